"""Scheduler names of the API (diffusers class names and A1111 sampler names) mapped to diffusers schedulers."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import diffusers
from diffusers import SchedulerMixin
from diffusers.utils import DummyObject

from sdserve.errors import SchedulerNotSupported

DEFAULT_SCHEDULER = "UniPCMultistepScheduler"

# Every `scheduler` value of reference §1.10, in its order.
_API_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DDIMInverseScheduler",
    "DEISMultistepScheduler",
    "IPNDMScheduler",
    "KarrasVeScheduler",
    "ScoreSdeVeScheduler",
    "LCMScheduler",
)

# DDIMInverseScheduler turns images into noise (the wrong direction); KarrasVe and ScoreSdeVe
# are for unconditional variance-exploding pixel models, not SD's latents.
_UNUSABLE = frozenset({"DDIMInverseScheduler", "KarrasVeScheduler", "ScoreSdeVeScheduler"})

# diffusers algorithm_type for each wire value; anything else means the class default.
_ALGORITHMS = {"dpmsolver+++": "sde-dpmsolver++", "sde-dpmsolver++": "sde-dpmsolver++"}

# Sigma schedules that diffusers refuses to combine with use_karras_sigmas.
_OTHER_SIGMA_SCHEDULES = ("use_exponential_sigmas", "use_beta_sigmas")

# A1111 sampler -> (class, Karras sigmas, wire algorithm_type), per the reference's table.
# Keys are in `_normalize` form. "DPM++ 2S a" has no diffusers twin; the table names the closest.
_A1111: dict[str, tuple[str, bool, str | None]] = {
    "dpm++ 2m": ("DPMSolverMultistepScheduler", False, None),
    "dpm++ 2m karras": ("DPMSolverMultistepScheduler", True, None),
    "dpm++ 2m sde": ("DPMSolverMultistepScheduler", False, "dpmsolver+++"),
    "dpm++ 2m sde karras": ("DPMSolverMultistepScheduler", True, "dpmsolver+++"),
    "dpm++ 2s a": ("DPMSolverMultistepScheduler", False, None),
    "dpm++ 2s a karras": ("DPMSolverMultistepScheduler", True, None),
    "dpm++ sde": ("DPMSolverSinglestepScheduler", False, None),
    "dpm++ sde karras": ("DPMSolverSinglestepScheduler", True, None),
    "dpm2": ("KDPM2DiscreteScheduler", False, None),
    "dpm2 karras": ("KDPM2DiscreteScheduler", True, None),
    "dpm2 a": ("KDPM2AncestralDiscreteScheduler", False, None),
    "dpm2 a karras": ("KDPM2AncestralDiscreteScheduler", True, None),
    "euler": ("EulerDiscreteScheduler", False, None),
    "euler a": ("EulerAncestralDiscreteScheduler", False, None),
    "heun": ("HeunDiscreteScheduler", False, None),
    "lms": ("LMSDiscreteScheduler", False, None),
    "lms karras": ("LMSDiscreteScheduler", True, None),
    "ddim": ("DDIMScheduler", False, None),
    "plms": ("PNDMScheduler", False, None),
    "unipc": ("UniPCMultistepScheduler", False, None),
    "deis": ("DEISMultistepScheduler", False, None),
    "lcm": ("LCMScheduler", False, None),
}
A1111_SAMPLERS: tuple[str, ...] = tuple(_A1111)  # accepted in any case, with _ for spaces


@dataclass(frozen=True)
class SchedulerChoice:
    """What `make_scheduler` builds: a diffusers class and the options it really supports."""

    class_name: str
    use_karras_sigmas: bool
    algorithm_type: str | None  # diffusers' value, e.g. "sde-dpmsolver++"; None: class default


def _installed(class_name: str) -> bool:
    # A class whose optional dependency is missing (LMSDiscreteScheduler needs scipy) is a dummy
    # that raises on use; it must not be offered.
    cls = getattr(diffusers, class_name, None)
    return (
        isinstance(cls, type)
        and not isinstance(cls, DummyObject)
        and issubclass(cls, SchedulerMixin)
    )


SUPPORTED_SCHEDULERS: list[str] = [
    name for name in _API_SCHEDULERS if name not in _UNUSABLE and _installed(name)
]
_BY_KEY = {name.lower(): name for name in _API_SCHEDULERS} | {
    name.lower().removesuffix("scheduler"): name for name in _API_SCHEDULERS
}


def resolve_scheduler_name(
    name: str | None, use_karras_sigmas: bool | None, algorithm_type: str | None
) -> SchedulerChoice:
    """Validate a wire scheduler name; raise SchedulerNotSupported listing the usable ones.

    An A1111 sampler name fixes Karras sigmas and the algorithm itself ("DPM++ 2M" is the
    non-Karras one), so the separate fields only modify diffusers class names. Karras sigmas
    default to on, as upstream; both modifiers are dropped where the class cannot use them.
    """
    requested = (name or "").strip() or DEFAULT_SCHEDULER
    key = _normalize(requested)
    if key in _A1111:
        class_name, karras, wire_algorithm = _A1111[key]
    else:
        class_name = _BY_KEY.get(key.replace(" ", ""), "")
        karras = True if use_karras_sigmas is None else use_karras_sigmas
        wire_algorithm = algorithm_type
    if class_name not in SUPPORTED_SCHEDULERS:
        raise SchedulerNotSupported(requested, SUPPORTED_SCHEDULERS)

    algorithm = None
    if class_name == "DPMSolverMultistepScheduler" and wire_algorithm:
        algorithm = _ALGORITHMS.get(wire_algorithm.strip().lower())
    karras = bool(karras) and "use_karras_sigmas" in _init_parameters(class_name)
    return SchedulerChoice(class_name, karras, algorithm)


def make_scheduler(base_config: dict[str, Any], choice: SchedulerChoice) -> SchedulerMixin:
    """A new scheduler of the chosen class that keeps the model's noise schedule and prediction type."""
    # The sampler options come from the choice alone: a model that ships an SDE or exponential-
    # sigma config must not leak those into a class that rejects them (DEIS raises on SDE).
    dropped = {"algorithm_type", "use_karras_sigmas"}
    if choice.use_karras_sigmas:
        dropped.update(_OTHER_SIGMA_SCHEDULES)
    config = {k: v for k, v in dict(base_config).items() if k not in dropped}
    extra: dict[str, Any] = {}
    parameters = _init_parameters(choice.class_name)
    # What diffusers' SD pipelines force at load, needed when the model's own config is of
    # another class: latents are not bounded to [-1, 1], and PNDM's Runge-Kutta warm-up is
    # never used for SD (and breaks below 4 steps).
    if "clip_sample" in parameters:
        extra["clip_sample"] = False
    if "skip_prk_steps" in parameters:
        extra["skip_prk_steps"] = True
    # DPM-Solver is unstable at few steps without it; singlestep defaults to False and then
    # rewrites its own config with a warning on every request.
    if "lower_order_final" in parameters:
        config.setdefault("lower_order_final", True)
    if "use_karras_sigmas" in parameters:
        extra["use_karras_sigmas"] = choice.use_karras_sigmas
    if choice.algorithm_type and "algorithm_type" in parameters:
        extra["algorithm_type"] = choice.algorithm_type
    return getattr(diffusers, choice.class_name).from_config(config, **extra)


def _normalize(name: str) -> str:
    # "DPM++ 2M Karras", "dpmpp_2m_karras" and "DPM++  2M karras" are the same sampler.
    name = name.strip().lower().replace("_", " ").replace("dpmpp", "dpm++")
    return re.sub(r"\s+", " ", name)


def _init_parameters(class_name: str) -> set[str]:
    return set(inspect.signature(getattr(diffusers, class_name).__init__).parameters)
