"""How honest `eta` is: a mixed burst of jobs on a fresh server (cold worker), each job's real time
from submission to its result divided by the `eta` its submission answered (reference §16.2).

Run: .venv/bin/python bench/eta.py [--jobs 18] [--rounds 1] [--busy N]
Target: at least 90% of jobs within their eta (ratio <= 1) and a median ratio of at least 0.5.
Tiny models on the CPU by default (text2img of several sizes, steps and samples, and
text2video clips); a round after the first runs on the now-warm server. `--busy N` runs N
busy-looping processes throughout, from before the server starts: a machine loaded by others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

import httpx
from _server import ADMIN_KEY, running_server

from sdserve.testing import start_process, stop_process

IMAGE = "/api/v4/dreambooth"
VIDEO = "/api/v4/dreambooth/text2video"
# How often each client fetches its job. Eighteen clients fetching ten times a second were a
# load of their own (180 requests a second, in the server's process) that no real client makes.
POLL_SECONDS = 1.0
SETTLE_SECONDS = 6.0  # between rounds: longer than the server caches measured speeds (5 s)


def mixed_jobs(count: int) -> list[tuple[str, dict]]:
    """`count` jobs cycling through six shapes: small and larger images, several samples,
    more steps, the SDXL-layout model, and a short clip."""
    shapes = [
        (IMAGE, {"model_id": "tiny-sd", "width": 64, "height": 64, "num_inference_steps": 2}),
        (IMAGE, {"model_id": "tiny-sd", "width": 256, "height": 256, "num_inference_steps": 8}),
        (IMAGE, {"model_id": "tiny-sd", "width": 128, "height": 128, "samples": 3}),
        (IMAGE, {"model_id": "tiny-sdxl", "width": 128, "height": 128, "num_inference_steps": 4}),
        (VIDEO, {"model_id": "tiny-sd", "width": 64, "height": 64, "num_frames": 8}),
        (IMAGE, {"model_id": "tiny-sd", "width": 192, "height": 128, "num_inference_steps": 20}),
    ]
    jobs = []
    for i in range(count):
        endpoint, shape = shapes[i % len(shapes)]
        shape = {"num_inference_steps": 4, **shape}
        if endpoint == VIDEO:
            shape["num_inference_steps"] = 2 + i % 3
        jobs.append((endpoint, {"prompt": f"a lighthouse, take {i}", "seed": i + 1, **shape}))
    return jobs


def run_burst(url: str, jobs: list[tuple[str, dict]]) -> list[dict]:
    """Submit every job at once (one thread each, as many clients would); each client then
    fetches its job every `POLL_SECONDS` until it ends. A job's real time runs from its
    submission to when its result was ready (the job's `finished_at`; client and server share
    this machine's clock): a client that comes back after `eta` finds it done when real <= eta
    (reference §16.2)."""
    results: list[dict] = [{} for _ in jobs]

    def one(index: int, endpoint: str, body: dict) -> None:
        with httpx.Client(timeout=600) as http:
            started = time.time()
            answer = http.post(url + endpoint, json={"key": ADMIN_KEY, **body}).json()
            if answer.get("status") != "processing":
                results[index] = {"error": answer}
                return
            job_id, eta = answer["id"], float(answer["eta"])
            while True:
                time.sleep(POLL_SECONDS)
                data = http.post(f"{url}/api/v3/fetch/{job_id}", json={"key": ADMIN_KEY}).json()
                if data["status"] != "processing":
                    break
            job = http.get(f"{url}/api/v1/jobs/{job_id}", params={"key": ADMIN_KEY}).json()["job"]
            real = job["finished_at"] - started
            results[index] = {
                "id": job_id,
                "endpoint": endpoint,
                "shape": {k: v for k, v in body.items() if k not in ("prompt", "seed")},
                "status": data["status"],
                "eta": eta,
                "real": round(real, 2),
                "ratio": round(real / eta, 3) if eta > 0 else float("inf"),
            }

    threads = [
        threading.Thread(target=one, args=(i, endpoint, body))
        for i, (endpoint, body) in enumerate(jobs)
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.02)  # submission order = queue order, so the report reads in order
    for thread in threads:
        thread.join()
    return results


def summary(results: list[dict]) -> dict:
    ratios = [r["ratio"] for r in results if "ratio" in r]
    if not ratios:
        return {"jobs": 0}
    within = sum(ratio <= 1.0 for ratio in ratios)
    quantiles = statistics.quantiles(ratios, n=10) if len(ratios) > 1 else ratios * 9
    return {
        "jobs": len(ratios),
        "errors": len(results) - len(ratios),
        "within_eta": f"{within}/{len(ratios)} ({100 * within / len(ratios):.0f}%)",
        "median_ratio": round(statistics.median(ratios), 3),
        "p10_ratio": round(quantiles[0], 3),
        "p90_ratio": round(quantiles[-1], 3),
        "max_ratio": round(max(ratios), 3),
        "target_met": within / len(ratios) >= 0.9 and statistics.median(ratios) >= 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=18)
    parser.add_argument("--rounds", type=int, default=1, help="bursts; the first is cold")
    parser.add_argument("--verbose", action="store_true", help="print every job")
    parser.add_argument("--data-dir", help="keep the server's data (its measured timings) here")
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes alongside")
    args = parser.parse_args()
    busy = [
        start_process([sys.executable, "-c", "while True: pass"], None, None)
        for _ in range(args.busy)
    ]
    try:
        print(json.dumps(measure(args), indent=2))
    finally:
        for proc in busy:
            stop_process(proc)


def measure(args: argparse.Namespace) -> dict:
    env = {
        "SDSERVE_SYNC_WAIT_SECONDS": "0",  # every submission answers `processing` with its eta
        "SDSERVE_QUEUE_LIMIT_PER_KEY": "1000",
        "SDSERVE_SAFETY_CHECKER": "no",
    }
    report = {}
    with running_server(args.data_dir, **env) as url:
        for round_ in range(args.rounds):
            if round_:  # the server re-reads measured speeds every few seconds
                time.sleep(SETTLE_SECONDS)
            results = run_burst(url, mixed_jobs(args.jobs))
            name = "cold" if round_ == 0 else f"warm{round_}"
            report[name] = summary(results)
            if args.verbose:
                report[name]["per_job"] = results
    return report


if __name__ == "__main__":
    main()
