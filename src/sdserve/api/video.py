"""Video routes: v4 dreambooth/text2video (the headline), v5 text2video, v6 video, enterprise mirrors."""

from __future__ import annotations

from fastapi import APIRouter, Request

from sdserve.api.envelope import authenticate, read_json_body
from sdserve.api.serving import submit_video_job
from sdserve.api.state import get_state
from sdserve.errors import InvalidKey
from sdserve.schemas.video import VideoFamily, VideoRequest

router = APIRouter()

# path -> (family, image_to_video, enterprise key required)
VIDEO_ROUTES: dict[str, tuple[VideoFamily, bool, bool]] = {
    "/api/v4/dreambooth/text2video": ("v4video", False, False),
    "/api/v5/text2video": ("v5video", False, False),
    "/api/v6/video/text2video": ("video", False, False),
    "/api/v6/video/img2video": ("video", True, False),
    "/api/v1/enterprise/text2video": ("enterprise", False, True),
    "/api/v1/enterprise/video/text2video": ("enterprise", False, True),
    "/api/v1/enterprise/video/img2video": ("enterprise", True, True),
}

_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": VideoRequest.model_json_schema()}},
    }
}


def _make_route(family: VideoFamily, image_to_video: bool, enterprise: bool):
    async def generate(request: Request):
        state = get_state(request)
        body = await read_json_body(request, state.settings)
        principal = authenticate(request, body, state.keys)
        if enterprise and not principal.is_admin:
            raise InvalidKey()
        return await submit_video_job(state, principal, body, family, image_to_video=image_to_video)

    return generate


for _path, (_family, _i2v, _enterprise) in VIDEO_ROUTES.items():
    router.add_api_route(
        _path,
        _make_route(_family, _i2v, _enterprise),
        methods=["POST"],
        summary=("img2video" if _i2v else "text2video") + f" ({_family})",
        tags=["video"],
        openapi_extra=_BODY_SCHEMA,
    )
