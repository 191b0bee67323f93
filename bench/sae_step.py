"""The SAE training step alone, on stored activations, against a dense fp32 matmul of the
encoder's size measured in the same run.

    .venv/bin/python bench/sae_step.py --store demo/activations [--latents 4096 --k 32 --batch-size 1024]

Every step of one real training pass over the store's training tokens is timed (the reference
task's 293 steps: the learning-rate schedule, the early steps where AuxK revives dead latents,
and the rest), reading from the store left out. Reported: tokens/s over all steps, the median
step, and the mean step time over the dense fp32 (B×d @ d×n) matmul, timed before and after.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from trainer.config import TrainConfig
from trainer.store import ActivationStore
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
    args = parser.parse_args()
    store = ActivationStore.open(args.store)
    scale = input_scale(store, TrainConfig().positions)
    x = store.rows(0, 64)[: args.batch_size] * scale  # (B, d)
    d = x.shape[1]
    W = torch.randn(d, args.latents)
    matmul_s = [timed(lambda: x @ W, 30)]

    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"B={args.batch_size}, d={d}, n={args.latents}, k={args.k}\n")
    rows = []
    for fast in (0, 1):
        cfg = TrainConfig(n_latents=args.latents, k=args.k, batch_size=args.batch_size, fast_matmul=fast, checkpoint_every=0)
        trainer = Trainer(cfg, store, scale)
        step_times = timed_training(trainer)
        label = f"train step, selection matmul in {str(trainer.matmul_dtype).removeprefix('torch.')}"
        rows.append((label, step_times))
    matmul_s.append(timed(lambda: x @ W, 30))
    matmul = statistics.mean(matmul_s)
    print(f"| step ({len(rows[0][1])} steps of one training pass) | tokens/s | median step | mean step / dense fp32 encoder matmul (B×d @ d×n) |")
    print("|---|---|---|---|")
    for label, step_times in rows:
        mean = statistics.mean(step_times)
        print(f"| {label} | {args.batch_size / mean:,.0f} | {1e3 * statistics.median(step_times):.1f} ms | {mean / matmul:.2f} |")
    print(f"\ndense fp32 matmul before and after: {1e3 * matmul_s[0]:.1f} and {1e3 * matmul_s[1]:.1f} ms")


def timed_training(trainer: Trainer) -> list[float]:
    """The time of each step of one training pass, as Trainer.fit runs them (reading excluded)."""
    trainer.init_b_dec()
    total, fvu, times = trainer.total_steps, None, []
    for step, x in trainer.batches():
        start = time.perf_counter()
        fvu = trainer.train_step(step, x, total, fvu)
        times.append(time.perf_counter() - start)
    return times


if __name__ == "__main__":
    main()
