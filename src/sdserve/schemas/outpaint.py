"""Wire schemas for the inpaint-based editing verbs: `outpaint` (reference §11.1: era A's walk,
era B's fixed canvas) and the aliases of §16.5, `object_removal` and `inpaint`, which are the image
family's inpaint job (the base model with the mask) under the image-editing paths."""

from __future__ import annotations

from sdserve.engine import batching, editing_models
from sdserve.engine.outpaint import DIRECTIONS, OutpaintParams
from sdserve.errors import ValidationFailed
from sdserve.schemas import common, editing, images
from sdserve.schemas.coerce import Flag, Float, Int, StrList, Text, yes_no
from sdserve.schemas.common import (
    CommonRequest,
    Context,
    Dialect,
    Input,
    JobSpec,
    WireFlags,
    parse_request,
)

MAX_WALK = 20  # walk steps per request: each is a full inpaint run
MAX_VIDEO_PIXELS = 256 * 2**20  # frames x width x height of a walk video (held before encoding)
_ALIASES = {"back": "backward"}


class OutpaintRequest(CommonRequest):
    image: Text = None
    samples: Int = None
    walk_type: StrList = None
    width_translation_per_step: Int = None
    height_translation_per_step: Int = None
    translation_factor: Float = None
    num_interpolation_steps: Int = None
    as_video: Flag = None
    fps: Int = None
    overlap_width: Int = None
    safety_checker: Flag = None
    safety_checker_type: Text = None


def _walk(values: list[str] | None, errors: dict) -> list[str]:
    walk = [_ALIASES.get(v.lower(), v.lower()) for v in values or []]
    wrong = [v for v in walk if v not in DIRECTIONS]
    if wrong:
        errors["walk_type"] = [
            f"The walk type must list directions ({', '.join(DIRECTIONS)}); got {', '.join(wrong)}."
        ]
    elif len(walk) > MAX_WALK:
        errors["walk_type"] = [f"The walk type may have at most {MAX_WALK} steps."]
    return walk


def _translation(
    name: str, given: int | None, factor: float | None, side: int, walk: list[str], errors: dict
) -> int:
    """Pixels per walk step: the value given, else `translation_factor` of the side, else 32;
    less than the side (half of it when the walk goes backward: a shrunk image must remain)."""
    value = given if given is not None else round(factor * side) if factor is not None else 32
    limit = (side - 1) // 2 if "backward" in walk else side - 1
    if walk and not 1 <= value <= limit:
        label = name.replace("_", " ")
        errors[name] = [f"The {label} must be between 1 and {limit} pixels."]
    return value


def outpaint_job(dialect: Dialect):
    def build(body: dict, ctx: Context) -> JobSpec:
        settings = ctx.settings
        req = parse_request(OutpaintRequest, body)
        errors: dict[str, list[str]] = {}
        era_b = dialect in editing.ERA_B
        source = req.image or req.init_image
        if not source:
            errors["image"] = ["The image field is required."]
        # A walk when the client sends one (era A); otherwise era B's fixed canvas.
        mode = "walk" if req.walk_type else "canvas"
        walk = _walk(req.walk_type, errors)
        default_prompt = "" if mode == "walk" else "high quality"
        prompt = common.check_prompt(
            req.prompt or default_prompt, "prompt", settings, errors, required=False
        )
        negative = common.check_prompt(
            req.negative_prompt or ("" if mode == "walk" else "low quality"),
            "negative_prompt", settings, errors, required=False,
        )  # fmt: skip
        width = common.size("width", req.width, 512 if mode == "walk" else 1280,
                            settings.max_width, errors)  # fmt: skip
        height = common.size("height", req.height, 512 if mode == "walk" else 720,
                             settings.max_height, errors)  # fmt: skip
        steps = common.steps(
            req.num_inference_steps, req.steps, 10 if era_b and mode == "canvas" else 20,
            settings, errors,
        )  # fmt: skip
        samples = common.bounded(
            "samples", req.samples or 1, 1, settings.max_samples, common.HARD_MAX_SAMPLES, errors
        )
        guidance = editing.check_range(
            "guidance_scale", 7.5 if req.guidance_scale is None else req.guidance_scale, 0, 20,
            errors,
        )  # fmt: skip
        if req.translation_factor is not None:
            editing.check_range("translation_factor", req.translation_factor, 0, 0.5, errors)
        factor = req.translation_factor if "translation_factor" not in errors else None
        dx = _translation("width_translation_per_step", req.width_translation_per_step,
                          factor, width, walk, errors)  # fmt: skip
        dy = _translation("height_translation_per_step", req.height_translation_per_step,
                          factor, height, walk, errors)  # fmt: skip
        interpolation = common.bounded(
            "num_interpolation_steps", 60 if req.num_interpolation_steps is None
            else req.num_interpolation_steps, 1, 120, common.HARD_MAX_FRAMES, errors,
        )  # fmt: skip
        fps = common.bounded("fps", 120 if req.fps is None else req.fps, 1, 120, 1000, errors)
        overlap = common.bounded(
            "overlap_width", 10 if req.overlap_width is None else req.overlap_width, 0, 64, 1024,
            errors,
        )  # fmt: skip
        as_video = bool(req.as_video) and mode == "walk"
        frames = 1 + len(walk) * interpolation
        if as_video and not errors and frames * width * height > MAX_VIDEO_PIXELS:
            errors["num_interpolation_steps"] = [
                f"The video would have {frames} frames of {width}x{height}: too many to hold; "
                "send fewer interpolation steps, a shorter walk or a smaller size."
            ]
        common.check_webhook(req.webhook, settings, errors)
        if errors:
            raise ValidationFailed(errors)
        model_id = req.model_id or settings.default_outpaint_model
        editing_models.resolve(model_id, "inpaint", ctx.registry, ctx.owner)
        p = OutpaintParams(
            mode=mode,
            model_id=model_id,
            prompt=prompt,
            negative_prompt=negative,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance,
            seed=common.pick_seed(req.seed),
            samples=samples,
            walk=walk,
            dx=dx,
            dy=dy,
            interpolation_steps=interpolation,
            as_video=as_video,
            fps=fps,
            overlap=overlap,
            safety_checker=editing.safety_default(dialect, req.safety_checker),
            safety_checker_type=req.safety_checker_type or "sensitive_content_text",
        )
        wire = WireFlags.of(req)
        meta = {
            "prompt": p.prompt,
            "negative_prompt": p.negative_prompt,
            "image": common.echo_url(source),
            "model_id": model_id,
            "width": p.width,
            "height": p.height,
            "num_inference_steps": p.steps,
            "guidance_scale": p.guidance_scale,
            "seed": p.seed,
            "samples": p.samples,
            "temp": yes_no(wire.temp),
            "base64": yes_no(wire.base64),
            "file_prefix": wire.file_prefix,
        }
        if mode == "walk":
            meta.update(
                walk_type=walk,
                width_translation_per_step=dx,
                height_translation_per_step=dy,
                num_interpolation_steps=interpolation,
                as_video=yes_no(as_video),
                fps=fps,
            )
        else:
            meta["overlap_width"] = overlap
        calls = p.calls * p.samples
        return JobSpec(
            kind="outpaint",
            model_id=model_id,
            params={**p.model_dump(mode="json"), **wire.stored()},
            batch_key=batching.batch_key("outpaint", model_id),
            cost=batching.cost(calls, p.steps, p.width, p.height),
            total_steps=p.steps * calls,
            output_names=editing.output_names(wire, p.samples, "mp4" if as_video else "png"),
            meta=meta,
            inputs={"image": Input(source)},
            webhook=wire.webhook,
            track_id=wire.track_id,
            instant_response=wire.instant_response,
        )

    return build


# ---- object_removal and inpaint: the image family's inpaint job -------------------------------

_REMOVAL_PROMPT = "empty background, seamless, nothing there"


def inpaint_job(*, removal: bool):
    """The image family's v6 inpaint under an image-editing path. The mask must have the image's
    size (it marks pixels: a stretched mask marks others). Object removal needs no prompt and
    regenerates the masked area fully (strength 1) unless told otherwise."""
    build_inpaint = images.image_job("inpaint", images.IMAGES)

    def for_dialect(_dialect: Dialect):
        def build(body: dict, ctx: Context) -> JobSpec:
            if removal:
                body = {**body}
                if not str(body.get("prompt") or "").strip():
                    body["prompt"] = _REMOVAL_PROMPT
                if body.get("strength") in (None, ""):
                    body["strength"] = 1.0
            spec = build_inpaint(body, ctx)
            if spec.params["steps"] * spec.params["strength"] < 1:
                raise ValidationFailed(
                    {"strength": ["The strength times the number of inference steps must be at "
                                  "least 1 (one step)."]}
                )  # fmt: skip
            mask = spec.inputs["mask_image"]
            spec.inputs["mask_image"] = Input(mask.value, same_size_as="init_image")
            return spec

        return build

    return for_dialect


ROUTES = [
    *editing.routes("outpaint", outpaint_job, OutpaintRequest),
    *editing.routes("object_removal", inpaint_job(removal=True), images.ImageRequest),
    *editing.routes("inpaint", inpaint_job(removal=False), images.ImageRequest),
]
