"""All configuration in one typed object, read from `SDSERVE_*` environment variables once at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDSERVE_", extra="ignore")

    # Where things live
    data_dir: Path = Path("./data")
    database_url: str | None = None  # default: SQLite file in data_dir
    public_url: str | None = None  # default: http://{host}:{port} of `sdserve serve`
    host: str = "127.0.0.1"
    port: int = 7860

    # Keys
    admin_key: str | None = None
    queue_limit_per_key: int = 10

    # Models
    default_model: str = "tiny-sd"
    offline: bool = False  # also implied by HF_HUB_OFFLINE=1
    residency_budget_mb: int = 12_000
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # GPU execution (ignored on CPU)
    gpu_dtype: Literal["auto", "float16", "bfloat16"] = "auto"  # auto: bf16 where supported
    channels_last: bool = True
    compile_unet: bool = False  # torch.compile per (size, batch) bucket, cached in the data dir
    lora_hotswap_rank: int = 64  # largest LoRA rank that swaps into a compiled UNet
    vae_tile_above_pixels: int = 1024 * 1024  # larger images are decoded in tiles
    # Buckets to run once when a worker starts, before it serves, so no user waits for a compile
    # or a load, and a cold eta is priced at a measured speed (`default`: the default model):
    # "model_id:WIDTHxHEIGHT:steps:batch,..." e.g. "sd-1.5:512x512:30:8"; empty for none
    warmup_buckets: str = "default:256x256:4:1"
    # `noop` runs no model (flat images after noop_seconds): queue benchmarks and fault tests
    engine: Literal["diffusers", "noop"] = "diffusers"
    noop_seconds: float = 0.0

    # Image editing: the models of pix2pix, depth2img and outpaint when a request names none
    # (built-in tiny ones; e.g. instruct-pix2pix, sd-2-depth, sd-inpainting for real weights)
    default_pix2pix_model: str = "tiny-pix2pix"
    default_depth2img_model: str = "tiny-depth2img"
    default_outpaint_model: str = "tiny-sd-inpaint"

    # Video
    default_t2v_model: str = "tiny-t2v"  # /api/v5/text2video (ModelScope / Zeroscope layout)
    default_svd_model: str = "tiny-svd"  # /api/v6/video/img2video without a model_id
    # AnimateDiff motion adapter for real SD1.5 models (hub id or folder); tiny-sd uses its own.
    motion_adapter: str = "guoyww/animatediff-motion-adapter-v1-5-3"
    motion_context_frames: int = 16  # the adapter's native window; longer clips use FreeNoise
    max_video_frames: int = 64
    max_video_fps: int = 30
    max_video_size: int = 1024
    video_decode_chunk: int = 8  # frames per VAE decode call: bounds memory on long clips

    # 3D (Shap-E): the models of txt_to_3d / img_to_3d without a model_id (e.g. openai/shap-e)
    default_3d_model: str = "tiny-shap-e"
    default_img_3d_model: str = "tiny-shap-e-img2img"

    # Training
    default_train_model: str = "tiny-sd"  # base of lora_fine_tune with base_model_type normal
    default_train_model_xl: str = "tiny-sdxl"  # ... with base_model_type sdxl
    min_train_images: int = 3
    max_train_images: int = 50
    max_train_steps: int = 2000
    train_checkpoint_every: int = 50  # steps between resumable checkpoints
    train_class_images: int = 4  # prior-preservation images generated with the base model
    train_lora_rank: int = 8
    train_mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16/fp16 on GPU

    # Request limits (clamped, never a crash)
    max_width: int = 1024
    max_height: int = 1024
    max_samples: int = 4
    max_steps: int = 50
    default_steps: int = 30
    max_body_bytes: int = 30 * 1024 * 1024
    max_image_bytes: int = 15 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    image_fetch_timeout: float = 15.0
    # Prompts and negative prompts: longer ones are a validation error (docs/compatibility.md).
    max_prompt_chars: int = 10_000
    max_prompt_tokens: int = 1_000  # CLIP tokens; encoded in 75-token chunks
    job_timeout_seconds: float = 3600.0  # a job running longer fails instead of holding its worker

    # Outbound requests to user-given URLs (model downloads, input images): private, loopback and
    # link-local addresses are refused unless allowed, so a request cannot reach the LAN.
    allow_private_urls: bool = False
    max_model_mb: int = 20_000  # size cap of one model download
    download_timeout: float = 60.0  # seconds of network silence before a download fails

    # Output storage: local files under data_dir, or an S3-compatible bucket (also set at run
    # time by /api/v1/enterprise/update_s3, which wins over these).
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_public_url: str | None = None  # else outputs get presigned URLs

    # Response timing
    sync_wait_seconds: float = (
        8.0  # answer `success` if the job ends within this, else `processing`
    )

    # Queue and workers
    # More endpoint families, as "module:attribute" of a sdserve.families.Family (plugins, tests)
    extra_families: str = ""
    in_process_worker: bool = True
    lease_seconds: float = 30.0
    max_attempts: int = 3
    worker_poll_seconds: float = 0.5
    max_batch_size: int = 8
    # A batch's budget in work units (samples x steps x megapixels / 512x512): 8 SD1.5 images
    # at 30 steps by default; larger images and longer runs make smaller batches.
    max_batch_cost: float = 240.0
    batch_window_ms: float = 0.0  # wait this long for more compatible jobs before starting
    shutdown_grace_seconds: float = 60.0  # a restart waits this long for running jobs

    # Webhooks
    webhook_timeout: float = 30.0
    webhook_max_attempts: int = 5
    webhook_backoff_seconds: float = 2.0

    # Outputs
    temp_ttl_hours: float = 24.0

    # Error HTTP status policy: `legacy` answers 200 for application errors (as the hosted API
    # did) and 429 for queue-limit rejections; `http` uses 400/401/404/422/429/500/503.
    error_status: Literal["legacy", "http"] = "legacy"

    nsfw_threshold: float = Field(0.5, ge=0, le=1)

    # Chat (docs/chat.md): the model name clients see, and what answers it: the embedded model
    # (the built-in tiny-chat, or a transformers folder) or an OpenAI-compatible upstream.
    chat_model: str = "tiny-chat"
    chat_model_path: str | None = None  # a local causal LM folder served as `chat_model`
    chat_upstream_url: str | None = None  # e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp, Ollama)
    chat_upstream_key: str | None = None
    chat_model_map: str = ""  # "public=upstream,...": names clients send -> the upstream's names
    chat_upstream_timeout: float = 120.0  # seconds of upstream silence before a clear error
    chat_max_tokens: int = 4096  # larger max_tokens are reduced to this
    chat_wait_seconds: float = 300.0  # OpenAI routes wait this long for a queued answer

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'sdserve.db').resolve()}"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"
