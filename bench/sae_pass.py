"""One SAE training pass split into its parts, on a synthetic activation store of the reference
task's size (2,600 contexts of 128 tokens, d = 576): the whole pass as `saescope train` runs it
(reading the store, then the steps), the steps alone on batches already read, and reading alone
(the shuffled gather from the store and the move to the device). Any device: on a GPU it shows
whether training is bound by the steps or by reading; `bench/gpu_check.sh` runs it.

    .venv/bin/python bench/sae_pass.py [--device cuda] [--sizes 4096x1024 16384x4096] [--raw]

Timed: the whole pass, then the same batches again through fresh weights (steps alone), each
from a fresh Trainer; with a GPU, the queue is drained before each clock read.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.store import ActivationStore
from trainer.train import Trainer

CONTEXTS, T, D, HELDOUT = 2600, 128, 576, 256


def synthetic_store() -> ActivationStore:
    """Random fp16 rows in memory, laid out as a real store (the values do not change the time)."""
    rows = np.random.default_rng(0).standard_normal((CONTEXTS * T, D), dtype=np.float32).astype(np.float16)
    meta = {"context_length": T, "n_contexts": CONTEXTS, "n_heldout": HELDOUT, "d_model": D, "heldout_complete": True,
            "special_token_ids": []}  # none: the exclusion leaves out each context's first position
    return ActivationStore(Path("synthetic"), meta, np.zeros((CONTEXTS, T), np.int32), rows)


def timed(fn, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def one_pass(trainer: Trainer, batches) -> None:
    fvu = None
    for step, x in batches:
        fvu = trainer.train_step(step, x, trainer.total_steps, fvu)


def measure(store: ActivationStore, n: int, B: int, device: str, deterministic: int = 0) -> dict:
    cfg = TrainConfig(n_latents=n, k=32, batch_size=B, checkpoint_every=0, device=device, tokens=(CONTEXTS - HELDOUT) * T,
                      **({"deterministic": 1} if deterministic else {}))  # as is, it also runs an older trainer (A/B)

    def fresh() -> Trainer:
        trainer = Trainer(cfg, store, 1.0)
        trainer.init_b_dec()
        return trainer

    trainer = fresh()
    one_pass(trainer, list(trainer.batches())[:3])  # warm-up: kernels, allocator
    trainer = fresh()
    whole = timed(lambda: one_pass(trainer, trainer.batches()), trainer.device)
    trainer = fresh()
    batches = []
    reading = timed(lambda: batches.extend(trainer.batches()), trainer.device)
    steps = timed(lambda: one_pass(trainer, batches), trainer.device)
    tokens = len(batches) * B
    return {"whole": tokens / whole, "steps": tokens / steps, "reading": tokens / reading}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="", help="torch device; empty: cuda when available, else cpu")
    parser.add_argument("--sizes", nargs="+", default=["4096x1024", "16384x1024", "16384x4096", "65536x4096"],
                        help="latents x batch size pairs")
    parser.add_argument("--deterministic", type=int, default=0, help="1: train with --deterministic (its cost on a GPU)")
    parser.add_argument("--raw", action="store_true", help="also print each row's tokens/s, for an A/B across versions")
    args = parser.parse_args()
    store = synthetic_store()
    device = Trainer(TrainConfig(n_latents=64, k=4, device=args.device), store, 1.0).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{(CONTEXTS - HELDOUT) * T:,} training tokens, d = {D}, k = 32\n")
    print("| latents n | batch B | whole pass / steps alone | reading / steps alone | steps alone, tokens/s / the first row's |")
    print("|---|---|---|---|---|")
    first = None
    for size in args.sizes:
        n, B = (int(part) for part in size.split("x"))
        rates = measure(store, n, B, args.device, args.deterministic)
        first = first or rates["steps"]
        print(f"| {n:,} | {B:,} | {rates['whole'] / rates['steps']:.2f} | {rates['reading'] / rates['steps']:.2f} "
              f"| {rates['steps'] / first:.2f} |", flush=True)
        if args.raw:
            print("raw", size, " ".join(f"{part}={rate:.0f}" for part, rate in rates.items()), flush=True)


if __name__ == "__main__":
    main()
