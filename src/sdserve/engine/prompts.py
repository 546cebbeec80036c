"""Prompt handling: A1111 attention weights, prompts past 77 tokens, clip_skip, `enhance_prompt`.

Plain prompts (no weights, at most 75 tokens) give exactly the embeddings of diffusers' own
`encode_prompt`, so this module only changes what the syntax asks for.
"""

from __future__ import annotations

import re

import torch

# `enhance_prompt` (reference §1.11): quality terms appended to the prompt, and a default
# negative prepended to the user's. Shown in meta as the effective prompt.
ENHANCE_SUFFIX = ", ultra realistic, highly detailed, sharp focus, 8k"
ENHANCE_NEGATIVE = "lowres, bad anatomy, blurry, watermark, text, deformed"

_CHUNK = 75  # tokens per CLIP window, between BOS and EOS
_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = "BREAK"


def enhance_prompt(prompt: str, negative_prompt: str) -> tuple[str, str]:
    negative = f"{ENHANCE_NEGATIVE}, {negative_prompt}" if negative_prompt else ENHANCE_NEGATIVE
    return prompt + ENHANCE_SUFFIX, negative


def parse_weighted(text: str) -> list[tuple[str, float]]:
    """AUTOMATIC1111's `parse_prompt_attention`: `(a:1.3)`, `(a)` x1.1, `[a]` /1.1, escapes, BREAK.

    BREAK comes back as the fragment ("BREAK", -1).
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append([BREAK, -1])
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1] and item[1] != -1:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(text_, weight) for text_, weight in merged]


def _tokens_and_weights(pipe, tokenizer, prompt: str) -> list[list[tuple[int, float]]]:
    """Token ids with weights, cut into chunks of at most 75 (BREAK forces a new chunk)."""
    chunks: list[list[tuple[int, float]]] = [[]]
    for fragment, weight in parse_weighted(prompt):
        if weight == -1:  # BREAK
            if chunks[-1]:
                chunks.append([])
            continue
        if hasattr(pipe, "maybe_convert_prompt"):  # multi-vector textual inversion tokens
            fragment = pipe.maybe_convert_prompt(fragment, tokenizer)
        for token in tokenizer(fragment, add_special_tokens=False, verbose=False).input_ids:
            if len(chunks[-1]) == _CHUNK:
                chunks.append([])
            chunks[-1].append((token, weight))
    return chunks


def _chunk_ids(tokenizer, chunk: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    length = _CHUNK + 2
    ids = [tokenizer.bos_token_id] + [t for t, _ in chunk] + [tokenizer.eos_token_id]
    weights = [1.0] + [w for _, w in chunk] + [1.0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ids + [pad] * (length - len(ids)), weights + [1.0] * (length - len(weights))


def _encode_chunks(
    text_encoder, tokenizer, all_chunks: list[list[list[tuple[int, float]]]], layer, pooled: bool
):
    """Embeddings [batch, 77 * chunks, dim] with A1111 weighting; pooled output of chunk 0."""
    n_chunks = max(len(chunks) for chunks in all_chunks)
    device = text_encoder.device
    sequences, pooled_out = [], None
    for index in range(n_chunks):
        ids, weights = zip(
            *[_chunk_ids(tokenizer, c[index] if index < len(c) else []) for c in all_chunks],
            strict=True,
        )
        ids_t = torch.tensor(ids, device=device)
        output = text_encoder(ids_t, output_hidden_states=True)
        hidden = layer(text_encoder, output)
        if pooled and index == 0:
            pooled_out = output[0]
        weights_t = torch.tensor(weights, device=device, dtype=hidden.dtype)
        if not torch.all(weights_t == 1):
            # A1111: scale each token, then restore the chunk's mean so overall strength holds.
            mean_before = hidden.mean()
            hidden = hidden * weights_t.unsqueeze(-1)
            hidden = hidden * (mean_before / hidden.mean())
        sequences.append(hidden)
    return torch.cat(sequences, dim=1), pooled_out


def _sd_layer(clip_skip: int | None):
    """SD 1.x/2.x: the last layer, or the layer clip_skip-1 from the end, layer-normed (as diffusers)."""

    def layer(text_encoder, output):
        if not clip_skip or clip_skip <= 1:
            return output[0]
        hidden = output.hidden_states[-clip_skip]
        # transformers 5 puts final_layer_norm on the model itself, 4.x on `.text_model`
        return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)

    return layer


def _sdxl_layer(clip_skip: int | None):
    """SDXL: the penultimate layer, moved further back by clip_skip-1 (as diffusers)."""

    def layer(_text_encoder, output):
        return output.hidden_states[-((clip_skip or 1) + 1)]

    return layer


def encode_prompts(
    pipe, prompts: list[str], negative_prompts: list[str], clip_skip: int | None = None
) -> dict[str, torch.Tensor]:
    """Pipeline-call kwargs (`prompt_embeds`, …) for one sample per list entry.

    `clip_skip` has the A1111/ModelsLab meaning: 1 = last layer, 2 = penultimate, …
    """
    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is not None:
            return _encode_sdxl(pipe, prompts, negative_prompts, clip_skip)
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        layer = _sd_layer(clip_skip)
        pos = [_tokens_and_weights(pipe, tokenizer, p) for p in prompts]
        neg = [_tokens_and_weights(pipe, tokenizer, n) for n in negative_prompts]
        n_chunks = max(len(c) for c in pos + neg)
        pos = [c + [[]] * (n_chunks - len(c)) for c in pos]
        neg = [c + [[]] * (n_chunks - len(c)) for c in neg]
        prompt_embeds, _ = _encode_chunks(encoder, tokenizer, pos, layer, pooled=False)
        negative_embeds, _ = _encode_chunks(encoder, tokenizer, neg, layer, pooled=False)
    return {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}


def _encode_sdxl(pipe, prompts, negative_prompts, clip_skip):
    layer = _sdxl_layer(clip_skip)
    encoders = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    encoders = [(t, e) for t, e in encoders if e is not None]
    tokenized = {
        id(t): [_tokens_and_weights(pipe, t, text) for text in prompts + negative_prompts]
        for t, _ in encoders
    }
    n_chunks = max(len(c) for chunks in tokenized.values() for c in chunks)

    def encode(start: int, stop: int):
        embeds, pooled = [], None
        for tokenizer, encoder in encoders:
            chunks = [c + [[]] * (n_chunks - len(c)) for c in tokenized[id(tokenizer)][start:stop]]
            hidden, pooled = _encode_chunks(encoder, tokenizer, chunks, layer, pooled=True)
            embeds.append(hidden)
        return torch.cat(embeds, dim=-1), pooled

    prompt_embeds, pooled = encode(0, len(prompts))
    if all(not n for n in negative_prompts) and pipe.config.get("force_zeros_for_empty_prompt"):
        # diffusers' SDXL convention: no negative prompt means zero embeddings.
        negative_embeds, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = encode(
            len(prompts), len(prompts) + len(negative_prompts)
        )
    return {
        "prompt_embeds": prompt_embeds,
        "negative_prompt_embeds": negative_embeds,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
    }
