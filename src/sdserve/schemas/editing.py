"""What the image-editing verbs of this half of reference §11 share on the wire: their four path
prefixes (§16.5) and dialects, and the small rules every one of them applies the same way."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from sdserve.schemas.common import Context, Dialect, JobSpec, Route, WireFlags

# Era A answers list outputs, except where §11 shows a single URL string (pix2pix, depth2img).
V5 = Dialect("editing_v5", "/api/v5/fetch/{id}")
V5_SINGLE = Dialect("editing_v5_single", "/api/v5/fetch/{id}", single_output=True)
V6 = Dialect("editing_v6", "/api/v6/image_editing/fetch/{id}")
V1 = Dialect("editing_v1", "/api/v1/image_editing/fetch/{id}")
ENTERPRISE = Dialect("editing_enterprise", "/api/v1/enterprise/image_editing/fetch/{id}")
ERA_B = (V6, V1, ENTERPRISE)


def routes(
    verb: str,
    build: Callable[[Dialect], Callable[[dict, Context], JobSpec]],
    request: type[BaseModel],
    *,
    single_v5: bool = False,
) -> list[Route]:
    """The verb under every prefix: `/api/v5/`, `/api/v6/image_editing/`,
    `/api/v1/image_editing/` and, for the admin key, `/api/v1/enterprise/image_editing/`."""
    paths = (
        (f"/api/v5/{verb}", V5_SINGLE if single_v5 else V5, False),
        (f"/api/v6/image_editing/{verb}", V6, False),
        (f"/api/v1/image_editing/{verb}", V1, False),
        (f"/api/v1/enterprise/image_editing/{verb}", ENTERPRISE, True),
    )
    return [
        Route(
            path,
            dialect,
            build(dialect),
            request,
            summary=f"{verb} ({dialect.name})",
            admin_only=admin_only,
            tags=("image_editing",),
        )
        for path, dialect, admin_only in paths
    ]


def safety_default(dialect: Dialect, given: bool | None) -> bool:
    """The NSFW check is on by default for era B clients, off for era A (as the image family)."""
    return dialect in ERA_B if given is None else given


def output_names(wire: WireFlags, count: int, ext: str = "png") -> list[str]:
    """`{folder}/{i}-{prefix}.{ext}`; base64 outputs are stored as `.base64` files."""
    ext = "base64" if wire.base64 else ext
    folder = "temp" if wire.temp else "generations"
    return [f"{folder}/{i}-{wire.file_prefix}.{ext}" for i in range(count)]


def check_range(
    name: str, value: float, low: float, high: float, errors: dict[str, list[str]]
) -> float:
    """A value outside [low, high] is an error (weights and strengths are not silently clamped)."""
    if not low <= value <= high:
        label = name.replace("_", " ")
        errors.setdefault(name, []).append(f"The {label} must be between {low:g} and {high:g}.")
    return value
