"""The endpoint families this server answers, one registration line each: the routes its schema
file declares and the engine (from its engine file) that runs its jobs."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from sdserve.engine.base import Engine, Runtime
from sdserve.engine.blip_diffusion import BlipDiffusionEngine
from sdserve.engine.images import ImageEngine
from sdserve.engine.img_mixer import ImgMixerEngine
from sdserve.engine.imports import ModelJobsEngine
from sdserve.engine.magic_mix import MagicMixEngine
from sdserve.engine.mixture_canvas import MixtureCanvasEngine
from sdserve.engine.noop import NoopEngine
from sdserve.engine.super_resolution import UpscaleEngine
from sdserve.engine.training import TrainingEngine
from sdserve.engine.video import VideoEngine
from sdserve.schemas import image_mixing, images, super_resolution, video
from sdserve.schemas.common import Dialect, Route
from sdserve.settings import Settings


@dataclass(frozen=True)
class Family:
    name: str
    routes: list[Route]
    engine: type[Engine]


FAMILIES = (
    Family("images", images.ROUTES, ImageEngine),
    Family("video", video.ROUTES, VideoEngine),
    Family("super_resolution", super_resolution.ROUTES, UpscaleEngine),
    Family("blip_diffusion", image_mixing.BLIP_DIFFUSION_ROUTES, BlipDiffusionEngine),
    Family("magic_mix", image_mixing.MAGIC_MIX_ROUTES, MagicMixEngine),
    Family("img_mixer", image_mixing.IMG_MIXER_ROUTES, ImgMixerEngine),
    Family("mixture_canvas", image_mixing.MIXTURE_CANVAS_ROUTES, MixtureCanvasEngine),
)
# Engines of jobs that have routes of their own (training and model management, in api/).
OTHER_ENGINES: tuple[type[Engine], ...] = (TrainingEngine, ModelJobsEngine)


def registered(settings: Settings) -> tuple[Family, ...]:
    """The built-in families and those named by `SDSERVE_EXTRA_FAMILIES` ("module:attribute")."""
    extra = []
    for name in filter(None, (n.strip() for n in settings.extra_families.split(","))):
        module, _, attribute = name.partition(":")
        extra.append(getattr(importlib.import_module(module), attribute))
    families = FAMILIES + tuple(extra)
    dialects: dict[str, Dialect] = {}
    for family in families:
        for route in family.routes:
            known = dialects.setdefault(route.dialect.name, route.dialect)
            assert known == route.dialect, f"two dialects named {route.dialect.name}"
    return families


def build_engines(settings: Settings, runtime: Runtime) -> list[Engine]:
    """The engines a worker runs: one per family (sharing `runtime`), or the no-op engine."""
    if settings.engine == "noop":
        return [NoopEngine(settings)]
    classes = [family.engine for family in registered(settings)] + list(OTHER_ENGINES)
    return [engine(runtime) for engine in classes]
