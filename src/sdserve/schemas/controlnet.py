"""Wire schema for ControlNet (reference §8, §9, §16.5): `/api/v5/controlnet`, `/api/v6/images/
controlnet` and the enterprise forms; one net or a comma list (multi-ControlNet), and meta."""

from __future__ import annotations

from typing import Any

from sdserve.engine import hints
from sdserve.engine.controlnet import (
    ControlNetParams,
    check_controlnet_available,
    resolve_controlnet,
)
from sdserve.engine.prompts import enhance_prompt
from sdserve.engine.schedulers import resolve_scheduler_name
from sdserve.errors import ValidationFailed
from sdserve.schemas import common
from sdserve.schemas.coerce import Flag, FloatList, StrList, Text, yes_no
from sdserve.schemas.common import Context, Dialect, Input, JobSpec, Route, WireFlags
from sdserve.schemas.images import IMAGES, ImageRequest, normalize_image_request, output_names

# Era A answered with the v6 images fetch (2025 captures); enterprise polls its own fetch.
V5 = Dialect("controlnet_v5", "/api/v6/images/fetch/{id}")
ENTERPRISE = Dialect("controlnet_enterprise", "/api/v1/enterprise/fetch/{id}")
DEFAULT_STRENGTH = 0.55  # §8
DEFAULT_SCALE = 0.5
MAX_SCALE = 20.0  # the enterprise page's upper bound (the v5 page says 5)


class ControlNetRequest(ImageRequest):
    controlnet_model: StrList = None
    controlnet_type: Text = None
    controlnet_conditioning_scale: FloatList = None
    auto_hint: Flag = None
    guess_mode: Flag = None
    control_image: Text = None
    loadbalancer: Flag = None  # enterprise: one server here
    # Interior (§16.8)
    object_image: Text = None
    object_name: Text = None
    scenario: Text = None
    image: Text = None  # v6 clients' other name for init_image


def conditioning_scales(values: list[float] | None, nets: int, errors: dict) -> list[float]:
    """One scale for every net, or one per net (in the order of controlnet_model)."""
    scales = values or [DEFAULT_SCALE]
    if any(not 0 <= s <= MAX_SCALE for s in scales):
        errors["controlnet_conditioning_scale"] = [
            f"The controlnet conditioning scale must be between 0 and {MAX_SCALE:g}."
        ]
    if len(scales) == 1:
        return scales * nets
    if len(scales) != nets:
        errors["controlnet_conditioning_scale"] = [
            f"The controlnet conditioning scale has {len(scales)} values for {nets} ControlNet "
            "models: send one value, or one per model."
        ]
    return scales


def controlnet_params(req: ControlNetRequest, ctx: Context, *, model_id: str):
    """Validate a ControlNet request into the engine's params, and the spec's inputs."""
    errors: dict[str, list[str]] = {}
    init_image = req.init_image or req.image
    nets = req.controlnet_model or []
    if not nets:
        errors["controlnet_model"] = ["The controlnet model field is required."]
    nets = [n.strip() for n in nets]
    auto_hint = bool(req.auto_hint)
    inpaint = "inpaint" in nets
    if req.mask_image and not inpaint:
        errors["mask_image"] = ["A mask_image is used with controlnet_model inpaint."]
    if inpaint and not req.mask_image and not req.object_name:
        errors["mask_image"] = ["The mask image field is required with controlnet_model inpaint."]
    if not init_image and not req.control_image:
        errors["init_image"] = ["The init image field is required (or control_image)."]
    elif not init_image and (auto_hint or inpaint):
        errors["init_image"] = ["The init image field is required with auto_hint or inpaint."]
    # the pipeline: the masked part repainted; the init image repainted under a separate hint;
    # or a new image under the hint (the init image itself, when nothing else is given)
    if inpaint:
        kind = "inpaint"
    elif init_image and (req.control_image or auto_hint):
        kind = "img2img"
    else:
        kind = "text2img"
    hint_types: list[str | None] = [None] * len(nets)
    if auto_hint and not req.control_image and nets:
        hint_types = [req.controlnet_type or nets[0], *nets[1:]]
    scales = conditioning_scales(req.controlnet_conditioning_scale, max(len(nets), 1), errors)
    # guess mode works without a prompt (§8): the net alone guides the image
    promptless = bool(req.guess_mode) and not (req.prompt or "").strip()
    checked = req.model_copy(update={"prompt": "-"}) if promptless else req
    # a mask found from object_name (interior) is made by the worker
    checked_kind = "img2img" if kind == "inpaint" and not req.mask_image else kind
    try:
        p = normalize_image_request(
            checked, checked_kind, "images", ctx.settings, model_id=model_id
        )
    except ValidationFailed as exc:
        raise ValidationFailed({**exc.fields, **errors}) from None
    if errors:
        raise ValidationFailed(errors)
    if promptless:
        p.prompt = ""
    p.kind = kind
    for hint_type in filter(None, hint_types):
        hints.check_hint_type(hint_type)
    source = ctx.registry.resolve(p.model_id, ctx.owner)
    ctx.registry.check_available(source)
    architecture = ctx.registry.architecture(source)
    for net_id in nets:
        check_controlnet_available(
            ctx.registry,
            resolve_controlnet(ctx.registry, net_id, p.model_id, architecture, ctx.owner),
        )
    resolve_scheduler_name(p.scheduler, p.use_karras_sigmas, p.algorithm_type)
    for lora_id, _ in p.loras:
        ctx.registry.resolve_lora(lora_id, ctx.owner)
    if p.embeddings_model:
        ctx.registry.resolve_embedding(p.embeddings_model, ctx.owner)
    if p.vae:
        ctx.registry.resolve_vae(p.vae, ctx.owner)
    strength = (
        DEFAULT_STRENGTH if req.strength is None and req.prompt_strength is None else p.strength
    )
    params = ControlNetParams(
        **p.model_dump(exclude={"strength"}),
        strength=strength,
        controlnets=nets,
        conditioning_scales=scales,
        hint_types=hint_types,
        guess_mode=bool(req.guess_mode),
    )
    inputs = {}
    if init_image:
        inputs["init_image"] = Input(init_image)
    if req.control_image:
        inputs["control_image"] = Input(req.control_image)
    if req.mask_image:
        inputs["mask_image"] = Input(req.mask_image)
    return params, inputs, source


def controlnet_job(dialect: Dialect):
    def build(body: dict, ctx: Context) -> JobSpec:
        req = common.parse_request(ControlNetRequest, body)
        p, inputs, source = controlnet_params(
            req, ctx, model_id=req.model_id or ctx.settings.default_model
        )
        enhance = bool(req.enhance_prompt)
        if enhance:
            p.prompt, p.negative_prompt = enhance_prompt(p.prompt, p.negative_prompt)
        wire = WireFlags.of(req, enhance_prompt=enhance)
        return controlnet_spec(p, req, wire, dialect, source_label=p.model_id, inputs=inputs)

    return build


def controlnet_spec(
    p: ControlNetParams,
    req: ControlNetRequest,
    wire: WireFlags,
    dialect: Dialect,
    *,
    source_label: str,
    inputs: dict[str, Input],
    extra_meta: dict[str, Any] | None = None,
) -> JobSpec:
    choice = resolve_scheduler_name(p.scheduler, p.use_karras_sigmas, p.algorithm_type)
    return JobSpec(
        kind="controlnet",
        model_id=p.model_id,
        params={**p.model_dump(mode="json"), **wire.stored()},
        batch_key=p.batch_key,
        cost=p.cost,
        total_steps=p.steps,
        output_names=output_names(p.samples, wire, dialect.name),
        meta={
            **controlnet_meta(p, req, wire, source_label, choice.class_name),
            **(extra_meta or {}),
        },
        inputs=inputs,
        webhook=wire.webhook,
        track_id=wire.track_id,
        instant_response=wire.instant_response,
    )


def controlnet_meta(
    p: ControlNetParams, req: ControlNetRequest, w: WireFlags, model_label: str, scheduler: str
) -> dict[str, Any]:
    """The §8 meta keys, in its order."""
    lora = ",".join(lora_id for lora_id, _ in p.loras) or None
    lora_strength = ",".join(f"{s:g}" for _, s in p.loras) or None
    return {
        "prompt": p.prompt,
        "model_id": model_label,
        "controlnet_model": ",".join(p.controlnets),
        "controlnet_type": req.controlnet_type or p.controlnets[0],
        "negative_prompt": p.negative_prompt,
        "scheduler": scheduler,
        "safety_checker": yes_no(p.safety_checker),
        "auto_hint": yes_no(any(p.hint_types)),
        "guess_mode": yes_no(p.guess_mode),
        "strength": p.strength,
        "W": p.width,
        "H": p.height,
        "guidance_scale": p.guidance_scale,
        "controlnet_conditioning_scale": ",".join(f"{s:g}" for s in p.conditioning_scales),
        "seed": p.seed,
        "multi_lingual": yes_no(bool(req.multi_lingual)),
        "use_karras_sigmas": yes_no(p.use_karras_sigmas),
        "algorithm_type": p.algorithm_type or "none",
        "safety_checker_type": p.safety_checker_type,
        "instant_response": yes_no(w.instant_response),
        "tomesd": yes_no(req.tomesd is not False),
        "init_image": common.echo_url(req.init_image or req.image),
        "mask_image": common.echo_url(req.mask_image),
        "control_image": common.echo_url(req.control_image),
        "vae": p.vae,
        "steps": p.steps,
        "full_url": "no",
        "upscale": req.upscale or "no",
        "n_samples": p.samples,
        "embeddings": p.embeddings_model,
        "lora": lora,
        "lora_strength": lora_strength,
        "temp": yes_no(w.temp),
        "base64": yes_no(w.base64),
        "clip_skip": p.clip_skip or 1,
        "file_prefix": w.file_prefix,
        "webhook": w.webhook,
        "track_id": w.track_id,
        "enhance_prompt": yes_no(w.enhance_prompt),
        "outdir": "out",
    }


def _routes() -> list[Route]:
    paths = (
        ("/api/v5/controlnet", V5, False),
        ("/api/v6/images/controlnet", IMAGES, False),
        ("/api/v1/enterprise/controlnet", ENTERPRISE, True),
        ("/api/v1/enterprise/{product}/controlnet", ENTERPRISE, True),
    )
    return [
        Route(
            path,
            dialect,
            controlnet_job(dialect),
            ControlNetRequest,
            summary=f"ControlNet ({dialect.name})",
            admin_only=admin_only,
            tags=("controlnet",),
        )
        for path, dialect, admin_only in paths
    ]


ROUTES = _routes()
