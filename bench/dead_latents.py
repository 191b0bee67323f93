"""Dead latents and FVU of one rung of a sweep under several training settings, on one store.

    .venv/bin/python bench/dead_latents.py --store DIR [--latents 32768 --k 32]
        [--variant "paper AuxK:auxk_rescale=0" --variant "no AuxK:auxk_alpha=0" ...]

Each variant is a name and TrainConfig overrides (`field=value`, comma-separated) on top of
`saescope train`'s defaults with the sweep's budget (300,032 training tokens, 65,536 held out:
the store of a default `saescope sweep` has them; one pass over them unless a variant sets
`epochs`, where the sweep now trains three); every variant starts from the same seed. Reported per variant:
held-out FVU, latents that never fire on the held-out tokens (the sweep's "dead"), dense ones, and latents
the trainer counted dead at the end (no firing within --dead-tokens). Without --variant, the
table of BENCHMARKS.md ("Dead latents at n = 32,768") is measured.
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import fields, replace

from trainer.config import BOOLEAN_WORDS, SWEEP_TRAIN_DEFAULTS, TrainConfig
from trainer.evaluate import evaluate_sae
from trainer.store import ActivationStore, complete_heldout
from trainer.train import Trainer, input_scale

DEFAULT_VARIANTS = [
    "paper AuxK (unscaled):auxk_rescale=0",
    "no AuxK:auxk_alpha=0",
    "rescaled AuxK (default):",
    "rescaled, alpha 1/8:auxk_alpha=0.125",
    "rescaled, alpha 1:auxk_alpha=1",
    "rescaled, alpha 1/4, dead after 8,192 tokens:auxk_alpha=0.25,dead_tokens=8192",
    "rescaled, alpha 1, dead after 8,192 tokens:auxk_alpha=1,dead_tokens=8192",
]


def parse_variant(text: str, base: TrainConfig) -> tuple[str, TrainConfig]:
    name, _, overrides = text.partition(":")
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    changes = {}
    for item in filter(None, overrides.split(",")):
        key, value = item.split("=")
        changes[key] = BOOLEAN_WORDS[value.lower()] if types[key] is bool else types[key](value)
    return name, replace(base, **changes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--latents", type=int, default=32768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.2e-3, help="for every variant unless it sets lr (0: the 1/sqrt(n) rule)")
    parser.add_argument("--variant", action="append", help="NAME:field=value,... (repeatable)")
    args = parser.parse_args()

    store = complete_heldout(ActivationStore.open(args.store))
    budget = {key: SWEEP_TRAIN_DEFAULTS[key] for key in ("tokens", "heldout_tokens")}  # the rest: train's defaults
    base = TrainConfig(n_latents=args.latents, k=args.k, lr=args.lr, checkpoint_every=0, **budget)
    scale = input_scale(store, base.positions)
    print(f"# {platform.processor() or platform.machine()}, n = {args.latents}, k = {args.k}, lr {base.effective_lr:g}, "
          f"{store.n_train_contexts * store.context_length:,} training tokens, "
          f"{(store.n_contexts - store.n_train_contexts) * store.context_length:,} held out")
    print("| variant | held-out FVU | never fire on held-out | dense (> 10 % of held-out tokens) | dead at the end of training |")
    print("|---|---|---|---|---|")
    for text in args.variant or DEFAULT_VARIANTS:
        name, cfg = parse_variant(text, base)
        trainer = Trainer(cfg, store, scale)
        trainer.fit()
        metrics = evaluate_sae(trainer.sae, store, trainer.norm, cfg.positions)
        dead_end = int((trainer.tokens_since_fired > cfg.effective_dead_tokens).sum())
        never = round(metrics["dead_fraction"] * cfg.n_latents)
        dense = round(metrics["dense_fraction"] * cfg.n_latents)
        print(f"| {name} | {metrics['fvu']:.4f} | {never:,} ({100 * metrics['dead_fraction']:.2f} %) | {dense:,} | {dead_end:,} |",
              flush=True)


if __name__ == "__main__":
    main()
