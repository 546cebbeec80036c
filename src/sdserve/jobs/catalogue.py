"""The catalogue of imported models (the `models` table), shared by every API and worker process."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from sdserve.engine.assets import CATEGORIES, CatalogueEntry, DuplicateModel, new_entry
from sdserve.jobs.db import ModelEntry, Training
from sdserve.jobs.store import JobStore

__all__ = ["CATEGORIES", "CatalogueEntry", "DuplicateModel", "ModelCatalogue", "new_entry"]


def _entry(row: ModelEntry) -> CatalogueEntry:
    return CatalogueEntry(**{name: getattr(row, name) for name in CatalogueEntry.__dataclass_fields__})


class ModelCatalogue:
    def __init__(self, store: JobStore):
        self._store = store

    def get(self, model_id: str) -> CatalogueEntry | None:
        with self._store.session() as s:
            row = s.get(ModelEntry, model_id)
            return None if row is None else _entry(row)

    def list(self, category: str | None = None) -> list[CatalogueEntry]:
        with self._store.session() as s:
            query = select(ModelEntry).order_by(ModelEntry.loaded_at)
            if category is not None:
                query = query.where(ModelEntry.category == category)
            return [_entry(row) for row in s.scalars(query)]

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
            previous = None if old is None else _entry(old)
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
            entry = _entry(row)
            s.delete(row)
            return entry
