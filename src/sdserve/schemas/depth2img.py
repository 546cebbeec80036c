"""Wire schema for depth to image (reference §11.4): `init_image` re-imagined as `prompt` says,
keeping its depth (estimated, or the client's `depth_map`); era A answers one URL string."""

from __future__ import annotations

from sdserve.engine import batching, editing_models
from sdserve.engine.depth2img import Depth2ImgParams
from sdserve.errors import ValidationFailed
from sdserve.schemas import common, editing
from sdserve.schemas.coerce import Flag, Int, Text, yes_no
from sdserve.schemas.common import (
    CommonRequest,
    Context,
    Dialect,
    Input,
    JobSpec,
    WireFlags,
    parse_request,
)


class Depth2ImgRequest(CommonRequest):
    image: Text = None
    depth_map: Text = None  # not in the hosted API: a depth image (white near) to use as is
    samples: Int = None
    safety_checker_type: Text = None
    safety_checker: Flag = None


def depth2img_job(dialect: Dialect):
    def build(body: dict, ctx: Context) -> JobSpec:
        settings = ctx.settings
        req = parse_request(Depth2ImgRequest, body)
        errors: dict[str, list[str]] = {}
        source = req.init_image or req.image
        if not source:
            errors["init_image"] = ["The init image field is required."]
        prompt = common.check_prompt(req.prompt, "prompt", settings, errors, required=True)
        negative = common.check_prompt(
            req.negative_prompt, "negative_prompt", settings, errors, required=False
        )
        width = common.size("width", req.width, 512, settings.max_width, errors)
        height = common.size("height", req.height, 512, settings.max_height, errors)
        steps = common.steps(req.num_inference_steps, req.steps, 20, settings, errors)
        samples = common.bounded(
            "samples", req.samples or 1, 1, settings.max_samples, common.HARD_MAX_SAMPLES, errors
        )
        guidance = editing.check_range(
            "guidance_scale", 7.5 if req.guidance_scale is None else req.guidance_scale, 0, 20,
            errors,
        )  # fmt: skip
        strength = editing.check_range(
            "strength", 0.8 if req.strength is None else req.strength, 0.01, 1, errors
        )
        if (
            "num_inference_steps" not in errors
            and "strength" not in errors
            and steps * strength < 1
        ):
            errors["strength"] = [
                "The strength times the number of inference steps must be at least 1 (one step)."
            ]
        common.check_webhook(req.webhook, settings, errors)
        if errors:
            raise ValidationFailed(errors)
        model_id = req.model_id or settings.default_depth2img_model
        editing_models.resolve(model_id, "depth2img", ctx.registry, ctx.owner)
        p = Depth2ImgParams(
            model_id=model_id,
            prompt=prompt,
            negative_prompt=negative,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance,
            strength=strength,
            seed=common.pick_seed(req.seed),
            samples=samples,
            safety_checker=editing.safety_default(dialect, req.safety_checker),
            safety_checker_type=req.safety_checker_type or "sensitive_content_text",
        )
        wire = WireFlags.of(req)
        inputs = {"init_image": Input(source)}
        if req.depth_map:
            inputs["depth_map"] = Input(req.depth_map)
        meta = {
            "prompt": p.prompt,
            "negative_prompt": p.negative_prompt,
            "init_image": common.echo_url(source),
            "depth_map": common.echo_url(req.depth_map),
            "model_id": model_id,
            "W": p.width,
            "H": p.height,
            "steps": p.steps,
            "strength": p.strength,
            "guidance_scale": p.guidance_scale,
            "seed": p.seed,
            "n_samples": p.samples,
            "safety_checker": yes_no(p.safety_checker),
            "temp": yes_no(wire.temp),
            "base64": yes_no(wire.base64),
            "file_prefix": wire.file_prefix,
        }
        return JobSpec(
            kind="depth2img",
            model_id=model_id,
            params={**p.model_dump(mode="json"), **wire.stored()},
            batch_key=batching.batch_key("depth2img", model_id),
            cost=batching.cost(p.samples, max(1, int(p.steps * p.strength)), p.width, p.height),
            total_steps=max(1, int(p.steps * p.strength)),
            output_names=editing.output_names(wire, p.samples),
            meta=meta,
            inputs=inputs,
            webhook=wire.webhook,
            track_id=wire.track_id,
            instant_response=wire.instant_response,
        )

    return build


ROUTES = editing.routes("depth2img", depth2img_job, Depth2ImgRequest, single_v5=True)
