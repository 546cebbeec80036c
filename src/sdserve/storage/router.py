"""One storage interface over the local disk and an S3-compatible bucket, switchable at run time.

A key names where its file lives: `generations/x.png` is on the local disk, `s3:generations/x.png`
in the bucket. Keys are made when a job is accepted, so switching storage (`update_s3`) moves new
jobs to the bucket while every older output keeps working where it was written.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sdserve.extras import require
from sdserve.settings import Settings
from sdserve.storage.local import LocalStorage

if TYPE_CHECKING:
    from sdserve.storage.s3 import S3Storage
    from sdserve.storage.s3config import S3Config

S3_PREFIX = "s3:"
MODELS_PREFIX = "models/"  # model files in the bucket, by their path under the data dir
_CONFIG_ROW = "s3"


class SavedConfig(Protocol):
    """Where `update_s3` keeps the bucket settings for every process (the job store)."""

    def load_config(self, name: str) -> dict | None: ...

    def save_config(self, name: str, value: dict) -> None: ...


class StorageRouter:
    def __init__(self, settings: Settings, saved: SavedConfig | None = None):
        self.settings = settings
        self.local = LocalStorage(settings.outputs_dir)
        self._saved = saved
        self._s3: S3Storage | None = None
        self._lock = threading.Lock()
        self.reload()

    # ---- configuration ---------------------------------------------------------------------

    def reload(self) -> None:
        """Pick up the S3 settings: the ones saved by update_s3, else the environment's."""
        config = self._saved_config() or self._env_config()
        backend = None
        if config is not None:
            backend = _s3_storage(config)
        with self._lock:
            self._s3 = backend

    def configure_s3(self, config: S3Config) -> None:
        """Check the bucket works, then make it the storage of new outputs, in every process."""
        candidate = _s3_storage(config)
        candidate.check()
        if self._saved is not None:
            self._saved.save_config(_CONFIG_ROW, asdict(config))
        with self._lock:
            self._s3 = candidate

    def describe(self) -> dict:
        """What the storage is, secrets masked."""
        with self._lock:
            s3 = self._s3
        if s3 is None:
            return {"kind": "local", "root": str(self.local.root)}
        return {"kind": "s3", **s3.config.redacted()}

    def _saved_config(self) -> S3Config | None:
        value = None if self._saved is None else self._saved.load_config(_CONFIG_ROW)
        if value is None:
            return None
        from sdserve.storage.s3config import S3Config

        return S3Config(**value)

    def _env_config(self) -> S3Config | None:
        st = self.settings
        if not st.s3_bucket:
            return None
        from sdserve.storage.s3config import S3Config

        return S3Config(
            bucket=st.s3_bucket,
            prefix=st.s3_prefix,
            endpoint_url=st.s3_endpoint_url,
            region_name=st.s3_region,
            access_key_id=st.s3_access_key_id,
            secret_access_key=st.s3_secret_access_key,
            public_url=st.s3_public_url,
        )

    # ---- files -----------------------------------------------------------------------------

    def new_key(self, key: str) -> str:
        """The key a new file gets: in the bucket when one is configured."""
        with self._lock:
            return S3_PREFIX + key if self._s3 is not None else key

    def _backend(self, key: str) -> tuple[LocalStorage | S3Storage, str]:
        if not key.startswith(S3_PREFIX):
            return self.local, key
        with self._lock:
            s3 = self._s3
        if s3 is None:
            from sdserve.errors import S3Unavailable

            raise S3Unavailable("This file is in S3 storage, which is no longer configured")
        return s3, key[len(S3_PREFIX) :]

    def put(self, key: str, data: bytes) -> None:
        backend, name = self._backend(key)
        backend.put(name, data)

    def get(self, key: str) -> bytes:
        backend, name = self._backend(key)
        return backend.get(name)

    def exists(self, key: str) -> bool:
        backend, name = self._backend(key)
        return backend.exists(name)

    def delete(self, key: str) -> None:
        backend, name = self._backend(key)
        backend.delete(name)

    def url(self, key: str, base_url: str) -> str:
        if key.startswith(S3_PREFIX):
            backend, name = self._backend(key)
            return backend.url(name)
        return f"{base_url}/{key}"

    def path(self, key: str):
        """The local file of a local key (for the API to serve)."""
        return self.local.path(key)

    # ---- model files, for workers on other hosts ---------------------------------------------

    def _model_key(self, path: Path) -> str | None:
        data_dir = self.settings.data_dir.resolve()
        try:
            return MODELS_PREFIX + path.resolve().relative_to(data_dir).as_posix()
        except ValueError:  # outside the data dir (a hub cache, a user's folder): not shared
            return None

    def _model_objects(self, path: Path) -> tuple[S3Storage | None, str | None, list[str]]:
        with self._lock:
            s3 = self._s3
        key = self._model_key(path)
        if s3 is None or key is None:
            return None, None, []
        return s3, key, [k for k in s3.list(key) if k == key or k.startswith(key + "/")]

    def publish_model_files(self, path: Path) -> None:
        """Copy a model file or folder of the data dir to the bucket (no-op without one)."""
        with self._lock:
            s3 = self._s3
        key = self._model_key(path)
        if s3 is None or key is None:
            return
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            s3.upload_file(self._model_key(file), file)

    def has_model_files(self, path: Path) -> bool:
        return path.exists() or bool(self._model_objects(path)[2])

    def fetch_model_files(self, path: Path) -> bool:
        """Bring a model file or folder that is in the bucket but not here; True if here now."""
        if path.exists():
            return True
        s3, key, objects = self._model_objects(path)
        if not objects:
            return False
        # Into a temp sibling, then one rename: the file or folder appears whole or not at all.
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}-{threading.get_ident()}")
        try:
            for name in objects:
                target = partial / name[len(key) + 1 :] if name != key else partial
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(name, target)
            if not path.exists():
                os.replace(partial, path)
        finally:
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
        return path.exists()

    def delete_model_files(self, path: Path) -> None:
        s3, _key, objects = self._model_objects(path)
        for name in objects:
            s3.delete(name)

    def delete_older_than(self, folder: str, max_age_seconds: float) -> int:
        removed = self.local.delete_older_than(folder, max_age_seconds)
        with self._lock:
            s3 = self._s3
        if s3 is not None:
            removed += s3.delete_older_than(folder, max_age_seconds)
        return removed


def _s3_storage(config: S3Config) -> S3Storage:
    """The S3 backend; boto3 (the optional `s3` extra) is imported only when a bucket is used."""
    require("boto3", "S3 output storage")
    from sdserve.storage.s3 import S3Storage

    return S3Storage(config)
