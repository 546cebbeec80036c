#!/usr/bin/env bash
# One command, cold start to a JSON report on a GPU host (H100 / H200, under 8 minutes):
#   bench/gpu.sh          SD1.5 shapes (random weights): 512x512, 30 steps; clips 16 x 512^2, 25 steps
#   bench/gpu.sh --tiny   every step at tiny shapes on CPU: the rehearsal (bench/gpu_rehearse.sh)
# Installs the bundled wheels (bench/wheels/, see bench/gpu_wheels.sh) when a package is missing,
# then runs, each step under its own time budget: plain diffusers (batch 1 and 16); the server
# under 1, 8 and 32 clients; one AnimateDiff clip, plain and through the server; the same with
# SDSERVE_COMPILE_UNET=1 in whatever time is left. Output: $OUT if set, else
# bench/results/<date>-<device>/: report.json, summary.txt, run.log. Budgets: GPU_BUDGET_<STEP>
# (seconds) and GPU_BUDGET_TOTAL override the defaults.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
MODE=full
[ "${1:-}" = "--tiny" ] && MODE=tiny
PY="${PYTHON:-python3}"
START=$(date +%s)
WORK="$(mktemp -d /tmp/sdserve-gpu.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

device="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
device="${device:-cpu}"
slug="$(echo "$device" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-//; s/-$//')"
OUTDIR="${OUT:-$REPO/bench/results/$(date -u +%Y%m%d-%H%M)-$slug-$MODE}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/run.log"
: >"$LOG"
log() { echo "[gpu.sh $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

if [ "$MODE" = full ]; then
  budget_install=60 budget_build=120 budget_plain=100 budget_server=170 budget_video=120
  total=${GPU_BUDGET_TOTAL:-465}
else
  budget_install=120 budget_build=300 budget_plain=300 budget_server=300 budget_video=300
  total=${GPU_BUDGET_TOTAL:-1800}
fi
for step in install build plain server video; do
  override="GPU_BUDGET_${step^^}"
  [ -n "${!override:-}" ] && printf -v "budget_$step" '%s' "${!override}"
done

# step NAME BUDGET COMMAND...: runs COMMAND in its own process group (timeout kills the server
# it started too), logs it, and records rc / seconds / budget in steps.tsv.
step() {
  local name=$1 budget=$2 began rc
  shift 2
  began=$(date +%s)
  log "step $name (budget ${budget}s): $*"
  timeout --kill-after=20 "$budget" "$@" >>"$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - began))" "$budget" >>"$WORK/steps.tsv"
  log "step $name: rc $rc after $(($(date +%s) - began))s"
  return $rc
}

# ---- 1. packages: install the bundled wheels when the host lacks one -------------------------
core_missing() {
  "$PY" - <<'PY'
import importlib.util
mods = ["diffusers", "fastapi", "starlette", "pydantic", "pydantic_core", "pydantic_settings",
        "dotenv", "uvicorn", "sqlalchemy", "alembic", "mako", "importlib_metadata",
        "annotated_types", "typing_inspection", "torch", "transformers", "accelerate", "peft",
        "safetensors", "httpx", "PIL", "numpy", "scipy"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
PY
}
install_wheels() {
  local links=() name
  for dir in bench/wheels bench/wheels-cp*; do [ -d "$dir" ] && links+=(--find-links "$dir"); done
  [ ${#links[@]} -gt 0 ] || { echo "no bench/wheels: run bench/gpu_wheels.sh first"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "${links[@]}" -r bench/gpu-requirements.txt || return 1
  # Optional extras: MP4 output (PyAV) and the NSFW check (NudeNet), when bundled and missing.
  for name in av nudenet; do
    if ! "$PY" -c "import $name" 2>/dev/null && ls bench/wheels/$name-*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$WORK/site" "${links[@]}" "$name" || return 1
    fi
  done
}
export -f install_wheels
export WORK PY
missing="$(core_missing)"
if [ -n "$missing" ]; then
  log "missing: $missing; installing bench/wheels into $WORK/site"
  step install "$budget_install" bash -c install_wheels
else
  printf 'install\t0\t0\t%s\n' "$budget_install" >>"$WORK/steps.tsv"
fi
export PYTHONPATH="$WORK/site:$REPO/src:$REPO/bench${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
missing="$(core_missing)"
# find_spec is not enough: a package can be there and still fail to import (a missing dependency).
[ -z "$missing" ] && ! "$PY" -c "import diffusers, sdserve.api.app, sdserve.engine.images" >>"$LOG" 2>&1 \
  && missing="(sdserve's imports fail: see run.log)"
if [ -n "$missing" ]; then
  log "still missing after the install: $missing; stopping"
  "$PY" bench/gpu_report.py "$WORK" "$OUTDIR" | tee -a "$LOG"
  exit 1
fi
has() { "$PY" -c "import $1" 2>/dev/null; }
clip_format=gif
has av && clip_format=mp4
nsfw_clients=0
has nudenet && nsfw_clients=32

# ---- shapes and the shared model -------------------------------------------------------------
MODELS="$WORK/models"
if [ "$MODE" = full ]; then
  shape=(--full)
  plain_args=(--plain-batches 1,16 --baseline-images 8)
  server_args=(--clients 1,8,32 --requests-per-client 4 --single 4)
  compile_args=(--clients 32 --requests-per-client 4 --single 2)
  video_shape=(--full)
  [ "$nsfw_clients" = 32 ] || nsfw_clients=0
else
  shape=(--size 64 --steps 2)
  plain_args=(--plain-batches 1,2 --baseline-images 2)
  server_args=(--clients 1,2,4 --requests-per-client 1 --single 1)
  compile_args=(--clients 4 --requests-per-client 1 --single 1)
  video_shape=(--frames 4 --size 64 --steps 2)
  [ "$nsfw_clients" = 32 ] && nsfw_clients=4
fi
full_flag=$([ "$MODE" = full ] && echo True || echo False)
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$PY" - "$WORK/run.json" <<PY
import json, sys, datetime, subprocess
smi = subprocess.run("nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm "
                     "--format=csv,noheader", shell=True, capture_output=True, text=True).stdout
json.dump({"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "mode": "$MODE", "commit": "$commit", "nvidia_smi": smi.strip() or None,
           "clip_format": "$clip_format", "nsfw_clients": $nsfw_clients,
           "budget_total_s": $total}, open(sys.argv[1], "w"), indent=2)
PY

step build "$budget_build" "$PY" -c "
import sys; from pathlib import Path; from _gpu import bench_models
bench_models($full_flag, Path(sys.argv[1]))" "$MODELS"

# ---- 2. plain diffusers, one image at a time and batched -------------------------------------
step plain "$budget_plain" "$PY" bench/throughput.py "${shape[@]}" --model-dir "$MODELS" \
  "${plain_args[@]}" --clients '' --json "$WORK/plain.json"
gflops="$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['plain']['gflops_per_output'])" "$WORK/plain.json" 2>/dev/null || true)"
gflops_arg=()
[ -n "$gflops" ] && gflops_arg=(--gflops-per-output "$gflops")

# ---- 3. the server under concurrent clients ----------------------------------------------------
step server "$budget_server" "$PY" bench/throughput.py "${shape[@]}" --model-dir "$MODELS" \
  --plain-batches '' "${server_args[@]}" --nsfw-clients "$nsfw_clients" "${gflops_arg[@]}" \
  --json "$WORK/server.json"

# ---- 4. one AnimateDiff clip, plain and through the server -----------------------------------
step video "$budget_video" "$PY" bench/video.py "${video_shape[@]}" --model-dir "$MODELS" \
  --clips 2 --output-type "$clip_format" --json "$WORK/video.json"

# ---- 5. compilation on, in the time left -----------------------------------------------------
left=$((total - ($(date +%s) - START) - 15))
if [ "$left" -ge 60 ]; then
  step compile $((left * 2 / 3)) "$PY" bench/throughput.py "${shape[@]}" --model-dir "$MODELS" \
    --plain-batches '' "${compile_args[@]}" --env SDSERVE_COMPILE_UNET=1 "${gflops_arg[@]}" \
    --json "$WORK/compile.json"
  left=$((total - ($(date +%s) - START) - 15))
  if [ "$left" -ge 30 ]; then
    step compile_video "$left" "$PY" bench/video.py "${video_shape[@]}" --model-dir "$MODELS" \
      --clips 1 --skip-plain --output-type "$clip_format" --env SDSERVE_COMPILE_UNET=1 \
      --json "$WORK/compile_video.json"
  fi
else
  log "compile steps skipped: ${left}s left of the ${total}s budget"
fi

"$PY" bench/gpu_report.py "$WORK" "$OUTDIR" | tee -a "$LOG"
log "done in $(($(date +%s) - START))s: $OUTDIR"
# Fails when a step did not finish (a budget ran out or a step broke), so a rehearsal notices.
! awk -F'\t' '$2 != 0 && $1 !~ /^compile/ {bad=1} END {exit !bad}' "$WORK/steps.tsv"
