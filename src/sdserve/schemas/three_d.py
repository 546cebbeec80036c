"""Wire schema for text and image to 3D (reference §12, §16.5, §16.8): era A (`/api/v3/txt_to_3d`,
`img_to_3d`: a turntable GIF or a mesh by `output_type`), v6 (`/api/v6/3d/*`: TRELLIS's fields,
a mesh by `output_format`, `render` adds a turntable MP4) and enterprise. Shap-E answers all of
them (docs/3d.md)."""

from __future__ import annotations

from typing import Any

from sdserve.engine import batching, shap_e
from sdserve.engine.registry import safe_id
from sdserve.engine.three_d import ThreeDParams
from sdserve.errors import ModelMismatch, NotAvailable, ValidationFailed
from sdserve.extras import MissingExtra, available
from sdserve.media.mesh import MESH_FORMATS
from sdserve.schemas import common
from sdserve.schemas.coerce import Flag, Float, Int, Text, yes_no
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

ERA_A = Dialect("3d_v3", "/api/v3/fetch/{id}", whole_seconds=True)
V6 = Dialect("3d_v6", "/api/v6/3d/fetch/{id}")
ENTERPRISE = Dialect("3d_enterprise", "/api/v1/enterprise/3d/fetch/{id}")

ERA_A_FORMATS = ("gif", *MESH_FORMATS)
MAX_FRAME_SIZE = 512  # larger turntables are reduced to this; past HARD_MAX_FRAME_SIZE, an error
HARD_MAX_FRAME_SIZE = 2048
MAX_GRID = 256  # marching-cubes grid per axis (resolution); 256³ is 16.7 M network queries
MAX_SECONDS = 30
# Shap-E's recommended guidance (diffusers' docs) where a client sends none: v6's documented 1.0
# is TRELLIS's, and turns Shap-E's guidance off.
_GUIDANCE = {"text": 15.0, "image": 3.0}


class ThreeDRequest(CommonRequest):
    image: Text = None  # the input of img_to_3d (init_image also accepted)
    frame_size: Int = None
    seconds: Int = None
    batch_size: Int = None  # era A img_to_3d: samples
    output_type: Text = None  # era A
    output_format: Text = None  # v6
    resolution: Int = None  # v6 sends "256" from text_to_3d, 256 from image_to_3d
    render: Flag = None
    remove_bg: Flag = None
    foreground_ratio: Float = None
    # TRELLIS's own knobs: validated and echoed; Shap-E has no such stages (docs/3d.md).
    ss_guidance_strength: Float = None
    ss_sampling_steps: Int = None
    slat_guidance_strength: Float = None
    slat_sampling_steps: Int = None
    mesh_simplify: Float = None
    texture_size: Int = None
    chunk_size: Int = None
    multi_image: Flag = None


def _number(name: str, value, default, low, high, errors: dict, *, label: str | None = None):
    """A value within [low, high] (an error outside), or the default when not sent."""
    if value is None:
        return default
    if not low <= value <= high:
        errors.setdefault(name, []).append(
            f"The {label or name.replace('_', ' ')} must be between {low:g} and {high:g}."
        )
        return default
    return value


def _whole(value: float) -> int | float:
    """Era A's Go client decodes guidance_scale as an integer: 5.0 is echoed as 5."""
    return int(value) if float(value).is_integer() else value


def three_d_job(dialect: Dialect, task: shap_e.Task):
    era_a = dialect is ERA_A

    def build(body: dict, ctx: Context) -> JobSpec:
        settings = ctx.settings
        req = parse_request(ThreeDRequest, body)
        errors: dict[str, list[str]] = {}

        # 1. what to make it from
        prompt = common.check_prompt(
            req.prompt, "prompt", settings, errors, required=task == "text"
        )
        negative = common.check_prompt(
            req.negative_prompt, "negative_prompt", settings, errors, required=False
        )
        source = req.image or req.init_image
        if task == "image" and not source:
            errors["image"] = ["The image field is required (or init_image)."]

        # 2. what to make: files per sample
        asked = (
            (req.output_type or req.output_format)
            if era_a
            else (req.output_format or req.output_type)
        )
        fmt = (asked or ("gif" if era_a else "glb")).strip().lower()
        formats = ERA_A_FORMATS if era_a else MESH_FORMATS
        if fmt not in formats:
            field = "output_type" if era_a else "output_format"
            errors[field] = [f"The {field.replace('_', ' ')} must be one of: {', '.join(formats)}."]
        render = bool(req.render)
        outputs = [fmt] + (["mp4"] if render else [])

        # 3. sizes and steps
        frame_size = common.bounded(
            "frame_size",
            256 if req.frame_size is None else req.frame_size,
            16,
            MAX_FRAME_SIZE,
            HARD_MAX_FRAME_SIZE,
            errors,
        )
        frame_size -= frame_size % 8  # the MP4's yuv420p wants even sides
        grid = common.bounded(
            "resolution",
            128 if req.resolution is None else req.resolution,
            16,
            MAX_GRID,
            1024,
            errors,
        )
        seconds = common.bounded(
            "seconds", 4 if req.seconds is None else req.seconds, 1, MAX_SECONDS, 3600, errors
        )
        samples = common.bounded(
            "batch_size",
            1 if req.batch_size is None else req.batch_size,
            1,
            settings.max_samples,
            common.HARD_MAX_SAMPLES,
            errors,
        )
        steps = common.steps(req.num_inference_steps, req.steps, 64, settings, errors)
        guidance = _number("guidance_scale", req.guidance_scale, _GUIDANCE[task], 0.0, 30.0, errors)
        trellis = {
            "ss_guidance_strength": _number("ss_guidance_strength", req.ss_guidance_strength, 7.5, 0, 10, errors),
            "ss_sampling_steps": _number("ss_sampling_steps", req.ss_sampling_steps, 12, 1, 50, errors),
            "slat_guidance_strength": _number("slat_guidance_strength", req.slat_guidance_strength, 3.0, 0, 10, errors),
            "slat_sampling_steps": _number("slat_sampling_steps", req.slat_sampling_steps, 12, 1, 50, errors),
            "mesh_simplify": _number("mesh_simplify", req.mesh_simplify, 0.9, 0.9, 0.98, errors),
            "texture_size": _number("texture_size", req.texture_size, 1024, 256, 4096, errors),
        }  # fmt: skip
        chunk_size = _number("chunk_size", req.chunk_size, 8192, 512, 12000, errors)
        foreground_ratio = _number("foreground_ratio", req.foreground_ratio, 0.85, 0.5, 1.0, errors)
        common.check_webhook(req.webhook, settings, errors)
        if errors:
            raise ValidationFailed(errors)

        # 4. the model, and what this server can do
        default = settings.default_3d_model if task == "text" else settings.default_img_3d_model
        model_id = req.model_id or default
        model = shap_e.resolve(safe_id(model_id, "model_id"), settings)
        if model.task != task:
            wanted = (
                "a text-to-3D (ShapEPipeline)"
                if task == "text"
                else "an image-to-3D (ShapEImg2ImgPipeline)"
            )
            raise ModelMismatch(f"Model {model_id} is not {wanted} model.")
        remove_bg = bool(req.remove_bg) and task == "image"
        if remove_bg and not available("sdserve.engine.removebg"):
            raise NotAvailable(
                "remove_bg needs the background removal model, which this server does not have."
            )
        if render and not available("av"):
            raise MissingExtra("av", "render (the turntable MP4)")

        p = ThreeDParams(
            task=task,
            model_id=model_id,
            prompt=prompt,
            steps=steps,
            guidance_scale=guidance,
            seed=common.pick_seed(req.seed),
            samples=samples,
            outputs=outputs,
            frame_size=frame_size,
            seconds=seconds,
            grid_size=grid,
            chunk_size=chunk_size,
            remove_bg=remove_bg,
            foreground_ratio=foreground_ratio,
        )
        wire = WireFlags.of(req)
        folder = "temp" if wire.temp else "generations"
        names = [
            f"{folder}/{wire.file_prefix}-{i}." + (f"{out}.base64" if wire.base64 else out)
            for i in range(samples)
            for out in outputs
        ]
        meta: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": negative,
            "model_id": model_id,
            "seed": p.seed,
            "steps": steps,
            "guidance_scale": _whole(guidance) if era_a else guidance,
            "frame_size": frame_size,
            "seconds": seconds,
            "safetychecker": "no",
            "outdir": "out",
            "file_prefix": wire.file_prefix,
            "output_type": fmt,
            "resolution": grid,
            "render": yes_no(render),
            "batch_size": samples,
            "temp": yes_no(wire.temp),
            "base64": yes_no(wire.base64),
            "webhook": wire.webhook,
            "track_id": wire.track_id,
        }
        if task == "image":
            meta["image"] = common.echo_url(source)
        if not era_a:
            meta.update(
                output_format=fmt,
                num_inference_steps=steps,
                remove_bg=yes_no(remove_bg),
                foreground_ratio=foreground_ratio,
                chunk_size=chunk_size,
                multi_image=yes_no(bool(req.multi_image)),
                **trellis,
            )
        return JobSpec(
            kind="txt_to_3d" if task == "text" else "img_to_3d",
            model_id=model_id,
            params={**p.model_dump(mode="json"), **wire.stored()},
            batch_key=batching.solo_key("3d", wire.file_prefix),
            cost=p.cost,
            total_steps=p.total_steps,  # the prior's steps, then each sample's decoding
            output_names=names,
            meta=meta,
            inputs={"image": Input(source)} if task == "image" else {},
            webhook=wire.webhook,
            track_id=wire.track_id,
            instant_response=wire.instant_response,
        )

    return build


def _routes() -> list[Route]:
    paths = (
        ("/api/v3/txt_to_3d", ERA_A, "text", False),
        ("/api/v3/img_to_3d", ERA_A, "image", False),
        ("/api/v6/3d/text_to_3d", V6, "text", False),
        ("/api/v6/3d/image_to_3d", V6, "image", False),
        ("/api/v1/enterprise/3d/text_to_3d", ENTERPRISE, "text", True),
        ("/api/v1/enterprise/3d/image_to_3d", ENTERPRISE, "image", True),
        ("/api/v1/enterprise/{product}/text_to_3d", ENTERPRISE, "text", True),
        ("/api/v1/enterprise/{product}/image_to_3d", ENTERPRISE, "image", True),
    )
    return [
        Route(
            path,
            dialect,
            three_d_job(dialect, task),
            ThreeDRequest,
            summary=f"{task} to 3D ({dialect.name})",
            admin_only=admin_only,
            tags=("3d",),
        )
        for path, dialect, task, admin_only in paths
    ]


ROUTES = _routes()
