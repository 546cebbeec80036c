"""Chat: the typed parameters of a chat job, the built-in tiny chat model, an embedded sampler
(transformers, one token at a time) and the engine that runs queued chat jobs with the backend
the settings name (the embedded model, or an OpenAI-compatible upstream: `engine/chat_upstream`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel

from sdserve.engine import tiny
from sdserve.engine.base import EngineJob, EngineOutput, Runtime, one_by_one
from sdserve.engine.chat_upstream import UpstreamChat
from sdserve.errors import EngineError, ModelUnavailable, SdserveError

TINY_CHAT_ID = "tiny-chat"
_SEED = 0
# The template of Llama 3 chat models, which the tiny model's tokenizer carries.
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]
_CORPUS = [
    "You are a helpful assistant. Answer the question in a few words.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Hello! How can I help you today? Tell me about the weather, the sea and the mountains.",
    "Stable Diffusion makes images from text; a language model writes text from text.",
    "system user assistant: what is the capital of France? Paris is the capital of France.",
    "One two three four five six seven eight nine ten. Numbers 0123456789 and symbols ?!.,;:",
]


class ChatParams(BaseModel):
    """One chat job: a conversation (or a raw completion prompt) and how to sample the answer."""

    model_id: str
    messages: list[dict[str, str]] | None = (
        None  # chat: {role, content}, roles checked by the schema
    )
    prompt: str | None = None  # completion: the text to continue as is
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int = 1
    stop: list[str] = []


@dataclass
class ChatAnswer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    pieces: list[str] = field(default_factory=list)  # the text as it was generated, token by token

    def as_dict(self) -> dict:
        return asdict(self)


class ChatTooLong(SdserveError):
    http_status = 400


# ---- the built-in tiny model ------------------------------------------------------------------


def ensure_tiny_chat(models_dir: Path) -> Path:
    """A Llama-layout causal LM with random weights and a real byte-level BPE tokenizer whose chat
    template is Llama 3's, built once into `models_dir/tiny-chat` (about 130 KB)."""
    folder = models_dir / TINY_CHAT_ID
    if (folder / "config.json").exists():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    def write(target: Path) -> None:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=326,
            special_tokens=_SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(_CORPUS, trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            pad_token="<|pad|>",
            chat_template=_LLAMA3_TEMPLATE,
        )
        torch.manual_seed(_SEED)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
        tokenizer.save_pretrained(target)
        model.save_pretrained(target, safe_serialization=True)

    return tiny.publish_once(folder, write)


# ---- the embedded sampler ---------------------------------------------------------------------


class EmbeddedChat:
    """A transformers causal LM and its tokenizer, sampled one token at a time: OpenAI's presence
    and frequency penalties (which transformers lacks), a seeded generator of its own (threads
    never share a random state), and the text handed out as it grows."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        dtype = dtype if device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.device = device
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {t for t in [*eos, self.tokenizer.eos_token_id] if t is not None}
        self.components = {"model": self.model}  # what the residency cache weighs

    def prompt_ids(self, p: ChatParams) -> list[int]:
        if p.messages is None:
            ids = self.tokenizer(p.prompt or "", add_special_tokens=True).input_ids
            if not ids:  # an empty prompt with no BOS added: start where a text starts
                start = self.tokenizer.bos_token_id
                start = self.tokenizer.eos_token_id if start is None else start
                ids = [] if start is None else [start]
            return ids
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                p.messages, add_generation_prompt=True, tokenize=False
            )
        else:  # a base model: the conversation as plain lines
            lines = [f"{m['role']}: {m['content']}" for m in p.messages]
            text = "\n".join([*lines, "assistant:"])
        return self.tokenizer(text, add_special_tokens=False).input_ids

    @torch.inference_mode()
    def generate(
        self, p: ChatParams, on_piece: Callable[[str, int], None] | None = None
    ) -> ChatAnswer:
        """The answer to `p`; `on_piece(text, tokens_so_far)` is called as text is made."""
        # 1. the prompt, within the model's context
        prompt = self.prompt_ids(p)
        if not prompt:
            raise ChatTooLong("The prompt is empty, and this model has no token to start from.")
        room = self.context - len(prompt)
        if room < 1:
            raise ChatTooLong(
                f"The messages are {len(prompt)} tokens; this model's context is "
                f"{self.context} tokens."
            )
        budget = min(p.max_new_tokens, room)
        generator = torch.Generator("cpu").manual_seed(p.seed)
        counts = torch.zeros(self.model.config.vocab_size)
        tokens: list[int] = []
        text, pieces, finish = "", [], "length"
        inputs = torch.tensor([prompt], device=self.device)
        cache, stopped = None, False
        for _ in range(budget):
            # 2. one forward step on the new token, with the cache of the earlier ones
            out = self.model(input_ids=inputs, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            logits = out.logits[0, -1].float().cpu()
            # 3. penalties and sampling
            token = _pick(logits, counts, tokens, p, generator)
            if token in self.stop_ids:
                finish = "stop"
                break
            tokens.append(token)
            counts[token] += 1
            inputs = torch.tensor([[token]], device=self.device)
            # 4. the text so far; a byte sequence cut mid-character waits for its next token
            decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if decoded.endswith("\ufffd"):
                continue
            cut = _stop_at(decoded, p.stop)
            if cut is not None:
                decoded, finish, stopped = decoded[:cut], "stop", True
            else:  # text that may begin a stop string is not handed out yet
                decoded = decoded[: len(decoded) - _held(decoded, p.stop)]
            text = _grow(text, decoded, pieces, len(tokens), on_piece)
            if stopped:
                break
        if not stopped:  # 5. the end: what was held back (or cut mid-character) goes out too
            decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
            text = _grow(text, decoded, pieces, len(tokens), on_piece)
        return ChatAnswer(text, len(prompt), len(tokens), finish, pieces)


def _grow(
    text: str,
    decoded: str,
    pieces: list[str],
    tokens: int,
    on_piece: Callable[[str, int], None] | None,
) -> str:
    """The text handed out so far, grown to `decoded` (a new piece) when it is longer."""
    if len(decoded) <= len(text):
        return text
    pieces.append(decoded[len(text) :])
    if on_piece is not None:
        on_piece(pieces[-1], tokens)
    return decoded


def _pick(
    logits: torch.Tensor,
    counts: torch.Tensor,
    tokens: list[int],
    p: ChatParams,
    generator: torch.Generator,
) -> int:
    # OpenAI's penalties: subtract presence once per token seen, frequency per occurrence.
    if p.presence_penalty or p.frequency_penalty:
        logits = logits - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts
    if p.repetition_penalty != 1.0:  # transformers' multiplicative one (chat_llm's field)
        rp = p.repetition_penalty
        penalised = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(counts > 0, penalised, logits)
    n = p.no_repeat_ngram_size
    if n and len(tokens) >= n:
        prefix = tokens[len(tokens) - n + 1 :] if n > 1 else []
        for i in range(len(tokens) - n + 1):
            if tokens[i : i + n - 1] == prefix:
                logits[tokens[i + n - 1]] = -float("inf")
    if not p.do_sample or p.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(ordered, 0) - ordered > p.top_p  # keep the smallest set past top_p
        ordered[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, ordered)
    return int(torch.multinomial(probs, 1, generator=generator))


def _held(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _stop_at(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


# ---- the engine -------------------------------------------------------------------------------


class ChatEngine:
    """Runs `chat` jobs: the embedded model under the worker's residency cache, or the upstream
    when one is configured."""

    kinds = ("chat",)

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings = runtime.settings
        self._upstream = UpstreamChat(self.settings) if self.settings.chat_upstream_url else None
        self._load_lock = threading.Lock()

    def run_batch(self, jobs: list[EngineJob]) -> list[EngineOutput | Exception]:
        return one_by_one(jobs, self._run)

    def _run(self, job: EngineJob) -> EngineOutput:
        p = ChatParams.model_validate(job.params)
        started = time.perf_counter()
        if self._upstream is not None:
            answer = self._upstream.complete(p)
        else:
            model = self.model(p.model_id)
            loaded = time.perf_counter()

            pieces: list[str] = []

            def progress(piece: str, done: int) -> None:
                job.events.step(done, p.max_new_tokens)  # stops a job past its time limit
                pieces.append(piece)
                job.events.partial({"pieces": pieces})  # what a streaming request sends on

            answer = model.generate(p, progress)
            started = loaded
        seconds = time.perf_counter() - started
        stages = {"generate": seconds, "batch_size": 1}
        return EngineOutput([], stages=stages, meta={"chat": answer.as_dict()})

    def model(self, model_id: str) -> EmbeddedChat:
        """The served chat model, loaded once and kept resident within the shared budget."""
        if model_id != self.settings.chat_model:
            raise ModelUnavailable(f"The chat model {model_id} is not served here")

        def load() -> EmbeddedChat:
            path = self.settings.chat_model_path
            folder = Path(path) if path else ensure_tiny_chat(self.settings.models_dir)
            if not (folder / "config.json").exists():
                raise EngineError(f"No causal language model in {folder}")
            return EmbeddedChat(folder, self.runtime.device, self.runtime.dtype)

        with self._load_lock:
            return self.runtime.cache.get(f"chat:{model_id}", load)
