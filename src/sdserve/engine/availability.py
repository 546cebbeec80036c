"""Which models a server can name and whether each is ready, known without importing torch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from sdserve.engine.assets import Catalogue
from sdserve.settings import Settings

# Generation models built in code (usable as model_id); `sdserve.engine.tiny` builds them.
BUILTIN_MODELS = ("tiny-sd", "tiny-sdxl", "tiny-t2v", "tiny-svd")

# Public ids of the hosted API's catalogue that map to well-known hub repos.
HUB_CATALOGUE = {
    "sd-1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2.1": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "midjourney": "prompthero/openjourney",
    "openjourney": "prompthero/openjourney",
    "realistic-vision-v51": "SG161222/Realistic_Vision_V5.1_noVAE",
    "dreamshaper-8": "Lykon/dreamshaper-8",
    "zeroscope": "cerspense/zeroscope_v2_576w",
    "modelscope-t2v": "ali-vilab/text-to-video-ms-1.7b",
    "svd": "stabilityai/stable-video-diffusion-img2vid-xt",
}
# Pipeline family of catalogue hub ids, known without downloading anything.
HUB_FAMILIES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1": "sd2",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "prompthero/openjourney": "sd15",
    "SG161222/Realistic_Vision_V5.1_noVAE": "sd15",
    "Lykon/dreamshaper-8": "sd15",
    "cerspense/zeroscope_v2_576w": "t2v",
    "ali-vilab/text-to-video-ms-1.7b": "t2v",
    "stabilityai/stable-video-diffusion-img2vid-xt": "svd",
}
PIPELINE_CATEGORIES = ("stable_diffusion", "stable_diffusion_xl")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")

# ready: weights are here (built in, imported, on disk, or in the Hugging Face cache);
# downloadable: a hub model the first request downloads; unavailable: neither (offline, or a
# models.json entry whose path is gone).
Status = Literal["ready", "downloadable", "unavailable"]


def is_offline(settings: Settings) -> bool:
    """SDSERVE_OFFLINE, or the hub's own HF_HUB_OFFLINE."""
    return settings.offline or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "yes")


def hub_cached(repo: str) -> bool:
    """Whether a hub repo is in the local Hugging Face cache (as a request would load it offline)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "model_index.json"), str)


def user_catalogue(data_dir: Path) -> dict[str, dict]:
    """DATA/models.json, written by hand: {"id": {"source": "hf:repo" | path, "config": …}}."""
    path = data_dir / "models.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _hub_entry(repo: str, offline: bool) -> dict:
    if hub_cached(repo):
        return {"status": "ready", "hub_repo": repo, "note": f"{repo}, in the Hugging Face cache"}
    if offline:
        note = f"{repo} is not downloaded and this server is offline"
        return {"status": "unavailable", "hub_repo": repo, "note": note}
    note = f"{repo} is not downloaded yet: the first request downloads it"
    return {"status": "downloadable", "hub_repo": repo, "note": note}


def list_models(
    settings: Settings,
    catalogue: Catalogue | None,
    *,
    owner: str | None = None,
    trainers: dict[str, str] | None = None,
) -> list[dict]:
    """Every model id this server answers to, in resolution order, each with what is true of it.
    With `owner`, only what that key may use: other keys' private imports and trained models
    (`trainers`: model id -> the owner who trained it) are left out.

    Each: `model_id`, `source` (builtin | imported | catalogue | folder | file | hub), `status`,
    `note` (a sentence), and `hub_repo` and `size_bytes` where known without the network.
    """
    offline = is_offline(settings)
    models: dict[str, dict] = {
        mid: {"source": "builtin", "status": "ready", "note": "built in (random weights)"}
        for mid in BUILTIN_MODELS
    }
    for entry in catalogue.list() if catalogue else []:
        if entry.category in PIPELINE_CATEGORIES and entry.visible_to(owner):
            models[entry.model_id] = {
                "source": "imported",
                "status": "ready",
                "note": f"imported from {entry.url}" if entry.url else "imported",
                "size_bytes": entry.size_bytes or None,
            }
    for mid, entry in user_catalogue(settings.data_dir).items():
        if mid in models:
            continue  # built-in and imported ids resolve first
        source = str(entry.get("source", ""))
        if source.startswith("hf:"):
            models[mid] = {"source": "catalogue", **_hub_entry(source[3:], offline)}
        elif Path(source).exists():
            models[mid] = {"source": "catalogue", "status": "ready", "note": source}
        else:
            note = f"{source} does not exist"
            models[mid] = {"source": "catalogue", "status": "unavailable", "note": note}
    models_dir = settings.models_dir
    if models_dir.is_dir():
        for child in sorted(models_dir.iterdir()):
            if child.name.startswith(".") or (trainers or {}).get(child.stem, owner) != owner:
                continue
            if (child / "model_index.json").exists() and child.name not in models:
                models[child.name] = {"source": "folder", "status": "ready", "note": str(child)}
            elif child.suffix in CHECKPOINT_SUFFIXES and child.stem not in models:
                models[child.stem] = {
                    "source": "file",
                    "status": "ready",
                    "note": str(child),
                    "size_bytes": child.stat().st_size,
                }
    for mid, repo in HUB_CATALOGUE.items():
        if mid not in models:
            models[mid] = {"source": "hub", **_hub_entry(repo, offline)}
    return [
        {"model_id": mid, **{k: v for k, v in info.items() if v is not None}}
        for mid, info in models.items()
    ]
