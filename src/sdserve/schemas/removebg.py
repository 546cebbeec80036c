"""Wire schema for removebg_mask (reference §11.7, §16.8): `image`'s background removed with
rembg's options; meta echoes its flags as "0"/"1" as the hosted API does."""

from __future__ import annotations

from sdserve.engine import batching
from sdserve.engine.removebg import RemoveBgParams
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


class RemoveBgRequest(CommonRequest):
    image: Text = None
    only_mask: Flag = None
    alpha_matting: Flag = None
    post_process_mask: Flag = None
    inverse_mask: Flag = None
    alpha_matting_foreground_threshold: Int = None
    alpha_matting_background_threshold: Int = None
    alpha_matting_erode_size: Int = None


def _bit(flag: bool) -> str:
    return "1" if flag else "0"


def removebg_job(dialect: Dialect):
    def build(body: dict, ctx: Context) -> JobSpec:
        req = parse_request(RemoveBgRequest, body)
        errors: dict[str, list[str]] = {}
        source = req.image or req.init_image
        if not source:
            errors["image"] = ["The image field is required."]

        def threshold(name: str, value: int | None, default: int, high: int) -> int:
            return int(
                editing.check_range(name, default if value is None else value, 0, high, errors)
            )

        p = RemoveBgParams(
            only_mask=bool(req.only_mask),
            alpha_matting=bool(req.alpha_matting),
            post_process_mask=bool(req.post_process_mask),
            inverse_mask=bool(req.inverse_mask),
            alpha_matting_foreground_threshold=threshold(
                "alpha_matting_foreground_threshold",
                req.alpha_matting_foreground_threshold,
                240,
                255,
            ),
            alpha_matting_background_threshold=threshold(
                "alpha_matting_background_threshold",
                req.alpha_matting_background_threshold,
                20,
                255,
            ),
            alpha_matting_erode_size=threshold(
                "alpha_matting_erode_size", req.alpha_matting_erode_size, 5, 64
            ),
        )
        common.check_webhook(req.webhook, ctx.settings, errors)
        if errors:
            raise ValidationFailed(errors)
        wire = WireFlags.of(req)
        meta = {
            "image_url": common.echo_url(source),
            "only_mask": _bit(p.only_mask),
            "alpha_matting": _bit(p.alpha_matting),
            "post_process_mask": _bit(p.post_process_mask),
            "inverse_mask": _bit(p.inverse_mask),
            "alpha_matting_foreground_threshold": p.alpha_matting_foreground_threshold,
            "alpha_matting_background_threshold": p.alpha_matting_background_threshold,
            "alpha_matting_erode_size": p.alpha_matting_erode_size,
            "seed": common.pick_seed(req.seed),  # echoed: the model is deterministic
            "base64": yes_no(wire.base64),
            "instant_response": yes_no(wire.instant_response),
            "temp": yes_no(wire.temp),
            "file_prefix": wire.file_prefix,
        }
        return JobSpec(
            kind="removebg",
            model_id="u2netp",
            params={**p.model_dump(mode="json"), **wire.stored()},
            batch_key=batching.batch_key("removebg", p.alpha_matting),
            cost=0.5,  # about half a second of CPU at any size: rembg works at 320x320
            total_steps=1,
            output_names=editing.output_names(wire, 1),
            meta=meta,
            inputs={"image": Input(source)},
            webhook=wire.webhook,
            track_id=wire.track_id,
            instant_response=wire.instant_response,
        )

    return build


ROUTES = editing.routes("removebg_mask", removebg_job, RemoveBgRequest)
