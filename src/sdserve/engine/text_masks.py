"""Masks from text (interior `object_removal`'s `object_name`): CLIPSeg finds the named object.

With a built-in tiny base model a tiny random-weight CLIPSeg, built in code, stands in (the masks
it makes are arbitrary, the shapes are real); otherwise CLIPSeg's trained weights come from the
hub (`CIDAS/clipseg-rd64-refined`), downloaded once or found in the Hugging Face cache.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdserve.engine import tiny
from sdserve.errors import EngineError, ModelUnavailable

CLIPSEG_REPO = "CIDAS/clipseg-rd64-refined"
_THRESHOLD = 0.4  # of CLIPSeg's sigmoid: what it is fairly sure is the object
_TINY = "tiny-clipseg"


def clipseg_location(base_model_id: str, models_dir: Path) -> str:
    if base_model_id in tiny.TINY_MODELS:
        return str(ensure_tiny_clipseg(models_dir))
    return CLIPSEG_REPO


def check_clipseg_available(base_model_id: str, offline: bool) -> None:
    """ModelUnavailable at submit when the trained CLIPSeg is needed but cannot be had."""
    if base_model_id in tiny.TINY_MODELS or not offline:
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(CLIPSEG_REPO, "config.json"), str):
        raise ModelUnavailable(
            f"object_removal finds the object with CLIPSeg ({CLIPSEG_REPO} on the Hugging Face "
            "hub), which is not downloaded and this server is offline. On a machine with internet "
            f"access run `huggingface-cli download {CLIPSEG_REPO}`, or send a mask_image to "
            "/api/v6/image_editing/object_removal instead."
        )


@functools.lru_cache(maxsize=2)
def _segmenter(location: str):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    try:
        processor = CLIPSegProcessor.from_pretrained(location)
        model = CLIPSegForImageSegmentation.from_pretrained(location).eval()
    except Exception as exc:
        raise ModelUnavailable(f"CLIPSeg could not be loaded from {location}: {exc}") from exc
    return processor, model


def text_mask(object_name: str, image: Image.Image, base_model_id: str, models_dir: Path):
    """White where CLIPSeg sees `object_name` in `image` (grown a little, to cover its edges)."""
    from sdserve.extras import require

    cv2 = require("cv2", "object_removal")

    processor, model = _segmenter(clipseg_location(base_model_id, models_dir))
    inputs = processor(text=[object_name], images=[image.convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    probability = torch.sigmoid(logits.reshape(logits.shape[-2:])).numpy()
    mask = (probability > _THRESHOLD).astype(np.uint8) * 255
    mask = cv2.resize(mask, image.size, interpolation=cv2.INTER_NEAREST)
    grow = max(3, min(image.size) // 32) | 1
    mask = cv2.dilate(mask, np.ones((grow, grow), np.uint8))
    if not mask.any():
        raise EngineError(f"No {object_name} was found in the image: nothing was removed.")
    return Image.fromarray(mask, "L")


def _calibrate(model, processor) -> None:
    """Random weights find "the object" everywhere or nowhere; shift the output so that about a
    fifth of a test image is found, as for a real object."""
    ramp = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    inputs = processor(text=["object"], images=[Image.fromarray(ramp)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits.flatten()
        target = float(np.log(_THRESHOLD / (1 - _THRESHOLD)))
        model.decoder.transposed_convolution.bias -= float(torch.quantile(logits, 0.8)) - target


def ensure_tiny_clipseg(models_dir: Path) -> Path:
    """A CLIPSeg with CLIPSeg's real layout and tiny random weights, saved once (with its
    processor) like the other tiny models."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        ViTImageProcessor,
    )

    folder = models_dir / _TINY
    if (folder / "config.json").is_file():
        return folder

    def write(target: Path) -> None:
        tokenizer = tiny.write_char_tokenizer(target.parent / "tokenizer")
        vocab = len(tokenizer)
        config = CLIPSegConfig(
            text_config={
                "vocab_size": vocab,
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 77,
                "bos_token_id": vocab - 2,
                "eos_token_id": vocab - 1,
                "pad_token_id": vocab - 1,
            },
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "image_size": 64,
                "patch_size": 16,
            },
            projection_dim=32,
            reduce_dim=16,
            extract_layers=[1, 2],
            decoder_num_attention_heads=2,
            decoder_intermediate_size=32,
        )
        torch.manual_seed(0)
        model = CLIPSegForImageSegmentation(config)
        processor = CLIPSegProcessor(
            image_processor=ViTImageProcessor(
                size={"height": 64, "width": 64},
                image_mean=[0.485, 0.456, 0.406],
                image_std=[0.229, 0.224, 0.225],
            ),
            tokenizer=tokenizer,
        )
        _calibrate(model, processor)
        model.save_pretrained(target)
        processor.save_pretrained(target)

    return tiny.publish_once(folder, write)
