"""Optional extras: packages only some deployments need, imported where used, with a clear error when absent."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from sdserve.errors import SdserveError

# Module -> (PyPI package, extra of pyproject.toml that installs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "nudenet": ("nudenet", "nsfw"),
    "av": ("av", "video"),
    "boto3": ("boto3", "s3"),
    "psycopg": ("psycopg[binary]", "postgres"),
    "prometheus_client": ("prometheus-client", "metrics"),
    "rembg": ("rembg", "removebg"),
    "cv2": ("opencv-python-headless", "controlnet"),
    "h5py": ("h5py", "controlnet"),
}


class MissingExtra(SdserveError):
    """A feature was asked for whose optional package is not installed on this server."""

    http_status = 501

    def __init__(self, module: str, feature: str):
        package, extra = EXTRAS[module]
        super().__init__(
            f"{feature} is not available on this server: the Python package {package} is not "
            f"installed. The operator can install it with: pip install 'sdserve[{extra}]'",
            tip="Ask without this option, or ask the server's operator to install the extra.",
        )
        self.module = module
        self.extra = extra


def require(module: str, feature: str) -> ModuleType:
    """Import an optional module, or raise MissingExtra naming `feature` and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(module, feature) from None


def available(module: str) -> bool:
    """Whether an optional module can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked or half-installed package
        return False
