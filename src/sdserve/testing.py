"""Throwaway real services for the tests and benchmarks: `sdserve` processes, a PostgreSQL server
and moto's S3 server, started in temp dirs on loopback ports (no mocks), with deadlines that
scale with the machine and nothing left running after a failure."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

# `python -c "import torch, diffusers"` on an idle developer machine; a slower or busier
# machine gets proportionally longer deadlines.
_BASELINE_IMPORT_SECONDS = 3.0
_STARTED: list[subprocess.Popen] = []  # every process started here, for `kill_started`
_KEPT: set[int] = set()  # pids that outlive the test that started them (see outlives_the_test)


class StartFailed(RuntimeError):
    """A service did not come up; the message holds the end of its log."""


@functools.cache
def timeout_scale() -> float:
    """How much slower than a developer machine this one is now (>= 1).

    SDSERVE_TEST_TIMEOUT_SCALE sets it; otherwise it is measured once per process by timing
    the imports every server start pays for.
    """
    override = os.environ.get("SDSERVE_TEST_TIMEOUT_SCALE")
    if override:
        return max(float(override), 0.1)
    started = time.perf_counter()
    try:
        subprocess.run(
            [sys.executable, "-c", "import torch, diffusers"],
            capture_output=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return 10.0
    return max(1.0, (time.perf_counter() - started) / _BASELINE_IMPORT_SECONDS)


def scaled(seconds: float) -> float:
    """A deadline for something that takes `seconds` on a developer machine."""
    return seconds * timeout_scale()


def start_process(argv: list[str], env: dict[str, str], log: Path | None) -> subprocess.Popen:
    """A child in its own process group, so that stopping it stops whatever it started too."""
    output = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            argv, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        if log is not None:
            output.close()  # the child has its own copy
    _STARTED.append(proc)
    return proc


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 30) -> None:
    """`sig` to the process group, then SIGKILL after `grace` seconds: a child that ignores
    SIGTERM, or a hung one, still goes."""
    if proc.poll() is None:
        _signal_group(proc, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # the group's other members, even if the leader is gone
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            proc.send_signal(sig)


def started_count() -> int:
    return len(_STARTED)


def outlives_the_test(proc: subprocess.Popen) -> None:
    """Keep `proc` past the current test (a module fixture's server restarted inside a test):
    the per-test cleanup leaves it, the end of the session still stops it."""
    _KEPT.add(proc.pid)


def kill_started(since: int = 0, *, kept_too: bool = False) -> list[int]:
    """Kill every process started (by `start_process`) since the `since`-th, except the kept
    ones unless `kept_too`; their pids."""
    killed, kept = [], []
    for proc in _STARTED[since:]:
        if proc.pid in _KEPT and not kept_too:
            kept.append(proc)
            continue
        if proc.poll() is None:
            killed.append(proc.pid)
        stop_process(proc, grace=5)
    _STARTED[since:] = kept
    return killed


def log_tail(log: Path | None, chars: int = 4000) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return log.read_text(errors="replace")[-chars:] or "(the log is empty)"


def wait_until_serving(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    what: str,
    log: Path | None,
    seconds: float = 60,
) -> None:
    """Poll `ready` until it holds; on exit or after `scaled(seconds)`, kill the process group
    and raise StartFailed with the log."""
    deadline = time.monotonic() + scaled(seconds)
    while True:
        if proc.poll() is not None:
            stop_process(proc, grace=1)
            raise StartFailed(f"{what} exited with {proc.returncode}; its log:\n{log_tail(log)}")
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_process(proc, grace=5)
            raise StartFailed(
                f"{what} did not start within {scaled(seconds):.0f} s "
                f"(timeout scale {timeout_scale():.1f}); its log:\n{log_tail(log)}"
            )
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    return versions[-1] if versions else None


class PostgresServer:
    """A real PostgreSQL server in a temp dir on loopback (initdb, pg_ctl), for the tests."""

    def __init__(self):
        self.bin = postgres_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sdserve-pg-"))
        self._databases = 0
        # PostgreSQL refuses to run as root: run it as the postgres user when we are root.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> PostgresServer:
        data = self.dir / "data"
        if not data.exists():
            self._run(
                str(self.bin / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "sdserve",
                "--no-sync",
            )
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://sdserve@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self._databases += 1
        name = f"test_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class MotoServer:
    """moto's standalone S3 server on loopback: a real HTTP S3 endpoint, no mocks in-process."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        binary = Path(sys.executable).parent / "moto_server"
        log = Path(tempfile.mkdtemp(prefix="sdserve-moto-")) / "moto.log"
        self.proc = start_process(
            [str(binary), "-H", "127.0.0.1", "-p", str(self.port)], dict(os.environ), log
        )

        def ready() -> bool:
            httpx.get(self.url, timeout=1)
            return True

        wait_until_serving(self.proc, ready, "moto server", log, seconds=30)
        return self

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, grace=10)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
