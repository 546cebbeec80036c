"""Built-in offline models: real diffusers SD / SDXL layouts with tiny, deterministic random weights.

They make noise, not pictures. They exist so the server, its tests and its quick start work with
no downloads; they are saved as ordinary diffusers folders and loaded by the same code as real
models.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    EulerDiscreteScheduler,
    MotionAdapter,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from sdserve.engine.availability import BUILTIN_MODELS

# Generation models (usable as model_id) and the motion adapter that animates tiny-sd.
TINY_MODELS = BUILTIN_MODELS
TINY_MOTION_ADAPTER = "tiny-motion-adapter"
TINY_UNET_CHANNELS = (32, 64)
_SEED = 0


def _bytes_to_unicode() -> dict[int, str]:
    # The byte-to-character table of CLIP's byte-level BPE (same as transformers').
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_char_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer with a byte-level vocabulary and no merges (one token per character)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        merges=[],
        pad_token=pad_token,
        model_max_length=77,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def _text_config(vocab_size: int, hidden_size: int = 32, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=4,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        **extra,
    )


def _calibrate(vae):
    """Set scaling_factor so image latents have unit variance, as SD's 0.18215 was chosen.

    With random weights the raw latents are ~25x smaller than SD's; unscaled, denoised latents
    would land far outside what the decoder ever sees and every output would look alike.
    """
    generator = torch.Generator().manual_seed(_SEED)
    images = torch.rand(8, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        std = vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1 / std, 5))
    return vae


def _vae() -> AutoencoderKL:
    # Four blocks, like SD's VAE, so latents are 1/8 of the image size as in real models.
    return _calibrate(
        AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
    )


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


def _build_tiny_sd(tmp: Path) -> StableDiffusionPipeline:
    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=TINY_UNET_CHANNELS,
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _vae()
    tokenizer = write_char_tokenizer(tmp / "tokenizer")
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_tiny_sdxl(tmp: Path) -> StableDiffusionXLPipeline:
    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 40,
        cross_attention_dim=32 + 40,
        norm_num_groups=32,
    )
    vae = _vae()
    tokenizer = write_char_tokenizer(tmp / "tokenizer")
    tokenizer_2 = write_char_tokenizer(tmp / "tokenizer_2", pad_token="!")
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), hidden_act="gelu", projection_dim=32))
    # A different width from the first encoder, as in real SDXL (768 vs 1280): single-file
    # loaders tell the two encoders apart by it.
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(len(tokenizer_2), hidden_act="gelu", projection_dim=40, hidden_size=40)
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=_scheduler(),
    )


def _build_tiny_t2v(tmp: Path) -> TextToVideoSDPipeline:
    """ModelScope / Zeroscope layout: a 3D UNet on SD's VAE and CLIP text encoder."""
    torch.manual_seed(_SEED)
    unet = UNet3DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    tokenizer = write_char_tokenizer(tmp / "tokenizer")
    return TextToVideoSDPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
        ),
    )


def _build_tiny_svd(_tmp: Path) -> StableVideoDiffusionPipeline:
    """Stable Video Diffusion layout: image-conditioned spatio-temporal UNet and temporal VAE."""
    torch.manual_seed(_SEED)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        projection_class_embeddings_input_dim=3 * 8,
        addition_time_embed_dim=8,
    )
    vae = _calibrate(
        AutoencoderKLTemporalDecoder(
            block_out_channels=(32, 32, 32, 32),  # its norm layers have 32 groups
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
        )
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,  # the pipeline resizes conditioning images to 224 itself
            intermediate_size=37,
            patch_size=32,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=True,
    )
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )


def _build_tiny_motion_adapter(_tmp: Path) -> MotionAdapter:
    """An AnimateDiff motion adapter shaped for tiny-sd's UNet."""
    torch.manual_seed(_SEED)
    return MotionAdapter(
        block_out_channels=TINY_UNET_CHANNELS,
        motion_layers_per_block=1,
        motion_norm_num_groups=32,
        motion_num_attention_heads=4,
        motion_max_seq_length=32,
    )


_BUILDERS = {
    "tiny-sd": _build_tiny_sd,
    "tiny-sdxl": _build_tiny_sdxl,
    "tiny-t2v": _build_tiny_t2v,
    "tiny-svd": _build_tiny_svd,
    TINY_MOTION_ADAPTER: _build_tiny_motion_adapter,
}


def publish_once(folder: Path, write: Callable[[Path], None]) -> Path:
    """Write a model folder with `write(target)` in a staging folder beside `folder`, then move it
    into place in one rename: readers never see half a model, and two workers building the same
    one at once both end with one whole copy. Returns `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(staging / "model")
        try:
            os.replace(staging / "model", folder)
        except OSError:
            if not folder.exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def ensure_tiny_model(model_id: str, models_dir: Path) -> Path:
    """Build the tiny model into `models_dir/model_id` once; return the diffusers folder."""
    folder = models_dir / model_id
    if (folder / "model_index.json").exists() or (folder / "config.json").exists():
        return folder

    def write(target: Path) -> None:
        pipe = _BUILDERS[model_id](target.parent / "tokenizers")
        pipe.save_pretrained(target, safe_serialization=True)

    return publish_once(folder, write)
