"""Image generation routes of every family: v3, legacy v3 community, v4 community, v6 images and realtime."""

from __future__ import annotations

from fastapi import APIRouter, Request

from sdserve.api.envelope import authenticate, read_json_body
from sdserve.api.serving import submit_image_job
from sdserve.api.state import get_state
from sdserve.errors import InvalidKey
from sdserve.schemas.images import Family, ImageRequest, Kind

router = APIRouter()

# path -> (pipeline kind, wire family)
IMAGE_ROUTES: dict[str, tuple[Kind, Family]] = {
    "/api/v3/text2img": ("text2img", "v3"),
    "/api/v3/img2img": ("img2img", "v3"),
    "/api/v3/inpaint": ("inpaint", "v3"),
    "/api/v3/dreambooth": ("text2img", "community"),
    "/api/v3/dreambooth/img2img": ("img2img", "community"),
    "/api/v3/dreambooth/inpaint": ("inpaint", "community"),
    "/api/v4/dreambooth": ("text2img", "community"),
    "/api/v4/dreambooth/img2img": ("img2img", "community"),
    "/api/v4/dreambooth/inpaint": ("inpaint", "community"),
    "/api/v6/images/text2img": ("text2img", "images"),
    "/api/v6/images/img2img": ("img2img", "images"),
    "/api/v6/images/inpaint": ("inpaint", "images"),
    "/api/v6/realtime/text2img": ("text2img", "realtime"),
    "/api/v6/realtime/img2img": ("img2img", "realtime"),
    "/api/v6/realtime/inpaint": ("inpaint", "realtime"),
}

_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ImageRequest.model_json_schema()}},
    }
}


def image_route(kind: Kind, family: Family, admin_only: bool = False):
    async def generate(request: Request):
        state = get_state(request)
        body = await read_json_body(request, state.settings)
        principal = authenticate(request, body, state.keys)
        if admin_only and not principal.is_admin:
            raise InvalidKey()
        return await submit_image_job(state, principal, body, kind, family)

    return generate


for _path, (_kind, _family) in IMAGE_ROUTES.items():
    router.add_api_route(
        _path,
        image_route(_kind, _family),
        methods=["POST"],
        summary=f"{_kind} ({_family})",
        tags=[_family],
        openapi_extra=_BODY_SCHEMA,
    )
