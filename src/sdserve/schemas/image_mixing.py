"""Wire schemas of four image-editing verbs that mix subjects and images (reference §11.2, §11.3,
§11.5, §11.9, paths §16.5): `blip_diffusion`, `magic_mix`, `img_mixer` and `mixture_canvas`.

Each verb answers under `/api/v5/<verb>` (era A), `/api/v6/image_editing/<verb>` and
`/api/v1/image_editing/<verb>` (era B), `/api/v1/enterprise/image_editing/<verb>` (admin), and
`img_mixer` under `/api/v3/img_mixer` too; every form answers `output` as a list.
"""

from __future__ import annotations

import re
from typing import Any

from sdserve.engine import batching, blip_diffusion
from sdserve.engine.blip_diffusion import TASKS, BlipDiffusionParams
from sdserve.engine.img_mixer import (
    MAX_IMAGES,
    ImgMixerParams,
    adapter_for,
    image_input_names,
    refuse_lambdalabs,
)
from sdserve.engine.magic_mix import MagicMixParams, phase_bounds
from sdserve.engine.mixture_canvas import LATENT_FACTOR, MixtureCanvasParams
from sdserve.engine.safety import REPLACEMENTS
from sdserve.errors import ValidationFailed
from sdserve.schemas import common
from sdserve.schemas.coerce import Float, FloatList, Int, Text, yes_no
from sdserve.schemas.common import (
    CommonRequest,
    Context,
    Dialect,
    Input,
    JobSpec,
    Route,
    WireFlags,
    parse_request,
)

# Dialect names are stored on jobs and unique across families: these four verbs share theirs.
MIX_V5 = Dialect("mix_v5", "/api/v5/fetch/{id}")
MIX_V3 = Dialect("mix_v3", "/api/v3/fetch/{id}")
MIX_V6 = Dialect("mix_v6", "/api/v6/image_editing/fetch/{id}")
MIX_V1 = Dialect("mix_v1", "/api/v1/image_editing/fetch/{id}")
MIX_ENTERPRISE = Dialect("mix_enterprise", "/api/v1/enterprise/image_editing/fetch/{id}")


class MixingRequest(CommonRequest):
    """Fields several of the four verbs send, beyond the common ones."""

    samples: Int = None
    image: Text = None
    safety_checker_type: Text = None


class BlipDiffusionRequest(MixingRequest):
    task: Text = None
    condition_image: Text = None
    condition_subject: Text = None
    target_subject: Text = None
    style_image: Text = None
    style_subject: Text = None
    controlnet_condition_image: Text = None
    prompt_strength: Float = None
    prompt_reps: Int = None


class MagicMixRequest(MixingRequest):
    kmin: Float = None
    kmax: Float = None
    mix_factor: Float = None


class ImgMixerRequest(MixingRequest):
    init_image: Any = None  # comma-separated URLs (era A) or a JSON array (era B)
    init_image_weights: FloatList = None


class MixtureCanvasRequest(MixingRequest):
    mix_factor: Float = None
    pos_x1: Int = None
    pos_x2: Int = None
    pos_y1: Int = None
    pos_y2: Int = None


# ---- the rules the four share --------------------------------------------------------------


def _fraction(name: str, value: float | None, default: float, errors: dict) -> float:
    chosen = default if value is None else value
    if not 0 <= chosen <= 1:
        errors[name] = [f"The {name.replace('_', ' ')} must be between 0 and 1."]
    return chosen


def _guidance(value: float | None, default: float, errors: dict) -> float:
    chosen = default if value is None else value
    if not 1 <= chosen <= 20:
        errors["guidance_scale"] = ["The guidance scale must be between 1 and 20."]
    return chosen


def _samples(value: int | None, ctx: Context, errors: dict) -> int:
    chosen = 1 if value is None else value
    maximum = ctx.settings.max_samples
    return common.bounded("samples", chosen, 1, maximum, common.HARD_MAX_SAMPLES, errors)


def _safety(req: MixingRequest, errors: dict) -> tuple[bool, str]:
    kind = (req.safety_checker_type or "sensitive_content_text").strip().lower()
    if kind not in REPLACEMENTS:
        errors["safety_checker_type"] = [
            f"The safety checker type must be one of: {', '.join(REPLACEMENTS)}."
        ]
    return bool(req.safety_checker), kind


def _sd_model(model_id: str | None, ctx: Context) -> tuple[str, str]:
    """A Stable Diffusion model (the server's default when none is named), checked available:
    its id and the label meta shows."""
    model_id = model_id or ctx.settings.default_model
    source = ctx.registry.resolve(model_id, ctx.owner)
    ctx.registry.check_available(source)
    if ctx.registry.architecture(source) in ("t2v", "svd"):
        raise ValidationFailed({"model_id": [f"{model_id} is a video model, not an image model."]})
    return model_id, source.location if source.kind == "hub" else model_id


def _output_names(samples: int, wire: WireFlags) -> list[str]:
    ext = "base64" if wire.base64 else "png"
    folder = "temp" if wire.temp else "generations"
    return [f"{folder}/{i}-{wire.file_prefix}.{ext}" for i in range(samples)]


def _spec(kind: str, p, wire: WireFlags, inputs: dict, meta: dict, steps: int, samples: int):
    return JobSpec(
        kind=kind,
        model_id=p.model_id,
        params={**p.model_dump(mode="json"), **wire.stored()},
        batch_key=batching.batch_key(kind, p.model_id, p.width, p.height, p.steps),
        cost=p.cost,
        total_steps=steps,
        output_names=_output_names(samples, wire),
        meta={
            **meta,
            "safety_checker": yes_no(p.safety_checker),
            "temp": yes_no(wire.temp),
            "base64": yes_no(wire.base64),
            "instant_response": yes_no(wire.instant_response),
            "webhook": wire.webhook,
            "track_id": wire.track_id,
            "outdir": "out",
            "file_prefix": wire.file_prefix,
        },
        inputs=inputs,
        webhook=wire.webhook,
        track_id=wire.track_id,
        instant_response=wire.instant_response,
    )


# ---- blip_diffusion (§11.2) ------------------------------------------------------------------


def blip_diffusion_job(body: dict, ctx: Context) -> JobSpec:
    req = parse_request(BlipDiffusionRequest, body)
    settings, errors = ctx.settings, {}
    task = (req.task or "zeroshot").strip().lower()
    if task not in TASKS:
        errors["task"] = [f"The task must be one of: {', '.join(TASKS)}."]
    prompt = common.check_prompt(req.prompt, "prompt", settings, errors, required=True)
    negative = common.check_prompt(
        req.negative_prompt, "negative_prompt", settings, errors, required=False
    )
    zeroshot = task == "zeroshot"
    # zeroshot: the subject of the condition image; controlnet: the style image's
    if zeroshot:
        reference = req.condition_image or req.image
    else:
        reference = req.style_image or req.condition_image
    source_subject = ((req.condition_subject if zeroshot else req.style_subject) or "").strip()
    if not reference:
        name = "condition_image" if zeroshot else "style_image"
        errors[name] = [f"The {name.replace('_', ' ')} field is required."]
    if not source_subject:
        name = "condition_subject" if zeroshot else "style_subject"
        errors[name] = [f"The {name.replace('_', ' ')} field is required."]
    if not zeroshot and not req.controlnet_condition_image:
        errors["controlnet_condition_image"] = [
            "The controlnet condition image field is required for the controlnet tasks."
        ]
    target = (req.target_subject or "").strip() or source_subject
    limit = min(512, settings.max_width), min(512, settings.max_height)
    width = common.size("width", req.width, 512, limit[0], errors)
    height = common.size("height", req.height, 512, limit[1], errors)
    steps = common.steps(req.num_inference_steps, req.steps, 20, settings, errors)
    guidance = _guidance(req.guidance_scale, 8.0, errors)
    samples = _samples(req.samples, ctx, errors)
    prompt_strength = 1.0 if req.prompt_strength is None else req.prompt_strength
    if not 0 < prompt_strength <= 1:
        errors["prompt_strength"] = ["The prompt strength must be above 0 and at most 1."]
    prompt_reps = 20 if req.prompt_reps is None else req.prompt_reps
    if not 1 <= prompt_reps <= 50:
        errors["prompt_reps"] = ["The prompt reps must be between 1 and 50."]
    safety, safety_type = _safety(req, errors)
    common.check_webhook(req.webhook, settings, errors)
    if errors:
        raise ValidationFailed(errors)
    model_id = req.model_id or blip_diffusion.TINY_MODEL_ID
    blip_diffusion.check_available(model_id, task, settings)
    p = BlipDiffusionParams(
        model_id=model_id,
        task=task,
        prompt=prompt,
        negative_prompt=negative,
        condition_subject=source_subject,
        target_subject=target,
        width=width,
        height=height,
        samples=samples,
        steps=steps,
        guidance_scale=guidance,
        seed=common.pick_seed(req.seed),
        prompt_strength=prompt_strength,
        prompt_reps=prompt_reps,
        safety_checker=safety,
        safety_checker_type=safety_type,
    )
    inputs = {"condition_image": Input(reference)}
    if not zeroshot:
        inputs["controlnet_condition_image"] = Input(req.controlnet_condition_image)
    wire = WireFlags.of(req)
    meta = {
        "model_id": model_id,
        "sub_task": task,
        "prompt": prompt,
        "neg_prompt": negative,
        "reference_image": common.echo_url(reference),
        "controlnet_condition_image": common.echo_url(req.controlnet_condition_image),
        "source_subject_category": source_subject,
        "target_subject_category": target,
        "width": width,
        "height": height,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "prompt_strength": prompt_strength,
        "prompt_reps": prompt_reps,
        "n_samples": samples,
        "seed": p.seed,
    }
    return _spec("blip_diffusion", p, wire, inputs, meta, steps, samples)


# ---- magic_mix (§11.3) -----------------------------------------------------------------------


def magic_mix_job(body: dict, ctx: Context) -> JobSpec:
    req = parse_request(MagicMixRequest, body)
    settings, errors = ctx.settings, {}
    prompt = common.check_prompt(req.prompt, "prompt", settings, errors, required=True)
    negative = common.check_prompt(
        req.negative_prompt, "negative_prompt", settings, errors, required=False
    )
    image = req.image or req.init_image
    if not image:
        errors["image"] = ["The image field is required."]
    width = common.size("width", req.width, 768, settings.max_width, errors)
    height = common.size("height", req.height, 768, settings.max_height, errors)
    steps = common.steps(req.num_inference_steps, req.steps, 20, settings, errors)
    guidance = _guidance(req.guidance_scale, 7.5, errors)
    samples = _samples(req.samples, ctx, errors)
    kmin = _fraction("kmin", req.kmin, 0.3, errors)
    kmax = _fraction("kmax", req.kmax, 0.5, errors)
    if "kmin" not in errors and "kmax" not in errors and kmin > kmax:
        errors["kmin"] = ["The kmin may not be greater than kmax."]
    mix_factor = _fraction("mix_factor", req.mix_factor, 0.5, errors)
    safety, safety_type = _safety(req, errors)
    common.check_webhook(req.webhook, settings, errors)
    if errors:
        raise ValidationFailed(errors)
    model_id, label = _sd_model(req.model_id, ctx)
    p = MagicMixParams(
        model_id=model_id,
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        samples=samples,
        steps=steps,
        guidance_scale=guidance,
        seed=common.pick_seed(req.seed),
        kmin=kmin,
        kmax=kmax,
        mix_factor=mix_factor,
        safety_checker=safety,
        safety_checker_type=safety_type,
    )
    tmax, _ = phase_bounds(steps, kmin, kmax)
    meta = {
        "model_id": label,
        "prompt": prompt,
        "negative_prompt": negative,
        "image": common.echo_url(image),
        "H": height,
        "W": width,
        "kmin": kmin,
        "kmax": kmax,
        "mix_factor": mix_factor,
        "steps": steps,
        "guidance_scale": guidance,
        "n_samples": samples,
        "seed": p.seed,
    }
    wire = WireFlags.of(req)
    return _spec("magic_mix", p, wire, {"image": Input(image)}, meta, steps - tmax, samples)


# ---- img_mixer (§11.5) -----------------------------------------------------------------------

# A new image starts at a comma followed by a URL or a data URL (data URLs hold a comma).
_NEXT_IMAGE = re.compile(r",\s*(?=https?://|data:)")


def split_images(value: Any) -> list[str]:
    """The images of `init_image`: a JSON array, or one string of comma-separated URLs, data
    URLs or raw base64."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [str(item).strip() for item in value if str(item).strip()]
    text = str(value).strip()
    if re.match(r"https?://|data:", text):
        parts = _NEXT_IMAGE.split(text)
    else:  # raw base64 has no commas
        parts = text.split(",")
    return [part.strip() for part in parts if part.strip()]


def img_mixer_job(body: dict, ctx: Context) -> JobSpec:
    req = parse_request(ImgMixerRequest, body)
    settings, errors = ctx.settings, {}
    prompt = common.check_prompt(req.prompt, "prompt", settings, errors, required=False)
    negative = common.check_prompt(
        req.negative_prompt, "negative_prompt", settings, errors, required=False
    )
    if req.init_image is not None and not isinstance(req.init_image, str | list):
        errors["init_image"] = [
            "The init image must be a list of images or a comma-separated string."
        ]
        images = []
    else:
        images = split_images(req.init_image) or split_images(req.image)
    if "init_image" not in errors and not 1 <= len(images) <= MAX_IMAGES:
        errors["init_image"] = [f"Send between 1 and {MAX_IMAGES} images in init_image."]
    weights = req.init_image_weights or [1.0] * len(images)
    if images and len(weights) != len(images):
        errors["init_image_weights"] = [
            f"Send one weight per image: {len(images)} images, {len(weights)} weights."
        ]
    elif any(not 0 <= w <= 1 for w in weights) or not any(weights):
        errors["init_image_weights"] = [
            "Each init image weight must be between 0 and 1, and one at least above 0."
        ]
    width = common.size("width", req.width, 512, settings.max_width, errors)
    height = common.size("height", req.height, 512, settings.max_height, errors)
    steps = common.steps(req.num_inference_steps, req.steps, 20, settings, errors)
    guidance = _guidance(req.guidance_scale, 7.5, errors)
    samples = _samples(req.samples, ctx, errors)
    safety, safety_type = _safety(req, errors)
    common.check_webhook(req.webhook, settings, errors)
    if errors:
        raise ValidationFailed(errors)
    refuse_lambdalabs(req.model_id)
    model_id, label = _sd_model(req.model_id, ctx)
    adapter_for(model_id, ctx.registry, ctx.owner)
    p = ImgMixerParams(
        model_id=model_id,
        prompt=prompt,
        negative_prompt=negative,
        weights=weights,
        width=width,
        height=height,
        samples=samples,
        steps=steps,
        guidance_scale=guidance,
        seed=common.pick_seed(req.seed),
        safety_checker=safety,
        safety_checker_type=safety_type,
    )
    inputs = {
        name: Input(image)
        for name, image in zip(image_input_names(len(images)), images, strict=True)
    }
    meta = {
        "model_id": label,
        "prompt": prompt,
        "negative_prompt": negative,
        "init_image": ",".join(common.echo_url(image) or "" for image in images),
        "init_image_weights": ",".join(f"{w:g}" for w in weights),
        "H": height,
        "W": width,
        "steps": steps,
        "guidance_scale": guidance,
        "n_samples": samples,
        "seed": p.seed,
    }
    return _spec("img_mixer", p, WireFlags.of(req), inputs, meta, steps, samples)


# ---- mixture_canvas (§11.9) ------------------------------------------------------------------


def mixture_canvas_job(body: dict, ctx: Context) -> JobSpec:
    req = parse_request(MixtureCanvasRequest, body)
    settings, errors = ctx.settings, {}
    prompt = common.check_prompt(req.prompt, "prompt", settings, errors, required=True)
    negative = common.check_prompt(
        req.negative_prompt, "negative_prompt", settings, errors, required=False
    )
    image = req.image or req.init_image
    if not image:
        errors["image"] = ["The image field is required."]
    # As the hosted API does (its own example answers canvas_height = width): `width` is the
    # canvas's height and `height` its width, so that the default region fits the default canvas.
    canvas_height = common.size("width", req.width, 800, settings.max_height, errors)
    canvas_width = common.size("height", req.height, 360, settings.max_width, errors)
    steps = common.steps(req.num_inference_steps, req.steps, 20, settings, errors)
    guidance = _guidance(req.guidance_scale, 8.0, errors)
    strength = _fraction("strength", req.strength, 0.5, errors)
    mix_factor = _fraction("mix_factor", req.mix_factor, 0.5, errors)
    box = {
        "pos_x1": 0 if req.pos_x1 is None else req.pos_x1,
        "pos_x2": 352 if req.pos_x2 is None else req.pos_x2,
        "pos_y1": 448 if req.pos_y1 is None else req.pos_y1,
        "pos_y2": 800 if req.pos_y2 is None else req.pos_y2,
    }
    _check_region(box, canvas_width, canvas_height, errors)
    safety, safety_type = _safety(req, errors)
    common.check_webhook(req.webhook, settings, errors)
    if errors:
        raise ValidationFailed(errors)
    model_id, label = _sd_model(req.model_id, ctx)
    p = MixtureCanvasParams(
        model_id=model_id,
        prompt=prompt,
        negative_prompt=negative,
        width=canvas_width,
        height=canvas_height,
        steps=steps,
        guidance_scale=guidance,
        seed=common.pick_seed(req.seed),
        strength=strength,
        mix_factor=mix_factor,
        safety_checker=safety,
        safety_checker_type=safety_type,
        **box,
    )
    meta = {
        "model_id": label,
        "prompt": prompt,
        "negative_prompt": negative,
        "image": common.echo_url(image),
        "canvas_height": canvas_height,
        "canvas_width": canvas_width,
        **box,
        "strength": strength,
        "mix_factor": mix_factor,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "seed": p.seed,
    }
    return _spec("mixture_canvas", p, WireFlags.of(req), {"image": Input(image)}, meta, steps, 1)


def _check_region(box: dict[str, int], width: int, height: int, errors: dict) -> None:
    """The image region: inside the canvas, at least one latent cell, edges on multiples of 8."""
    for name, value in box.items():
        if value % LATENT_FACTOR:
            errors[name] = [f"The {name} must be a multiple of {LATENT_FACTOR}."]
    if errors.keys() & box.keys():
        return
    if not 0 <= box["pos_x1"] < box["pos_x2"] <= width:
        errors["pos_x1"] = [
            f"The region's columns pos_x1..pos_x2 must lie within the canvas width, 0..{width} "
            "(the request's height)."
        ]
    if not 0 <= box["pos_y1"] < box["pos_y2"] <= height:
        errors["pos_y1"] = [
            f"The region's rows pos_y1..pos_y2 must lie within the canvas height, 0..{height} "
            "(the request's width)."
        ]


# ---- the routes ------------------------------------------------------------------------------


def _routes(verb: str, build, request) -> list[Route]:
    paths = [
        (f"/api/v5/{verb}", MIX_V5, False),
        (f"/api/v6/image_editing/{verb}", MIX_V6, False),
        (f"/api/v1/image_editing/{verb}", MIX_V1, False),
        (f"/api/v1/enterprise/image_editing/{verb}", MIX_ENTERPRISE, True),
    ]
    if verb == "img_mixer":
        paths.append(("/api/v3/img_mixer", MIX_V3, False))
    return [
        Route(
            path,
            dialect,
            build,
            request,
            summary=f"{verb} ({dialect.name})",
            admin_only=admin_only,
            tags=("image_editing",),
        )
        for path, dialect, admin_only in paths
    ]


BLIP_DIFFUSION_ROUTES = _routes("blip_diffusion", blip_diffusion_job, BlipDiffusionRequest)
MAGIC_MIX_ROUTES = _routes("magic_mix", magic_mix_job, MagicMixRequest)
IMG_MIXER_ROUTES = _routes("img_mixer", img_mixer_job, ImgMixerRequest)
MIXTURE_CANVAS_ROUTES = _routes("mixture_canvas", mixture_canvas_job, MixtureCanvasRequest)
