"""A throwaway endpoint family, in a few lines, to show the seam: a schema that turns a body into a
job spec, an engine that runs its kind, and one registration. It writes `text` `times` times."""

from __future__ import annotations

from sdserve.engine.base import EngineJob, EngineOutput, OutputFile
from sdserve.errors import ValidationFailed
from sdserve.families import Family
from sdserve.schemas.coerce import Int, Text
from sdserve.schemas.common import CommonRequest, Context, Dialect, JobSpec, Route, WireFlags

ECHO = Dialect("echo", "/api/test/echo/fetch/{id}")


class EchoRequest(CommonRequest):
    text: Text = None
    times: Int = None


def build(body: dict, ctx: Context) -> JobSpec:  # the schema
    req = EchoRequest.model_validate(body)
    if not req.text:
        raise ValidationFailed({"text": ["The text field is required."]})
    wire = WireFlags.of(req)
    return JobSpec(
        kind="echo",
        model_id="echo",
        params={"text": req.text, "times": req.times or 1, **wire.stored()},
        batch_key="echo",
        cost=1.0,
        total_steps=1,
        output_names=[f"generations/{wire.file_prefix}.txt"],
        meta={"text": req.text, "times": req.times or 1},
        webhook=wire.webhook,
        track_id=wire.track_id,
        instant_response=wire.instant_response,
    )


class EchoEngine:  # the engine
    kinds = ("echo",)

    def __init__(self, runtime):
        self.runtime = runtime

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        for job in jobs:
            job.events.step(1, 1)
        return [
            EngineOutput([OutputFile((job.params["text"] * job.params["times"]).encode())])
            for job in jobs
        ]


# the registration
FAMILY = Family("echo", [Route("/api/test/echo", ECHO, build, EchoRequest, "echo")], EchoEngine)
