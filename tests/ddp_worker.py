"""Run under ``accelerate launch --multi_gpu --num_processes 2``: a few VAE steps, then every rank writes
what it saw and a checksum of its weights (used by tests/test_training.py)."""
import json
import sys

import torch

from medvlm.config import load_config
from train.stage_vae import VAETrainer


def main(config_path: str, data: str, output: str) -> None:
    trainer = VAETrainer(load_config(config_path), data, output)
    seen = []
    original = trainer.make_inputs

    def recording(index: int):
        seen.append(trainer.batcher.indices(index))
        return original(index)

    trainer.make_inputs = recording
    trainer.run()
    weights = torch.cat([p.detach().flatten() for p in trainer.unwrap(trainer.vae).parameters()])
    rank = trainer.accelerator.process_index
    with open(f"{output}/rank{rank}.json", "w") as handle:
        json.dump({"rank": rank, "world": trainer.accelerator.num_processes, "seen": seen,
                   "weights": weights.tolist()[:2000], "sum": float(weights.double().sum())}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:4])
