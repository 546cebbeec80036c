"""Models, LoRAs, embeddings, VAEs and other assets brought in by users: what the engine needs to
know of a catalogue entry, and the catalogue it reads them from (jobs.catalogue keeps it)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from sdserve.errors import ValidationFailed

ADMIN_OWNER = "admin"  # the owner of the admin key: sees and uses every asset and job

CATEGORIES = (
    "stable_diffusion",
    "stable_diffusion_xl",
    "controlnet",
    "lora",
    "embeddings",
    "vae",
    "super_resolution",  # Real-ESRGAN .pth / .safetensors (engine/super_resolution.py)
)


@dataclass(frozen=True)
class CatalogueEntry:
    model_id: str
    category: str
    location: str  # a file or folder path, or "hf:<repo>"
    config_model_id: str | None  # a model whose configs a single file loads with
    url: str
    sha256: str | None
    size_bytes: int
    owned: bool
    owner: str
    name: str
    visibility: str
    loaded_at: float

    def visible_to(self, owner: str | None) -> bool:
        return self.visibility != "private" or owner in (None, ADMIN_OWNER, self.owner)


class DuplicateModel(ValidationFailed):
    def __init__(self, model_id: str):
        super().__init__(
            {
                "model_id": [
                    f"A model with the id {model_id} already exists. Delete it first, or send "
                    "force_load: yes to replace it."
                ]
            }
        )


class Catalogue(Protocol):
    """The shared catalogue of imported assets, as the registry and importer use it."""

    def get(self, model_id: str) -> CatalogueEntry | None: ...

    def list(self, category: str | None = None) -> list[CatalogueEntry]: ...

    def trainer(self, training_id: str) -> str | None: ...

    def trainers(self) -> dict[str, str]: ...

    def register(self, entry: CatalogueEntry, replace: bool = False) -> CatalogueEntry | None: ...

    def remove(self, model_id: str) -> CatalogueEntry | None: ...


def new_entry(**fields) -> CatalogueEntry:
    defaults = {
        "config_model_id": None,
        "url": "",
        "sha256": None,
        "size_bytes": 0,
        "owned": True,
        "owner": ADMIN_OWNER,
        "name": "",
        "visibility": "public",
        "loaded_at": time.time(),
    }
    return CatalogueEntry(**(defaults | fields))
