"""The endpoint families this server answers, one registration line each: the routes its schema
file declares and the engine (from its engine file) that runs its jobs."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from fastapi import APIRouter

from sdserve.api import chat as chat_api
from sdserve.engine.base import Engine, Runtime
from sdserve.engine.blip_diffusion import BlipDiffusionEngine
from sdserve.engine.chat import ChatEngine
from sdserve.engine.controlnet import ControlNetEngine
from sdserve.engine.depth2img import Depth2ImgEngine
from sdserve.engine.images import ImageEngine
from sdserve.engine.img_mixer import ImgMixerEngine
from sdserve.engine.imports import ModelJobsEngine
from sdserve.engine.magic_mix import MagicMixEngine
from sdserve.engine.mixture_canvas import MixtureCanvasEngine
from sdserve.engine.noop import NoopEngine
from sdserve.engine.outpaint import OutpaintEngine
from sdserve.engine.pix2pix import Pix2PixEngine
from sdserve.engine.removebg import RemoveBgEngine
from sdserve.engine.super_resolution import UpscaleEngine
from sdserve.engine.three_d import ThreeDEngine
from sdserve.engine.training import TrainingEngine
from sdserve.engine.video import VideoEngine
from sdserve.schemas import (
    controlnet,
    depth2img,
    image_mixing,
    images,
    interior,
    outpaint,
    pix2pix,
    removebg,
    super_resolution,
    three_d,
    video,
)
from sdserve.schemas.common import Dialect, Route
from sdserve.settings import Settings


@dataclass(frozen=True)
class Family:
    """`router`: routes of the family's own beyond its job routes (answers that are not the job
    envelope: chat's synchronous and streaming routes). `lane`: the family's jobs get a worker
    of their own in the API process, so they never wait behind other families' jobs."""

    name: str
    routes: list[Route]
    engine: type[Engine]
    router: APIRouter | None = None
    lane: str | None = None


FAMILIES = (
    Family("images", images.ROUTES, ImageEngine),
    Family("video", video.ROUTES, VideoEngine),
    Family("super_resolution", super_resolution.ROUTES, UpscaleEngine),
    # before the image-editing verbs: /api/v1/enterprise/interior/object_removal is interior's
    Family("controlnet", controlnet.ROUTES + interior.ROUTES, ControlNetEngine),
    Family("3d", three_d.ROUTES, ThreeDEngine),
    Family("chat", [], ChatEngine, router=chat_api.router, lane="chat"),
    Family("outpaint", outpaint.ROUTES, OutpaintEngine),  # + object_removal, inpaint aliases
    Family("pix2pix", pix2pix.ROUTES, Pix2PixEngine),
    Family("depth2img", depth2img.ROUTES, Depth2ImgEngine),
    Family("removebg", removebg.ROUTES, RemoveBgEngine),
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


def lanes(settings: Settings) -> list[str]:
    return sorted({family.lane for family in registered(settings) if family.lane})


def build_engines(settings: Settings, runtime: Runtime, lane: str | None = None) -> list[Engine]:
    """The engines a worker runs: one per family (sharing `runtime`), or the no-op engine; a
    lane's worker runs only its families' engines (real ones, even with the no-op engine)."""
    if lane is not None:
        return [f.engine(runtime) for f in registered(settings) if f.lane == lane]
    if settings.engine == "noop":
        return [NoopEngine(settings)]
    classes = [family.engine for family in registered(settings)] + list(OTHER_ENGINES)
    return [engine(runtime) for engine in classes]
