"""Wire schema for chat (reference §13, §16.6, §16.7): the ModelsLab bodies (`uncensored_chat`,
`chat_llm/chat`) and OpenAI's (`chat/completions`, `completions`), each turned into the one
typed `ChatParams` of a chat job, with the echo ModelsLab clients read back in `meta`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sdserve.engine import batching
from sdserve.engine.chat import ChatParams
from sdserve.engine.chat_upstream import model_map
from sdserve.errors import ValidationFailed
from sdserve.schemas import common
from sdserve.schemas.admin import KeyOnly
from sdserve.schemas.coerce import Flag, Float, Int, Text
from sdserve.schemas.common import CommonRequest, Context, JobSpec, parse_request
from sdserve.settings import Settings

ROLES = ("system", "user", "assistant")
HARD_MAX_TOKENS = 30_000  # era B's documented maximum; past it a value is nonsense
DEFAULT_MAX_TOKENS = 128


class UncensoredChatRequest(CommonRequest):
    """§13.1 (and chat_llm's `uncensored_chat`); OpenAI's sampling fields are accepted too."""

    messages: Any = None
    max_tokens: Int = None
    temperature: Float = None
    top_p: Float = None
    top_k: Int = None
    presence_penalty: Float = None
    frequency_penalty: Float = None
    stop: Any = None


class ChatLlmRequest(CommonRequest):
    """§16.6 `chat_llm/chat`: one prompt, an optional system prompt, transformers' sampling
    fields; `chat_id` (not in the hosted docs) continues an earlier chat of the same key."""

    system_prompt: Text = None
    max_new_tokens: Int = None
    do_sample: Flag = None
    temperature: Float = None
    top_k: Int = None
    top_p: Float = None
    no_repeat_ngram_size: Int = None
    repetition_penalty: Float = None
    presence_penalty: Float = None
    frequency_penalty: Float = None
    chat_id: Int = None


class OpenAIRequest(CommonRequest):
    """An OpenAI `chat/completions` or `completions` body (vLLM's `top_k` accepted)."""

    model: Text = None
    messages: Any = None
    prompt: Any = None  # completions: a string, or a list of one string
    max_tokens: Int = None
    max_completion_tokens: Int = None
    max_new_tokens: Int = None
    temperature: Float = None
    top_p: Float = None
    top_k: Int = None
    presence_penalty: Float = None
    frequency_penalty: Float = None
    stop: Any = None
    n: Int = None
    stream: Flag = None
    stream_options: Any = None


@dataclass
class OpenAICall:
    params: ChatParams
    stream: bool
    include_usage: bool


# ---- the shared rules -------------------------------------------------------------------------


def served_models(settings: Settings) -> list[str]:
    """The model names clients may send: the upstream's mapped names, or the one chat model."""
    mapped = model_map(settings.chat_model_map) if settings.chat_upstream_url else {}
    return list(mapped) or [settings.chat_model]


def _model(value: str | None, name: str, settings: Settings, errors: dict) -> str:
    served = served_models(settings)
    if not value:
        return served[0]
    if value not in served:
        errors[name] = [f"The model {value} is not served here; served: {', '.join(served)}."]
    return value


def _messages(value: Any, settings: Settings, errors: dict) -> list[dict[str, str]]:
    """`[{role, content}]`, roles system/user/assistant (OpenAI's `developer` is a system one);
    content is text or OpenAI's list of text parts."""
    if isinstance(value, str):  # a form body sends it as JSON text
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, list) or not value:
        errors["messages"] = ["The messages field is required: a list of {role, content}."]
        return []
    messages = []
    for index, item in enumerate(value):
        role = item.get("role") if isinstance(item, dict) else None
        role = "system" if role == "developer" else role
        content = _content(item.get("content") if isinstance(item, dict) else None)
        if role not in ROLES:
            errors["messages"] = [
                f"messages[{index}]: the role must be one of {', '.join(ROLES)}, not {role!r}."
            ]
            break
        if content is None:
            errors["messages"] = [f"messages[{index}]: the content must be text."]
            break
        if len(content) > settings.max_prompt_chars:
            errors["messages"] = [
                f"messages[{index}]: the content may not be longer than "
                f"{settings.max_prompt_chars} characters."
            ]
            break
        messages.append({"role": role, "content": content})
    return messages


def _content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(value) and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    return None


def _stop(value: Any, errors: dict) -> list[str]:
    if value is None or value == "":
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        errors["stop"] = ["The stop field must be a string or a list of up to 4 strings."]
        return []
    return stops


def _tokens(value: int | None, name: str, settings: Settings, errors: dict) -> int:
    chosen = DEFAULT_MAX_TOKENS if value is None else value
    return common.bounded(name, chosen, 1, settings.chat_max_tokens, HARD_MAX_TOKENS, errors)


def _range(name: str, value: float | None, default: float, low: float, high: float, errors: dict):
    chosen = default if value is None else value
    if not low <= chosen <= high:
        errors[name] = [f"The {name.replace('_', ' ')} must be between {low:g} and {high:g}."]
    return chosen


def _sampling(req: Any, errors: dict) -> dict[str, Any]:
    """The OpenAI sampling fields every chat body may send, with OpenAI's ranges."""
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    if top_k < 0:
        errors["top_k"] = ["The top k must be 0 (no cut) or more."]
    return {
        "temperature": _range("temperature", req.temperature, 1.0, 0.0, 2.0, errors),
        "top_p": _range("top_p", req.top_p, 1.0, 0.0, 1.0, errors) or 1.0,
        "top_k": top_k,
        "presence_penalty": _range("presence_penalty", req.presence_penalty, 0.0, -2, 2, errors),
        "frequency_penalty": _range("frequency_penalty", req.frequency_penalty, 0.0, -2, 2, errors),
    }


def chat_spec(p: ChatParams, req: CommonRequest, meta: dict[str, Any], ctx: Context) -> JobSpec:
    """A chat job: it runs alone (one sequence per run) and makes no files."""
    errors: dict[str, list[str]] = {}
    common.check_webhook(req.webhook, ctx.settings, errors)
    if errors:
        raise ValidationFailed(errors)
    return JobSpec(
        kind="chat",
        model_id=p.model_id,
        params=p.model_dump(mode="json"),
        batch_key=batching.solo_key("chat", common.new_file_prefix()),
        cost=p.max_new_tokens / 1000,
        total_steps=p.max_new_tokens,
        output_names=[],
        meta=meta,
        webhook=req.webhook,
        track_id=req.track_id,
        instant_response=bool(req.instant_response),
    )


# ---- the ModelsLab bodies ---------------------------------------------------------------------


def uncensored_chat(body: dict, ctx: Context) -> JobSpec:
    """§13.1: the conversation in `messages`; meta echoes the sampling fields with defaults."""
    req = parse_request(UncensoredChatRequest, body)
    errors: dict[str, list[str]] = {}
    messages = _messages(req.messages, ctx.settings, errors)
    max_tokens = _tokens(req.max_tokens, "max_tokens", ctx.settings, errors)
    sampling = _sampling(req, errors)
    stop = _stop(req.stop, errors)
    model_id = _model(req.model_id, "model_id", ctx.settings, errors)
    if errors:
        raise ValidationFailed(errors)
    seed = common.pick_seed(req.seed)
    p = ChatParams(
        model_id=model_id,
        messages=messages,
        max_new_tokens=max_tokens,
        seed=seed,
        stop=stop,
        **sampling,
    )
    meta = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": sampling["temperature"],
        "top_p": sampling["top_p"],
        "presence_penalty": sampling["presence_penalty"],
        "frequency_penalty": sampling["frequency_penalty"],
        "model_id": model_id,
        "seed": seed,
        "track_id": req.track_id,
        "webhook": req.webhook,
    }
    return chat_spec(p, req, meta, ctx)


def chat_llm(body: dict, ctx: Context, history: list[dict[str, str]]) -> JobSpec:
    """§16.6 `chat`: `history` is the conversation `chat_id` continues (empty for a new one)."""
    req = parse_request(ChatLlmRequest, body)
    errors: dict[str, list[str]] = {}
    prompt = common.check_prompt(req.prompt, "prompt", ctx.settings, errors, required=True)
    system = common.check_prompt(
        req.system_prompt, "system_prompt", ctx.settings, errors, required=False
    )
    max_new = _tokens(req.max_new_tokens, "max_new_tokens", ctx.settings, errors)
    sampling = _sampling(req, errors)
    ngram = req.no_repeat_ngram_size or 0
    if ngram < 0:
        errors["no_repeat_ngram_size"] = ["The no repeat ngram size must be 0 or more."]
    repetition = _range("repetition_penalty", req.repetition_penalty, 1.0, 0.1, 10.0, errors)
    model_id = _model(req.model_id, "model_id", ctx.settings, errors)
    if errors:
        raise ValidationFailed(errors)
    earlier = [m for m in history if m["role"] != "system"]
    system = system or next((m["content"] for m in history if m["role"] == "system"), "")
    messages = ([{"role": "system", "content": system}] if system else []) + earlier
    messages.append({"role": "user", "content": prompt})
    seed = common.pick_seed(req.seed)
    do_sample = True if req.do_sample is None else req.do_sample
    p = ChatParams(
        model_id=model_id,
        messages=messages,
        max_new_tokens=max_new,
        do_sample=do_sample,
        no_repeat_ngram_size=ngram,
        repetition_penalty=repetition,
        seed=seed,
        **sampling,
    )
    meta = {
        "model_id": model_id,
        "system_prompt": system,
        "prompt": prompt,
        "max_new_tokens": max_new,
        "do_sample": do_sample,
        **sampling,
        "no_repeat_ngram_size": ngram,
        "seed": seed,
        "temp": bool(req.temp),
        "track_id": req.track_id,
        "webhook": req.webhook,
    }
    return chat_spec(p, req, meta, ctx)


# ---- the OpenAI bodies ------------------------------------------------------------------------


def openai_call(body: dict, settings: Settings, *, chat: bool) -> OpenAICall:
    """An OpenAI body as chat params; raises ValidationFailed (the routes answer it OpenAI's way)."""
    req = parse_request(OpenAIRequest, body)
    errors: dict[str, list[str]] = {}
    messages, prompt = None, None
    if chat:
        messages = _messages(req.messages, settings, errors)
    else:
        prompt = (
            req.prompt[0] if isinstance(req.prompt, list) and len(req.prompt) == 1 else req.prompt
        )
        if not isinstance(prompt, str):
            errors["prompt"] = ["The prompt field is required: one string."]
        elif len(prompt) > settings.max_prompt_chars:
            errors["prompt"] = [
                f"The prompt may not be longer than {settings.max_prompt_chars} characters."
            ]
    given = next(
        (
            v
            for v in (req.max_completion_tokens, req.max_tokens, req.max_new_tokens)
            if v is not None
        ),
        None,
    )
    max_tokens = _tokens(given, "max_tokens", settings, errors)
    sampling = _sampling(req, errors)
    stop = _stop(req.stop, errors)
    if req.n not in (None, 1):
        errors["n"] = ["Only n = 1 is supported."]
    model = _model(req.model, "model", settings, errors)
    if errors:
        raise ValidationFailed(errors)
    options = req.stream_options if isinstance(req.stream_options, dict) else {}
    p = ChatParams(
        model_id=model,
        messages=messages,
        prompt=prompt if isinstance(prompt, str) else None,
        max_new_tokens=max_tokens,
        seed=common.pick_seed(req.seed),
        stop=stop,
        **sampling,
    )
    return OpenAICall(p, bool(req.stream), bool(options.get("include_usage")))


def openai_spec(call: OpenAICall, ctx: Context) -> JobSpec:
    """The job of an OpenAI request answered by the embedded model (no webhook, no echo)."""
    meta = {"model": call.params.model_id, "seed": call.params.seed}
    return chat_spec(call.params, CommonRequest(), meta, ctx)


# ---- what the OpenAPI document says of the bodies (the rules above check them) -----------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"] = Field(
        description="`developer` is a system message"
    )
    content: str | list[TextPart]


class _Sampling(KeyOnly):
    """The OpenAI sampling fields every chat body may send, with their ranges."""

    model_config = ConfigDict(extra="allow")

    temperature: float | None = Field(None, ge=0, le=2, description="1 by default")
    top_p: float | None = Field(None, ge=0, le=1, description="1 by default")
    top_k: int | None = Field(None, ge=-1, description="0 or -1: no cut")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, description="random when left out")


_MAX_TOKENS = Field(
    None,
    ge=1,
    le=HARD_MAX_TOKENS,
    description=f"{DEFAULT_MAX_TOKENS} by default; above SDSERVE_CHAT_MAX_TOKENS it is reduced",
)
_STOP = Field(None, description="a string, or up to 4")


class _ModelsLabChat(_Sampling):
    model_id: str | None = Field(None, description="the chat model; the served one by default")
    instant_response: bool | None = Field(None, description="answer `processing` at once")
    webhook: str | None = None
    track_id: str | int | None = None


class UncensoredChatBody(_ModelsLabChat):
    """§13.1: the conversation so far."""

    messages: list[Message]
    max_tokens: int | None = _MAX_TOKENS
    stop: str | list[str] | None = _STOP


class ChatLlmBody(_ModelsLabChat):
    """§16.6 `chat_llm/chat`: one prompt; `chat_id` continues an earlier chat of the same key."""

    prompt: str
    system_prompt: str | None = None
    max_new_tokens: int | None = _MAX_TOKENS
    do_sample: bool | None = Field(None, description="true by default")
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=0.1, le=10)
    chat_id: int | None = Field(None, description="the chat to continue (its answer must be in)")
    temp: bool | None = None


class ChatIdBody(KeyOnly):
    chat_id: int | str = Field(description="the chat's id, from its first answer")


class StreamOptions(BaseModel):
    include_usage: bool | None = Field(None, description="a last chunk with `usage`")


class _OpenAIBody(_Sampling):
    model: str | None = Field(None, description="a name /models lists; the first by default")
    max_tokens: int | None = _MAX_TOKENS
    max_completion_tokens: int | None = Field(None, ge=1, le=HARD_MAX_TOKENS)
    stop: str | list[str] | None = _STOP
    n: Literal[1] | None = Field(None, description="only 1")
    stream: bool | None = Field(None, description="server-sent events, ending `data: [DONE]`")
    stream_options: StreamOptions | None = None


class ChatCompletionBody(_OpenAIBody):
    """OpenAI's `chat/completions` body (vLLM's `top_k` too); the key may also be `key`."""

    messages: list[Message]


class CompletionBody(_OpenAIBody):
    """OpenAI's `completions` body; the key may also be `key`."""

    prompt: str | list[str] = Field(description="one string (or a list of one)")
