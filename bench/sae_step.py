"""The SAE training step alone, on stored activations: this checkout's defaults against another
checkout's (the commit before a change), each in fresh processes, alternated, on the same store.

    .venv/bin/python bench/sae_step.py --store demo/activations [--baseline /tmp/old-checkout ...]
        [--variant "batch 512:batch_size=512,lr=2.4e-3"] [--rounds 2] [--threads 1]

Every step of one real training pass over the store's training tokens is timed with each
checkout's TrainConfig defaults (plus a variant's overrides): the learning-rate schedule, the
early steps where AuxK revives dead latents, and the rest; reading from the store left out.
Reported per row: tokens per second of wall time and of the process's CPU time (on a machine
shared with other jobs the CPU time is the fairer clock: it leaves out the time the process
waited for a core; with one thread it is the stepping thread's alone), the median step, and each as a ratio to the first baseline's
row of the same round (the first row without --baseline).
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

ROOT = Path(__file__).resolve().parents[1]


def measure(store_dir: str, overrides: dict) -> dict:
    """One training pass in this process with the checkout on sys.path first."""
    import torch

    from trainer.config import TrainConfig
    from trainer.store import ActivationStore
    from trainer.train import Trainer, input_scale

    store = ActivationStore.open(store_dir)
    cfg = TrainConfig(checkpoint_every=0, **overrides)
    trainer = Trainer(cfg, store, input_scale(store, cfg.positions))
    trainer.init_b_dec()
    # One thread: the step's own thread (not the one reading the next chunk); more: the process's.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time
    total, fvu, wall, cpu = trainer.total_steps, None, [], []
    for step, x in trainer.batches():
        w, c = time.perf_counter(), clock()
        fvu = trainer.train_step(step, x, total, fvu)
        wall.append(time.perf_counter() - w)
        cpu.append(clock() - c)
    B = cfg.batch_size
    return {"batch": B, "steps": len(wall), "tokens_per_s": B * len(wall) / sum(wall), "tokens_per_cpu_s": B * len(cpu) / sum(cpu),
            "median_step_ms": 1e3 * statistics.median(wall), "threads": torch.get_num_threads(), "fvu_ema": fvu}


def run_in(checkout: Path, store: str, overrides: dict, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}
    code = f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import sae_step; " \
           f"print(json.dumps(sae_step.measure({store!r}, {overrides!r})))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=checkout, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def commit(checkout: Path) -> str:
    """The checkout's commit, short, with "+" when its tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True).stdout.strip()
    return (git("rev-parse", "--short", "HEAD") or checkout.name) + ("+" if git("status", "--porcelain", "-uno") else "")


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, items = text.partition(":")
    overrides = {}
    for item in filter(None, items.split(",")):
        key, value = item.split("=")
        overrides[key] = float(value) if "." in value or "e" in value else int(value)
    return name, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--baseline", action="append", default=[],
                        help="another checkout of saescope, e.g. a git worktree of an earlier commit (repeatable: the first is the reference)")
    parser.add_argument("--variant", action="append", default=[], help="NAME:field=value,... on this checkout's defaults")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = [(f"{commit(Path(path))} defaults", Path(path).resolve(), {}) for path in args.baseline]
    rows += [(f"{commit(ROOT)} defaults", ROOT, {})]
    rows += [(name, ROOT, overrides) for name, overrides in map(parse_variant, args.variant)]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu}, {args.threads} threads, {args.rounds} rounds, store {args.store}\n")
    print("| round | row | batch | steps | tokens/s | tokens per CPU s | median step | ratio (wall) | ratio (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        results = [run_in(checkout, args.store, overrides, args.threads) for _, checkout, overrides in rows]
        reference = results[0]
        for (name, _, _), r in zip(rows, results):
            print(f"| {round_} | {name} | {r['batch']:,} | {r['steps']:,} | {r['tokens_per_s']:,.0f} | {r['tokens_per_cpu_s']:,.0f} "
                  f"| {r['median_step_ms']:.1f} ms | {r['tokens_per_s'] / reference['tokens_per_s']:.2f} "
                  f"| {r['tokens_per_cpu_s'] / reference['tokens_per_cpu_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
