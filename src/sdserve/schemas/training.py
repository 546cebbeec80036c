"""Wire schemas for training (§4, §10): LoRA, Dreambooth v1 / v2 and the sandbox."""

from __future__ import annotations

import re
import secrets
import string
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from sdserve.engine.training import TrainingKind, TrainingParams
from sdserve.errors import ValidationFailed
from sdserve.net import url_field_errors
from sdserve.schemas.coerce import Flag, Int, Text
from sdserve.schemas.common import validation_error_map
from sdserve.settings import Settings

TRAINING_TYPES = ("men", "female", "women", "couple", "null")
# Reference §4.2: learning rates are strings like "1e-6", mantissa 1-6, exponent 0-10.
_LEARNING_RATE = re.compile(r"^[1-6]e-(?:[0-9]|10)$")
# Per training_type: how the class prompt reads when none is given (§4.0 presets).
_CLASS_PROMPTS = {
    "men": "photo of a man",
    "female": "photo of a woman",
    "women": "photo of a woman",
    "couple": "photo of a couple",
    "null": "photo",
}


class TrainingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key: Text = None
    instance_prompt: Text = None
    class_prompt: Text = None
    base_model_type: Text = None
    base_model_id: Text = None
    negative_prompt: Text = None
    images: Any = None
    seed: Int = None
    training_type: Text = None
    lora_type: Text = None
    max_train_steps: Int = None
    learning_rate_unet: Text = None
    steps_unet: Int = None
    learning_rate_text_encoder: Text = None
    steps_text_encoder: Int = None
    train_text_encoder: Flag = None
    webhook: Text = None

    @field_validator("images", mode="before")
    @classmethod
    def _image_list(cls, value: Any) -> list[str] | None:
        if value is None or value == "":
            return None
        if isinstance(value, str):
            # a comma list of URLs; base64 never contains commas except after a data-URL header
            return (
                [value]
                if value.startswith("data:")
                else [v.strip() for v in value.split(",") if v.strip()]
            )
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ValueError("images must be a list of URLs or base64 strings")


def new_training_id() -> str:
    """10 characters, letters and digits, as the hosted API's ids look (`F5jvdzGnYi`)."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(10))


def parse_training_request(body: dict) -> TrainingRequest:
    try:
        return TrainingRequest.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed(validation_error_map(exc)) from None


def _learning_rate(name: str, value: str | None, default: float, errors: dict) -> float:
    if value is None:
        return default
    text = value.strip().lower()
    if not _LEARNING_RATE.match(text):
        errors[name] = [
            f"The {name} must be one of 1e-0 ... 6e-10 (a digit 1-6, then e-0 to e-10)."
        ]
        return default
    return float(text)


def normalize_training_request(
    req: TrainingRequest,
    kind: TrainingKind,
    settings: Settings,
    *,
    base_model_id: str,
    lycoris_default: str = "loha",
) -> TrainingParams:
    errors: dict[str, list[str]] = {}
    if not req.instance_prompt or not req.instance_prompt.strip():
        errors["instance_prompt"] = ["The instance prompt field is required."]
    training_type = (req.training_type or "null").strip().lower()
    if training_type not in TRAINING_TYPES:
        errors["training_type"] = [
            f"The training type must be one of: {', '.join(TRAINING_TYPES)}."
        ]
    images = req.images or []
    if len(images) < settings.min_train_images:
        errors["images"] = [
            f"At least {settings.min_train_images} images are required, got {len(images)}."
        ]
    elif len(images) > settings.max_train_images:
        errors["images"] = [f"At most {settings.max_train_images} images are allowed."]

    default_steps = 2 * max(len(images), 1) * (50 if kind == "dreambooth" else 25)
    steps = req.max_train_steps if req.max_train_steps is not None else req.steps_unet
    steps = min(default_steps, settings.max_train_steps) if steps is None else steps
    if not 1 <= steps <= settings.max_train_steps:
        errors["max_train_steps"] = [
            f"The max train steps must be between 1 and {settings.max_train_steps}."
        ]
    text_steps = 0 if req.steps_text_encoder is None else req.steps_text_encoder
    if not 0 <= text_steps <= settings.max_train_steps:
        errors["steps_text_encoder"] = [
            f"The steps text encoder must be between 0 and {settings.max_train_steps}."
        ]

    default_lr = 1e-4 if kind == "lora" else 5e-6
    lr_unet = _learning_rate("learning_rate_unet", req.learning_rate_unet, default_lr, errors)
    lr_text = _learning_rate(
        "learning_rate_text_encoder", req.learning_rate_text_encoder, default_lr, errors
    )

    lora_type = (req.lora_type or "lora").strip().lower()
    if lora_type == "lycoris":
        lora_type = lycoris_default
    if lora_type not in ("lora", "loha", "lokr"):
        errors["lora_type"] = ["The lora type must be lora or lycoris."]
    errors.update(url_field_errors(req.webhook, settings, "webhook"))
    if errors:
        raise ValidationFailed(errors)

    return TrainingParams(
        training_id=new_training_id(),
        kind=kind,
        base_model_id=base_model_id,
        instance_prompt=req.instance_prompt.strip(),
        class_prompt=(req.class_prompt or _CLASS_PROMPTS[training_type]).strip(),
        negative_prompt=req.negative_prompt or "",
        training_type=training_type,
        lora_type=lora_type,
        train_text_encoder=bool(req.train_text_encoder) or text_steps > 0,
        max_train_steps=steps,
        learning_rate_unet=lr_unet,
        learning_rate_text_encoder=lr_text,
        steps_text_encoder=min(text_steps, steps)
        if text_steps
        else (steps if req.train_text_encoder else 0),
        seed=req.seed or 0,
        prior_preservation=kind == "dreambooth",
        webhook=req.webhook,
    )
