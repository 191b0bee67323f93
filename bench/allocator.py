"""The forward pass through block L with saescope's malloc settings and with glibc's defaults.

    .venv/bin/python bench/allocator.py [--contexts 400] [--rounds 2] [--layer 6]

Each measurement is a fresh process (malloc settings apply from import on): it loads the
bundled model truncated after block L, runs one warm-up batch, then the forward over --contexts
contexts of 128 stdlib tokens in batches of 16, as `train` does, and reports tokens/s and the
process's minor page faults during the pass. "glibc defaults" sets a no-op glibc tunable
(GLIBC_TUNABLES=glibc.malloc.perturb=0), which makes saescope leave malloc as it is
(trainer/allocator.py). The two settings alternate, --rounds times; prints a Markdown table for
BENCHMARKS.md with each pass as a ratio to the mean of the glibc-default passes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ONE_PASS = """
import json, resource, sys, time
import trainer  # applies the malloc settings unless the environment opts out
from trainer import corpus
from trainer.config import TrainConfig
from trainer.model import load_language_model

n, layer = int(sys.argv[1]), int(sys.argv[2])
cfg = TrainConfig(layer=layer)
lm = load_language_model(cfg.model, layer)
contexts = corpus.tokenize_contexts(lm.tokenizer, corpus.iter_documents(cfg.corpus), 128, n)
lm.residual(contexts[:16])
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = time.perf_counter()
for first in range(0, n, 16):
    lm.residual(contexts[first : first + 16])
seconds = time.perf_counter() - start
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"tokens_per_s": contexts.numel() / seconds, "faults": faults}))
"""

SETTINGS = {
    "saescope's malloc settings": {},
    "glibc defaults": {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"},
}


def one_pass(extra_env: dict[str, str], contexts: int, layer: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run(
        [sys.executable, "-c", ONE_PASS, str(contexts), str(layer)], env={**env, **extra_env},
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layer", type=int, default=6)
    args = parser.parse_args()
    results = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            results[name].append(one_pass(env, args.contexts, args.layer))
    baseline = statistics.mean(r["tokens_per_s"] for r in results["glibc defaults"])
    print(f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.machine()}, {os.cpu_count()} cores · "
          f"{args.contexts} contexts of 128 tokens through block {args.layer}, batches of 16\n")
    print("| malloc | forward speed / glibc defaults' mean, each pass | minor page faults per pass |")
    print("|---|---|---|")
    for name, runs in results.items():
        speeds = " / ".join(f"{r['tokens_per_s'] / baseline:.2f}" for r in runs)
        faults = " / ".join(f"{r['faults']:,}" for r in runs)
        print(f"| {name} | {speeds} | {faults} |")


if __name__ == "__main__":
    main()
