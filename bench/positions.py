"""The reference task several ways on one activation store: every position with one scale (how
runs were trained before the attention sink was left out), the exclusion of the first position
and special tokens with one scale and with per-token normalisation, each at batches of 1,024 and
of 256 (with AuxK at weight 1 on latents silent for 4,096 tokens), and today's defaults (which
came out of these: per-token normalisation, batches of 256, lr 1.8e-3 at n = 4,096, AuxK at
weight 1 on latents silent for 1,000 tokens). `train s` beside the "all" variant (the defaults
before) is the throughput comparison, one run, same store.

For each: held-out FVU over the positions that count and over every position, L0, latents that
never fire, ΔCE and KL (spliced at the positions that count), the n-gram explanations' mean
held-out F1 and share of latents at F1 >= 0.5, and the densest latent with its explanation.

    .venv/bin/python bench/positions.py [--out /tmp/positions] [--variants all,default,exclude,token,...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from trainer import runfolder
from trainer.config import TrainConfig
from trainer.evaluate import evaluate_run, evaluate_sae
from trainer.harvest import harvest_run
from trainer.sae import default_device
from trainer.store import ActivationStore, Positions
from trainer.train import train

# The settings before the attention sink was left out (every position, batches of 1,024, AuxK at
# 1/32 with a window of a tenth of the run), then one change at a time.
BEFORE = dict(exclude_first=0, exclude_special_tokens=False, normalization="scale", batch_size=1024, auxk_alpha=1 / 32,
              dead_tokens=30_003)
VARIANTS = {
    "all": BEFORE,
    "exclude": BEFORE | dict(exclude_first=1, exclude_special_tokens=True),
    "token": BEFORE | dict(exclude_first=1, exclude_special_tokens=True, normalization="token"),
    "exclude-b256": BEFORE | dict(exclude_first=1, exclude_special_tokens=True, batch_size=256, auxk_alpha=1.0, dead_tokens=4096),
    "token-b256": BEFORE | dict(exclude_first=1, exclude_special_tokens=True, normalization="token", batch_size=256,
                                auxk_alpha=1.0, dead_tokens=4096),
    "default": {},
}


def measure(out: Path, name: str) -> dict:
    run = out / name
    began = time.perf_counter()
    train(TrainConfig(**VARIANTS[name]), run, out / "activations", replace_store=False)
    trained = time.perf_counter() - began
    metrics = evaluate_run(run)
    cfg, sae = runfolder.load_sae(run, default_device())
    # The same positions for every variant: the default exclusion.
    counted = evaluate_sae(sae, ActivationStore.open(out / "activations"), cfg.norm, Positions())
    harvest = harvest_run(run)
    f1 = np.array([e["f1"] if e.get("f1") is not None else 0.0 for e in harvest.explanations])
    density = harvest.tensors["density"].numpy()
    densest = int(density.argmax())
    return {
        "variant": name, "train_s": round(trained, 1), "fvu_counted": counted["fvu"], "fvu_all_positions": counted["fvu_all_positions"],
        "l0": counted["l0"], "never_fire": round(counted["dead_fraction"] * cfg.n_latents), "delta_ce": metrics.get("delta_ce"),
        "kl": metrics.get("kl"), "mean_f1": float(f1.mean()), "share_f1_0.5": float((f1 >= 0.5).mean()),
        "densest": {"latent": densest, "density": float(density[densest]),
                    "explanation": harvest.explanations[densest].get("text") or harvest.explanations[densest].get("patterns")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/positions")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    out = Path(args.out)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, reference task (layer 6, 4,096 latents, k 32, 300,032 tokens)")
    results = [measure(out, name) for name in args.variants.split(",")]
    print("| variant | FVU (counted) | FVU (all positions) | L0 | never fire | ΔCE | KL | mean F1 | F1 >= 0.5 | densest latent | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        d = r["densest"]
        print(f"| {r['variant']} | {r['fvu_counted']:.4f} | {r['fvu_all_positions']:.4f} | {r['l0']:.1f} | {r['never_fire']} | "
              f"{r['delta_ce']:+.4f} | {r['kl']:.4f} | {r['mean_f1']:.3f} | {r['share_f1_0.5']:.0%} | "
              f"#{d['latent']} {d['density']:.1%} {d['explanation']!r} | {r['train_s']} |")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
