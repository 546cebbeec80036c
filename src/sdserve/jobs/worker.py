"""The worker loop: claim a batch of compatible jobs, run them on the engine, store outputs, finish."""

from __future__ import annotations

import base64
import io
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from PIL import Image

from sdserve.engine.images import BatchItem, ImageEngine, ImageResult
from sdserve.engine.imports import ImportSpec, ModelImporter
from sdserve.engine.training import Trainer, TrainingCancelled, TrainingHooks
from sdserve.engine.video import VideoEngine, VideoItem, VideoResult
from sdserve.errors import EngineError, SdserveError, StoreUnavailable
from sdserve.jobs.control import ControlChannel, WorkerInfo
from sdserve.jobs.notify import CompletionBus, listen_for_jobs
from sdserve.jobs.store import JobStore, JobView
from sdserve.media.images import encode_png
from sdserve.media.video import decode_video, encode_video
from sdserve.schemas.images import GenerationParams
from sdserve.schemas.training import TrainingParams
from sdserve.schemas.video import VideoParams
from sdserve.settings import Settings
from sdserve.storage.router import StorageRouter

log = logging.getLogger(__name__)
_PROGRESS_INTERVAL = 0.2  # seconds between progress writes for one job
_MAINTENANCE_INTERVAL = 30.0
_ADVERTISE_INTERVAL = 5.0
_BROADCAST_INTERVAL = 0.5
IMAGE_KINDS = ("text2img", "img2img", "inpaint")
VIDEO_KINDS = ("animatediff", "t2v", "svd")
BATCHED_KINDS = IMAGE_KINDS + VIDEO_KINDS
TRAINING_KINDS = ("train_lora", "train_dreambooth", "train_sandbox")
_SANDBOX_STAGES = (
    ("training_started", "sandbox: no GPU is used, stages are simulated"),
    ("training_success", "sandbox: simulated training done"),
    ("trained_model_compressing", "sandbox"),
    ("trained_model_uploading", "sandbox"),
    ("trained_model_uploaded", "sandbox"),
    ("deploying_model", "sandbox"),
    ("model_ready", "sandbox: no model was made"),
)


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        engine: ImageEngine,
        storage: StorageRouter,
        bus: CompletionBus | None = None,
        on_restart: Callable[[], None] | None = None,
    ):
        self.settings = settings
        self.store = store
        self.engine = engine
        self.video = VideoEngine(engine)
        self.trainer = Trainer(settings, engine.registry, engine.device)
        self.importer = ModelImporter(settings, engine.registry)
        engine.registry.fetch_missing = True  # model files made on other hosts come from the bucket
        self.storage = storage
        self.bus = bus
        self.control = ControlChannel(store)
        # A standalone worker restarts itself on `restart_server`; the API's own worker is
        # restarted with the API, so it passes None.
        self.on_restart = on_restart
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._last_maintenance = 0.0
        self._last_advertised = 0.0
        self._advertised_models: list[str] = []
        self._seen_broadcast: int | None = None
        self._last_broadcast_check = 0.0
        self._busy = False
        self._current: list[int] = []
        # Set when there may be work: by the API's bus in-process, by NOTIFY on PostgreSQL.
        self.wake = bus.work_available if bus is not None else threading.Event()

    def run(self, stop: threading.Event) -> None:
        log.info("worker %s started", self.worker_id)
        if hasattr(self.engine, "warm_up"):
            self.engine.warm_up()
        if not self.store.is_sqlite:
            threading.Thread(
                target=listen_for_jobs,
                args=(self.store.url, self.wake, stop),
                name="job-notifications",
                daemon=True,
            ).start()
        while not stop.is_set():
            try:
                self._follow_broadcasts()
                if stop.is_set():
                    break
                if self.run_once(stop):
                    continue
            except Exception:  # a DB outage must not kill the worker: wait and retry
                log.exception("worker loop error")
                stop.wait(1.0)
            self.wake.wait(self.settings.worker_poll_seconds)
            self.wake.clear()
        try:
            self.control.retire(self.worker_id)
        except Exception:
            log.warning("could not retire worker record %s", self.worker_id)

    def give_back_current(self) -> None:
        """Requeue the batch in hand now (the process is about to end before it finishes)."""
        if self._current:
            self.store.requeue(list(self._current), self.worker_id)

    def _follow_broadcasts(self) -> None:
        """Carry out what the API asked of every worker since the last look (at most every
        `_BROADCAST_INTERVAL`: it is one query, and the claim loop runs much more often)."""
        now = time.monotonic()
        if now - self._last_broadcast_check < _BROADCAST_INTERVAL:
            return
        self._last_broadcast_check = now
        if self._seen_broadcast is None:  # orders from before this worker started do not apply
            self._seen_broadcast = self.control.latest_id()
        for broadcast_id, command, argument in self.control.since(self._seen_broadcast):
            self._seen_broadcast = broadcast_id
            log.info("worker %s: %s %s", self.worker_id, command, argument)
            if command == "clear_cache":
                self.engine.cache.clear()
            elif command == "evict":
                self.engine.cache.evict(argument)
            elif command == "storage":
                self.storage.reload()
            elif command == "restart" and self.on_restart is not None:
                self.on_restart()
        self._advertise()

    def _advertise(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_advertised < _ADVERTISE_INTERVAL:
            return
        self._last_advertised = now
        self._advertised_models = self.engine.cache.loaded()
        device = self.engine.device
        gpu_name = gpu_memory = None
        if device.type == "cuda":
            import torch

            props = torch.cuda.get_device_properties(device)
            gpu_name, gpu_memory = props.name, props.total_memory // 2**20
        self.control.advertise(
            WorkerInfo(
                worker_id=self.worker_id,
                hostname=socket.gethostname(),
                device=str(device),
                gpu_name=gpu_name,
                gpu_memory_mb=gpu_memory,
                resident=self.engine.cache.loaded(),
                state="busy" if self._busy else "idle",
                last_seen=now,
                model_loads=self.engine.cache.loads,
            )
        )

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Claim and run one batch; return how many jobs it had.

        When `stop` is set mid-batch (SIGTERM, shutdown), the job running finishes and the rest
        of the batch goes back to the queue at once instead of waiting out its lease.
        """
        self._maintenance()
        settings = self.settings
        batch = self.store.claim_batch(
            self.worker_id,
            settings.max_batch_size,
            settings.lease_seconds,
            resident=self.engine.cache.loaded(),
            max_cost=settings.max_batch_cost,
        )
        if not batch:
            return 0
        if batch[0].kind in BATCHED_KINDS and settings.batch_window_ms > 0:
            # Give compatible jobs arriving right now the chance to share the loop.
            time.sleep(settings.batch_window_ms / 1000)
            batch += (
                self.store.claim_batch(
                    self.worker_id,
                    settings.max_batch_size - len(batch),
                    settings.lease_seconds,
                    max_cost=settings.max_batch_cost - sum(job.cost for job in batch),
                    batch_key=batch[0].batch_key,
                )
                if len(batch) < settings.max_batch_size
                else []
            )
        self._busy = True
        self._current = [job.id for job in batch]
        stop_heartbeat = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat, args=([job.id for job in batch], stop_heartbeat), daemon=True
        )
        heartbeat.start()
        try:
            if batch[0].kind in BATCHED_KINDS:  # the whole batch in one denoising loop
                self._run_batch(batch)
            else:
                for index, job in enumerate(batch):
                    if stop is not None and stop.is_set():
                        self.store.requeue([j.id for j in batch[index:]], self.worker_id)
                        break
                    self._run_job(job)
        finally:
            stop_heartbeat.set()
            heartbeat.join()
            self._busy = False
            self._current = []
        self._advertise(force=self.engine.cache.loaded() != self._advertised_models)
        return len(batch)

    def _heartbeat(self, job_ids: list[int], stop: threading.Event) -> None:
        while not stop.wait(self.settings.lease_seconds / 3):
            try:
                self.store.heartbeat(self.worker_id, job_ids, self.settings.lease_seconds)
            except Exception:
                log.exception("heartbeat failed")

    def _maintenance(self) -> None:
        now = time.time()
        if now - self._last_maintenance < _MAINTENANCE_INTERVAL:
            return
        self._last_maintenance = now
        for job_id in self.store.fail_exhausted(self.settings.max_attempts):
            self._publish(job_id)
        self.storage.delete_older_than("temp", self.settings.temp_ttl_hours * 3600)

    def _run_job(self, job: JobView) -> None:
        if job.kind == "model_reload":
            self._settle(job, lambda: self._run_reload_job(job))
        elif job.kind == "model_load":
            self._settle(job, lambda: self._run_import_job(job))
        else:
            self._settle(job, lambda: self._run_training_job(job))

    def _run_reload_job(self, job: JobView) -> dict:
        self.engine.pipeline(job.model_id)
        return {"output_keys": [], "meta": {"model_id": job.model_id}}

    def _settle(self, job: JobView, work: Callable[[], dict], seconds: float = 0.0) -> None:
        """Run `work` and record how the job ended: its result, or its error. `seconds` is time
        spent on the job before (a batch's shared denoising loop)."""
        started = time.perf_counter()
        try:
            result = work()
        except StoreUnavailable as exc:
            # The database went away mid-job: its lease runs out and it runs again.
            log.warning("job %s interrupted: %s", job.id, exc.message)
            return
        except SdserveError as exc:
            log.warning("job %s failed: %s", job.id, exc.message)
            self._finish(self.store.fail, job.id, self.worker_id, exc.message)
        except Exception as exc:
            log.exception("job %s crashed", job.id)
            message = f"Internal error: {type(exc).__name__}: {exc}"
            self._finish(self.store.fail, job.id, self.worker_id, message)
        else:
            elapsed = seconds + time.perf_counter() - started
            self._finish(self.store.complete, job.id, self.worker_id, result, elapsed)
        self._publish(job.id)

    def _finish(self, record, *args) -> bool:
        """Record a job's end, riding out a database outage for up to one lease.

        Past that the lease has expired and another worker may run the job again; its outputs
        overwrite these (same keys), so nothing is duplicated.
        """
        deadline = time.monotonic() + self.settings.lease_seconds
        while True:
            try:
                return record(*args)
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise
                log.warning("job store unavailable; retrying the result of job %s", args[0])
                time.sleep(1.0)

    def _run_batch(self, jobs: list[JobView]) -> None:
        """Compatible image or video jobs through one denoising loop; each job ends on its own."""
        if jobs[0].kind in IMAGE_KINDS:
            build, generate, store = (
                self._image_item,
                self.engine.generate_batch,
                self._store_images,
            )
        else:
            build, generate, store = self._video_item, self.video.generate_batch, self._store_video
        items, runnable = [], []
        for job in jobs:
            try:
                items.append(build(job))
                runnable.append(job)
            except Exception as exc:  # an unreadable input fails its own job only
                self._settle(job, _raise(exc))
        try:
            outcomes = generate(items) if items else []
        except Exception as exc:  # the engine failed outside any one job: fail them all clearly
            log.exception("batch of %d jobs failed", len(items))
            error = (
                exc if isinstance(exc, SdserveError) else EngineError(f"Generation failed: {exc}")
            )
            outcomes = [error] * len(items)
        for job, item, outcome in zip(runnable, items, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._settle(job, _raise(outcome))
            else:
                self._settle(
                    job,
                    lambda job=job, item=item, outcome=outcome: store(job, item.params, outcome),
                    seconds=outcome.pipeline_seconds,
                )

    def _image_item(self, job: JobView) -> BatchItem:
        inputs = job.params.get("input_keys", {})
        return BatchItem(
            GenerationParams.model_validate(job.params),
            self._input_image(inputs.get("init_image")),
            self._input_image(inputs.get("mask_image")),
            self._progress(job),
        )

    def _video_item(self, job: JobView) -> VideoItem:
        inputs = job.params.get("input_keys", {})
        init_frames = None
        if "init_image" in inputs:
            init_frames = [self._input_image(inputs["init_image"])]
        elif "init_video" in inputs:
            data = self.storage.get(inputs["init_video"])
            init_frames = decode_video(data, "init_video", self.settings.max_video_frames)
        return VideoItem(VideoParams.model_validate(job.params), init_frames, self._progress(job))

    def _store_images(self, job: JobView, params: GenerationParams, outcome: ImageResult) -> dict:
        started = time.perf_counter()
        keys = job.params["output_keys"][: len(outcome.images)]
        for key, image in zip(keys, outcome.images, strict=True):
            png = encode_png(image)
            self.storage.put(key, base64.b64encode(png) if params.base64 else png)
        stages = {**outcome.stages, "upload": time.perf_counter() - started}
        return {
            "output_keys": keys,  # URLs are made at answer time, from the API's public URL
            "meta": dict(job.params.get("meta", {})),
            "nsfw_content_detected": any(outcome.nsfw),
            "timings": _timings(job, stages),
        }

    def _store_video(self, job: JobView, params: VideoParams, outcome: VideoResult) -> dict:
        started = time.perf_counter()
        encoded = encode_video(outcome.frames, params.fps, params.output_type)
        key = job.params["output_keys"][0]
        self.storage.put(key, base64.b64encode(encoded) if params.base64 else encoded)
        stages = {**outcome.stages, "upload": time.perf_counter() - started}
        return {
            "output_keys": [key],
            "meta": dict(job.params.get("meta", {})),
            "timings": _timings(job, stages),
        }

    def _run_import_job(self, job: JobView) -> dict:
        spec = ImportSpec(**job.params["import"])
        entry = self.importer.run(spec, self._progress(job))
        if spec.replace:  # every worker drops what it loaded under the old files
            self.control.publish("clear_cache")
        return {
            "output_keys": [],
            "meta": {
                "model_id": entry.model_id,
                "model_category": entry.category,
                "url": entry.url,
                "sha256": entry.sha256,
                "size_bytes": entry.size_bytes,
            },
        }

    def _run_training_job(self, job: JobView) -> dict:
        params = TrainingParams.model_validate(job.params)
        training_id = params.training_id

        def stage(name: str, line: str) -> None:
            self.store.set_training_stage(training_id, name, line, params.webhook)

        def cancelled() -> bool:
            return self.store.training_cancelled(training_id)

        try:
            if job.kind == "train_sandbox":
                for name, line in _SANDBOX_STAGES:
                    if cancelled():
                        raise TrainingCancelled()
                    stage(name, line)
                    time.sleep(0.05)
            else:
                images = [self._input_image(key) for key in params.image_keys]
                hooks = TrainingHooks(stage=stage, step=self._progress(job), cancelled=cancelled)
                workdir = self.settings.data_dir / "training" / training_id
                self.trainer.train(params, images, workdir, hooks)
                for made in (
                    self.settings.data_dir / "loras" / f"{training_id}.safetensors",
                    self.settings.models_dir / training_id,
                ):
                    if made.exists():  # for workers on other hosts
                        self.storage.publish_model_files(made)
        except TrainingCancelled:
            stage("training_cancelled", "stopped on request")
            raise EngineError("Training cancelled") from None
        except Exception as exc:
            message = (
                exc.message if isinstance(exc, SdserveError) else f"{type(exc).__name__}: {exc}"
            )
            stage("training_failed", message)
            raise
        return {"output_keys": [], "meta": {"training_id": training_id, "model_id": training_id}}

    def _progress(self, job: JobView):
        """A step callback that writes progress (and renews the lease) at most every 0.2 s."""
        last_write = [0.0]

        def on_step(done: int, total: int) -> None:
            now = time.monotonic()
            # The last step is not written: completing the job records it.
            if done < total and now - last_write[0] >= _PROGRESS_INTERVAL:
                last_write[0] = now
                step = round(done * job.total_steps / max(total, 1))
                try:
                    self.store.report_progress(
                        self.worker_id, job.id, step, self.settings.lease_seconds
                    )
                except StoreUnavailable:  # progress is best effort; the result is not
                    log.warning("progress of job %s not recorded: job store unavailable", job.id)

        return on_step

    def _input_image(self, key: str | None) -> Image.Image | None:
        if not key:
            return None
        return Image.open(io.BytesIO(self.storage.get(key))).convert("RGB")

    def _publish(self, job_id: int) -> None:
        if self.bus is not None:
            self.bus.publish(job_id)


def _timings(job: JobView, stages: dict[str, float]) -> dict[str, float]:
    """Where a job's time went, in seconds, and the size of the batch it ran in (fetch shows it
    as `timings`; the metrics export it)."""
    queue_wait = (job.started_at or job.created_at) - job.created_at
    return {"queue_wait": round(queue_wait, 4)} | {k: round(v, 4) for k, v in stages.items()}


def _raise(exc: Exception) -> Callable[[], dict]:
    """Work that fails with `exc`: settles a job that failed before or inside the batch."""

    def fail() -> dict:
        raise exc

    return fail
