"""Wire schema for interior design (reference §7 "create room", §16.5, §16.8): ControlNet img2img
with a straight-line hint of the room (M-LSD; here OpenCV's LSD), strength 0.55 as the hosted
meta shows. `object_removal` finds `object_name` with CLIPSeg and inpaints it away;
`interior_mixer` places `object_image` into the room before it is repainted."""

from __future__ import annotations

from sdserve.engine.prompts import enhance_prompt
from sdserve.engine.text_masks import check_clipseg_available
from sdserve.errors import ValidationFailed
from sdserve.schemas import common
from sdserve.schemas.common import Context, Dialect, Input, JobSpec, Route, WireFlags
from sdserve.schemas.controlnet import ControlNetRequest, controlnet_params, controlnet_spec

V5 = Dialect("interior_v5", "/api/v5/fetch/{id}")
V3 = Dialect("interior_v3", "/api/v3/fetch/{id}")
V6 = Dialect("interior", "/api/v6/interior/fetch/{id}")
ENTERPRISE = Dialect("interior_enterprise", "/api/v1/enterprise/interior/fetch/{id}")
VERBS = (
    "make",
    "room_decorator",
    "floor_planning",
    "scenario",
    "exterior_restorer",
    "interior_mixer",
    "object_removal",
)
LINE_NET = "mlsd"
_REMOVAL_PROMPT = "empty space, clean seamless surface, matching the surroundings"
_REMOVAL_NEGATIVE = "object, furniture, clutter, person"


def interior_job(verb: str, dialect: Dialect):
    def build(body: dict, ctx: Context) -> JobSpec:
        req = common.parse_request(ControlNetRequest, body)
        req = req.model_copy(update=_interior_fields(req, verb))
        model_id = req.model_id or ctx.settings.default_model
        if verb == "object_removal":
            check_clipseg_available(model_id, ctx.registry.offline())
        p, inputs, source = controlnet_params(req, ctx, model_id=model_id)
        if verb == "object_removal":
            p.object_name = req.object_name
        if verb == "interior_mixer":
            p.place_object = True
            inputs["object_image"] = Input(req.object_image)
        enhance = bool(req.enhance_prompt)
        if enhance:
            p.prompt, p.negative_prompt = enhance_prompt(p.prompt, p.negative_prompt)
        wire = WireFlags.of(req, enhance_prompt=enhance)
        extra = {"interior": verb}
        if verb == "object_removal":
            extra["object_name"] = req.object_name
        if verb == "interior_mixer":
            extra["object_image"] = common.echo_url(req.object_image)
        if verb == "scenario":
            extra["scenario"] = req.scenario
        return controlnet_spec(
            p, req, wire, dialect, source_label=p.model_id, inputs=inputs, extra_meta=extra
        )

    return build


def _interior_fields(req: ControlNetRequest, verb: str) -> dict:
    """What an interior verb fixes: the line-hint ControlNet on the room, or (object_removal)
    the inpaint ControlNet on the mask CLIPSeg finds."""
    errors: dict[str, list[str]] = {}
    if not (req.init_image or req.image):
        errors["init_image"] = ["The init image field is required."]
    update: dict = {
        "controlnet_model": [LINE_NET],
        "controlnet_type": LINE_NET,
        "auto_hint": True,
        "control_image": None,
        "mask_image": None,
    }
    if verb == "object_removal":
        if not (req.object_name or "").strip():
            errors["object_name"] = ["The object name field is required."]
        update.update(
            controlnet_model=["inpaint"],
            controlnet_type="inpaint",
            prompt=req.prompt or _REMOVAL_PROMPT,
            negative_prompt=req.negative_prompt or _REMOVAL_NEGATIVE,
            strength=1.0 if req.strength is None else req.strength,
        )
    if verb == "interior_mixer":
        if not req.object_image:
            errors["object_image"] = ["The object image field is required."]
        update["num_inference_steps"] = req.num_inference_steps or req.steps or 8
    if verb == "scenario" and req.scenario:
        update["prompt"] = f"{req.prompt or ''}, {req.scenario}".strip(", ")
    if errors:
        raise ValidationFailed(errors)
    return update


def _routes() -> list[Route]:
    routes = [
        Route("/api/v5/interior", V5, interior_job("make", V5), ControlNetRequest, "interior (v5)"),
        Route("/api/v3/interior", V3, interior_job("make", V3), ControlNetRequest, "interior (v3)"),
        Route(
            "/api/v1/enterprise/interior",
            ENTERPRISE,
            interior_job("make", ENTERPRISE),
            ControlNetRequest,
            "interior (enterprise)",
            admin_only=True,
        ),
    ]
    for verb in VERBS:
        routes.append(
            Route(
                f"/api/v6/interior/{verb}",
                V6,
                interior_job(verb, V6),
                ControlNetRequest,
                f"interior {verb}",
            )
        )
        routes.append(
            Route(
                f"/api/v1/enterprise/interior/{verb}",
                ENTERPRISE,
                interior_job(verb, ENTERPRISE),
                ControlNetRequest,
                f"interior {verb} (enterprise)",
                admin_only=True,
            )
        )
    return [
        Route(r.path, r.dialect, r.build, r.request, r.summary, r.admin_only, ("interior",))
        for r in routes
    ]


ROUTES = _routes()
