"""This server's own output URLs given as inputs (chaining, §16.3): read from storage, never over HTTP."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from sdserve.engine.assets import ADMIN_OWNER
from sdserve.errors import BadImage
from sdserve.jobs.store import JobStore
from sdserve.storage.local import PUBLIC_FOLDERS, InvalidStorageKey
from sdserve.storage.router import StorageRouter


@dataclass(frozen=True)
class OwnOutputs:
    """The outputs `owner` may chain: those of its own jobs (the admin: every one)."""

    storage: StorageRouter
    store: JobStore
    base_url: str
    owner: str

    @classmethod
    def of(cls, state, principal) -> OwnOutputs:
        """For a request: `state` a ServerState, `principal` its caller."""
        return cls(state.storage, state.store, state.settings.base_url, principal.owner)

    def key_of(self, url: str) -> str | None:
        """The storage key behind one of this server's file URLs; None for any other URL."""
        base = urlsplit(self.base_url.rstrip("/") + "/")
        parts = urlsplit(url)
        if (parts.scheme.lower(), parts.netloc.lower()) != (
            base.scheme.lower(),
            base.netloc.lower(),
        ):
            return None
        if not parts.path.startswith(base.path):
            return None
        key = unquote(parts.path[len(base.path) :])
        return key if key.split("/", 1)[0] in PUBLIC_FOLDERS else None

    def read(self, url: str, field: str) -> bytes | None:
        """The file's bytes, if `url` is this server's; BadImage if this key may not use it."""
        key = self.key_of(url)
        if key is None:
            return None
        owner = self.store.output_owner(key)
        if owner is None or (self.owner != ADMIN_OWNER and owner != self.owner):
            # One answer for "someone else's" and "no such output": ids are not probed this way.
            raise BadImage(
                field,
                f"{field} is a file URL of this server that is not one of this key's outputs "
                "(only the key whose job made it, or the admin key, may use it as an input)",
            )
        try:
            return self.storage.get(key)
        except (FileNotFoundError, InvalidStorageKey):
            raise BadImage(field, f"{field} no longer exists on this server") from None
