"""Prompt handling: A1111 attention weights, prompts past 77 tokens, clip_skip and `enhance_prompt`."""

from __future__ import annotations

import re

import torch

# `enhance_prompt` (ModelsLab flag, reference §1.11). These exact strings are the documented
# behaviour: the terms are appended to the prompt and the negative is put before the user's own
# negative prompt; meta shows the resulting (effective) prompts.
ENHANCE_SUFFIX = "ultra realistic, highly detailed, sharp focus, 8k"
ENHANCE_NEGATIVE = "lowres, bad anatomy, blurry, watermark, text, deformed"

# A1111's `parse_prompt_attention` tokenizer and BREAK splitter, verbatim.
_ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:"
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)
_BREAK = ("BREAK", -1.0)  # how A1111 marks BREAK in the parsed list
_ROUND, _SQUARE = 1.1, 1 / 1.1
_COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
_MEAN_FLOOR = 1e-4  # means below this fraction of the mean magnitude are treated as zero


def enhance_prompt(prompt: str, negative_prompt: str) -> tuple[str, str]:
    """The prompts the `enhance_prompt` flag asks for: quality terms after, default negative before."""
    head = prompt.rstrip(" ,")
    negative = negative_prompt.strip(" ,")
    return (
        f"{head}, {ENHANCE_SUFFIX}" if head else ENHANCE_SUFFIX,
        f"{ENHANCE_NEGATIVE}, {negative}" if negative else ENHANCE_NEGATIVE,
    )


def parse_weighted(prompt: str) -> list[tuple[str, float]]:
    """Fragments and weights, as AUTOMATIC1111's `parse_prompt_attention`.

    `(a:1.3)` sets a weight, `(a)` multiplies by 1.1, `[a]` divides by 1.1, they nest, `\\(` etc.
    are literal, unclosed brackets run to the end, and `BREAK` comes back as ("BREAK", -1.0).
    Two deliberate differences, both where A1111 misbehaves: a BREAK inside brackets still breaks
    (A1111 multiplies its marker and encodes the word), and a malformed weight such as `(a:1.2.3)`
    closes like `)` (A1111 raises).
    """
    res: list[list | None] = []  # [text, weight], or None for BREAK
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            if item is not None:
                item[1] *= factor

    for match in _ATTENTION.finditer(prompt):
        text, weight = match.group(0), _number(match.group(1))
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_open.append(len(res))
        elif text == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), weight)
        elif (text == ")" or match.group(1) is not None) and round_open:
            multiply(round_open.pop(), _ROUND)
        elif text == "]" and square_open:
            multiply(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(text)):
                if i > 0:
                    res.append(None)
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, _ROUND)
    for start in square_open:
        multiply(start, _SQUARE)

    merged: list[tuple[str, float]] = []
    for item in res or [["", 1.0]]:
        if item is None:
            merged.append(_BREAK)
        elif merged and merged[-1] is not _BREAK and merged[-1][1] == item[1]:
            merged[-1] = (merged[-1][0] + item[0], item[1])  # A1111 merges runs of equal weight
        else:
            merged.append((item[0], item[1]))
    return merged


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def encode_prompts(
    pipe, prompts: list[str], negative_prompts: list[str], clip_skip: int | None = None
) -> dict[str, torch.Tensor]:
    """Keyword arguments for an SD / SDXL pipeline call in place of `prompt`/`negative_prompt`.

    One entry per sample in each list. Prompts are cut A1111-style into 75-token chunks, each
    encoded between BOS and EOS and concatenated; positive and negative get the same number of
    chunks. `clip_skip` counts layers as A1111 and ModelsLab do (1 = last, 2 = penultimate; diffusers'
    own argument is this minus one) and, as in A1111, applies to the negative prompt too. SDXL reads
    the penultimate layer (moved back by clip_skip - 1) and, like diffusers and A1111, zeroes the
    negative embeddings of samples whose negative prompt is empty.
    """
    if len(prompts) != len(negative_prompts):
        raise ValueError("prompts and negative_prompts must have one entry per sample")
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if sdxl:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    pairs = [(tok, enc) for tok, enc in pairs if enc is not None]
    device = pipe._execution_device
    texts = list(prompts) + list(negative_prompts)
    with torch.no_grad():
        chunked = [[_chunks(pipe, tok, text) for text in texts] for tok, _ in pairs]
        # every sample, both halves and both encoders end up with the same sequence length
        n_chunks = max(len(c) for per_text in chunked for c in per_text)
        halves = {}
        for name, rows in (
            ("prompt", slice(0, len(prompts))),
            ("negative", slice(len(prompts), None)),
        ):
            embeds, pooled = [], None
            for (tok, enc), per_text in zip(pairs, chunked, strict=True):
                hidden, pooled = _encode(
                    enc, tok, per_text[rows], n_chunks, clip_skip, sdxl, device
                )
                embeds.append(hidden.to(device))
            halves[name] = (torch.cat(embeds, dim=-1).to(pairs[-1][1].dtype), pooled)

    out = {"prompt_embeds": halves["prompt"][0], "negative_prompt_embeds": halves["negative"][0]}
    if sdxl:
        negative, negative_pooled = halves["negative"]
        if pipe.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([n == "" for n in negative_prompts], device=negative.device)
            negative = torch.where(empty[:, None, None], 0, negative)
            negative_pooled = torch.where(empty[:, None], 0, negative_pooled)
        out.update(
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=halves["prompt"][1],
            negative_pooled_prompt_embeds=negative_pooled,
        )
    return out


def _chunks(pipe, tokenizer, prompt: str) -> list[tuple[list[int], list[float]]]:
    """Token ids and weights in chunks of at most 75, split as A1111's `tokenize_line` does."""
    size = tokenizer.model_max_length - 2
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    comma = None if comma == tokenizer.unk_token_id else comma  # a vocabulary without one
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for fragment, weight in parse_weighted(prompt):
        if (fragment, weight) == _BREAK:  # A1111 checks the values too
            close()
            continue
        if hasattr(pipe, "maybe_convert_prompt"):  # multi-vector textual inversion tokens
            fragment = pipe.maybe_convert_prompt(fragment, tokenizer)
        for token in tokenizer(fragment, add_special_tokens=False, verbose=False).input_ids:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == size and last_comma != -1 and size - last_comma <= _COMMA_BACKTRACK:
                # A1111 moves the words after a nearby comma to the next chunk, so a phrase
                # is not cut in two by the 75-token boundary
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved
            if len(ids) == size:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def _encode(
    encoder,
    tokenizer,
    chunked: list[list[tuple[list[int], list[float]]]],
    n_chunks: int,
    clip_skip: int | None,
    sdxl: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[batch, 77 * n_chunks, dim] weighted embeddings and the pooled output of the first chunk."""
    length = tokenizer.model_max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    skip = min(max(clip_skip or 1, 1), encoder.config.num_hidden_layers)  # 1 = last layer
    sequences, pooled = [], None
    for index in range(n_chunks):
        ids, weights = [], []
        for chunks in chunked:  # samples short of chunks get empty ones, as A1111 pads them
            chunk_ids, chunk_weights = chunks[index] if index < len(chunks) else ([], [])
            row = [tokenizer.bos_token_id, *chunk_ids, tokenizer.eos_token_id]
            ids.append(row + [pad] * (length - len(row)))
            weights.append([1.0, *chunk_weights] + [1.0] * (length - len(row) + 1))
        ids_t = torch.tensor(ids, device=device)
        if sdxl:
            # diffusers: the penultimate layer, and clip_skip - 1 further back
            output = encoder(ids_t, output_hidden_states=True)
            hidden = output.hidden_states[-(skip + 1)]
            if index == 0 and output[0].ndim == 2:  # the projected pooled output (text_encoder_2)
                pooled = output[0]
        elif skip == 1:
            hidden = encoder(ids_t)[0]
        else:
            hidden = encoder(ids_t, output_hidden_states=True).hidden_states[-skip]
            # diffusers normalises the earlier layer as the last one is; transformers 5 keeps
            # final_layer_norm on the model itself, 4.x on `.text_model`
            hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
        sequences.append(_apply_weights(hidden, torch.tensor(weights, device=device)))
    return torch.cat(sequences, dim=1), pooled


def _apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis: scale each token, then restore the chunk's mean so overall strength holds.

    A1111 takes the mean over its whole batch; here it is per sample, so a sample's embeddings do
    not depend on what else is in the batch (the same when the batch repeats one prompt).
    """
    weights = weights.to(hidden.dtype)
    if torch.all(weights == 1):
        return hidden  # plain prompts stay bit-identical to diffusers
    scaled = hidden * weights.unsqueeze(-1)
    before = hidden.mean(dim=(1, 2), keepdim=True)
    after = scaled.mean(dim=(1, 2), keepdim=True)
    # A1111 divides by the new mean unchecked. Where a mean is ~0 next to the values themselves
    # (layer-normed outputs without bias) or the sign flips, the ratio is rounding noise that
    # would blow up or negate the embeddings, so such samples keep the plain scaling.
    floor = _MEAN_FLOOR * scaled.abs().mean(dim=(1, 2), keepdim=True)
    usable = (before * after > 0) & (before.abs() > floor) & (after.abs() > floor)
    return scaled * torch.where(usable, before / after, 1)
