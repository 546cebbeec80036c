"""Which model a `model_id` names (built-in, Hugging Face repo, local folder, single file) and loading it.

Resolution order for a model_id: built-in tiny models; models imported by `load_model` (the
`models` table); entries of `DATA/models.json`, written by hand; a diffusers folder
`DATA/models/<id>/` or a file `DATA/models/<id>.safetensors|.ckpt`; the catalogue of public hub ids
below. LoRAs, textual-inversion embeddings and VAEs are looked up in the `models` table, then in
`DATA/loras`, `DATA/embeddings` and `DATA/vae` under their id.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from sdserve.engine import tiny
from sdserve.engine.assets import ADMIN_OWNER, Catalogue
from sdserve.engine.availability import (
    CHECKPOINT_SUFFIXES,
    HUB_CATALOGUE,
    HUB_FAMILIES,
    PIPELINE_CATEGORIES,
    hub_cached,
    is_offline,
    list_models,
    user_catalogue,
)
from sdserve.errors import ModelNotFound, ModelUnavailable, ValidationFailed
from sdserve.settings import Settings
from sdserve.storage.router import StorageRouter

_BUILTIN_FAMILIES = {"tiny-sd": "sd15", "tiny-sdxl": "sdxl", "tiny-t2v": "t2v", "tiny-svd": "svd"}
_CLASS_FAMILIES = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "TextToVideoSDPipeline": "t2v",
    "StableVideoDiffusionPipeline": "svd",
}
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,199}$")


@dataclass(frozen=True)
class ModelSource:
    model_id: str
    kind: Literal["builtin", "hub", "folder", "file"]
    location: str  # repo id, folder or file path
    config: str | None = None  # config folder for single files, if not the shipped one


def safe_id(value: str, what: str) -> str:
    if not _ID_PATTERN.match(value) or ".." in value or value.startswith("/"):
        raise ValidationFailed({what: [f"The {what} is not a valid id."]})
    return value


class ModelRegistry:
    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue | None = None,
        storage: StorageRouter | None = None,
    ):
        self.settings = settings
        self.data_dir = settings.data_dir
        self.catalogue = catalogue
        # Model files of the data dir are also kept in the bucket, when there is one, for workers
        # on other hosts: the API only checks they exist, a worker (fetch_missing) downloads them.
        self.storage = storage
        self.fetch_missing = False

    def entry_path(self, location: str) -> Path:
        """A catalogue location: relative ones are under this host's data dir."""
        path = Path(location)
        return path if path.is_absolute() else self.data_dir / path

    def fetch_missing_file(self, path: Path) -> bool:
        """A model file here, from the bucket if need be (to serve it to another server)."""
        if not path.is_file() and self.storage is not None:
            self.storage.fetch_model_files(path)
        return path.is_file()

    def _available(self, path: Path) -> bool:
        if path.exists() or self.storage is None:
            return path.exists()
        if self.fetch_missing:
            return self.storage.fetch_model_files(path)
        return self.storage.has_model_files(path)

    # ---- resolution (cheap, done at submit time) -------------------------------------------

    def _user_catalogue(self) -> dict[str, dict]:
        return user_catalogue(self.data_dir)

    def _check_trainer(self, asset_id: str, owner: str | None, refusal: Exception) -> None:
        """A trained model or LoRA is its trainer's alone (and the admin's)."""
        if owner in (None, ADMIN_OWNER) or self.catalogue is None:
            return
        trainer = self.catalogue.trainer(asset_id)
        if trainer is not None and trainer != owner:
            raise refusal

    def resolve(self, model_id: str, owner: str | None = None) -> ModelSource:
        """Where `model_id` lives; with `owner` (a key's owner, None: unchecked, for workers),
        other keys' private imports and trained models are not found."""
        safe_id(model_id, "model_id")
        if model_id in tiny.TINY_MODELS:
            return ModelSource(model_id, "builtin", model_id)
        imported = self.catalogue.get(model_id) if self.catalogue else None
        if imported is not None and not imported.visible_to(owner):
            raise ModelNotFound(model_id)  # never the same id's file further down the order
        if imported is not None:
            if imported.category not in PIPELINE_CATEGORIES:
                label = imported.category.replace("_", " ")
                raise ValidationFailed(
                    {"model_id": [f"{model_id} is a {label} model, not a base model"]}
                )
            config = imported.config_model_id
            path = self.entry_path(imported.location)
            self._available(path)
            return self._source_from_entry(
                model_id, {"source": str(path), "config": config and self.config_folder(config)}
            )
        entry = self._user_catalogue().get(model_id)
        if entry is not None:
            return self._source_from_entry(model_id, entry)
        self._check_trainer(model_id, owner, ModelNotFound(model_id))
        folder = self.settings.models_dir / model_id
        if (folder / "model_index.json").exists() or (
            not folder.exists() and self._available(folder)
        ):
            return ModelSource(model_id, "folder", str(folder))
        for suffix in CHECKPOINT_SUFFIXES:
            file = self.settings.models_dir / f"{model_id}{suffix}"
            if file.is_file() or self._available(file):
                return ModelSource(model_id, "file", str(file))
        if model_id in HUB_CATALOGUE:
            return ModelSource(model_id, "hub", HUB_CATALOGUE[model_id])
        raise ModelNotFound(model_id)

    @staticmethod
    def _source_from_entry(model_id: str, entry: dict) -> ModelSource:
        source = str(entry["source"])
        config = entry.get("config")
        if source.startswith("hf:"):
            return ModelSource(model_id, "hub", source[3:])
        path = Path(source)
        if path.is_dir():
            return ModelSource(model_id, "folder", str(path), config)
        return ModelSource(model_id, "file", str(path), config)

    def check_available(self, source: ModelSource) -> None:
        """Raise ModelUnavailable now, at submit, for a model whose weights cannot be had."""
        if source.kind in ("folder", "file") and not self._available(Path(source.location)):
            raise ModelUnavailable(
                f"Model {source.model_id} points to {source.location}, which does not exist"
            )
        if source.kind == "hub" and self.offline():
            if not hub_cached(source.location):
                raise ModelUnavailable(
                    f"Model {source.model_id} ({source.location} on the Hugging Face hub) is not "
                    "downloaded and this server is offline. On a machine with internet access run "
                    f"`huggingface-cli download {source.location}`, or put a diffusers folder at "
                    f"{self.settings.models_dir / source.model_id} or a single .safetensors file at "
                    f"{self.settings.models_dir / source.model_id}.safetensors"
                )

    def architecture(self, source: ModelSource) -> str | None:
        """sd15 | sd2 | sdxl | t2v | svd, when knowable without loading weights (else None)."""
        if source.kind == "builtin":
            return _BUILTIN_FAMILIES.get(source.model_id)
        if source.kind == "hub":
            return HUB_FAMILIES.get(source.location)
        index = Path(source.location) / "model_index.json"
        if source.kind != "folder" or not index.exists():
            return None
        class_name = json.loads(index.read_text()).get("_class_name", "")
        if class_name in _CLASS_FAMILIES:
            return _CLASS_FAMILIES[class_name]
        unet_config = Path(source.location) / "unet" / "config.json"
        if unet_config.exists():
            cross = json.loads(unet_config.read_text()).get("cross_attention_dim")
            return "sd2" if cross == 1024 else "sd15"
        return None

    def config_folder(self, model_id: str, owner: str | None = None) -> Path:
        """The diffusers folder of a local model, whose configs a single file may load with."""
        source = self.resolve(model_id, owner)
        if source.kind == "builtin":
            return tiny.ensure_tiny_model(model_id, self.settings.models_dir)
        if source.kind == "folder":
            return Path(source.location)
        raise ValidationFailed(
            {"config_model_id": [f"{model_id} is not a built-in model or a local model folder."]}
        )

    def load_motion_adapter(self, adapter: str, device: torch.device, dtype: torch.dtype):
        from diffusers import MotionAdapter

        try:
            if adapter == tiny.TINY_MOTION_ADAPTER:
                location = tiny.ensure_tiny_model(adapter, self.settings.models_dir)
            else:
                location = adapter
            return MotionAdapter.from_pretrained(
                location, dtype=dtype, local_files_only=self.offline()
            ).to(device)
        except Exception as exc:
            raise ModelUnavailable(
                f"Motion adapter {adapter} could not be loaded: {exc}. Set SDSERVE_MOTION_ADAPTER "
                "to a downloaded adapter folder or hub id."
            ) from exc

    def offline(self) -> bool:
        return is_offline(self.settings)

    def list_models(self, owner: str | None = None) -> list[dict]:
        """The models `owner` may use (None: every one, for the operator), each with its source
        and status (ready, downloadable, unavailable)."""
        trainers = {}
        if owner not in (None, ADMIN_OWNER) and self.catalogue is not None:
            trainers = self.catalogue.trainers()
        return list_models(self.settings, self.catalogue, owner=owner, trainers=trainers)

    # `owner` as for resolve: other keys' private imports and trained LoRAs are not found.
    def resolve_lora(self, lora_id: str, owner: str | None = None) -> Path:
        return self._asset(
            "loras", lora_id, "lora_model", (".safetensors",), "LoRA", "lora", owner=owner
        )

    def resolve_embedding(self, embedding_id: str, owner: str | None = None) -> Path:
        return self._asset(
            "embeddings",
            embedding_id,
            "embeddings_model",
            (".safetensors", ".pt", ".bin"),
            "Embedding",
            "embeddings",
            owner=owner,
        )

    def resolve_vae(self, vae_id: str, owner: str | None = None) -> Path:
        return self._asset(
            "vae", vae_id, "vae", (".safetensors", ".ckpt"), "VAE", "vae", folders=True, owner=owner
        )

    def _asset(
        self,
        folder: str,
        asset_id: str,
        field: str,
        suffixes: tuple[str, ...],
        label: str,
        category: str,
        folders: bool = False,
        owner: str | None = None,
    ) -> Path:
        safe_id(asset_id, field)
        not_found = ValidationFailed({field: [f"{label} model not found: {asset_id}"]})
        imported = self.catalogue.get(asset_id) if self.catalogue else None
        if imported is not None and imported.category == category:
            if not imported.visible_to(owner):
                raise not_found
            path = self.entry_path(imported.location)
            self._available(path)
            return path
        self._check_trainer(asset_id, owner, not_found)
        base = self.data_dir / folder
        if folders and (base / asset_id / "config.json").exists():
            return base / asset_id
        for suffix in suffixes:
            if self._available(base / f"{asset_id}{suffix}"):
                return base / f"{asset_id}{suffix}"
        if (base / asset_id).is_dir():
            for suffix in suffixes:
                found = sorted((base / asset_id).glob(f"*{suffix}"))
                if found:
                    return found[0]
        raise not_found

    # ---- loading (in the worker) -----------------------------------------------------------

    def load(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype
    ) -> DiffusionPipeline:
        self.check_available(source)
        try:
            if source.kind == "builtin":
                folder = tiny.ensure_tiny_model(source.model_id, self.settings.models_dir)
                pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype)
            elif source.kind == "folder":
                pipe = DiffusionPipeline.from_pretrained(
                    source.location, dtype=dtype, safety_checker=None, requires_safety_checker=False
                )
            elif source.kind == "file":
                from sdserve.engine.checkpoints import load_single_file

                config = Path(source.config) if source.config else None
                pipe = load_single_file(Path(source.location), config_dir=config, torch_dtype=dtype)
            else:
                pipe = DiffusionPipeline.from_pretrained(
                    source.location,
                    dtype=dtype,
                    safety_checker=None,
                    requires_safety_checker=False,
                    local_files_only=self.offline(),
                )
        except (ModelUnavailable, ModelNotFound):
            raise
        except Exception as exc:  # a broken download or file: say which model and why
            raise ModelUnavailable(f"Model {source.model_id} could not be loaded: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def load_vae(self, path: Path, like: AutoencoderKL, dtype: torch.dtype) -> AutoencoderKL:
        try:
            if path.is_dir():
                return AutoencoderKL.from_pretrained(path, dtype=dtype)
            # diffusers wants the config as a folder: the base model's own VAE config
            with tempfile.TemporaryDirectory(prefix="sdserve-vae-config-") as config:
                like.save_config(config)
                return AutoencoderKL.from_single_file(path, config=config, dtype=dtype)
        except Exception as exc:
            raise ModelUnavailable(f"VAE {path.stem} could not be loaded: {exc}") from exc


class ResidencyCache:
    """Keeps the most recently used pipelines loaded, within a memory budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._items: OrderedDict[str, tuple[DiffusionPipeline, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, key: str, load) -> DiffusionPipeline:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        pipe = load()
        size = _pipeline_bytes(pipe)
        with self._lock:
            self.loads += 1
            self._items[key] = (pipe, size)
            self._items.move_to_end(key)
            while (
                len(self._items) > 1 and sum(s for _, s in self._items.values()) > self.budget_bytes
            ):
                self._items.popitem(last=False)
        free_device_memory()
        return pipe

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
        free_device_memory()

    def evict(self, model_id: str) -> None:
        """Drop a model and everything loaded for it (its VAEs, its video pipelines)."""
        with self._lock:
            for key in list(self._items):
                if key.split("+")[0] == model_id or model_id in key.split(":"):
                    del self._items[key]
        free_device_memory()


def _pipeline_bytes(pipe: DiffusionPipeline | torch.nn.Module) -> int:
    total = 0
    components = [pipe] if isinstance(pipe, torch.nn.Module) else pipe.components.values()
    for component in components:
        if isinstance(component, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in component.parameters())
    return total


def free_device_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
