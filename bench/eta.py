"""How honest `eta` is: a mixed burst of jobs on a fresh server (cold worker), each job's real time
from submission to its result divided by the `eta` its submission answered (reference §16.2).

Run: .venv/bin/python bench/eta.py [--jobs 18] [--rounds 1]
Target: at least 90% of jobs within their eta (ratio <= 1) and a median ratio of at least 0.5.
Tiny models on the CPU by default (text2img of several sizes, steps and samples, and
text2video clips); a round after the first runs on the now-warm server.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx
from _server import ADMIN_KEY, running_server

IMAGE = "/api/v4/dreambooth"
VIDEO = "/api/v4/dreambooth/text2video"


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
    """Submit every job at once (one thread each, as many clients would), then time each to its
    result by polling fetch."""
    results: list[dict] = [{} for _ in jobs]

    def one(index: int, endpoint: str, body: dict) -> None:
        with httpx.Client(timeout=600) as http:
            started = time.monotonic()
            answer = http.post(url + endpoint, json={"key": ADMIN_KEY, **body}).json()
            if answer.get("status") != "processing":
                results[index] = {"error": answer}
                return
            job_id, eta = answer["id"], float(answer["eta"])
            while True:
                data = http.post(f"{url}/api/v3/fetch/{job_id}", json={"key": ADMIN_KEY}).json()
                if data["status"] != "processing":
                    break
                time.sleep(0.1)
            real = time.monotonic() - started
            results[index] = {
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
    args = parser.parse_args()
    env = {
        "SDSERVE_SYNC_WAIT_SECONDS": "0",  # every submission answers `processing` with its eta
        "SDSERVE_QUEUE_LIMIT_PER_KEY": "1000",
        "SDSERVE_SAFETY_CHECKER": "no",
    }
    report = {}
    with running_server(args.data_dir, **env) as url:
        for round_ in range(args.rounds):
            results = run_burst(url, mixed_jobs(args.jobs))
            name = "cold" if round_ == 0 else f"warm{round_}"
            report[name] = summary(results)
            if args.verbose:
                report[name]["per_job"] = results
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
