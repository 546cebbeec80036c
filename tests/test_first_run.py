"""What a new user sees on a fresh data dir: keys made on first start, the model list, /docs, the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess, base_env, run_cli

from sdserve.engine.prompts import ENHANCE_NEGATIVE, ENHANCE_SUFFIX
from sdserve.jobs.db import ApiKey
from sdserve.jobs.keys import KeyRing, hash_key
from sdserve.jobs.store import JobStore
from sdserve.settings import Settings
from sdserve.testing import outlives_the_test

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CACHED_REPO = "prompthero/openjourney"  # `midjourney` and `openjourney` name it


def _fake_hub_cache(cache: Path, repo: str) -> None:
    """A Hugging Face cache holding `repo`'s model_index.json, laid out as the hub client does."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')


def _printed_key(log: str, heading: str) -> str:
    lines = log.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(heading))
    return lines[index + 1].strip()


def _readme_first_request(key: str) -> dict:
    """The JSON body of the README's first curl, with the key filled in."""
    section = README.split("## First request", 1)[1]
    body = re.search(r"-d '(\{.*?\})'\n", section, re.S).group(1)
    return json.loads(body.replace("\"'$KEY'\"", json.dumps(key)))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """`sdserve serve` on an empty data dir with no SDSERVE_ADMIN_KEY, as the README starts it."""
    data = tmp_path_factory.mktemp("fresh")
    cache = tmp_path_factory.mktemp("hub-cache")
    _fake_hub_cache(cache, CACHED_REPO)
    # The default warm-up, as `sdserve serve` has it: tiny-sd is built and resident at start.
    warm_up = Settings.model_fields["warmup_buckets"].default
    env = {"SDSERVE_ADMIN_KEY": "", "HF_HUB_CACHE": str(cache), "SDSERVE_WARMUP_BUCKETS": warm_up}
    srv = ServerProcess(data, **env).start()
    yield srv
    srv.stop()


def _admin_ok(srv: ServerProcess, key: str) -> bool:
    data = srv.post("/api/v1/enterprise/schedulers_list", {"key": key}).json()
    return data.get("status") == "success" and bool(data.get("schedulers"))


def test_first_start_makes_an_admin_key_that_survives_restarts(fresh):
    log = fresh.log.read_text()
    admin = _printed_key(log, "Created the admin key")
    first = _printed_key(log, "Created a first API key")
    admin_file, first_file = fresh.data_dir / "admin-key.txt", fresh.data_dir / "first-key.txt"
    assert admin_file.read_text().strip() == admin and first_file.read_text().strip() == first
    for path in (admin_file, first_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert _admin_ok(fresh, admin)
    assert not _admin_ok(fresh, first)  # the first key is an ordinary key

    fresh.stop()
    fresh.start()  # same data dir, still no SDSERVE_ADMIN_KEY
    outlives_the_test(fresh.proc)  # the module's server: later tests use it
    assert _admin_ok(fresh, admin)
    assert fresh.log.read_text().count("Created the admin key") == 1  # printed once, ever
    assert admin_file.read_text().strip() == admin


def test_configured_admin_key_replaces_the_generated_one(fresh, tmp_path):
    admin = (fresh.data_dir / "admin-key.txt").read_text().strip()
    other = ServerProcess(fresh.data_dir, SDSERVE_ADMIN_KEY="set-by-operator").start()
    try:
        assert _admin_ok(other, "set-by-operator")
        assert not _admin_ok(other, admin)
    finally:
        other.stop()


def test_server_start_prints_no_torchvision_lines(fresh):
    key = (fresh.data_dir / "first-key.txt").read_text().strip()
    # a generation loads the engine (transformers, diffusers): where the lines came from
    job = fresh.post("/api/v4/dreambooth", _readme_first_request(key)).json()
    assert job["status"] == "success", job
    assert "torchvision" not in fresh.log.read_text()


def _wait_success(srv: ServerProcess, key: str, fetch_url: str) -> dict:
    deadline = time.time() + 180
    while time.time() < deadline:
        data = httpx.post(fetch_url, json={"key": key}, timeout=60).json()
        if data["status"] != "processing":
            return data
        time.sleep(0.5)
    raise AssertionError("job did not finish")


def test_readme_first_request_answers_what_the_readme_shows(fresh):
    key = (fresh.data_dir / "first-key.txt").read_text().strip()
    body = _readme_first_request(key)
    answer = fresh.post("/api/v4/dreambooth", body).json()
    assert answer["status"] == "success" and '"status": "success"' in README
    assert answer["timings"]["model_load"] < 0.05  # warmed up at start
    # The README says what enhance_prompt did, in the words meta shows.
    expected = f"{body['prompt']}, {ENHANCE_SUFFIX}"
    assert answer["meta"]["prompt"] == expected
    assert f'"prompt": "{expected}"' in README
    assert ENHANCE_NEGATIVE in README
    assert httpx.get(answer["output"][0], timeout=30).status_code == 200
    # The same request with instant_response answers `processing` at once, as the README shows.
    answer = fresh.post("/api/v4/dreambooth", {**body, "instant_response": "yes"}).json()
    assert answer["status"] == "processing" and '"status": "processing"' in README
    assert '"instant_response": "yes"' in README
    for field in ("eta", "fetch_result", "future_links", "id"):
        assert field in answer and f'"{field}"' in README, field
    done = _wait_success(fresh, key, answer["fetch_result"])
    assert done["status"] == "success" and done["output"] == answer["future_links"]
    assert httpx.get(done["output"][0], timeout=30).status_code == 200


def test_model_list_says_what_is_true(fresh):
    key = (fresh.data_dir / "first-key.txt").read_text().strip()
    models = {
        m["model_id"]: m for m in fresh.post("/api/v4/dreambooth/model_list", {"key": key}).json()
    }
    hosted = {"model_id", "status", "created_at", "instance_prompt", "model_name", "description"}
    assert all(hosted <= set(m) for m in models.values())
    assert (
        models["tiny-sd"]["status"] == "model_ready" and models["tiny-svd"]["source"] == "builtin"
    )
    # The test server is offline: hub models that are not downloaded cannot be had.
    sdxl = models["sdxl"]
    assert sdxl["status"] == "unavailable" and sdxl["availability"] == "unavailable"
    assert sdxl["hub_repo"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "offline" in sdxl["description"]
    # ... and one in the Hugging Face cache is ready.
    assert models["midjourney"]["status"] == "model_ready"
    assert models["midjourney"]["hub_repo"] == CACHED_REPO


def test_docs_page_uses_only_local_assets(fresh):
    for page in ("/docs", "/redoc"):
        html = httpx.get(fresh.url + page, timeout=30)
        assert html.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert assets, page
        for asset in assets:
            assert asset.startswith("/"), asset  # no CDN
            got = httpx.get(fresh.url + asset, timeout=30)
            assert got.status_code == 200 and len(got.content) > 1000, asset
        assert "https://" not in html.text.split("<body>")[0]


def test_every_operation_has_a_written_summary(fresh):
    spec = httpx.get(fresh.url + "/openapi.json", timeout=30).json()
    missing = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            suffix = re.sub(r"\W", "_", path) + "_" + method
            function = operation["operationId"][: -len(suffix)]
            summary = operation.get("summary", "")
            # FastAPI's fallback is the handler's name in title case ("Create", "Healthz")
            if " " not in summary or summary == function.replace("_", " ").title():
                missing.append(f"{method} {path}: {summary!r}")
    assert not missing, missing


# ---- keys -------------------------------------------------------------------------------------


def test_generated_keys_never_start_with_a_dash(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'keys.db'}")
    store.create_schema()
    keys = KeyRing(store, None, 10)
    made = [keys.create() for _ in range(400)] + [keys.create_admin() or ""]
    assert all(re.fullmatch(r"[A-Za-z0-9]{40}", key) for key in made)


def test_keys_revoke_from_the_command_line(tmp_path):
    key = run_cli("keys", "create", data_dir=tmp_path).strip().splitlines()[-1]
    assert run_cli("keys", "revoke", key, data_dir=tmp_path).strip() == "Revoked"
    # A key made before this change may start with "-": `--` ends the options.
    store = JobStore(f"sqlite:///{(tmp_path / 'sdserve.db').resolve()}")
    old = "-dgO6xF4legacykey"
    with store.session(write=True) as s:
        s.add(ApiKey(key_hash=hash_key(old), prefix=old[:8], label="", created_at=time.time()))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdserve.cli",
            "keys",
            "revoke",
            "--data-dir",
            str(tmp_path),
            "--",
            old,
        ],
        env=base_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "Revoked", out.stderr


# ---- CLI --------------------------------------------------------------------------------------


def test_help_lists_every_command():
    from sdserve.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    out = subprocess.run(
        [sys.executable, "-m", "sdserve.cli", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    usage, description = out.split("positional arguments")[0].split("\n", 1)
    for name in commands:
        assert name in usage and name in description, name  # the one-line summary too
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), name  # with its help line


_NO_TORCH = (
    "import sys; from sdserve.cli import main; rc = main(sys.argv[1:]); "
    "print('heavy:', sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)); "
    "sys.exit(rc)"
)


def test_models_list_is_quick_quiet_and_truthful(tmp_path):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, CACHED_REPO)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.safetensors").write_bytes(b"\0" * 1234)

    def models_list(**env: str) -> tuple[dict, str, float]:
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", _NO_TORCH, "models", "list", "--data-dir", str(tmp_path)],
            env=base_env(tmp_path, HF_HUB_CACHE=str(cache), **env),
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - started
        assert out.returncode == 0, out.stderr
        rows = {}
        for line in out.stdout.splitlines()[:-1]:
            model_id, source, status, note = line.split("\t")
            rows[model_id] = (source, status, note)
        assert out.stdout.splitlines()[-1] == "heavy: []"  # torch is never imported
        return rows, out.stdout + out.stderr, elapsed

    rows, output, elapsed = models_list()
    assert "torchvision" not in output and "Context impl" not in output
    assert elapsed < 20, elapsed  # was 15-43 s with torch; ~1 s now
    assert rows["tiny-t2v"][:2] == ("builtin", "ready")
    assert rows["mine"][:2] == ("file", "ready")
    assert rows["midjourney"][:2] == ("hub", "ready")
    assert rows["sdxl"][:2] == ("hub", "unavailable")  # base_env is offline
    online, _, _ = models_list(SDSERVE_OFFLINE="0", HF_HUB_OFFLINE="0")
    assert online["sdxl"][1] == "downloadable" and "first request downloads" in online["sdxl"][2]


# ---- setup and README -------------------------------------------------------------------------


_FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python3 and .venv/bin/python: records each call, makes the venv's python.
echo "$0 $*" >> "$SETUP_CALLS"
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
"""


def test_setup_shows_progress(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup", repo / "scripts" / "setup")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    fake = tmp_path / "python3"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "SETUP_CALLS": str(tmp_path / "calls")}
    out = subprocess.run(
        ["bash", "scripts/setup"], cwd=repo, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stdout.splitlines() if line.startswith("==> ")]
    assert len(steps) >= 3, out.stdout  # venv, torch, sdserve, done
    calls = (tmp_path / "calls").read_text()
    assert "pip install" in calls and "--quiet" not in calls  # pip shows its own progress
    again = subprocess.run(
        ["bash", "scripts/setup"], cwd=repo, env=env, capture_output=True, text=True, timeout=60
    )
    assert "up to date" in again.stdout  # a second run says why it does nothing


def test_readme_model_order_names_every_builtin():
    from sdserve.engine.availability import BUILTIN_MODELS

    order = README.split("A `model_id` resolves, in this order, to:", 1)[1].split("\n\n", 2)[1]
    first = order.splitlines()[0]
    for model_id in BUILTIN_MODELS:
        assert f"`{model_id}`" in first, model_id
    assert "admin-key.txt" in README and "ADMIN_KEY=$(cat data/admin-key.txt)" in README
