"""Wire models of the model-management requests (load_model, load_model_v2, load_vae)."""

from __future__ import annotations

import re
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from sdserve.engine.assets import CATEGORIES
from sdserve.errors import ValidationFailed
from sdserve.schemas.coerce import Flag, Text
from sdserve.schemas.common import validation_error_map

_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_TRAINED_ID = re.compile(r"^[A-Za-z0-9]{10}$")
_FORMATS = ("diffusers", "safetensors", "ckpt", "pt")
# load_model's `model_type` (enterprise v1) -> model_category
_MODEL_TYPES = {
    "huggingface": None,  # a pipeline; SD or SDXL told apart by the weights
    "api_trained": None,
    "custom_ckpt": None,
    "lora": "lora",
    "embeddings": "embeddings",
    "controlnet": "controlnet",
}


class LoadModelRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: Text = None
    model_id: Text = None
    force_load: Flag = None
    model_format: Text = None
    revision: Text = None
    model_category: Text = None
    model_type: Text = None
    from_safetensors: Flag = None
    model_visibility: Text = None
    model_name: Text = None
    webhook: Text = None
    track_id: Text = None
    config_model_id: Text = None  # sdserve: configs for a single file of non-standard sizes
    # load_vae
    vae_id: Text = None
    vae_url: Text = None
    vae_type: Text = None


class ImportRequest(BaseModel):
    """A checked import: what the job will do."""

    model_id: str
    source: str
    source_kind: Literal["url", "hub", "trained"]
    category: str
    category_known: bool  # False: SD or SDXL, told by the weights
    model_format: str | None
    revision: str | None
    replace: bool
    name: str
    visibility: str
    webhook: str | None
    track_id: str | None
    config_model_id: str | None = None


def parse_load_model(body: dict, vae: bool = False) -> ImportRequest:
    try:
        req = LoadModelRequest.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed(validation_error_map(exc)) from None
    errors: dict[str, list[str]] = {}
    if vae:
        model_id, url = req.vae_id or req.model_id, req.vae_url or req.url
        category, known = "vae", True
        fmt = _lower(req.vae_type or req.model_format)
        id_field, url_field = "vae_id", "vae_url"
    else:
        model_id, url = req.model_id, req.url
        id_field, url_field = "model_id", "url"
        fmt = _lower(req.model_format)
        category, known = _category(req, errors)
    if not model_id:
        errors[id_field] = [f"The {id_field} field is required."]
    if not url:
        errors[url_field] = [f"The {url_field} field is required."]
    if req.from_safetensors and fmt is None:
        fmt = "safetensors"
    if fmt is not None and fmt not in _FORMATS:
        errors["model_format"] = [f"The model_format must be one of: {', '.join(_FORMATS)}."]
    revision = _lower(req.revision)
    if revision not in (None, "fp16", "fp32"):
        errors["revision"] = ["The revision must be fp16 or fp32."]
    visibility = _lower(req.model_visibility) or "public"
    if visibility not in ("public", "private"):
        errors["model_visibility"] = ["The model_visibility must be public or private."]
    source_kind = None
    if url:
        source_kind, url = _source_kind(url, fmt)
        if source_kind is None:
            errors[url_field] = [
                f"The {url_field} must be an http(s) URL to a .safetensors/.ckpt file, a Hugging "
                "Face repo id (owner/name) or the id of a model trained on this server."
            ]
    if errors:
        raise ValidationFailed(errors)
    return ImportRequest(
        model_id=model_id,
        source=url,
        source_kind=source_kind,
        category=category,
        category_known=known,
        model_format=fmt,
        revision=revision,
        replace=bool(req.force_load),
        name=req.model_name or model_id,
        visibility=visibility,
        webhook=req.webhook,
        track_id=req.track_id,
        config_model_id=req.config_model_id,
    )


def _category(req: LoadModelRequest, errors: dict) -> tuple[str, bool]:
    if req.model_category:
        category = req.model_category.strip().lower()
        if category not in CATEGORIES:
            errors["model_category"] = [
                f"The model_category must be one of: {', '.join(CATEGORIES)}."
            ]
        return category, True
    if req.model_type:
        model_type = req.model_type.strip().lower()
        if model_type not in _MODEL_TYPES:
            errors["model_type"] = [f"The model_type must be one of: {', '.join(_MODEL_TYPES)}."]
        elif _MODEL_TYPES[model_type]:
            return _MODEL_TYPES[model_type], True
    return "stable_diffusion", False


def _source_kind(url: str, fmt: str | None) -> tuple[str | None, str]:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError):
            return "url", url  # refused with a clear reason when checked
        parts = [p for p in parsed.path.split("/") if p]
        # https://huggingface.co/owner/name (no file): the repo itself
        if parsed.host in ("huggingface.co", "hf.co") and len(parts) == 2 and "." not in parts[1]:
            return "hub", "/".join(parts)
        return "url", url
    if _TRAINED_ID.match(url):
        return "trained", url
    if _HUB_REPO.match(url) and ".." not in url:
        return "hub", url
    return None, url


def _lower(value: str | None) -> str | None:
    return value.strip().lower() if value else None
