"""The test harness on a slow machine: a server that does not start says why and leaves nothing
running, and deadlines scale with the machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ServerProcess, start_worker

from sdserve.testing import StartFailed, kill_started, started_count

STUCK = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a hung start that ignores SIGTERM
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    open(sys.argv[1], "w").write(f"{child.pid}")
    print("stuck-marker: loading something forever", flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has stopped; only its exit status is left


def test_a_failed_start_shows_the_log_and_kills_what_it_started(tmp_path):
    script, pid_file = tmp_path / "stuck.py", tmp_path / "child.pid"
    script.write_text(STUCK)
    srv = ServerProcess(tmp_path, argv=[sys.executable, str(script), str(pid_file)])
    with pytest.raises(StartFailed) as failure:
        srv.start(seconds=3)
    assert "stuck-marker: loading something forever" in str(failure.value)
    assert "did not start within" in str(failure.value)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while (_alive(srv.proc.pid) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(srv.proc.pid) and not _alive(child), "a failed start left processes behind"


def test_a_server_that_exits_shows_its_log(tmp_path):
    srv = ServerProcess(
        tmp_path, argv=[sys.executable, "-c", "print('exit-marker'); raise SystemExit(3)"]
    )
    with pytest.raises(StartFailed, match="(?s)exited with 3.*exit-marker"):
        srv.start()


def test_workers_a_test_leaves_running_are_killed(tmp_path):
    before = started_count()
    worker = start_worker(tmp_path)
    assert worker.poll() is None
    assert kill_started(since=before) == [worker.pid]  # what the autouse fixture does
    assert worker.poll() is not None and not _alive(worker.pid)


def test_deadlines_scale_with_the_override():
    env = {**os.environ, "SDSERVE_TEST_TIMEOUT_SCALE": "7"}
    out = subprocess.run(
        [sys.executable, "-c", "from sdserve.testing import scaled; print(scaled(60))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert float(out.stdout) == 420.0
