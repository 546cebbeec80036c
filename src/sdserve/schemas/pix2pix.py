"""Wire schema for instruct pix2pix (reference §11.6): `init_image` edited as `prompt` says, with
`image_guidance_scale`; era A answers `output` as one URL string."""

from __future__ import annotations

from sdserve.engine import batching, editing_models
from sdserve.engine.pix2pix import Pix2PixParams
from sdserve.errors import ValidationFailed
from sdserve.schemas import common, editing
from sdserve.schemas.coerce import Flag, Float, Int, Text, yes_no
from sdserve.schemas.common import (
    CommonRequest,
    Context,
    Dialect,
    Input,
    JobSpec,
    WireFlags,
    parse_request,
)


class Pix2PixRequest(CommonRequest):
    image: Text = None  # some clients name the input this way
    image_guidance_scale: Float = None
    samples: Int = None
    safety_checker_type: Text = None
    safety_checker: Flag = None


def pix2pix_job(dialect: Dialect):
    def build(body: dict, ctx: Context) -> JobSpec:
        settings = ctx.settings
        req = parse_request(Pix2PixRequest, body)
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
            "guidance_scale", 7.0 if req.guidance_scale is None else req.guidance_scale, 0, 20,
            errors,
        )  # fmt: skip
        image_guidance = editing.check_range(
            "image_guidance_scale",
            1.5 if req.image_guidance_scale is None else req.image_guidance_scale,
            0,
            20,
            errors,
        )
        common.check_webhook(req.webhook, settings, errors)
        if errors:
            raise ValidationFailed(errors)
        model_id = req.model_id or settings.default_pix2pix_model
        editing_models.resolve(model_id, "pix2pix", ctx.registry, ctx.owner)
        p = Pix2PixParams(
            model_id=model_id,
            prompt=prompt,
            negative_prompt=negative,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance,
            image_guidance_scale=image_guidance,
            seed=common.pick_seed(req.seed),
            samples=samples,
            safety_checker=editing.safety_default(dialect, req.safety_checker),
            safety_checker_type=req.safety_checker_type or "sensitive_content_text",
        )
        wire = WireFlags.of(req)
        meta = {
            "prompt": p.prompt,
            "negative_prompt": p.negative_prompt,
            "init_image": common.echo_url(source),
            "model_id": model_id,
            "W": p.width,
            "H": p.height,
            "steps": p.steps,
            "guidance_scale": p.guidance_scale,
            "image_guidance_scale": p.image_guidance_scale,
            "seed": p.seed,
            "n_samples": p.samples,
            "safety_checker": yes_no(p.safety_checker),
            "temp": yes_no(wire.temp),
            "base64": yes_no(wire.base64),
            "file_prefix": wire.file_prefix,
        }
        return JobSpec(
            kind="pix2pix",
            model_id=model_id,
            params={**p.model_dump(mode="json"), **wire.stored()},
            batch_key=batching.batch_key("pix2pix", model_id),
            # three UNet passes a step: about 1.5 times an img2img step
            cost=1.5 * batching.cost(p.samples, p.steps, p.width, p.height),
            total_steps=p.steps,
            output_names=editing.output_names(wire, p.samples),
            meta=meta,
            inputs={"init_image": Input(source)},
            webhook=wire.webhook,
            track_id=wire.track_id,
            instant_response=wire.instant_response,
        )

    return build


ROUTES = editing.routes("pix2pix", pix2pix_job, Pix2PixRequest, single_v5=True)
