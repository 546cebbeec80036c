"""Scheduler names of the API (diffusers class names and A1111 sampler names) mapped to diffusers schedulers."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import diffusers

from sdserve.errors import SchedulerNotSupported

DEFAULT_SCHEDULER = "UniPCMultistepScheduler"

# The reference's list (§1.10) minus those that cannot denoise SD latents from text:
# DDIMInverseScheduler inverts images to noise; KarrasVe and ScoreSdeVe are for unconditional
# variance-exploding models.
SUPPORTED_SCHEDULERS = [
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
    "DEISMultistepScheduler",
    "IPNDMScheduler",
    "LCMScheduler",
]

# A1111 sampler name -> (class, karras, algorithm_type), from the reference's mapping table.
_A1111 = {
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
    "lcm": ("LCMScheduler", False, None),
}
_BY_LOWER = {name.lower(): name for name in SUPPORTED_SCHEDULERS}
_BY_LOWER.update({name.lower().removesuffix("scheduler"): name for name in SUPPORTED_SCHEDULERS})


@dataclass(frozen=True)
class SchedulerChoice:
    class_name: str
    use_karras_sigmas: bool
    algorithm_type: str | None  # diffusers' value, e.g. "sde-dpmsolver++"


def resolve_scheduler_name(
    name: str | None, use_karras_sigmas: bool | None, algorithm_type: str | None
) -> SchedulerChoice:
    """Validate a wire scheduler name; raise SchedulerNotSupported listing the usable ones."""
    requested = (name or DEFAULT_SCHEDULER).strip()
    karras = True if use_karras_sigmas is None else use_karras_sigmas
    algorithm = algorithm_type
    a1111 = _A1111.get(requested.lower())
    if a1111 is not None:
        class_name, karras, algorithm = a1111
    else:
        class_name = _BY_LOWER.get(requested.lower())
        if class_name is None or getattr(diffusers, class_name, None) is None:
            raise SchedulerNotSupported(requested, SUPPORTED_SCHEDULERS)
    if class_name != "DPMSolverMultistepScheduler" or algorithm in (None, "", "none"):
        algorithm = None
    elif algorithm in ("dpmsolver+++", "sde-dpmsolver++"):
        algorithm = "sde-dpmsolver++"
    else:
        algorithm = "dpmsolver++"
    karras = karras and "use_karras_sigmas" in _parameters(class_name)
    return SchedulerChoice(class_name, karras, algorithm)


def make_scheduler(base_config: dict, choice: SchedulerChoice):
    """A new scheduler of the chosen class, keeping the model's own noise schedule."""
    cls = getattr(diffusers, choice.class_name)
    extra = {}
    if "use_karras_sigmas" in _parameters(choice.class_name):
        extra["use_karras_sigmas"] = choice.use_karras_sigmas
    if choice.algorithm_type:
        extra["algorithm_type"] = choice.algorithm_type
    return cls.from_config(base_config, **extra)


def _parameters(class_name: str) -> set[str]:
    return set(inspect.signature(getattr(diffusers, class_name).__init__).parameters)
