"""What the probe loss and the progressive codes add to `saescope eval`, side by side on one run.

    .venv/bin/python bench/quality_metrics.py RUN [--store DIR] [--repeats 1]

RUN is copied to a temporary folder (its metrics.json is not touched). Each repeat times
`evaluate_run` with them (the default) and without them (probe=False, progressive=False), in
alternating order (with first), and then each part alone: the probe loss (encode, fit every task; the
labels of the held-out tokens are read from the store, where the first eval on it keeps them), the
labelling itself (the corpus read again, Python's tokenize), and the progressive-code pass. Explainability costs eval
nothing: the app computes it from the stored explanations (app/quality.py). Prints the times, the
ratio, and the probe table and progressive FVU measured.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from trainer import runfolder
from trainer.evaluate import evaluate_run, evaluate_sae
from trainer.model import load_tokenizer
from trainer.probing import heldout_python_labels, probe_loss_of
from trainer.sae import default_device
from trainer.store import complete_heldout, open_store_for_sae


def cpu_name() -> str:
    try:
        found = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in found.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--store", help="the run's activation store (default: cfg.json's)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="quality-bench-") as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("harvest", ".harvest*", "checkpoint*"))
        cfg, sae = runfolder.load_sae(run, default_device())
        store = complete_heldout(open_store_for_sae(Path(args.store) if args.store else cfg.store_dir(run), cfg, run))
        print(f"# {cpu_name()}, {time.strftime('%Y-%m-%d')}, n = {cfg.n_latents}, k = {cfg.k}, "
              f"{store.meta['n_heldout']} held-out contexts of {store.context_length}")
        timings, metrics = {"without": [], "with": []}, {}
        for repeat in range(args.repeats):
            # "with" first: the first eval on a store also computes its ablated CE (cached for later ones),
            # which makes the first measured eval slower: the ratio errs against the probe loss.
            order = ["with", "without"] if repeat % 2 == 0 else ["without", "with"]
            for name in order:
                quality = name == "with"
                seconds, found = timed(evaluate_run, run, store.path, probe=quality, progressive=quality)
                metrics = found if quality else metrics
                timings[name].append(seconds)
                print(f"eval {name} probe loss and progressive codes: {seconds:.1f} s")
        without, with_ = min(timings["without"]), min(timings["with"])
        print(f"ratio (with / without): {with_ / without:.2f}x")

        print(f"probe_loss {metrics['probe_loss']}, residual {metrics['probe_residual_loss']}, dense "
              f"{metrics['probe_dense_loss']}, base {metrics['probe_base_entropy']}, dropped {metrics.get('probe_dropped')}")
        for row in metrics.get("probe_tasks", []):
            if "skipped" in row:
                print(f"  {row['task']:<13} skipped: {row['skipped']}")
            else:
                print(f"  {row['task']:<13} pos {row['positives']:.3f}  latent {row['best_latent']:>5} {row['latent_loss']:.3f}  "
                      f"dim {row['best_dim']:>3} {row['residual_loss']:.3f}  dense {row['dense_loss']:.3f}  base {row['base_entropy']:.3f}")
        print("progressive_fvu", {k: round(v, 4) for k, v in metrics["progressive_fvu"].items()})
        plain, _ = timed(evaluate_sae, sae, store, cfg.norm, cfg.positions, progressive=False)
        progressive, _ = timed(evaluate_sae, sae, store, cfg.norm, cfg.positions, progressive=True)
        probe, _ = timed(probe_loss_of, sae, cfg, store)
        labelling, _ = timed(heldout_python_labels, store, load_tokenizer(cfg.model))
        print(f"parts: reconstruction pass {plain:.1f} s, with progressive codes {progressive:.1f} s; probe loss {probe:.1f} s "
              f"(labels read from the store); labelling the held-out tokens {labelling:.1f} s")
        print(f"the first eval on a store labels them too: ratio {(with_ + labelling) / without:.2f}x")


if __name__ == "__main__":
    main()
