"""The catalogue of imported models (the `models` table), shared by every API and worker process."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from sdserve.errors import ValidationFailed
from sdserve.jobs.db import ModelEntry, Training
from sdserve.jobs.store import ADMIN_OWNER, JobStore

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

    @classmethod
    def of(cls, row: ModelEntry) -> CatalogueEntry:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})

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


class ModelCatalogue:
    def __init__(self, store: JobStore):
        self._store = store

    def get(self, model_id: str) -> CatalogueEntry | None:
        with self._store.session() as s:
            row = s.get(ModelEntry, model_id)
            return None if row is None else CatalogueEntry.of(row)

    def list(self, category: str | None = None) -> list[CatalogueEntry]:
        with self._store.session() as s:
            query = select(ModelEntry).order_by(ModelEntry.loaded_at)
            if category is not None:
                query = query.where(ModelEntry.category == category)
            return [CatalogueEntry.of(row) for row in s.scalars(query)]

    def trainer(self, training_id: str) -> str | None:
        """The owner of the training whose result is `training_id` (its model or LoRA), if any."""
        with self._store.session() as s:
            return s.scalar(select(Training.owner).where(Training.training_id == training_id))

    def trainers(self) -> dict[str, str]:
        """Every training id and its owner."""
        with self._store.session() as s:
            return dict(s.execute(select(Training.training_id, Training.owner)).all())

    def register(self, entry: CatalogueEntry, replace: bool = False) -> CatalogueEntry | None:
        """Add the entry; with `replace`, return the one it replaced (whose files may go)."""
        with self._store.session(write=True) as s:
            old = s.get(ModelEntry, entry.model_id)
            previous = None if old is None else CatalogueEntry.of(old)
            if old is not None:
                if not replace:
                    raise DuplicateModel(entry.model_id)
                s.delete(old)
                s.flush()
            fields = {name: getattr(entry, name) for name in CatalogueEntry.__dataclass_fields__}
            s.add(ModelEntry(**fields))
            try:
                s.flush()
            except IntegrityError:  # another process registered the same id meanwhile
                raise DuplicateModel(entry.model_id) from None
            return previous

    def remove(self, model_id: str) -> CatalogueEntry | None:
        with self._store.session(write=True) as s:
            row = s.get(ModelEntry, model_id)
            if row is None:
                return None
            entry = CatalogueEntry.of(row)
            s.delete(row)
            return entry


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
