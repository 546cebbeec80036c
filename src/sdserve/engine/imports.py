"""Bringing models in (load_model, load_vae, sync_models): fetch, check, load, and only then register.

A source is an http(s) URL to a single file, a Hugging Face repo id, or the id of a model trained
here. Downloads resume after an interruption (HTTP Range), stop at a size cap, refuse what is not a
weights file by its first bytes, and are hashed (sha256). The file is loaded before the catalogue
row is written, so a failed import leaves nothing registered; files live under
`DATA/imported/<category>/`, named by id and hash, so replacing a model never touches the old file
until the new one is registered.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdserve.engine.assets import Catalogue, CatalogueEntry, new_entry
from sdserve.engine.base import EngineJob, EngineOutput, Runtime, one_by_one
from sdserve.engine.checkpoints import detect_file_architecture, load_single_file
from sdserve.engine.registry import ModelRegistry
from sdserve.errors import EngineError, ModelUnavailable
from sdserve.net import BlockedUrl, guard_hooks
from sdserve.settings import Settings
from sdserve.storage.router import StorageRouter

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes in all)

_MAX_REDIRECTS = 5
_DOWNLOAD_TRIES = 3
_CHUNK = 1 << 20
# Key fragments that tell what a weights file holds.
_LORA_KEYS = ("lora_down", "lora_up", "lora_A", "lora_B", "hada_w1", "lokr_w1", "lora.down")
_CONTROLNET_KEYS = ("input_hint_block", "controlnet_cond_embedding")
_VAE_KEYS = ("decoder.conv_in.weight", "decoder.conv_out.weight")


class ImportFailed(EngineError):
    """The model could not be brought in; the job fails with this message, nothing is registered."""


@dataclass(frozen=True)
class ImportSpec:
    """What a load_model / load_vae job asks for (stored as the job's params)."""

    model_id: str
    source: str  # url, hub repo id or trained id
    source_kind: str  # url | hub | trained
    category: str
    category_known: bool = True  # False: a pipeline, SD or SDXL as its weights say
    model_format: str | None = None  # diffusers | safetensors | ckpt | pt
    revision: str | None = None  # fp16 | fp32: the hub variant to fetch
    replace: bool = False
    name: str = ""
    visibility: str = "public"
    owner: str = "admin"
    headers: dict | None = None  # sent with the download (a peer server's key, for sync)
    # A local model whose configs a single file loads with: for checkpoints whose sizes differ
    # from standard SD (distilled and pruned models, the tiny test models).
    config_model_id: str | None = None


class ModelImporter:
    def __init__(self, settings: Settings, registry: ModelRegistry):
        self.settings = settings
        self.registry = registry
        self.catalogue: Catalogue = registry.catalogue

    def run(self, spec: ImportSpec, progress: ProgressCallback) -> CatalogueEntry:
        staging = self.settings.data_dir / "downloads"
        staging.mkdir(parents=True, exist_ok=True)
        stem = f"{spec.model_id.replace('/', '--')}-{_digest(spec.source)[:10]}"
        owned, sha256, size, category = True, None, 0, spec.category
        config = None
        if spec.config_model_id:
            config = self.registry.config_folder(spec.config_model_id, spec.owner)
        if spec.source_kind == "url":
            part = staging / f"{stem}.part"
            staged = [part]
            try:
                sha256, size = download(spec.source, part, self.settings, progress, spec.headers)
                staged.append(part.with_suffix(_suffix(part, spec.category)))
                location, category = _check_weights(part.rename(staged[-1]), spec, config)
                staged.append(location)
            except BaseException:
                for path in staged:
                    _remove(path)
                raise
            target = self._target(category, spec.model_id, sha256, location.suffix)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(location, target)
            location = target
        elif spec.source_kind == "hub":
            (location, category), owned = self._from_hub(spec), False
            progress(1, 1)
        else:
            (location, category), owned = self._trained(spec), False
            progress(1, 1)
        if location.is_file():
            size = location.stat().st_size
        if owned and self.registry.storage is not None:  # for workers on other hosts
            self.registry.storage.publish_model_files(location)
        entry = new_entry(
            model_id=spec.model_id,
            category=category,
            location=_relative(location, self.settings),
            config_model_id=spec.config_model_id if location.is_file() else None,
            url=spec.source,
            sha256=sha256,
            size_bytes=size,
            owned=owned,
            owner=spec.owner,
            name=spec.name or spec.model_id,
            visibility=spec.visibility,
        )
        try:
            previous = self.catalogue.register(entry, replace=spec.replace)
        except BaseException:
            if owned:
                remove_files(entry, self.settings, self.registry.storage)
            raise
        if previous is not None and previous.owned and previous.location != entry.location:
            remove_files(previous, self.settings, self.registry.storage)
        return entry

    def _target(self, category: str, model_id: str, sha256: str, suffix: str) -> Path:
        folder = self.settings.data_dir / "imported" / category
        return folder / f"{model_id.replace('/', '--')}-{sha256[:12]}{suffix}"

    def _from_hub(self, spec: ImportSpec) -> tuple[Path, str]:
        if self.settings.offline or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true"):
            raise ImportFailed(offline_message(spec.source))
        variant = "fp16" if spec.revision == "fp16" else None
        try:
            if spec.category in ("stable_diffusion", "stable_diffusion_xl"):
                from diffusers import DiffusionPipeline

                folder = Path(DiffusionPipeline.download(spec.source, variant=variant))
                pipe = DiffusionPipeline.from_pretrained(folder, variant=variant)  # must load
                return folder, _pipeline_category(spec, folder, type(pipe).__name__)
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    spec.source, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pt"]
                )
            )
        except ImportFailed:
            raise
        except Exception as exc:
            raise ImportFailed(f"Could not fetch {spec.source} from the hub: {exc}") from exc
        if (folder / "config.json").is_file() and spec.category in ("vae", "controlnet"):
            return folder, spec.category
        weights = sorted(folder.rglob("*.safetensors")) or sorted(folder.rglob("*.bin"))
        if not weights:
            raise ImportFailed(f"{spec.source} holds no weights file")
        return _check_weights(weights[0], spec, None)

    def _trained(self, spec: ImportSpec) -> tuple[Path, str]:
        data = self.settings.data_dir
        if spec.category == "lora":
            path = data / "loras" / f"{spec.source}.safetensors"
        else:
            path = self.settings.models_dir / spec.source
        if not path.exists():
            raise ImportFailed(
                f"No trained {spec.category.replace('_', ' ')} model with the id {spec.source}"
            )
        if spec.category == "lora":
            return path, "lora"
        class_name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
        return path, _pipeline_category(spec, path, class_name)


def _pipeline_category(spec: ImportSpec, where: Path, class_name: str) -> str:
    category = "stable_diffusion_xl" if "XL" in class_name else "stable_diffusion"
    if spec.category_known and category != spec.category:
        raise ImportFailed(f"{where.name} is a {class_name} but model_category is {spec.category}")
    return category


def offline_message(repo: str) -> str:
    return (
        f"This server is offline (SDSERVE_OFFLINE or HF_HUB_OFFLINE): it cannot fetch {repo} from "
        "the Hugging Face hub. Give an http(s) URL to a .safetensors or .ckpt file instead."
    )


def remove_files(
    entry: CatalogueEntry, settings: Settings, storage: StorageRouter | None = None
) -> None:
    """Delete an entry's files (here and in the bucket), but only files sdserve made."""
    if not entry.owned:
        return
    path = Path(entry.location)
    path = (path if path.is_absolute() else settings.data_dir / path).resolve()
    if settings.data_dir.resolve() not in path.parents:
        return
    if storage is not None:
        storage.delete_model_files(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _relative(path: Path, settings: Settings) -> str:
    """Locations under the data dir are stored relative to it: each host has its own data dir."""
    try:
        return path.resolve().relative_to(settings.data_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


# ---- downloading -----------------------------------------------------------------------------


def download(
    url: str,
    part: Path,
    settings: Settings,
    progress: ProgressCallback,
    headers: dict | None = None,
) -> tuple[str, int]:
    """Fetch `url` into `part`, resuming what is there; return (sha256, size)."""
    cap = settings.max_model_mb * 1024 * 1024
    last_error = "no attempt"
    for _ in range(_DOWNLOAD_TRIES):
        try:
            if _fetch_into(url, part, cap, settings, progress, headers or {}):
                break
            last_error = "the connection closed before the end of the file"
        except httpx.TimeoutException:
            last_error = f"no data for {settings.download_timeout:g} seconds"
        except httpx.TransportError as exc:
            last_error = str(exc) or type(exc).__name__
    else:
        raise ImportFailed(f"Download of {url} failed: {last_error}")
    digest = hashlib.sha256()
    with part.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest(), part.stat().st_size


def _fetch_into(
    url: str,
    part: Path,
    cap: int,
    settings: Settings,
    progress: ProgressCallback,
    headers: dict,
) -> bool:
    """One request; True when the file is whole. Resumes with a Range request when it can."""
    have = part.stat().st_size if part.exists() else 0
    request_headers = {"accept-encoding": "identity", **headers}
    if have:
        request_headers["range"] = f"bytes={have}-"
    timeout = httpx.Timeout(settings.download_timeout, connect=10.0)
    try:
        with (
            httpx.Client(
                timeout=timeout,
                follow_redirects=True,
                max_redirects=_MAX_REDIRECTS,
                event_hooks=guard_hooks(settings.allow_private_urls),
            ) as client,
            client.stream("GET", url, headers=request_headers) as response,
        ):
            if response.status_code == 416 and have:  # what we have is stale: start over
                part.unlink()
                return False
            if not response.is_success:
                raise ImportFailed(f"Download of {url} failed: HTTP {response.status_code}")
            _check_content_type(response)
            if response.status_code == 206:
                total = _range_total(response.headers.get("content-range", ""))
                mode = "ab"
            else:  # the server ignored the range: the whole file again
                have, mode = 0, "wb"
                length = response.headers.get("content-length", "")
                total = int(length) if length.isdigit() else None
            if total is not None and total > cap:
                raise ImportFailed(f"The file is larger than the {settings.max_model_mb} MB limit")
            with part.open(mode) as handle:
                for chunk in response.iter_bytes(_CHUNK):
                    if have == 0:
                        _check_magic(chunk)
                    have += len(chunk)
                    if have > cap:
                        raise ImportFailed(
                            f"The file is larger than the {settings.max_model_mb} MB limit"
                        )
                    handle.write(chunk)
                    progress(have, total or have)
    except BlockedUrl as exc:
        raise ImportFailed(f"url {exc}") from None
    except httpx.TooManyRedirects:
        raise ImportFailed(
            f"Download of {url} failed: more than {_MAX_REDIRECTS} redirects"
        ) from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL):
        raise ImportFailed(f"Download of {url} failed: redirected to an invalid URL") from None
    if have == 0:
        raise ImportFailed(f"Download of {url} failed: the file is empty")
    return total is None or have >= total


def _range_total(content_range: str) -> int | None:
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _check_content_type(response: httpx.Response) -> None:
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind.startswith("text/") or kind in ("application/json", "application/xml"):
        raise ImportFailed(
            f"The URL returned {kind}, not a model file (a login page or an error page?)"
        )


def _check_magic(head: bytes) -> None:
    if _is_safetensors(head) or _is_pickle(head):
        return
    raise ImportFailed("The file is neither a .safetensors nor a .ckpt/.pt file")


def _is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object
    return len(head) >= 9 and struct.unpack("<Q", head[:8])[0] < 100_000_000 and head[8:9] == b"{"


def _is_pickle(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"  # a torch zip, or a bare pickle


def _suffix(path: Path, category: str) -> str:
    with path.open("rb") as handle:
        if _is_safetensors(handle.read(16)):
            return ".safetensors"
    return ".ckpt" if category.startswith("stable_diffusion") else ".pt"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


# ---- checking what was fetched ---------------------------------------------------------------


def _check_weights(path: Path, spec: ImportSpec, config: Path | None) -> tuple[Path, str]:
    """Load the file as its category says; return the path to register (maybe converted)."""
    fmt = spec.model_format
    if fmt == "safetensors" and path.suffix != ".safetensors":
        raise ImportFailed("model_format is safetensors but the file is a pickled .ckpt/.pt")
    if fmt in ("ckpt", "pt") and path.suffix == ".safetensors":
        raise ImportFailed(f"model_format is {fmt} but the file is a .safetensors file")
    if spec.category in ("stable_diffusion", "stable_diffusion_xl"):
        return path, _check_pipeline(path, spec, config)
    keys = _tensor_keys(path)
    if spec.category == "lora":
        _require(keys, _LORA_KEYS, "a LoRA")
        if path.suffix != ".safetensors":  # LoRAs are applied from .safetensors only
            converted = path.with_suffix(".safetensors")
            save_file(_read_tensors(path), converted)
            path.unlink()
            return converted, "lora"
    elif spec.category == "controlnet":
        _require(keys, _CONTROLNET_KEYS, "a ControlNet")
    elif spec.category == "vae":
        _require(keys, _VAE_KEYS, "a VAE")
    elif spec.category == "super_resolution":
        from sdserve.engine.super_resolution import check_weights_file  # torch-heavy; lazy

        try:
            check_weights_file(path)
        except Exception as exc:
            raise ImportFailed(f"Not a Real-ESRGAN model: {exc}") from None
    elif spec.category == "embeddings" and not keys:
        raise ImportFailed("The file holds no tensors: it is not a textual-inversion embedding")
    return path, spec.category


def _check_pipeline(path: Path, spec: ImportSpec, config: Path | None) -> str:
    try:
        family = detect_file_architecture(path)
    except ModelUnavailable as exc:
        raise ImportFailed(f"Not a Stable Diffusion checkpoint: {exc.message}") from None
    category = "stable_diffusion_xl" if family.startswith("sdxl") else "stable_diffusion"
    if spec.category_known and category != spec.category:
        found = "an SDXL" if family.startswith("sdxl") else "an SD 1.x/2.x"
        raise ImportFailed(f"The file is {found} checkpoint but model_category is {spec.category}")
    try:
        pipe = load_single_file(path, config_dir=config, torch_dtype=torch.float16)
    except ModelUnavailable as exc:
        raise ImportFailed(exc.message) from None
    del pipe
    return category


def _tensor_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:
            raise ImportFailed(f"The file is not a valid .safetensors file: {exc}") from None
    return list(_read_tensors(path))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    except Exception as exc:
        raise ImportFailed(f"The file could not be read as tensors: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ImportFailed("The file does not hold a dictionary of tensors")
    return _flatten(data)


def _flatten(data: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    tensors = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            tensors[prefix + str(key)] = value.contiguous()
        elif isinstance(value, dict):
            tensors |= _flatten(value, f"{prefix}{key}.")
    return tensors


def _require(keys: list[str], fragments: tuple[str, ...], what: str) -> None:
    if not any(fragment in key for key in keys for fragment in fragments):
        raise ImportFailed(f"The file is not {what}: none of its tensors is named like one")


class ModelJobsEngine:
    """Model management as jobs: `model_load` imports a model, `model_reload` makes one resident."""

    kinds = ("model_load", "model_reload")

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.importer = ModelImporter(runtime.settings, runtime.registry)

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        return one_by_one(jobs, self._run)

    def _run(self, job: EngineJob) -> EngineOutput:
        if job.kind == "model_reload":
            self.runtime.pipeline(job.model_id)
            return EngineOutput([], meta={"model_id": job.model_id})
        spec = ImportSpec(**job.params["import"])
        entry = self.importer.run(spec, job.events.step)
        if spec.replace:  # every worker drops what it loaded under the old files
            job.events.broadcast("clear_cache")
        return EngineOutput(
            [],
            meta={
                "model_id": entry.model_id,
                "model_category": entry.category,
                "url": entry.url,
                "sha256": entry.sha256,
                "size_bytes": entry.size_bytes,
            },
        )
