"""Wire schema for super resolution (reference §9, §11.8, §16.8): era A (`url`, one output URL
string), era B (`init_image`, `output[]`), enterprise; Real-ESRGAN models by their ModelsLab ids."""

from __future__ import annotations

from sdserve.engine import batching
from sdserve.engine.super_resolution import (
    DEFAULT_MODEL_ID,
    DEFAULT_TILE,
    UpscaleParams,
    check_model_id,
    require_no_face_enhance,
)
from sdserve.errors import ValidationFailed
from sdserve.schemas import common
from sdserve.schemas.coerce import Flag, Int, Text, yes_no
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

# Era A and enterprise answer `output` as one URL string; era B as a list.
ERA_A = Dialect("sr_v5", "/api/v5/fetch/{id}", single_output=True)
ERA_A_V3 = Dialect("sr_v3", "/api/v3/fetch/{id}", single_output=True)
ERA_B = Dialect("sr_v6", "/api/v6/image_editing/fetch/{id}")
ERA_B_V1 = Dialect("sr_v1", "/api/v1/image_editing/fetch/{id}")
ENTERPRISE = Dialect("sr_enterprise", "/api/v1/enterprise/fetch/{id}", single_output=True)
# Era B's default id, `ultra_resolution`, is a diffusion upscaler with no offline weights; when no
# id is sent, the strongest shipped model answers instead (docs/compatibility.md).
_V6_DEFAULT_MODEL = "RealESRGAN_x4plus"


class SuperResolutionRequest(CommonRequest):
    url: Text = None  # era A
    image: Text = None  # some v6 clients
    scale: Int = None
    face_enhance: Flag = None
    tile: Int = None  # not in the hosted API: tile size in input pixels (0 = whole image)


def super_resolution_job(dialect: Dialect):
    def build(body: dict, ctx: Context) -> JobSpec:
        req = parse_request(SuperResolutionRequest, body)
        errors: dict[str, list[str]] = {}
        source = req.init_image or req.url or req.image
        if not source:
            errors["init_image"] = ["The init image field is required (or url)."]
        scale = 4 if req.scale is None else req.scale
        if not 1 <= scale <= 4:
            errors["scale"] = ["The scale must be between 1 and 4."]
        tile = DEFAULT_TILE if req.tile is None else req.tile
        if tile < 0 or 0 < tile < 32:
            errors["tile"] = ["The tile must be 0 (no tiling) or at least 32 pixels."]
        common.check_webhook(req.webhook, ctx.settings, errors)
        if errors:
            raise ValidationFailed(errors)
        require_no_face_enhance(bool(req.face_enhance))
        default = _V6_DEFAULT_MODEL if dialect in (ERA_B, ERA_B_V1) else DEFAULT_MODEL_ID
        model_id = check_model_id(req.model_id or default, ctx.registry)
        p = UpscaleParams(model_id=model_id, scale=scale, tile=tile)
        wire = WireFlags.of(req)
        ext = "base64" if wire.base64 else "png"
        folder = "temp" if wire.temp else "generations"
        meta = {
            "init_image": common.echo_url(source),
            "model_id": model_id,
            "scale": scale,
            "upscale_factor": scale,
            "face_enhance": yes_no(False),
            "tile_size": tile,
            "temp": yes_no(wire.temp),
            "base64": yes_no(wire.base64),
            "file_prefix": wire.file_prefix,
        }
        return JobSpec(
            kind="upscale",
            model_id=model_id,
            params={**p.model_dump(mode="json"), **wire.stored()},
            batch_key=batching.batch_key("upscale", model_id, scale, tile),
            cost=p.cost,
            total_steps=1,
            output_names=[f"{folder}/{wire.file_prefix}_out.{ext}"],
            meta=meta,
            inputs={"init_image": Input(source)},
            webhook=wire.webhook,
            track_id=wire.track_id,
            instant_response=wire.instant_response,
        )

    return build


def _routes() -> list[Route]:
    paths = (
        ("/api/v5/super_resolution", ERA_A, False),
        ("/api/v3/super_resolution", ERA_A_V3, False),
        ("/api/v6/image_editing/super_resolution", ERA_B, False),
        ("/api/v1/image_editing/super_resolution", ERA_B_V1, False),
        ("/api/v1/enterprise/super_resolution", ENTERPRISE, True),
        ("/api/v1/enterprise/image_editing/super_resolution", ENTERPRISE, True),
        ("/api/v1/enterprise/{product}/super_resolution", ENTERPRISE, True),
    )
    return [
        Route(
            path,
            dialect,
            super_resolution_job(dialect),
            SuperResolutionRequest,
            summary=f"super resolution ({dialect.name})",
            admin_only=admin_only,
            tags=("image_editing",),
        )
        for path, dialect, admin_only in paths
    ]


ROUTES = _routes()
