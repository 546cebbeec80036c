"""Patches that make diffusers' BlipDiffusion Q-Former run under transformers 5.

diffusers keeps BlipDiffusion under `pipelines/deprecated/`, and its `Blip2QFormerModel` still calls
what transformers 5 removed: `invert_attention_mask` and `get_head_mask` on the model, and the
old `Blip2QFormerAttention.forward(hidden, mask, head_mask, encoder_hidden, encoder_mask)` that
returned a tuple (now it takes keywords and returns one tensor). The patches below put the two
methods back and replace `Blip2QFormerLayer.forward` with one that calls the new attention.
State-dict names are unchanged, so the published checkpoints still load.

`tests/test_blip_patches.py` fails when upstream changes what is patched (the patched source, or
transformers growing the methods back): then re-check, and drop what is no longer needed.
"""

from __future__ import annotations

import hashlib
import inspect

import torch
from diffusers.pipelines.deprecated.blip_diffusion import modeling_blip2
from transformers.pytorch_utils import apply_chunking_to_forward

# sha256 of the upstream `Blip2QFormerLayer.forward` source these patches were written against
# (diffusers 0.42.1).
UPSTREAM_LAYER_FORWARD_SHA256 = "a46f4a40a650bd8218319fd325c4d35547d1af77b855d8ad3051870fa17f6a17"


def _invert_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
    """1 = attend, 0 = masked, as an additive mask broadcastable to (batch, heads, q, k)."""
    extended = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    extended = extended.to(self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
    # Head masks were removed from transformers 5's attention: none is ever applied.
    return [None] * num_hidden_layers if head_mask is None else head_mask


def _layer_forward(
    self,
    hidden_states,
    attention_mask=None,
    head_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    past_key_value=None,
    output_attentions=False,
    query_length=0,
):
    """Upstream's layer, calling transformers 5's attention (keywords in, one tensor out)."""
    attention_output = self.attention(hidden_states, attention_mask=attention_mask)
    if query_length > 0:
        query_output = attention_output[:, :query_length, :]
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states must be given for cross-attention layers")
            query_output = self.crossattention(
                query_output,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
            )
        layer_output = apply_chunking_to_forward(
            self.feed_forward_chunk_query,
            self.chunk_size_feed_forward,
            self.seq_len_dim,
            query_output,
        )
        if attention_output.shape[1] > query_length:
            text_output = apply_chunking_to_forward(
                self.feed_forward_chunk,
                self.chunk_size_feed_forward,
                self.seq_len_dim,
                attention_output[:, query_length:, :],
            )
            layer_output = torch.cat([layer_output, text_output], dim=1)
    else:
        layer_output = apply_chunking_to_forward(
            self.feed_forward_chunk,
            self.chunk_size_feed_forward,
            self.seq_len_dim,
            attention_output,
        )
    return (layer_output, None)


_UPSTREAM_LAYER_FORWARD = modeling_blip2.Blip2QFormerLayer.forward


def upstream_layer_forward_sha256() -> str:
    return hashlib.sha256(inspect.getsource(_UPSTREAM_LAYER_FORWARD).encode()).hexdigest()


def needs_patches() -> bool:
    """Whether transformers lacks what diffusers' Q-Former calls (true of transformers 5)."""
    model = modeling_blip2.Blip2PreTrainedModel
    return not (hasattr(model, "get_head_mask") and hasattr(model, "invert_attention_mask"))


def apply() -> None:
    """Patch diffusers' Q-Former in place, once; a no-op where transformers still has the APIs."""
    if not needs_patches():
        return
    qformer = modeling_blip2.Blip2QFormerModel
    qformer.invert_attention_mask = _invert_attention_mask
    qformer.get_head_mask = _get_head_mask
    modeling_blip2.Blip2QFormerLayer.forward = _layer_forward
