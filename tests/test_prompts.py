"""Prompt handling: A1111 attention parsing, chunked long prompts, weights, clip_skip, enhance_prompt."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sdserve.engine.prompts import (
    ENHANCE_NEGATIVE,
    ENHANCE_SUFFIX,
    encode_prompts,
    enhance_prompt,
    parse_weighted,
)
from sdserve.engine.tiny import ensure_tiny_model

BREAK = ("BREAK", -1.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd = StableDiffusionPipeline.from_pretrained(ensure_tiny_model("tiny-sd", root))
    sdxl = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model("tiny-sdxl", root))
    for pipe in (sd, sdxl):
        pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(sd=sd, sdxl=sdxl)


def _diffusers(pipe, prompts, negatives, clip_skip=None):
    with torch.no_grad():
        return pipe.encode_prompt(
            prompt=prompts,
            device=torch.device("cpu"),
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negatives,
            clip_skip=clip_skip,
        )


def _positive(pipe, prompt, clip_skip=None):
    return encode_prompts(pipe, [prompt], ["x"], clip_skip)["prompt_embeds"]


# --- parser: expected values are A1111's parse_prompt_attention outputs -------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("", [("", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("((word))", [("word", 1.21)]),
        ("(((word)))", [("word", 1.331)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.21)]),
        ("a (word:1.3) b", [("a ", 1.0), ("word", 1.3), (" b", 1.0)]),
        ("(word: 0.5 )", [("word", 0.5)]),
        ("((word:1.5))", [("word", 1.65)]),
        ("([word])", [("word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("[unbalanced", [("unbalanced", 1 / 1.1)]),
        ("a ] b ) c", [("a ] b ) c", 1.0)]),
        ("ratio 16:9", [("ratio 16:9", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("\\(a\\) \\[b\\]", [("(a) [b]", 1.0)]),
        ("(\\(x\\))", [("(x)", 1.1)]),
        ("back\\\\slash", [("back\\slash", 1.0)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a, BREAK, b", [("a,", 1.0), BREAK, (", b", 1.0)]),
        ("BREAKFAST", [("BREAKFAST", 1.0)]),
        ("a BREAK (b:1.2)", [("a", 1.0), BREAK, ("", 1.0), ("b", 1.2)]),
        # differences on purpose (A1111 encodes a weird "BREAK" token / raises here)
        ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
        ("(a:1.2.3) b", [("a", 1.1), (" b", 1.0)]),
    ],
)
def test_parse_weighted_matches_a1111(prompt, expected):
    parsed = parse_weighted(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


# --- plain prompts are exactly diffusers' ------------------------------------------------------


def test_plain_prompts_equal_diffusers_sd(models):
    prompts, negatives = ["a red fox in snow", "a cat"], ["blurry, lowres", ""]
    ours = encode_prompts(models.sd, prompts, negatives)
    positive, negative = _diffusers(models.sd, prompts, negatives)
    assert torch.equal(ours["prompt_embeds"], positive)
    assert torch.equal(ours["negative_prompt_embeds"], negative)
    assert set(ours) == {"prompt_embeds", "negative_prompt_embeds"}


def test_plain_prompts_equal_diffusers_sdxl(models):
    prompts, negatives = ["a red fox in snow", "a cat"], ["blurry, lowres", "ugly"]
    ours = encode_prompts(models.sdxl, prompts, negatives)
    theirs = _diffusers(models.sdxl, prompts, negatives)
    names = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    assert set(ours) == set(names)
    for name, expected in zip(names, theirs, strict=True):
        assert torch.equal(ours[name], expected), name


def test_sdxl_empty_negative_is_zeros_as_in_diffusers(models):
    ours = encode_prompts(models.sdxl, ["a cat"], [""])
    _, zeros, _, zeros_pooled = _diffusers(models.sdxl, ["a cat"], None)
    assert torch.equal(ours["negative_prompt_embeds"], zeros)
    assert torch.equal(ours["negative_pooled_prompt_embeds"], zeros_pooled)
    # per sample: only the samples whose negative prompt is empty
    mixed = encode_prompts(models.sdxl, ["a cat", "a dog"], ["", "blurry"])
    _, blurry, _, blurry_pooled = _diffusers(models.sdxl, ["a dog"], ["blurry"])
    assert not mixed["negative_prompt_embeds"][0].any()
    assert not mixed["negative_pooled_prompt_embeds"][0].any()
    # (batch size changes the last bits of the projection, hence close rather than equal)
    torch.testing.assert_close(mixed["negative_prompt_embeds"][1:], blurry)
    torch.testing.assert_close(mixed["negative_pooled_prompt_embeds"][1:], blurry_pooled)


# --- long prompts -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_long_prompt_gives_longer_sequence_and_runs(models, kind):
    pipe = getattr(models, kind)
    long_prompt = "a red fox " + ", ".join(["in a snowy forest at dawn"] * 6)  # ~120 tokens
    assert len(pipe.tokenizer(long_prompt).input_ids) > 77
    embeds = encode_prompts(pipe, [long_prompt], ["blurry"])
    assert embeds["prompt_embeds"].shape[1] == 2 * 77
    # the negative is padded with empty chunks to the same length
    assert embeds["negative_prompt_embeds"].shape == embeds["prompt_embeds"].shape
    # the words past 77 tokens count
    tail = encode_prompts(pipe, [long_prompt + ", purple"], ["blurry"])["prompt_embeds"]
    assert torch.equal(tail[:, :77], embeds["prompt_embeds"][:, :77])
    assert not torch.equal(tail[:, 77:], embeds["prompt_embeds"][:, 77:])

    image = pipe(
        **embeds,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()


def test_chunks_split_at_break_and_after_a_nearby_comma(models):
    pipe = models.sd
    both = _positive(pipe, "a cat BREAK a dog")
    assert both.shape[1] == 2 * 77
    assert torch.equal(both[:, :77], _positive(pipe, "a cat"))
    assert torch.equal(both[:, 77:], _positive(pipe, "a dog"))

    # 71 tokens up to the comma, then 10: A1111 starts the second chunk after the comma
    # rather than at token 75 (the tiny tokenizer has one token per character)
    head, tail = "a" * 70 + ",", "b" * 10
    split = _positive(pipe, f"{head} {tail}")
    assert torch.equal(split[:, :77], _positive(pipe, head))
    assert torch.equal(split[:, 77:], _positive(pipe, tail))


def test_batch_pads_shorter_samples_with_empty_chunks(models):
    long_prompt = "x" * 100
    batch = encode_prompts(models.sd, [long_prompt, "a cat"], ["", ""])["prompt_embeds"]
    alone = encode_prompts(models.sd, ["a cat"], [long_prompt])["prompt_embeds"]
    assert batch.shape[1] == alone.shape[1] == 2 * 77
    torch.testing.assert_close(batch[1], alone[0])


# --- weights ------------------------------------------------------------------------------------


def _cat_weights(weight: float) -> torch.Tensor:
    # BOS, "a", then the three tokens of "cat" (one per character in the tiny tokenizer)
    weights = torch.ones(77)
    weights[2:5] = weight
    return weights[:, None]


def test_weights_scale_tokens_then_restore_mean_as_a1111(models):
    pipe = models.sd
    # The tiny encoder's final layer norm has no bias, so its outputs average ~0, unlike CLIP's;
    # give it one for this test so A1111's mean restoration has a mean to restore.
    bias = pipe.text_encoder.final_layer_norm.bias
    with torch.no_grad():
        bias.add_(0.25)
    try:
        plain = _positive(pipe, "a cat dog")
        weighted = _positive(pipe, "a (cat:1.5) dog")
        assert torch.equal(_positive(pipe, "a (cat:1) dog"), plain)
    finally:
        with torch.no_grad():
            bias.sub_(0.25)
    scaled = plain * _cat_weights(1.5)
    torch.testing.assert_close(weighted, scaled * plain.mean() / scaled.mean())
    ratio = weighted[0] / plain[0]
    torch.testing.assert_close(ratio[2:5], 1.5 * ratio[:1].expand(3, -1))
    assert torch.allclose(ratio[0], ratio[10])  # every other token by the same factor


def test_weights_without_a_usable_mean_only_scale(models):
    # the tiny encoder's means are rounding noise: dividing by them would negate or blow up
    pipe = models.sd
    plain = _positive(pipe, "a cat dog")
    torch.testing.assert_close(_positive(pipe, "a (cat:1.5) dog"), plain * _cat_weights(1.5))
    torch.testing.assert_close(_positive(pipe, "a [cat] dog"), plain * _cat_weights(1 / 1.1))
    torch.testing.assert_close(
        _positive(pipe, "a ((cat)) dog"), _positive(pipe, "a (cat:1.21) dog")
    )


def test_weights_are_per_sample(models):
    pipe = models.sdxl  # its (un-normed) hidden states have real means to restore
    batch = encode_prompts(pipe, ["a (cat:1.4)", "a dog"], ["[ugly]", ""])
    alone = encode_prompts(pipe, ["a (cat:1.4)"], ["[ugly]"])
    plain = encode_prompts(pipe, ["a dog"], [""])
    # A1111 restores the mean over the whole batch, which would mix the samples
    torch.testing.assert_close(batch["prompt_embeds"][:1], alone["prompt_embeds"])
    torch.testing.assert_close(batch["negative_prompt_embeds"][:1], alone["negative_prompt_embeds"])
    torch.testing.assert_close(batch["prompt_embeds"][1:], plain["prompt_embeds"])


def test_weights_change_sdxl_embeddings(models):
    plain = encode_prompts(models.sdxl, ["a cat dog"], ["x"])
    weighted = encode_prompts(models.sdxl, ["a (cat:1.5) dog"], ["x"])
    assert not torch.equal(plain["prompt_embeds"], weighted["prompt_embeds"])
    # A1111 weights the token embeddings only, not the pooled one
    assert torch.equal(plain["pooled_prompt_embeds"], weighted["pooled_prompt_embeds"])


# --- clip_skip ----------------------------------------------------------------------------------


def test_clip_skip_sd_matches_diffusers_offset(models, monkeypatch):
    pipe = models.sd
    prompt = "a red fox in snow"
    last = _positive(pipe, prompt)
    assert torch.equal(_positive(pipe, prompt, clip_skip=1), last)
    skipped = _positive(pipe, prompt, clip_skip=2)
    assert not torch.equal(skipped, last)

    # diffusers 0.42 reaches for `text_encoder.text_model`, which transformers 5 no longer has
    encoder = pipe.text_encoder
    if not hasattr(encoder, "text_model"):
        monkeypatch.setattr(
            encoder,
            "text_model",
            SimpleNamespace(final_layer_norm=encoder.final_layer_norm),
            raising=False,
        )
    expected, _ = _diffusers(pipe, [prompt], ["x"], clip_skip=1)  # diffusers counts skipped layers
    assert torch.equal(skipped, expected)

    # unlike diffusers' encode_prompt, and as A1111, the negative prompt is skipped too
    negative = encode_prompts(pipe, [prompt], [prompt], clip_skip=2)["negative_prompt_embeds"]
    assert torch.equal(negative, skipped)
    # out-of-range values are clamped to the layers there are
    deepest = _positive(pipe, prompt, clip_skip=pipe.text_encoder.config.num_hidden_layers)
    assert torch.equal(_positive(pipe, prompt, clip_skip=99), deepest)


def test_clip_skip_sdxl_matches_diffusers_offset(models):
    pipe = models.sdxl
    prompt = "a red fox in snow"
    default = encode_prompts(pipe, [prompt], ["x"])
    assert torch.equal(
        encode_prompts(pipe, [prompt], ["x"], 1)["prompt_embeds"], default["prompt_embeds"]
    )
    skipped = encode_prompts(pipe, [prompt], ["x"], clip_skip=2)
    assert not torch.equal(skipped["prompt_embeds"], default["prompt_embeds"])
    positive, _, pooled, _ = _diffusers(pipe, [prompt], ["x"], clip_skip=1)
    assert torch.equal(skipped["prompt_embeds"], positive)
    assert torch.equal(skipped["pooled_prompt_embeds"], pooled)


# --- enhance_prompt -----------------------------------------------------------------------------


def test_enhance_prompt_appends_documented_strings():
    assert enhance_prompt("a red fox", "") == (f"a red fox, {ENHANCE_SUFFIX}", ENHANCE_NEGATIVE)
    assert enhance_prompt("a red fox, ", "cartoon") == (
        f"a red fox, {ENHANCE_SUFFIX}",
        f"{ENHANCE_NEGATIVE}, cartoon",
    )
    assert enhance_prompt("", "") == (ENHANCE_SUFFIX, ENHANCE_NEGATIVE)
