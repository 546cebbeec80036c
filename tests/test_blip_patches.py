"""The transformers-5 patches of diffusers' BLIP-Diffusion Q-Former: still needed, still written
against the upstream code they replace, and working. When this fails, upstream changed: re-check
`sdserve/engine/blip_patches.py` and drop what is no longer needed."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.deprecated.blip_diffusion import Blip2QFormerModel

from sdserve.engine import blip_diffusion, blip_patches


def test_upstream_still_needs_the_patches():
    assert blip_patches.needs_patches(), "transformers has the Q-Former's APIs again"


def test_the_patched_layer_is_the_one_upstream_ships():
    assert (
        blip_patches.upstream_layer_forward_sha256() == blip_patches.UPSTREAM_LAYER_FORWARD_SHA256
    )


def test_the_patched_qformer_embeds_a_reference_image(tmp_path):
    folder = blip_diffusion.ensure_tiny(tmp_path / "models")
    blip_patches.apply()
    qformer = Blip2QFormerModel.from_pretrained(
        folder / "qformer", tokenizer=str(folder / "qformer_tokenizer")
    )
    images = [np.full((56, 56, 3), value, np.float32) for value in (-0.8, 0.6)]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # normalised RGB, 56 px
    with torch.no_grad():
        embeds = qformer(image_input=pixels, text_input=["dog", "dog"], return_dict=False)
    assert embeds.shape == (2, qformer.config.num_query_tokens, 16)
    assert torch.isfinite(embeds).all()
    assert not torch.allclose(embeds[0], embeds[1])  # the image reaches the embedding
