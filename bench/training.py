"""Training steps per second: LoRA and Dreambooth on the tiny model.

Run: .venv/bin/python bench/training.py [--steps 100]
Tiny model only for now: the SD1.5-shape GPU run is not written yet.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from sdserve.engine.registry import ModelRegistry
from sdserve.engine.training import Trainer, TrainingHooks
from sdserve.schemas.training import TrainingRequest, normalize_training_request
from sdserve.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="sdserve-train-bench-") as tmp:
        settings = Settings(
            data_dir=Path(tmp), offline=True, train_checkpoint_every=10**9, train_class_images=2
        )
        model_id = "tiny-sd"
        trainer = Trainer(settings, ModelRegistry(settings), device)
        images = [Image.new("RGB", (512, 512), (200, 30, 30)) for _ in range(4)]
        steps_done = []
        hooks = TrainingHooks(
            stage=lambda *_: None,
            step=lambda d, t: steps_done.append(time.perf_counter()),
            cancelled=lambda: False,
        )
        for kind in ("lora", "dreambooth"):
            request = TrainingRequest(
                instance_prompt="photo of sks thing",
                images=["x"] * 4,
                max_train_steps=args.steps,
                seed=1,
            )
            params = normalize_training_request(request, kind, settings, base_model_id=model_id)
            steps_done.clear()
            trainer.train(params, images, Path(tmp) / "work" / params.training_id, hooks)
            # time between the first and last step: the loop only, not loading or saving
            rate = (len(steps_done) - 1) / (steps_done[-1] - steps_done[0])
            print(
                f"{kind:10s} {rate:7.1f} steps/s  ({model_id}, {device.type}, batch 1"
                f"{', with prior preservation' if kind == 'dreambooth' else ''})"
            )


if __name__ == "__main__":
    main()
