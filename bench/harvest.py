"""The harvest's cost, measured in one run on one run folder (default: the demo's):

1. the bare forward pass through block L over the harvest's contexts (no SAE, nothing kept);
2. the harvest computing its activations with that same model (`harvest_run(from_model=True)`);
3. the harvest reading the stored activations instead (the default);

and the time of each harvest stage (harvest.json "seconds").

    .venv/bin/python bench/harvest.py [RUN]

The goals: (2) at most 1.15x (1); (3) at least 25,000 tokens/s. Prints Markdown for
BENCHMARKS.md. The run's harvest is rewritten (with the same result).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from trainer.harvest import harvest_run
from trainer.runconfig import RunConfig
from trainer.store import ActivationStore

DEMO_RUN = Path("demo/runs/smollm2-135m-instruct-l6-4096-k32")


def bare_forward_seconds(run: Path, batch_contexts: int = 32) -> tuple[float, int]:
    cfg = RunConfig.load(run)
    tokens = torch.from_numpy(ActivationStore.open(cfg.store.path).tokens).long()
    lm = cfg.language_model()
    start = time.perf_counter()
    for first in range(0, len(tokens), batch_contexts):
        lm.residual(tokens[first : first + batch_contexts])
    return time.perf_counter() - start, tokens.numel()


def timed_harvest(run: Path, from_model: bool) -> tuple[float, dict]:
    start = time.perf_counter()
    harvest = harvest_run(run, from_model=from_model)
    return time.perf_counter() - start, harvest.info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", nargs="?", type=Path, default=DEMO_RUN)
    args = parser.parse_args()
    forward_s, n_tokens = bare_forward_seconds(args.run)
    from_model_s, model_info = timed_harvest(args.run, from_model=True)
    from_store_s, info = timed_harvest(args.run, from_model=False)
    cfg = RunConfig.load(args.run)
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"run: {cfg.model} layer {cfg.layer}, {cfg.n_latents} latents, k={cfg.k}; "
          f"{n_tokens:,} harvest tokens, {info['n_firings']:,} firings\n")
    print("| measurement | time / bare forward pass | tokens/s |")
    print("|---|---|---|")
    for name, seconds in (("bare forward through the block", forward_s),
                          ("harvest, activations from the model", from_model_s),
                          ("harvest, activations from the store", from_store_s)):
        print(f"| {name} | {seconds / forward_s:.3f} | {n_tokens / seconds:,.0f} |")
    # The three stages after the pass run at once, so their times overlap: each is given as a
    # share of the whole harvest's wall time, not of their sum.
    print("\n| harvest stage (from the store) | share of the harvest's wall time |")
    print("|---|---|")
    for stage, seconds in info["seconds"].items():
        print(f"| {stage} | {seconds / from_store_s:.0%} |")
    print(f"\n(from the model, the stages took {model_info['seconds']})")


if __name__ == "__main__":
    main()
