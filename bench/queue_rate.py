"""Jobs per second through the queue (submit, claim, complete, fetch) and claim latency, with the
no-op engine, on SQLite (one `sdserve serve` with its in-process worker) and on PostgreSQL (one
API process and three `sdserve worker` processes).

Throughput: a burst of `--jobs` jobs from `--clients` clients, each submitting its share and then
fetching each job until it succeeded. Claim latency: the time from a job's insert to its claim by a
worker, over `--idle-jobs` jobs sent one at a time to an idle queue (the notification path).

CPU: the CPU seconds each part (API, workers, PostgreSQL, this client) spent per job in the burst,
from /proc, so the rate can be read against the machine's cores.

Run: .venv/bin/python bench/queue_rate.py [--jobs 1000 --clients 32 --workers 3]
Everything (database, API, workers, clients) shares this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager

import httpx
from _server import ADMIN_KEY, running_server
from sqlalchemy import create_engine, text

from sdserve.jobs.store import normalize_database_url
from sdserve.testing import PostgresServer

BODY = {
    "key": ADMIN_KEY,
    "prompt": "x",
    "width": 64,
    "height": 64,
    "num_inference_steps": 1,
    "instant_response": "yes",
}


async def _burst(url: str, jobs: int, clients: int) -> float:
    """Submit `jobs` jobs from `clients` concurrent clients, then fetch each until it succeeded;
    return the seconds from the first submit to the last successful fetch."""
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def client(count: int) -> None:
            ids = []
            for _ in range(count):
                ids.append((await http.post(url + "/api/v3/text2img", json=BODY)).json()["id"])
            for job_id in ids:
                while True:
                    fetch = f"{url}/api/v3/fetch/{job_id}"
                    answer = (await http.post(fetch, json={"key": ADMIN_KEY})).json()
                    if answer["status"] == "success":
                        break
                    assert answer["status"] == "processing", answer
                    await asyncio.sleep(0.02)

        started = time.perf_counter()
        await asyncio.gather(*(client(jobs // clients) for _ in range(clients)))
        return time.perf_counter() - started


def _cpu_seconds() -> collections.Counter:
    """CPU seconds so far of the API, worker and PostgreSQL processes, and of this client."""
    totals: collections.Counter = collections.Counter()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmd = handle.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        part = next(
            (
                name
                for name, marker in (
                    ("api", "sdserve.cli serve"),
                    ("workers", "sdserve.cli worker"),
                    ("postgres", "postgres"),
                )
                if marker in cmd
            ),
            None,
        )
        if part and int(pid) != os.getpid():
            totals[part] += (int(fields[11]) + int(fields[12])) / tick
    usage = resource.getrusage(resource.RUSAGE_SELF)
    totals["client"] = usage.ru_utime + usage.ru_stime
    return totals


def _one_at_a_time(url: str, jobs: int) -> None:
    """Jobs on an idle queue, one after another: what claim latency is when nothing waits."""
    with httpx.Client(timeout=60) as http:
        for _ in range(jobs):
            http.post(url + "/api/v3/text2img", json={**BODY, "instant_response": "no"})


def _claim_latencies(database_url: str, after_id: int) -> list[float]:
    engine = create_engine(normalize_database_url(database_url))
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT started_at - created_at FROM jobs WHERE id > :after ORDER BY id"),
            {"after": after_id},
        ).all()
    engine.dispose()
    return sorted(row[0] for row in rows)


def _last_id(database_url: str) -> int:
    engine = create_engine(normalize_database_url(database_url))
    with engine.connect() as connection:
        last = connection.execute(text("SELECT coalesce(max(id), 0) FROM jobs")).scalar()
    engine.dispose()
    return last


@contextmanager
def _workers(count: int, env: dict[str, str]):
    procs = []
    with tempfile.TemporaryDirectory(prefix="sdserve-bench-workers-") as tmp:
        for index in range(count):
            data_dir = os.path.join(tmp, f"w{index}")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "sdserve.cli", "worker", "--data-dir", data_dir],
                    env={**os.environ, **env, "SDSERVE_DATA_DIR": data_dir},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        try:
            yield
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)


def run(label: str, url: str, database_url: str, args) -> dict:
    asyncio.run(_burst(url, args.clients * 2, args.clients))  # warm-up
    cpu_before = _cpu_seconds()
    wall = asyncio.run(_burst(url, args.jobs, args.clients))
    cpu = _cpu_seconds()
    cpu.subtract(cpu_before)
    before = _last_id(database_url)
    _one_at_a_time(url, args.idle_jobs)
    claims = _claim_latencies(database_url, before)
    result = {
        "database": label,
        "jobs": args.jobs,
        "jobs_per_s": round(args.jobs / wall, 1),
        "idle_claim_p50_ms": round(statistics.median(claims) * 1000, 2),
        "idle_claim_p95_ms": round(claims[int(0.95 * len(claims)) - 1] * 1000, 2),
        "cpu_ms_per_job": {part: round(1000 * sec / args.jobs, 2) for part, sec in cpu.items()},
    }
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--idle-jobs", type=int, default=100)
    args = parser.parse_args()
    noop = {"SDSERVE_ENGINE": "noop", "SDSERVE_QUEUE_LIMIT_PER_KEY": "100000"}

    with tempfile.TemporaryDirectory(prefix="sdserve-bench-") as tmp:
        with running_server(data_dir=tmp, **noop) as url:
            run("sqlite (in-process worker)", url, f"sqlite:///{tmp}/sdserve.db", args)

    postgres = PostgresServer().start()
    try:
        database_url = postgres.new_database()
        env = {**noop, "SDSERVE_DATABASE_URL": database_url}
        with ExitStack() as stack:
            url = stack.enter_context(running_server(SDSERVE_IN_PROCESS_WORKER="0", **env))
            stack.enter_context(_workers(args.workers, env))
            run(f"postgresql ({args.workers} workers)", url, database_url, args)
    finally:
        postgres.remove()


if __name__ == "__main__":
    main()
