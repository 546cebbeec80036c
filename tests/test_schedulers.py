"""Scheduler names (diffusers classes and A1111 samplers) resolve as reference §1.10 says and all run."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import DummyObject

from sdserve.engine import schedulers
from sdserve.engine.schedulers import (
    A1111_SAMPLERS,
    DEFAULT_SCHEDULER,
    SUPPORTED_SCHEDULERS,
    SchedulerChoice,
    make_scheduler,
    resolve_scheduler_name,
)
from sdserve.errors import SchedulerNotSupported

SD_CONFIG = {  # SD 1.5's shipped scheduler config
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def _usable(name: str) -> bool:
    return name in SUPPORTED_SCHEDULERS


def test_supported_list_is_the_usable_part_of_the_reference_list():
    assert (
        DEFAULT_SCHEDULER == "UniPCMultistepScheduler" and DEFAULT_SCHEDULER in SUPPORTED_SCHEDULERS
    )
    for name in ("DDIMInverseScheduler", "KarrasVeScheduler", "ScoreSdeVeScheduler"):
        assert name not in SUPPORTED_SCHEDULERS
    # LMSDiscreteScheduler needs scipy; everything else of §1.10 ships with diffusers.
    assert len(SUPPORTED_SCHEDULERS) == 15 - (not _usable("LMSDiscreteScheduler"))
    for name in SUPPORTED_SCHEDULERS:
        assert issubclass(getattr(diffusers, name), diffusers.SchedulerMixin)


@pytest.mark.parametrize(
    "name",
    [
        "NoSuchScheduler",
        "ScoreSdeVeScheduler",
        "KarrasVeScheduler",
        "DDIMInverseScheduler",
        "DPM fast",
    ],
)
def test_unusable_and_unknown_names_are_refused_with_the_list(name):
    with pytest.raises(SchedulerNotSupported) as info:
        resolve_scheduler_name(name, None, None)
    assert info.value.supported == SUPPORTED_SCHEDULERS
    assert name in info.value.message and "EulerDiscreteScheduler" in info.value.message


def test_a_class_missing_its_optional_dependency_is_not_offered(monkeypatch):
    class LMSDiscreteScheduler(metaclass=DummyObject):  # what diffusers exports without scipy
        _backends = ["torch", "scipy"]

    monkeypatch.setattr(diffusers, "LMSDiscreteScheduler", LMSDiscreteScheduler)
    assert not schedulers._installed("LMSDiscreteScheduler")
    assert not schedulers._installed("NoSuchScheduler")
    assert schedulers._installed("EulerDiscreteScheduler")
    if not _usable("LMSDiscreteScheduler"):  # scipy is absent here: the names are refused
        for name in ("LMSDiscreteScheduler", "LMS Karras"):
            with pytest.raises(SchedulerNotSupported):
                resolve_scheduler_name(name, None, None)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (None, DEFAULT_SCHEDULER),
        ("", DEFAULT_SCHEDULER),
        ("eulerdiscretescheduler", "EulerDiscreteScheduler"),
        ("  EulerAncestralDiscrete ", "EulerAncestralDiscreteScheduler"),
        ("Euler Ancestral Discrete", "EulerAncestralDiscreteScheduler"),
        ("unipcmultistep", "UniPCMultistepScheduler"),
        ("LCM", "LCMScheduler"),
    ],
)
def test_class_names_are_case_and_suffix_insensitive(name, expected):
    assert resolve_scheduler_name(name, None, None).class_name == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DPM++ 2M", SchedulerChoice("DPMSolverMultistepScheduler", False, None)),
        ("DPM++ 2M Karras", SchedulerChoice("DPMSolverMultistepScheduler", True, None)),
        ("DPM++ 2M SDE", SchedulerChoice("DPMSolverMultistepScheduler", False, "sde-dpmsolver++")),
        (
            "DPM++ 2M SDE Karras",
            SchedulerChoice("DPMSolverMultistepScheduler", True, "sde-dpmsolver++"),
        ),
        (
            "dpmpp_2m_sde_karras",
            SchedulerChoice("DPMSolverMultistepScheduler", True, "sde-dpmsolver++"),
        ),
        ("DPM++ 2S a Karras", SchedulerChoice("DPMSolverMultistepScheduler", True, None)),
        ("DPM++ SDE", SchedulerChoice("DPMSolverSinglestepScheduler", False, None)),
        ("DPM++ SDE Karras", SchedulerChoice("DPMSolverSinglestepScheduler", True, None)),
        ("DPM2", SchedulerChoice("KDPM2DiscreteScheduler", False, None)),
        ("DPM2 Karras", SchedulerChoice("KDPM2DiscreteScheduler", True, None)),
        ("DPM2 a", SchedulerChoice("KDPM2AncestralDiscreteScheduler", False, None)),
        ("DPM2 a Karras", SchedulerChoice("KDPM2AncestralDiscreteScheduler", True, None)),
        ("Euler", SchedulerChoice("EulerDiscreteScheduler", False, None)),
        ("Euler a", SchedulerChoice("EulerAncestralDiscreteScheduler", False, None)),
        ("Heun", SchedulerChoice("HeunDiscreteScheduler", False, None)),
        ("UniPC", SchedulerChoice("UniPCMultistepScheduler", False, None)),
    ],
)
def test_a1111_names_translate_per_the_table(name, expected):
    # The sampler name decides Karras and SDE, whatever the separate fields say.
    assert resolve_scheduler_name(name, True, "none") == expected
    assert resolve_scheduler_name(name, False, None) == expected


def test_lms_karras_translates_when_available():
    if not _usable("LMSDiscreteScheduler"):
        pytest.skip("LMSDiscreteScheduler needs scipy")
    assert resolve_scheduler_name("LMS Karras", None, None) == SchedulerChoice(
        "LMSDiscreteScheduler", True, None
    )


def test_modifiers_apply_only_where_the_class_supports_them():
    dpm = "DPMSolverMultistepScheduler"
    assert resolve_scheduler_name(dpm, None, None) == SchedulerChoice(
        dpm, True, None
    )  # default yes
    assert resolve_scheduler_name(dpm, False, "none") == SchedulerChoice(dpm, False, None)
    assert resolve_scheduler_name(dpm, True, "dpmsolver+++").algorithm_type == "sde-dpmsolver++"
    assert resolve_scheduler_name(dpm, True, "DPMSolver+++ ").algorithm_type == "sde-dpmsolver++"
    assert resolve_scheduler_name(dpm, True, "nonsense").algorithm_type is None
    # algorithm_type is only for DPMSolverMultistep; Karras only where diffusers has it.
    assert resolve_scheduler_name("DEISMultistepScheduler", True, "dpmsolver+++") == (
        SchedulerChoice("DEISMultistepScheduler", True, None)
    )
    assert resolve_scheduler_name("DDIMScheduler", True, None).use_karras_sigmas is False
    assert (
        resolve_scheduler_name("EulerAncestralDiscreteScheduler", True, None).use_karras_sigmas
        is False
    )


def test_make_scheduler_keeps_the_models_schedule_and_applies_the_choice():
    v_config = {**SD_CONFIG, "prediction_type": "v_prediction"}
    scheduler = make_scheduler(v_config, resolve_scheduler_name("DPM++ 2M SDE Karras", None, None))
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1
    assert scheduler.config.use_karras_sigmas is True
    assert scheduler.config.algorithm_type == "sde-dpmsolver++"


def test_make_scheduler_does_not_inherit_the_models_sampler_options():
    # A model shipped with an SDE, exponential-sigma DPM config: DEIS rejects SDE, and diffusers
    # refuses Karras together with exponential sigmas.
    sde_config = {
        **SD_CONFIG,
        "_class_name": "DPMSolverMultistepScheduler",
        "algorithm_type": "sde-dpmsolver++",
        "use_exponential_sigmas": True,
    }
    deis = make_scheduler(sde_config, resolve_scheduler_name("DEISMultistepScheduler", True, None))
    assert deis.config.algorithm_type == "deis" and deis.config.use_karras_sigmas is True
    dpm = make_scheduler(sde_config, resolve_scheduler_name("DPM++ 2M", None, None))
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.use_karras_sigmas is False


def test_make_scheduler_sets_what_sd_pipelines_expect():
    euler_config = {
        k: v for k, v in SD_CONFIG.items() if k not in ("clip_sample", "skip_prk_steps")
    }
    assert (
        make_scheduler(
            euler_config, SchedulerChoice("DDIMScheduler", False, None)
        ).config.clip_sample
        is False
    )
    assert (
        make_scheduler(
            euler_config, SchedulerChoice("PNDMScheduler", False, None)
        ).config.skip_prk_steps
        is True
    )


def _all_choices() -> list[SchedulerChoice]:
    # Every supported class with its defaults (Karras on where available), and every distinct
    # translation of an A1111 name: each way the wire can configure a scheduler.
    choices = {resolve_scheduler_name(name, None, None): None for name in SUPPORTED_SCHEDULERS}
    for name in A1111_SAMPLERS:
        try:
            choices.setdefault(resolve_scheduler_name(name, None, None))
        except SchedulerNotSupported:
            assert not _usable("LMSDiscreteScheduler") and name.startswith("lms")
    return list(choices)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_models_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models_dir / "tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    pipe.base_config = dict(pipe.scheduler.config)  # the tiny model ships EulerDiscreteScheduler
    return pipe


# diffusers' k-diffusion schedulers feed torch tensors to numpy, which numpy 2 warns about.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "choice",
    _all_choices(),
    ids=lambda c: (
        f"{c.class_name}-karras{int(c.use_karras_sigmas)}-{c.algorithm_type or 'default'}"
    ),
)
def test_every_choice_generates_on_tiny_sd(tiny_pipe, choice):
    tiny_pipe.scheduler = make_scheduler(tiny_pipe.base_config, choice)
    images = tiny_pipe(
        "a red vase",
        num_inference_steps=2,
        width=64,
        height=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.std() > 0
