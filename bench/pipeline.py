"""Where the demo's time goes: each stage of the default pipeline, timed in one run, quoted as a
ratio to the bare forward pass through block L over the same tokens (timed before and after the
stages, and averaged).

    .venv/bin/python bench/pipeline.py [--tokens 300032] [--layer 6] [--latents 4096] [--k 32]

Prints a Markdown table for BENCHMARKS.md. Uses a temporary folder; the converted model stays
in the user's cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from trainer import corpus
from trainer.config import HarvestConfig, TrainConfig
from trainer.evaluate import evaluate_run
from trainer.harvest import harvest_run
from trainer.model import load_language_model
from trainer.store import ActivationStore, complete_heldout
from trainer.train import train

HELDOUT_STAGE = "held-out activations (run by the first eval on the store)"


def bare_forward_seconds(cfg: TrainConfig, batch_size: int = 16) -> tuple[dict[torch.dtype, float], int]:
    """The model alone through block L over the training tokens (no store, no SAE), in fp32 and
    in the precision `train` runs it (bf16 autocast where the hardware has it): seconds of each."""
    n = cfg.n_train_contexts + cfg.n_heldout_contexts
    contexts = None
    seconds = {}
    for fast in dict.fromkeys([False, cfg.fast_matmul]):
        lm = load_language_model(cfg.model, cfg.layer, fast=fast)
        dtype = lm.forward_dtype
        if contexts is None:
            contexts = corpus.tokenize_contexts(lm.tokenizer, corpus.iter_documents(cfg.corpus), cfg.context_length, n)
        start = time.perf_counter()
        for first in range(0, n, batch_size):
            lm.residual(contexts[first : first + batch_size])
        seconds[dtype] = time.perf_counter() - start
    return seconds, contexts.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=300_032)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    cfg = TrainConfig(layer=args.layer, n_latents=args.latents, k=args.k, tokens=args.tokens)

    before, forward_tokens = bare_forward_seconds(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        stages = {}
        start = time.perf_counter()
        train(cfg, run)
        stages["train (activations of the training tokens + SAE)"] = time.perf_counter() - start
        trained = json.loads((run / "metrics.json").read_text())
        start = time.perf_counter()
        complete_heldout(ActivationStore.open(run / "activations"))  # what the first eval on a store does first
        stages[HELDOUT_STAGE] = time.perf_counter() - start
        start = time.perf_counter()
        metrics = evaluate_run(run)
        stages["eval (FVU/L0/dead/dense, downstream loss)"] = time.perf_counter() - start
        start = time.perf_counter()
        harvest_run(run, HarvestConfig())
        stages["harvest (from stored activations)"] = time.perf_counter() - start

    # Timed again after the stages: this VM drifts by 10-20 % within minutes, and a reference
    # timed only before would bias every ratio by that drift. The ratios use the mean of both.
    after, _ = bare_forward_seconds(cfg)
    forward_seconds = {dtype: (before[dtype] + after[dtype]) / 2 for dtype in before}
    train_dtype = list(forward_seconds)[-1]
    fp32_s, forward_s = forward_seconds[torch.float32], forward_seconds[train_dtype]

    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"config: layer {cfg.layer}, {cfg.n_latents} latents, k={cfg.k}, {cfg.tokens:,} training tokens; "
          f"held-out FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, dead {metrics['dead_fraction']:.2%}\n")
    dtype = str(train_dtype).removeprefix("torch.")
    print("| stage | time / bare forward pass |")
    print("|---|---|")
    print(f"| bare forward through block {cfg.layer} ({forward_tokens:,} tokens: training + held-out), {dtype} matmuls as `train` runs it | 1.00 |")
    print(f"| bare forward through block {cfg.layer}, fp32 | {fp32_s / forward_s:.2f} |")
    print(f"| (the bare forward timed after the stages / before them) | {after[train_dtype] / before[train_dtype]:.2f} |")
    for stage, seconds in stages.items():
        print(f"| {stage} | {seconds / forward_s:.2f} |")
    print(f"| all of them together | {sum(stages.values()) / forward_s:.2f} |")
    end_to_end = trained["end_to_end_tokens_per_s"]
    heldout_s = stages[HELDOUT_STAGE]
    with_heldout = trained["train_tokens"] / (trained["train_wall_s"] + heldout_s)  # as train was built before b1a168e
    print(f"\nend-to-end train: {end_to_end:,.0f} tokens/s; ratio to the bare forward pass ({dtype}): "
          f"{end_to_end / (forward_tokens / forward_s):.2f}, to the fp32 forward: {end_to_end / (forward_tokens / fp32_s):.2f}; "
          f"SAE step {trained['sae_tokens_per_s']:,.0f} tokens/s; with the held-out activations counted in train: "
          f"{with_heldout:,.0f} tokens/s, ratio {with_heldout / (forward_tokens / forward_s):.2f}")


if __name__ == "__main__":
    main()
