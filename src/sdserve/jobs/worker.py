"""The worker loop: claim a batch of compatible jobs, hand it to the engine that runs its kind,
store what comes back and end each job. It holds no code for any one family."""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from sdserve.engine import batching, speed_probe
from sdserve.engine.base import Engine, EngineJob, EngineOutput, Runtime
from sdserve.errors import EngineError, SdserveError, StoreUnavailable
from sdserve.jobs.control import ControlChannel, WorkerInfo
from sdserve.jobs.notify import CompletionBus, listen_for_jobs
from sdserve.jobs.store import JobStore, JobView
from sdserve.settings import Settings
from sdserve.storage.router import StorageRouter

log = logging.getLogger(__name__)
_PROGRESS_INTERVAL = 0.2  # seconds between progress writes for one job
_PARTIAL_INTERVAL = 0.1  # seconds between writes of a job's partial output (streamed answers)
_MAINTENANCE_INTERVAL = 30.0
_ADVERTISE_INTERVAL = 5.0
_BROADCAST_INTERVAL = 0.5
_PROBE_INTERVAL = 60.0  # seconds between speed probes of an idle worker


class JobTimedOut(EngineError):
    def __init__(self, seconds: float):
        super().__init__(
            f"The request ran past the server's time limit of {seconds:g} seconds and was stopped"
        )


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        storage: StorageRouter,
        runtime: Runtime,
        engines: list[Engine],
        bus: CompletionBus | None = None,
        on_restart: Callable[[], None] | None = None,
        advertised: bool = True,
    ):
        self.settings = settings
        self.store = store
        self.storage = storage
        self.runtime = runtime
        self.engines = engines
        self._by_kind = {kind: engine for engine in engines for kind in engine.kinds}
        runtime.registry.fetch_missing = True  # model files made on other hosts come from the bucket
        self.bus = bus
        self.control = ControlChannel(store)
        # A standalone worker restarts itself on `restart_server`; the API's own worker is
        # restarted with the API, so it passes None.
        self.on_restart = on_restart
        # A lane's worker (chat) is not listed: the queue's eta shares work over the listed ones.
        self.advertised = advertised
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._last_maintenance = 0.0
        self._last_advertised = 0.0
        self._advertised_models: list[str] = []
        self._seen_broadcast: int | None = None
        self._last_broadcast_check = 0.0
        self._seconds_per_unit: float | None = None  # its speed probe's (_probe_speed)
        self._last_probe = -_PROBE_INTERVAL
        self._busy = False
        self._draining = False  # told to drain by an operator: claims nothing until resumed
        self._current: list[int] = []
        self._deadline = float("inf")  # when the batch in hand runs out of time
        # Set when there may be work: by the API's bus in-process, by NOTIFY on PostgreSQL.
        self.wake = bus.work_available if bus is not None else threading.Event()
        # Before the API serves (its requests would slow it) and before the worker is listed:
        # a cold eta needs its speed.
        self._probe_speed()
        self.warmed_up = threading.Event()  # set once run() has warmed up

    def run(self, stop: threading.Event) -> None:
        log.info("worker %s started", self.worker_id)
        try:  # in the thread that runs the jobs, as they run
            self._warm_up()
        except Exception:  # a database down at start: the queue's own jobs measure the speed
            log.exception("worker %s: warm-up not recorded", self.worker_id)
        finally:
            self.warmed_up.set()
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
                if not self._draining and self.run_once(stop):
                    continue
                self._probe_speed()
            except Exception:  # a DB outage must not kill the worker: wait and retry
                log.exception("worker loop error")
                stop.wait(1.0)
            self.wake.wait(self.settings.worker_poll_seconds)
            self.wake.clear()
        try:
            self.control.retire(self.worker_id)
        except Exception:
            log.warning("could not retire worker record %s", self.worker_id)

    def _probe_speed(self) -> None:
        """Measure this machine's speed (engine.speed_probe): when the worker starts, then every
        `_PROBE_INTERVAL` while it is idle, so it follows the machine's load. It prices work no
        job has measured yet (jobs.eta)."""
        now = time.monotonic()
        if not self.advertised or now - self._last_probe < _PROBE_INTERVAL:
            return
        self._last_probe = now
        self._seconds_per_unit = speed_probe.seconds_per_unit(
            self.runtime.device, self.runtime.dtype
        )
        log.debug("worker %s: %.3f s a work unit, probed", self.worker_id, self._seconds_per_unit)
        self._advertise(force=True)

    def _warm_up(self) -> None:
        """Run the warm-up buckets (the default model's load and a short job, by default), so the
        first request waits for no load, and record their speed: until jobs have run, eta is
        priced at it, a real model's speed on this machine as loaded now (jobs.eta)."""
        warm_up = getattr(self._by_kind.get("text2img"), "warm_up", None)  # text2img buckets
        for run in warm_up() if warm_up is not None and self.advertised else []:
            self.store.record_run(
                run.model_id,
                run.kind,
                run.batch_key,
                run.cost,
                run.total_steps,
                {"model_load": run.model_load},
                run.seconds,
            )
        self._advertise(force=True)  # the models it loaded

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
                self.runtime.cache.clear()
            elif command == "evict":
                self.runtime.cache.evict(argument)
            elif command == "storage":
                self.storage.reload()
            elif command == "restart" and self.on_restart is not None:
                self.on_restart()
            elif command in ("drain", "resume") and argument == self.worker_id:
                self._draining = command == "drain"
                self._advertise(force=True)
        self._advertise()

    def _advertise(self, force: bool = False) -> None:
        now = time.time()
        if not self.advertised:
            return
        if not force and now - self._last_advertised < _ADVERTISE_INTERVAL:
            return
        self._last_advertised = now
        self._advertised_models = self.runtime.cache.loaded()
        device = self.runtime.device
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
                resident=self.runtime.cache.loaded(),
                state="draining" if self._draining else "busy" if self._busy else "idle",
                last_seen=now,
                model_loads=self.runtime.cache.loads,
                seconds_per_unit=self._seconds_per_unit,
            )
        )

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Claim and run one batch; return how many jobs it had.

        When `stop` is set mid-batch (SIGTERM, shutdown), jobs not started yet go back to the
        queue at once instead of waiting out their lease.
        """
        self._maintenance()
        settings = self.settings
        resident = self.runtime.cache.loaded()

        def claim(*, max_size: int, max_cost: float, batch_key: str | None = None):
            return self.store.claim_batch(
                self.worker_id,
                max_size,
                settings.lease_seconds,
                resident=resident,
                max_cost=max_cost,
                batch_key=batch_key,
                kinds=list(self._by_kind),
            )

        batch = batching.claim_batch(claim, settings)
        if not batch:
            return 0
        self._busy = True
        self._current = [job.id for job in batch]
        self._deadline = time.monotonic() + settings.job_timeout_seconds
        stop_heartbeat = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat, args=(list(batch), stop_heartbeat), daemon=True
        )
        heartbeat.start()
        try:
            engine = self._by_kind.get(batch[0].kind)
            if stop is not None and stop.is_set():
                self.store.requeue([job.id for job in batch], self.worker_id)
            elif engine is None:  # claims ask for known kinds only; an old row may be another
                for job in batch:
                    self._settle(job, _raise(EngineError(f"No engine here runs {job.kind} jobs")))
            else:
                self._run_batch(engine, batch)
        finally:
            stop_heartbeat.set()
            heartbeat.join()
            self._busy = False
            self._current = []
            self._deadline = float("inf")
        self._advertise(force=self.runtime.cache.loaded() != self._advertised_models)
        return len(batch)

    def _heartbeat(self, jobs: list[JobView], stop: threading.Event) -> None:
        """Renew the batch's lease while it runs; past the time limit, fail its jobs instead
        (a job that hangs must not hold its worker, nor run again elsewhere)."""
        while not stop.wait(self.settings.lease_seconds / 3):
            try:
                if time.monotonic() > self._deadline:
                    for job in jobs:
                        error = JobTimedOut(self.settings.job_timeout_seconds)
                        if self.store.fail(job.id, self.worker_id, error.message):
                            self._publish(job.id)
                    return
                self.store.heartbeat(self.worker_id, [j.id for j in jobs], self.settings.lease_seconds)
            except Exception:
                log.exception("heartbeat failed")

    def _run_batch(self, engine: Engine, jobs: list[JobView]) -> None:
        """The batch through its engine; each job ends on its own."""
        engine_jobs = [
            EngineJob(
                id=job.id,
                kind=job.kind,
                model_id=job.model_id,
                params=job.params,
                inputs=_StoredInputs(self.storage, job.params.get("input_keys", {})),
                events=_Events(self, job),
            )
            for job in jobs
        ]
        try:
            outcomes = engine.run_batch(engine_jobs)
        except Exception as exc:  # the engine failed outside any one job: fail them all clearly
            log.exception("batch of %d jobs failed", len(jobs))
            error = exc if isinstance(exc, SdserveError) else EngineError(f"Generation failed: {exc}")
            outcomes = [error] * len(jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._settle(job, _raise(outcome))
            else:
                self._settle(job, lambda job=job, outcome=outcome: self._store(job, outcome))
        for job in jobs:  # inputs are kept only while a job may still run
            self._drop_inputs(job)

    def _store(self, job: JobView, outcome: EngineOutput) -> tuple[dict, float]:
        """Write the job's files under the names fixed when it was accepted."""
        started = time.perf_counter()
        keys = job.params.get("output_keys", [])[: len(outcome.files)]
        as_text = bool(job.params.get("base64"))
        for key, file in zip(keys, outcome.files, strict=True):
            self.storage.put(key, base64.b64encode(file.data) if as_text else file.data)
        stages = {**outcome.stages, "upload": time.perf_counter() - started}
        result = {
            "output_keys": keys,  # URLs are made at answer time, from the API's public URL
            "meta": outcome.meta,
            "timings": _timings(job, stages),
        }
        if any(file.nsfw for file in outcome.files):
            result["nsfw_content_detected"] = True
        elif outcome.files:
            result["nsfw_content_detected"] = False
        work = sum(v for k, v in stages.items() if k not in ("batch_size", "model_load"))
        return result, work

    def _drop_inputs(self, job: JobView) -> None:
        if not job.params.get("input_keys"):
            return
        try:
            current = self.store.get(job.id)
        except Exception:
            return
        if current.status in ("success", "failed"):
            for key in job.params.get("input_keys", {}).values():
                try:
                    self.storage.delete(key)
                except Exception:
                    log.warning("could not delete input %s of job %s", key, job.id)

    def _maintenance(self) -> None:
        now = time.time()
        if now - self._last_maintenance < _MAINTENANCE_INTERVAL:
            return
        self._last_maintenance = now
        for job_id in self.store.fail_exhausted(self.settings.max_attempts):
            self._publish(job_id)
        self.storage.delete_older_than("temp", self.settings.temp_ttl_hours * 3600)

    def _settle(self, job: JobView, work: Callable[[], tuple[dict, float]]) -> None:
        """Run `work` (it returns the job's result and the seconds of work it took) and record
        how the job ended: its result, or its error."""
        try:
            result, seconds = work()
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
            self._finish(self.store.complete, job.id, self.worker_id, result, seconds)
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

    def _progress(self, job: JobView):
        """A step callback that writes progress (and renews the lease) at most every 0.2 s, the
        first time 0.2 s after the job starts: a quicker job writes none."""
        last_write = [time.monotonic()]

        def on_step(done: int, total: int) -> None:
            now = time.monotonic()
            if now > self._deadline:  # stops the pipeline: the job fails with this error
                raise JobTimedOut(self.settings.job_timeout_seconds)
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

    def _publish(self, job_id: int) -> None:
        if self.bus is not None:
            self.bus.publish(job_id)


def _timings(job: JobView, stages: dict[str, float]) -> dict[str, float]:
    """Where a job's time went, in seconds, and the size of the batch it ran in (fetch shows it
    as `timings`; the metrics export it)."""
    queue_wait = (job.started_at or job.created_at) - job.created_at
    return {"queue_wait": round(queue_wait, 4)} | {k: round(v, 4) for k, v in stages.items()}


def _raise(exc: Exception) -> Callable[[], tuple[dict, float]]:
    """Work that fails with `exc`: settles a job that failed before or inside the batch."""

    def fail() -> tuple[dict, float]:
        raise exc

    return fail


class _StoredInputs:
    """A job's input files in storage, read when the engine asks."""

    def __init__(self, storage: StorageRouter, keys: dict[str, str]):
        self._storage = storage
        self._keys = keys

    def names(self) -> list[str]:
        return list(self._keys)

    def read(self, name: str) -> bytes:
        return self._storage.get(self._keys[name])


class _Events:
    """What a running job tells the worker: steps, stages, and whether it was cancelled."""

    def __init__(self, worker: Worker, job: JobView):
        self._worker = worker
        self._job = job
        self.step = worker._progress(job)
        self._last_partial = -float("inf")

    def partial(self, data: dict) -> None:
        """What the job has made so far (cumulative: a later write carries everything), at
        most every 0.1 s; the requests streaming it are woken."""
        now = time.monotonic()
        if now - self._last_partial < _PARTIAL_INTERVAL:
            return
        self._last_partial = now
        worker = self._worker
        try:
            worker.store.report_partial(
                worker.worker_id, self._job.id, data, worker.settings.lease_seconds
            )
        except StoreUnavailable:  # best effort, like progress: the result is what counts
            log.warning("partial output of job %s not recorded: job store unavailable", self._job.id)
            return
        worker._publish(self._job.id)

    def stage(self, name: str, line: str) -> None:
        self._worker.store.set_job_stage(self._job.id, name, line)

    def cancelled(self) -> bool:
        return self._worker.store.job_cancelled(self._job.id)

    def broadcast(self, command: str, argument: str = "") -> None:
        self._worker.control.publish(command, argument)
