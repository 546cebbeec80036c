#!/usr/bin/env bash
# The GPU run's rehearsal on CPU: a fresh clone of this repo's HEAD, a fresh venv that sees only
# what the GPU host has (its package list, docs/gpu.md, linked from SOURCE_VENV) plus the bundled
# wheels, no package index; then `bench/gpu.sh --tiny` in it. Needs bench/gpu_wheels.sh --rehearsal
# first (the CPython 3.11 builds). Usage: bench/gpu_rehearse.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
R="${1:-/tmp/sdserve-rehearsal}"
SOURCE_VENV="${SOURCE_VENV:-$REPO/.venv}"
[ -x "$SOURCE_VENV/bin/python" ] || SOURCE_VENV=/work/main/.venv
rm -rf "$R"
mkdir -p "$R"
git clone -q "$REPO" "$R/clone"
cp -r bench/wheels "$R/clone/bench/"  # what the device tool carries (git-ignored)
[ -d bench/wheels-cp311 ] && cp -r bench/wheels-cp311 "$R/clone/bench/"

# The host's interpreter: the same base Python as the source venv, a venv of its own (no system
# or source site-packages), then a .pth that adds only the host's packages.
base="$("$SOURCE_VENV/bin/python" -c 'import sys; print(sys.base_prefix)')/bin/python3"
"$base" -m venv "$R/venv"
"$SOURCE_VENV/bin/python" - "$R/host-site" <<'PY'  # run in the repo: reads bench/
import importlib.metadata as md
import os
import sys
from pathlib import Path

# The GPU host's packages (.library/device/KINDS.md, nvidia-h200, 2026-11-17), by PyPI name.
HOST = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
certifi charset-normalizer click cloudpickle colorama filelock flatbuffers fsspec h11 hf-xet
httpcore httpx huggingface-hub idna imageio iniconfig jinja2 markupsafe mpmath networkx numpy
onnx onnxruntime opencv-python-headless packaging pillow pluggy prometheus-client protobuf psutil
pygments pytest pyyaml regex requests rich safetensors scipy sentencepiece setuptools six sympy
tokenizers torch torchvision tqdm transformers peft triton typing-extensions urllib3 uvloop
wheel zipp""".split()
norm = lambda n: n.lower().replace("_", "-").replace(".", "-")
wanted = {norm(n) for n in HOST}
# This machine's versions of those packages may need more than the host's do (huggingface-hub 2
# needs httpx2): add their dependencies, transitively, but never one the wheels bundle.
bundled = {norm(line.split("==")[0]) for line in open("bench/gpu-requirements.txt")
           if line.strip() and not line.startswith("#")}
todo = list(wanted)
while todo:
    try:
        requires = md.requires(todo.pop()) or []
    except md.PackageNotFoundError:
        continue
    for req in requires:
        if "extra ==" in req:
            continue
        name = norm(req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0]
                    .split("!")[0].split("~")[0].strip())
        if name not in wanted and name not in bundled:
            wanted.add(name)
            todo.append(name)
target = Path(sys.argv[1])
target.mkdir(parents=True)
linked = []
for dist in md.distributions():
    if norm(dist.metadata["Name"]) not in wanted:
        continue
    root = Path(dist.locate_file(""))
    tops = {Path(str(f)).parts[0] for f in dist.files or []}
    for top in tops:
        source = root / top
        if top in ("..", "__pycache__") or top.endswith(".pth") or not source.exists():
            continue
        if not (target / top).exists():
            os.symlink(source, target / top)
    linked.append(dist.metadata["Name"])
print(f"host-like site: {len(linked)} packages: {' '.join(sorted(linked))}")
PY
site="$("$R/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$R/host-site" >"$site/gpu-host.pth"

cd "$R/clone"
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1
unset PYTHONPATH
PYTHON="$R/venv/bin/python" OUT="$R/out" bench/gpu.sh --tiny
echo "rehearsal passed: $R/out/report.json"
