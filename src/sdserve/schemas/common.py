"""What every family's wire schema shares: the common request fields and their rules, the job spec
a request becomes, and the routes and dialects a family registers."""

from __future__ import annotations

import functools
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from sdserve.engine.registry import ModelRegistry
from sdserve.errors import ValidationFailed
from sdserve.net import url_field_errors
from sdserve.schemas.coerce import Flag, Float, FloatList, Int, StrList, Text
from sdserve.settings import Settings

_MAX_SEED = 2**32
R = TypeVar("R", bound=BaseModel)


class CommonRequest(BaseModel):
    """The fields most families send; unknown fields are ignored and null means not given."""

    model_config = ConfigDict(extra="ignore")

    key: Text = None
    model_id: Text = None
    prompt: Text = None
    negative_prompt: Text = None
    width: Int = None
    height: Int = None
    num_inference_steps: Int = None
    steps: Int = None  # v4/v6 docs spell it this way in places
    guidance_scale: Float = None
    seed: Int = None
    scheduler: Text = None
    lora_model: StrList = None
    lora_strength: FloatList = None
    clip_skip: Int = None
    init_image: Text = None
    strength: Float = None
    base64: Flag = None
    temp: Flag = None
    instant_response: Flag = None
    enhance_prompt: Flag = None
    safety_checker: Flag = None
    webhook: Text = None
    track_id: Any = None


# ---- the rules every family applies the same way ---------------------------------------------


def parse_request(model: type[R], body: dict) -> R:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ValidationFailed(validation_error_map(exc)) from None


def validation_error_map(exc: ValidationError) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "body"
        message = (
            err["msg"]
            if err["type"] in {"integer", "number", "flag", "string"}
            else (f"The {name} field is invalid.")
        )
        fields.setdefault(name, []).append(message)
    return fields


def pick_seed(value: int | None) -> int:
    """null, -1 and 0 all mean "random"; the seed used is chosen now and echoed in meta."""
    seed = value if value not in (None, -1, 0) else secrets.randbelow(_MAX_SEED - 1) + 1
    return seed % _MAX_SEED


def loras(ids: list[str] | None, strengths: list[float] | None) -> list[tuple[str, float]]:
    """(id, strength) pairs: a missing strength repeats the last one (1.0 when none), each is
    clamped to 0..2, and an id named twice is one adapter with the strengths added."""
    ids, strengths = ids or [], strengths or []
    merged: dict[str, float] = {}
    for index, lora_id in enumerate(ids):
        strength = strengths[min(index, len(strengths) - 1)] if strengths else 1.0
        merged[lora_id] = merged.get(lora_id, 0.0) + max(0.0, min(strength, 2.0))
    return [(lora_id, min(strength, 2.0)) for lora_id, strength in merged.items()]


# Hard limits: past these a value is nonsense, not something to reduce (docs/compatibility.md).
HARD_MAX_SIZE = 8192
HARD_MAX_STEPS = 1000
HARD_MAX_SAMPLES = 100
HARD_MAX_FRAMES = 10_000


def bounded(
    name: str, value: int, minimum: int, maximum: int, hard_maximum: int, errors: dict
) -> int:
    """The one rule of every bounded field (sizes, steps, samples, frames): below `minimum` or
    past `hard_maximum` is an error; above this server's `maximum` is reduced to it, and the
    job's meta shows the value used."""
    if value < minimum or value > hard_maximum:
        label = name.replace("_", " ")
        errors.setdefault(name, []).append(
            f"The {label} must be between {minimum} and {hard_maximum}; "
            f"above {maximum} it is reduced to {maximum}."
        )
        return minimum
    return min(value, maximum)


def steps(
    value: int | None, alias: int | None, default: int, settings: Settings, errors: dict
) -> int:
    chosen = value if value is not None else alias
    chosen = default if chosen is None else chosen
    return bounded(
        "num_inference_steps", chosen, 1, settings.max_steps, HARD_MAX_STEPS, errors
    )


def size(name: str, value: int | None, default: int, maximum: int, errors: dict) -> int:
    """A width or height: the one rule, then a multiple of 8 (latents are 1/8 of the image)."""
    chosen = min(default, maximum) if value is None else value
    return bounded(name, chosen, 64, maximum, HARD_MAX_SIZE, errors) // 8 * 8


def check_webhook(value: str | None, settings: Settings, errors: dict) -> None:
    """An http(s) URL to a public address, without credentials (the private-address guard)."""
    errors.update(url_field_errors(value, settings, "webhook"))


def check_prompt(
    value: str | None, name: str, settings: Settings, errors: dict, *, required: bool
) -> str:
    """The prompt stripped, within the documented caps in characters and in CLIP tokens (long
    prompts are encoded in 75-token chunks; past the cap they only cost time)."""
    text = (value or "").strip()
    label = name.replace("_", " ")
    if required and not text:
        errors[name] = [f"The {label} field is required."]
    elif len(text) > settings.max_prompt_chars:
        errors[name] = [f"The {label} may not be longer than {settings.max_prompt_chars} characters."]
    elif len(text) > settings.max_prompt_tokens and _token_count(text) > settings.max_prompt_tokens:
        errors[name] = [f"The {label} may not be longer than {settings.max_prompt_tokens} tokens."]
    return text


@functools.cache
def _tokenizer():
    from transformers import CLIPTokenizerFast

    from sdserve.engine.checkpoints import CLIP_TOKENIZER_DIR

    return CLIPTokenizerFast.from_pretrained(CLIP_TOKENIZER_DIR)


def _token_count(text: str) -> int:
    return len(_tokenizer()(text, add_special_tokens=False).input_ids)


def echo_url(value: str | None) -> str | None:
    """URLs are echoed in meta; inline base64 is not (it can be megabytes)."""
    if value is None:
        return None
    return value if value.startswith(("http://", "https://")) else "base64"


def new_file_prefix() -> str:
    return str(uuid.uuid4())


@dataclass
class WireFlags:
    """The common wire options of one request, as effective values (meta echoes them)."""

    file_prefix: str
    base64: bool = False
    temp: bool = False
    instant_response: bool = False
    enhance_prompt: bool = False
    track_id: Any = None
    webhook: str | None = None
    echo: dict[str, Any] = field(default_factory=dict)  # family-specific values meta repeats

    @classmethod
    def of(cls, req: CommonRequest, *, enhance_prompt: bool = False, **echo: Any) -> WireFlags:
        return cls(
            file_prefix=new_file_prefix(),
            base64=bool(req.base64),
            temp=bool(req.temp),
            instant_response=bool(req.instant_response),
            enhance_prompt=enhance_prompt,
            track_id=req.track_id,
            webhook=req.webhook,
            echo=echo,
        )

    def stored(self) -> dict[str, Any]:
        """What the worker reads of them: how to write the outputs."""
        return {"base64": self.base64}


# ---- what a request becomes -------------------------------------------------------------------


@dataclass
class JobSpec:
    """One job, as a family's schema describes it: what to run, with what, and what it makes."""

    kind: str  # what the engine runs: text2img, animatediff, upscale, ...
    model_id: str
    params: dict[str, Any]  # the engine's typed parameters plus the common flags, as JSON
    batch_key: str
    cost: float  # work units (engine.batching.cost)
    total_steps: int
    output_names: list[str]  # storage names of the outputs, fixed now: "generations/0-….png"
    meta: dict[str, Any]  # the echo of effective parameters, in the dialect's key style
    inputs: dict[str, Input] = field(default_factory=dict)
    webhook: str | None = None
    track_id: Any = None
    instant_response: bool = False
    # A training: its public record (training_id, kind, base_model_id, instance_prompt, and the
    # webhook its stages are posted to); `counts_as_model` when it uses the plan's allowance.
    training: dict[str, Any] | None = None
    counts_as_model: bool = False


@dataclass(frozen=True)
class Input:
    """A file the job needs, as the client sent it (URL or base64), stored before queueing."""

    value: str
    type: Literal["image", "video"] = "image"
    same_size_as: str | None = None  # another image input this one must match (a mask)


@dataclass(frozen=True)
class Context:
    """What a schema may consult while it builds a spec (all of it cheap, none of it I/O)."""

    settings: Settings
    registry: ModelRegistry
    owner: str  # the caller's: other keys' private models are invisible


@dataclass(frozen=True)
class Dialect:
    """How one era of clients is answered: where it polls, what `processing` says, whether
    `output` is one URL string instead of a list (some legacy endpoints), and whether the answer
    also names the first output `output_url` (v7)."""

    name: str  # stored on the job: unique across families
    fetch_path: str = "/api/v3/fetch/{id}"
    processing_message: str = "Try to fetch request after seconds estimated"
    single_output: bool = False
    output_url: bool = False  # v7 clients read the first output as `output_url` too
    whole_seconds: bool = False  # `generationTime` an integer (era-A 3D clients decode an int)


@dataclass(frozen=True)
class Route:
    """One endpoint: its path, its dialect, and how its body becomes a job spec."""

    path: str
    dialect: Dialect
    build: Callable[[dict, Context], JobSpec]
    request: type[BaseModel]  # for the OpenAPI schema
    summary: str
    admin_only: bool = False
    tags: tuple[str, ...] = ()

    @property
    def hidden(self) -> bool:
        """Per-product aliases (`/api/v1/enterprise/{product}/...`) stay out of the OpenAPI
        schema: their operation ids would repeat the plain path's."""
        return "{" in self.path
