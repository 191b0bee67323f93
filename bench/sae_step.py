"""The SAE training step alone, on stored activations, against a dense fp32 matmul of the
encoder's size measured in the same run.

    .venv/bin/python bench/sae_step.py --store demo/activations [--latents 4096 --k 32 --batch-size 1024]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from trainer.activations import ActivationStore
from trainer.config import TrainConfig
from trainer.train import Trainer, input_scale


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60, help="timed steps (the reference task has 293)")
    args = parser.parse_args()
    store = ActivationStore.open(args.store)
    scale = input_scale(store)
    x = store.rows(0, 64)[: args.batch_size] * scale  # (B, d)
    d = x.shape[1]
    W = torch.randn(d, args.latents)
    matmul_s = timed(lambda: x @ W, args.steps)

    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"B={args.batch_size}, d={d}, n={args.latents}, k={args.k}\n")
    print("| step | tokens/s | step time / dense fp32 encoder matmul (B×d @ d×n) |")
    print("|---|---|---|")
    for fast in (0, 1):
        cfg = TrainConfig(n_latents=args.latents, k=args.k, batch_size=args.batch_size, fast_matmul=fast)
        trainer = Trainer(cfg, store, scale)
        trainer.init_b_dec()
        # Real, distinct batches in training order: repeating one batch would mark every latent
        # it does not use as dead after a few steps and time the AuxK path instead.
        batches = trainer.batches()
        for _ in range(5):  # warm-up
            trainer.step(next(batches)[1], 1e-4)
        xs = [next(batches)[1] for _ in range(args.steps)]
        start = time.perf_counter()
        for x in xs:
            trainer.step(x, 1e-4)
        step_s = (time.perf_counter() - start) / args.steps
        label = f"train step, selection matmul in {str(trainer.matmul_dtype).removeprefix('torch.')}"
        print(f"| {label} | {args.batch_size / step_s:,.0f} | {step_s / matmul_s:.2f} |")


if __name__ == "__main__":
    main()
