"""Test-only: makes the modules named in SDSERVE_BLOCK_MODULES unimportable, as if not installed.

Put this folder first on PYTHONPATH of a subprocess; Python imports `sitecustomize` at start-up.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import PathFinder

_BLOCKED = frozenset(filter(None, os.environ.get("SDSERVE_BLOCK_MODULES", "").split(",")))


class _HidingPathFinder(PathFinder):
    """The finder of sys.path entries, blind to the blocked packages: `find_spec` gives None and
    `import` raises ModuleNotFoundError, exactly as for a package that is not installed."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in _BLOCKED:
            return None
        return super().find_spec(fullname, path, target)


if _BLOCKED:
    sys.meta_path[:] = [_HidingPathFinder if f is PathFinder else f for f in sys.meta_path]
