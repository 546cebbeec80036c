"""Merges bench/gpu.sh's step results into one report.json and a one-screen summary.txt.

Usage: gpu_report.py WORK_DIR OUT_DIR (WORK_DIR holds the steps' JSON files and steps.tsv).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = ("install", "build", "plain", "server", "video", "compile", "compile_video")
# The goals, at SD1.5 shapes on one H100 / H200 with 32 concurrent clients.
GOAL_IMAGES_PER_S = 10.0
GOAL_SPEEDUP = 10.0
GOAL_SINGLE_S = 0.6
GOAL_CLIP_S = 3.0


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(value, unit: str = "", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _level_line(name: str, level: dict | None) -> str:
    if not level:
        return f"  {name:<16} not measured"
    stages = level.get("stages", {})
    parts = " ".join(
        f"{stage}={stages[stage]['p50']:.3f}"
        for stage in ("queue_wait", "denoise", "decode", "nsfw", "upload")
        if stage in stages
    )
    return (
        f"  {name:<16} {_f(level.get('outputs_per_s'))}/s  p50 {_f(level.get('p50_s'), ' s', 3)}"
        f"  p95 {_f(level.get('p95_s'), ' s', 3)}  batch {_f(level.get('mean_batch_size'), '', 1)}"
        f"  mfu {_f(level.get('mfu'), '', 3)}  err {level.get('errors', 0)}\n"
        f"  {'':<16} stage p50 s: {parts or '-'}"
    )


def build(work: Path) -> dict:
    steps = {}
    tsv = work / "steps.tsv"
    for line in tsv.read_text().splitlines() if tsv.exists() else []:
        name, rc, seconds, budget = line.split("\t")
        steps[name] = {"rc": int(rc), "seconds": int(seconds), "budget_s": int(budget)}
    report: dict = {"steps": steps, "run": _load(work / "run.json") or {}}
    for name in STEPS[2:]:
        data = _load(work / f"{name}.json")
        if data is not None:
            report[name] = data
    facts = next((report[n]["facts"] for n in STEPS[2:] if n in report), None)
    report["facts"] = facts
    plain1 = report.get("plain", {}).get("plain", {}).get("batch_1", {})
    server32 = report.get("server", {}).get("server", {}).get("clients_32", {})
    single = report.get("server", {}).get("server", {}).get("single_request", {})
    clip = report.get("video", {}).get("server", {})
    served, plain = server32.get("outputs_per_s"), plain1.get("outputs_per_s")
    report["goals"] = {
        "images_per_s_32_clients": {"value": served, "goal": f">= {GOAL_IMAGES_PER_S}"},
        "speedup_vs_plain_batch_1": {
            "value": round(served / plain, 2) if served and plain else None,
            "goal": f">= {GOAL_SPEEDUP}",
        },
        "single_request_p50_s": {"value": single.get("p50_s"), "goal": f"<= {GOAL_SINGLE_S}"},
        "clip_through_server_p50_s": {"value": clip.get("p50_s"), "goal": f"<= {GOAL_CLIP_S}"},
    }
    checks = {
        "images_per_s_32_clients": lambda v: v >= GOAL_IMAGES_PER_S,
        "speedup_vs_plain_batch_1": lambda v: v >= GOAL_SPEEDUP,
        "single_request_p50_s": lambda v: v <= GOAL_SINGLE_S,
        "clip_through_server_p50_s": lambda v: v <= GOAL_CLIP_S,
    }
    for name, goal in report["goals"].items():
        goal["met"] = None if goal["value"] is None else checks[name](goal["value"])
    return report


def summary(report: dict) -> str:
    facts = report.get("facts") or {}
    run = report.get("run", {})
    lines = [
        f"sdserve GPU benchmark  {run.get('date', '')}  mode {run.get('mode', '?')}  "
        f"commit {run.get('commit', '?')}",
        f"device {facts.get('device', '?')}  torch {facts.get('torch', '?')}  CUDA "
        f"{facts.get('cuda', '-')}  diffusers {facts.get('diffusers', '?')}  python "
        f"{facts.get('python', '?')}",
        "steps (rc, seconds / budget; rc 124 = stopped by its budget):",
        "  "
        + "  ".join(
            f"{n} {s['rc']} {s['seconds']}/{s['budget_s']}" for n, s in report["steps"].items()
        ),
    ]
    plain = report.get("plain", {})
    if plain:
        shapes = plain.get("settings", {}).get("shapes", {})
        lines.append(
            f"plain diffusers ({shapes.get('width')}x{shapes.get('height')}, "
            f"{shapes.get('num_inference_steps')} steps, "
            f"{plain.get('plain', {}).get('gflops_per_output')} GFLOP/image):"
        )
        for key, level in plain.get("plain", {}).items():
            if isinstance(level, dict):
                lines.append(
                    f"  {key:<16} {_f(level['outputs_per_s'])}/s  p50 {_f(level['p50_s'], ' s', 3)}"
                    f"  mfu {_f(level.get('mfu'), '', 3)}  torch peak "
                    f"{level.get('torch_peak_mib')} MiB"
                )
    for name, title in (("server", "server"), ("compile", "server, SDSERVE_COMPILE_UNET=1")):
        data = report.get(name, {}).get("server", {})
        if not data:
            continue
        lines.append(
            f"{title}: single request p50 {_f(data.get('single_request', {}).get('p50_s'), ' s', 3)}"
            f"  warm-up {data.get('warmup', {}).get('s')} s"
        )
        for key, level in data.items():
            if key.startswith("clients_"):
                lines.append(_level_line(key, level))
    for name, title in (("video", "clip"), ("compile_video", "clip, compiled")):
        data = report.get(name, {})
        if not data:
            continue
        srv, pl = data.get("server", {}), data.get("plain", {})
        stages = srv.get("stages", {})
        lines.append(
            f"{title}: server p50 {_f(srv.get('p50_s'), ' s', 3)} (pipeline "
            f"{_f(srv.get('pipeline_p50_s'), ' s', 3)}, upload "
            f"{_f(stages.get('upload', {}).get('p50'), ' s', 3)})  plain p50 "
            f"{_f(pl.get('p50_s'), ' s', 3)}  err {srv.get('errors', '-')}"
        )
    peaks = [report[n].get("gpu_memory_peak_mib") for n in STEPS[2:] if report.get(n) is not None]
    lines.append(f"GPU memory peak (device, MiB) per step: {peaks}")
    lines.append("goals:")
    for name, goal in report["goals"].items():
        met = {True: "MET", False: "NOT MET", None: "not measured"}[goal["met"]]
        lines.append(f"  {name:<28} {_f(goal['value'], '', 3):>8}  goal {goal['goal']:<7} {met}")
    return "\n".join(lines) + "\n"


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    report = build(work)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = summary(report)
    (out / "summary.txt").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
