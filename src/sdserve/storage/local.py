"""Output and input files on the local disk; the API serves the public folders under its base URL."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path, PurePosixPath

# Top-level folders the API serves publicly; anything else (inputs/) is private to workers.
PUBLIC_FOLDERS = ("generations", "temp", "video_generations", "uploads")


class InvalidStorageKey(ValueError):
    pass


class LocalStorage:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file for `key`, refusing anything that would escape the storage root."""
        parts = PurePosixPath(key).parts
        if (
            not parts
            or any(part in ("..", "") or part.startswith("/") for part in parts)
            or "\\" in key
            or "\x00" in key  # the OS refuses NUL in a path with a ValueError, not a miss
        ):
            raise InvalidStorageKey(key)
        path = (self.root / Path(*parts)).resolve()
        if self.root not in path.parents:
            raise InvalidStorageKey(key)
        return path

    def put(self, key: str, data: bytes) -> None:
        """Write atomically (temp file + rename): a re-run job overwrites, never leaves half a file."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        try:
            return self.path(key).is_file()
        except InvalidStorageKey:
            return False

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_older_than(self, folder: str, max_age_seconds: float) -> int:
        """Remove files in `folder` older than the age limit (24 h `temp` outputs)."""
        base = self.path(folder)
        if not base.is_dir():
            return 0
        cutoff = time.time() - max_age_seconds
        removed = 0
        for path in base.rglob("*"):
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
