"""Wire schemas for the image endpoints (text2img / img2img / inpaint) of every dialect, and meta."""

from __future__ import annotations

from typing import Any

from sdserve.engine.images import ImageKind, ImageParams
from sdserve.engine.prompts import enhance_prompt
from sdserve.engine.schedulers import resolve_scheduler_name
from sdserve.errors import ValidationFailed
from sdserve.schemas import common
from sdserve.schemas.coerce import Flag, FloatList, StrList, Text, yes_no
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
from sdserve.settings import Settings

SAFETY_TYPES = ("sensitive_content_text", "blur", "pixelate", "black")

# v3: /api/v3/{text2img,...}; community: /api/v3|v4/dreambooth*; images: /api/v6/images/*;
# realtime: /api/v6/realtime/*
V3 = Dialect("v3", "/api/v3/fetch/{id}", "Try to fetch request after given estimated time")
COMMUNITY = Dialect("community", "/api/v3/dreambooth/fetch/{id}")
IMAGES = Dialect("images", "/api/v6/images/fetch/{id}")
REALTIME = Dialect("realtime", "/api/v6/realtime/fetch/{id}")
V7 = Dialect("v7images", "/api/v7/images/fetch/{id}", output_url=True)  # v6 bodies (§16.4)

# Defaults that differ by dialect (reference §3, §6): steps, safety checker, prompt enhancement.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "v3": {"steps": 20, "safety_checker": False, "enhance_prompt": True},
    "community": {"steps": 30, "safety_checker": True, "enhance_prompt": True},
    "images": {"steps": 30, "safety_checker": True, "enhance_prompt": True},
    "realtime": {"steps": 20, "safety_checker": True, "enhance_prompt": False},
    "v7images": {"steps": 30, "safety_checker": True, "enhance_prompt": True},
}


class ImageRequest(CommonRequest):
    """Every field any image dialect sends."""

    samples: common.Int = None
    use_karras_sigmas: Flag = None
    algorithm_type: Text = None
    safety_checker_type: Text = None
    lora: StrList = None  # alias in some v6 examples
    lora_strength: FloatList = None
    embeddings_model: Text = None
    embeddings: Text = None  # v6 name
    vae: Text = None
    mask_image: Text = None
    prompt_strength: common.Float = None  # very old docs' name for strength
    # Accepted and echoed in meta; no effect here (see docs/compatibility.md).
    multi_lingual: Flag = None
    panorama: Flag = None
    self_attention: Flag = None
    upscale: Text = None
    highres_fix: Flag = None
    tomesd: Flag = None
    enhance_style: Text = None


def parse_image_request(body: dict) -> ImageRequest:
    return parse_request(ImageRequest, body)


def normalize_image_request(
    req: ImageRequest, kind: ImageKind, dialect: str, settings: Settings, *, model_id: str
) -> ImageParams:
    """Validate and clamp a wire request into the engine's ImageParams; raise ValidationFailed."""
    errors: dict[str, list[str]] = {}
    defaults = _DEFAULTS[dialect]
    prompt = common.check_prompt(req.prompt, "prompt", settings, errors, required=True)
    negative = common.check_prompt(
        req.negative_prompt, "negative_prompt", settings, errors, required=False
    )
    if kind in ("img2img", "inpaint") and not req.init_image:
        errors["init_image"] = ["The init image field is required."]
    if kind == "inpaint" and not req.mask_image:
        errors["mask_image"] = ["The mask image field is required."]

    width = common.size("width", req.width, 512, settings.max_width, errors)
    height = common.size("height", req.height, 512, settings.max_height, errors)
    samples = 1 if req.samples is None else req.samples
    samples = common.bounded(
        "samples", samples, 1, settings.max_samples, common.HARD_MAX_SAMPLES, errors
    )

    steps = common.steps(req.num_inference_steps, req.steps, defaults["steps"], settings, errors)

    guidance = 7.5 if req.guidance_scale is None else req.guidance_scale
    if guidance < 0:
        errors["guidance_scale"] = ["The guidance scale must be at least 0."]
    guidance = max(0.0, min(guidance, 30.0))

    strength = req.strength if req.strength is not None else req.prompt_strength
    strength = 0.7 if strength is None else max(0.0, min(strength, 1.0))

    safety_type = (req.safety_checker_type or "sensitive_content_text").strip().lower()
    if safety_type not in SAFETY_TYPES:
        errors["safety_checker_type"] = [
            f"The safety checker type must be one of: {', '.join(SAFETY_TYPES)}."
        ]

    loras = common.loras(req.lora_model or req.lora, req.lora_strength)

    clip_skip = req.clip_skip
    if clip_skip is not None:
        if clip_skip < 1:
            errors["clip_skip"] = ["The clip skip must be between 1 and 8."]
        clip_skip = max(1, min(clip_skip, 8))

    common.check_webhook(req.webhook, settings, errors)
    if errors:
        raise ValidationFailed(errors)

    return ImageParams(
        kind=kind,
        model_id=model_id,
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        samples=samples,
        steps=steps,
        guidance_scale=guidance,
        seed=common.pick_seed(req.seed),
        scheduler=req.scheduler,
        use_karras_sigmas=True if req.use_karras_sigmas is None else req.use_karras_sigmas,
        algorithm_type=req.algorithm_type if req.algorithm_type not in (None, "", "none") else None,
        loras=loras,
        embeddings_model=req.embeddings_model or req.embeddings,
        clip_skip=clip_skip,
        vae=req.vae,
        strength=strength,
        safety_checker=defaults["safety_checker"]
        if req.safety_checker is None
        else req.safety_checker,
        safety_checker_type=safety_type,
    )


def image_job(kind: ImageKind, dialect: Dialect):
    """The route handler's work for one (kind, dialect): a wire body to a job spec."""

    def build(body: dict, ctx: Context) -> JobSpec:
        settings, registry = ctx.settings, ctx.registry
        req = parse_image_request(body)
        # Only the community and v6 dialects choose the model; v3 and realtime use the default.
        chosen = req.model_id if dialect.name in ("community", "images", "v7images") else None
        p = normalize_image_request(
            req, kind, dialect.name, settings, model_id=chosen or settings.default_model
        )
        enhance = (
            _DEFAULTS[dialect.name]["enhance_prompt"]
            if req.enhance_prompt is None
            else req.enhance_prompt
        )
        if enhance:
            p.prompt, p.negative_prompt = enhance_prompt(p.prompt, p.negative_prompt)

        # Everything that can be checked before queueing is checked now, so a bad request is
        # an immediate error, never a failed job.
        source = registry.resolve(p.model_id, ctx.owner)
        registry.check_available(source)
        choice = resolve_scheduler_name(p.scheduler, p.use_karras_sigmas, p.algorithm_type)
        for lora_id, _ in p.loras:
            registry.resolve_lora(lora_id, ctx.owner)
        if p.embeddings_model:
            registry.resolve_embedding(p.embeddings_model, ctx.owner)
        if p.vae:
            registry.resolve_vae(p.vae, ctx.owner)

        inputs = {}
        if kind != "text2img":
            inputs["init_image"] = Input(req.init_image)
        if kind == "inpaint":
            inputs["mask_image"] = Input(req.mask_image)
        wire = WireFlags.of(
            req,
            enhance_prompt=enhance,
            init_image=common.echo_url(req.init_image),
            mask_image=common.echo_url(req.mask_image),
            multi_lingual=yes_no(bool(req.multi_lingual)),
            panorama=yes_no(bool(req.panorama)),
            self_attention=yes_no(bool(req.self_attention)),
            upscale=req.upscale or "no",
            highres_fix=yes_no(bool(req.highres_fix)),
            tomesd=yes_no(req.tomesd is not False),
            enhance_style=req.enhance_style,
        )
        model_label = source.location if source.kind == "hub" else p.model_id
        return JobSpec(
            kind=kind,
            model_id=p.model_id,
            params={**p.model_dump(mode="json"), **wire.stored()},
            batch_key=p.batch_key,
            cost=p.cost,
            total_steps=p.steps,
            output_names=output_names(p.samples, wire, dialect.name),
            meta=build_meta(
                p, wire, dialect=dialect.name, model_label=model_label, scheduler=choice.class_name
            ),
            inputs=inputs,
            webhook=wire.webhook,
            track_id=wire.track_id,
            instant_response=wire.instant_response,
        )

    return build


def output_names(samples: int, w: WireFlags, dialect: str) -> list[str]:
    """File names as the hosted API names them: v3 `{prefix}-{i}`, later `{i}-{prefix}`."""
    ext = "base64" if w.base64 else "png"
    folder = "temp" if w.temp else "generations"
    if dialect == "v3":
        return [f"{folder}/{w.file_prefix}-{i}.{ext}" for i in range(samples)]
    return [f"{folder}/{i}-{w.file_prefix}.{ext}" for i in range(samples)]


def _routes() -> list[Route]:
    routes = []
    for path, kind, dialect in (
        ("/api/v3/text2img", "text2img", V3),
        ("/api/v3/img2img", "img2img", V3),
        ("/api/v3/inpaint", "inpaint", V3),
        ("/api/v3/dreambooth", "text2img", COMMUNITY),
        ("/api/v3/dreambooth/img2img", "img2img", COMMUNITY),
        ("/api/v3/dreambooth/inpaint", "inpaint", COMMUNITY),
        ("/api/v4/dreambooth", "text2img", COMMUNITY),
        ("/api/v4/dreambooth/img2img", "img2img", COMMUNITY),
        ("/api/v4/dreambooth/inpaint", "inpaint", COMMUNITY),
        ("/api/v6/images/text2img", "text2img", IMAGES),
        ("/api/v6/images/img2img", "img2img", IMAGES),
        ("/api/v6/images/inpaint", "inpaint", IMAGES),
        ("/api/v6/realtime/text2img", "text2img", REALTIME),
        ("/api/v6/realtime/img2img", "img2img", REALTIME),
        ("/api/v6/realtime/inpaint", "inpaint", REALTIME),
        ("/api/v7/images/text-to-image", "text2img", V7),
        ("/api/v7/images/image-to-image", "img2img", V7),
        ("/api/v7/images/inpaint", "inpaint", V7),
    ):
        routes.append(
            Route(
                path,
                dialect,
                image_job(kind, dialect),
                ImageRequest,
                summary=f"{kind} ({dialect.name})",
                tags=(dialect.name,),
            )
        )
    # The enterprise forms: the community endpoints, for the admin key.
    for kind in ("text2img", "img2img", "inpaint"):
        for path in (f"/api/v1/enterprise/{kind}", f"/api/v1/enterprise/{{product}}/{kind}"):
            routes.append(
                Route(
                    path,
                    COMMUNITY,
                    image_job(kind, COMMUNITY),
                    ImageRequest,
                    summary=f"{kind} (enterprise)",
                    admin_only=True,
                    tags=("enterprise",),
                )
            )
    return routes


ROUTES = _routes()


def build_meta(
    p: ImageParams, w: WireFlags, *, dialect: str, model_label: str, scheduler: str
) -> dict[str, Any]:
    """The `meta` echo of effective parameters, in the key style of the job's family (§1.5)."""
    lora = ",".join(lora_id for lora_id, _ in p.loras) or None
    lora_strength = ",".join(f"{s:g}" for _, s in p.loras) or None
    if dialect == "v3":
        meta = {
            "H": p.height,
            "W": p.width,
            "enable_attention_slicing": "true",
            "file_prefix": w.file_prefix,
            "guidance_scale": p.guidance_scale,
            "model": model_label,
            "n_samples": p.samples,
            "negative_prompt": p.negative_prompt,
            "outdir": "out",
            "prompt": p.prompt,
            "revision": "fp16",
            "safetychecker": yes_no(p.safety_checker),
            "seed": p.seed,
            "steps": p.steps,
            "vae": p.vae or "default",
            "scheduler": scheduler,
        }
    elif dialect == "realtime":
        meta = {
            "width": p.width,
            "height": p.height,
            "base64": yes_no(w.base64),
            "enhance_prompt": yes_no(w.enhance_prompt),
            "enhance_style": w.echo.get("enhance_style"),
            "file_prefix": w.file_prefix,
            "guidance_scale": p.guidance_scale,
            "instant_response": yes_no(w.instant_response),
            "n_samples": p.samples,
            "negative_prompt": p.negative_prompt,
            "outdir": "out",
            "prompt": p.prompt,
            "safety_checker": yes_no(p.safety_checker),
            "safety_checker_type": p.safety_checker_type,
            "seed": p.seed,
            "steps": p.steps,
            "temp": yes_no(w.temp),
            "track_id": w.track_id,
            "webhook": w.webhook,
        }
    else:
        meta = {
            "prompt": p.prompt,
            "model_id": p.model_id,
            "negative_prompt": p.negative_prompt,
            "scheduler": scheduler,
            "safetychecker": yes_no(p.safety_checker),
            "W": p.width,
            "H": p.height,
            "guidance_scale": p.guidance_scale,
            "seed": p.seed,
            "steps": p.steps,
            "n_samples": p.samples,
            "full_url": "no",
            "upscale": w.echo.get("upscale", "no"),
            "multi_lingual": w.echo.get("multi_lingual"),
            "panorama": w.echo.get("panorama"),
            "self_attention": w.echo.get("self_attention"),
            "embeddings": p.embeddings_model,
            "lora": lora,
            "lora_strength": lora_strength,
            "clip_skip": p.clip_skip or 1,
            "vae": p.vae,
            "use_karras_sigmas": yes_no(p.use_karras_sigmas),
            "algorithm_type": p.algorithm_type or "none",
            "safety_checker_type": p.safety_checker_type,
            "tomesd": w.echo.get("tomesd"),
            "enhance_prompt": yes_no(w.enhance_prompt),
            "instant_response": yes_no(w.instant_response),
            "temp": yes_no(w.temp),
            "base64": yes_no(w.base64),
            "webhook": w.webhook,
            "track_id": w.track_id,
            "outdir": "out",
            "file_prefix": w.file_prefix,
        }
    if p.kind != "text2img":
        meta["init_image"] = w.echo.get("init_image")
        meta["strength"] = p.strength
    if p.kind == "inpaint":
        meta["mask_image"] = w.echo.get("mask_image")
    return meta
