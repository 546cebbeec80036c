"""Shared by the GPU benchmarks: the benchmark model (built once, reused), device facts, a GPU
memory sampler, latency percentiles and per-stage summaries of fetch's `timings`, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import threading
from pathlib import Path

import torch


def bench_models(full: bool, folder: Path) -> tuple[Path, Path, str]:
    """(model folder, motion adapter folder, model_id), built into `folder` unless already there.

    Full = SD1.5 shapes with random weights; tiny = sdserve's offline tiny-sd and its adapter.
    """
    if full:
        from video import build_full_model

        model, adapter = folder / "models" / "bench-sd15", folder / "bench-adapter"
        if not (model / "model_index.json").exists() or not (adapter / "config.json").exists():
            build_full_model(folder)
        return model, adapter, "bench-sd15"
    from sdserve.engine.tiny import TINY_MOTION_ADAPTER, ensure_tiny_model

    model = ensure_tiny_model("tiny-sd", folder / "models")
    adapter = ensure_tiny_model(TINY_MOTION_ADAPTER, folder / "models")
    return model, adapter, "tiny-sd"


def device_facts() -> dict:
    """Device name, torch / CUDA / cuDNN / diffusers / Python versions."""
    import diffusers

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "gpu_memory_mib": round(torch.cuda.get_device_properties(0).total_memory / 2**20)
        if cuda
        else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "cpu_count": __import__("os").cpu_count(),
    }


class GpuMemoryPeak:
    """Samples the device's used memory (every process: the server's too) in a thread; needs
    NVML (nvidia-ml-py). `peak_mib` is None where there is no NVIDIA GPU or no NVML."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuMemoryPeak:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML, no driver, no GPU: report None
            return self

        def sample() -> None:
            while True:
                used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                self.peak_mib = max(self.peak_mib or 0.0, used)
                if self._stop.wait(self.interval_s):
                    return

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.peak_mib is not None:
            self.peak_mib = round(self.peak_mib)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def latency_summary(latencies: list[float]) -> dict:
    return {
        "p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "p95_s": round(percentile(latencies, 0.95), 4) if latencies else None,
        "mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
    }


def stage_summary(timings: list[dict]) -> dict:
    """p50 / p95 / mean seconds of each stage (queue_wait, denoise, decode, nsfw, upload...)."""
    stages: dict[str, list[float]] = {}
    for timing in timings:
        for stage, seconds in (timing or {}).items():
            if isinstance(seconds, int | float):
                stages.setdefault(stage, []).append(float(seconds))
    return {
        stage: {
            "p50": round(statistics.median(v), 4),
            "p95": round(percentile(v, 0.95), 4),
            "mean": round(statistics.fmean(v), 4),
        }
        for stage, v in sorted(stages.items())
    }


def write_json(path: str | None, result: dict) -> None:
    """Rewritten after each measurement, so a step killed by its time budget keeps what it did."""
    text = json.dumps(result, indent=2)
    if path:
        Path(path).write_text(text + "\n")
