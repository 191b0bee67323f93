"""Interventions: what steering and ablation cost, as ratios from one run on one machine.

    .venv/bin/python bench/interventions.py [--run demo/runs/smollm2-135m-instruct-l6-4096-k32]
        [--workdir /tmp/saescope-bench-interventions] [--repeats 5]

Without --run (or when it is missing), a small SAE on the bundled SmolLM2 (layer 6, 4,096 latents,
k 32, 65,536 training tokens, 16,384 held-out) is trained into --workdir once and reused.

1. Steering cost: a 32-token greedy continuation of a 32-token prompt, steered (add, one latent at
   strength 4, which also records the steered latent's activation on every token) against the
   same unsteered (trainer.interventions.generate): the median of --repeats, interleaved.
2. The KV cache: time per new token of one unsteered 128-token generation (no stop token), the
   mean of tokens 6-10 against tokens 124-128 (their ratio: 1 when flat), the median over
   --repeats generations.
3. The feature page's ablation section: trainer.interventions.ablation_effects over 5 held-out
   contexts of the store (as long as the harvest's) for the latent that fires most there, against
   one forward pass of the whole model over the same 5 contexts; the median of --repeats each,
   interleaved.
4. Ablation sparsity in `saescope eval`: evaluate_run at its defaults (--downstream-contexts 64,
   --ablation-samples 24) against evaluate_run with --ablation-samples 0, after one warm-up eval
   (which caches the ablated CE in the store for both), interleaved, the median of --eval-repeats
   each. --downstream-contexts sets both evals' downstream contexts (on a busy 2-core machine 64
   take many minutes per eval; say which was used).
5. `saescope harvest --ablation-examples 5`: the ablation stage's time per latent over the
   --harvest-latents latents that fire on most of 40 held-out contexts, each with its 5 strongest
   of them, against one forward pass over 5 contexts (what its default of 0 saves).

Prints each figure as it is measured, then a Markdown table with the date, the CPU (/proc/cpuinfo's model name), torch's threads and
the load average.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DEMO_RUN = ROOT / "demo" / "runs" / "smollm2-135m-instruct-l6-4096-k32"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def small_run(workdir: Path) -> Path:
    from saescope.cli import main

    run = workdir / "run"
    if not (run / "sae.safetensors").exists():
        assert main(["train", "--out", str(run), "--overwrite", "--tokens", "65536", "--heldout-tokens", "16384"]) == 0
    return run


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=DEMO_RUN)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/saescope-bench-interventions"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval-repeats", type=int, default=2)
    parser.add_argument("--downstream-contexts", type=int, default=64)
    parser.add_argument("--harvest-latents", type=int, default=32, help="latents of figure 5")
    parser.add_argument("--skip", default="", help="figures to leave out, e.g. 4 or 1,2")
    args = parser.parse_args()

    from trainer.interventions import LatentReader
    from trainer.runfolder import load_sae
    from trainer.store import open_store_for_sae

    run = args.run if (args.run / "sae.safetensors").exists() else small_run(args.workdir)
    cfg, sae = load_sae(run)
    lm = cfg.language_model("cpu")
    reader = LatentReader(sae, cfg.norm, cfg.fast_matmul)
    store = open_store_for_sae(cfg.store_dir(run), cfg, run)
    first = store.n_train_contexts
    contexts = torch.from_numpy(store.tokens[first : first + 5]).long()  # (5, T)

    # the latent that fires most on those contexts, and its largest activation there
    resid = lm.residual(contexts)
    x_n, _ = cfg.norm.normalize(resid.reshape(-1, resid.shape[-1]))
    dense = sae.encode_dense(x_n)  # (5T, n)
    latent = int((dense > 0).sum(0).argmax())
    max_activation = float(dense[:, latent].max())
    rows = {}
    skip = {int(x) for x in args.skip.split(",") if x}

    def report(name, times, ratio):
        rows[name] = (times, ratio)
        print(f"{name}: {times} -> {ratio:.2f}", flush=True)

    prompt = contexts[0, :32].tolist()  # 32 tokens
    if 1 not in skip:
        steering_figure(lm, reader, prompt, latent, max_activation, args.repeats, report)
    if 2 not in skip:
        cache_figure(lm, prompt, args.repeats, report)
    if 3 not in skip:
        ablation_figure(lm, reader, contexts, latent, args.repeats, report)
    if 4 not in skip:
        eval_figure(run, args.downstream_contexts, args.eval_repeats, report)
    if 5 not in skip:
        harvest_ablation_figure(lm, reader, store, args.harvest_latents, report)

    print(f"\n{datetime.date.today()} · {cpu_model()} · torch threads {torch.get_num_threads()} · "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} · run {run} ({sae.n_latents} latents, k {sae.k}) · "
          f"latent {latent}\n")
    print("| figure | times | ratio |\n|---|---|---|")
    for name, (times, ratio) in rows.items():
        print(f"| {name} | {times} | {ratio:.2f} |")


def steering_figure(lm, reader, prompt, latent, max_activation, repeats, report):
    """1. Steered against unsteered, 32 new tokens after a 32-token prompt."""
    from trainer.interventions import Steering, generate

    steering = Steering("add", (latent,), (4.0,), (max_activation,))
    generate(lm, prompt, 32)  # warm-up
    plain, steered = [], []
    for _ in range(repeats):
        plain.append(median_time(lambda: generate(lm, prompt, 32), 1))
        steered.append(median_time(lambda: generate(lm, prompt, 32, steering=steering, reader=reader), 1))
    report("steered / unsteered, 32 new tokens after 32 (≤ 1.2)",
           f"{statistics.median(steered):.3f} s / {statistics.median(plain):.3f} s", statistics.median(steered) / statistics.median(plain))


def cache_figure(lm, prompt, repeats, report):
    """2. The KV cache: per-token time early and late in a 128-token generation."""
    from trainer.interventions import generate

    ratios, early_late = [], []
    for _ in range(repeats):
        seconds = generate(lm, prompt, 128).step_seconds
        early, late = statistics.mean(seconds[5:10]), statistics.mean(seconds[123:128])
        ratios.append(late / early)
        early_late.append((early, late))
    early, late = early_late[ratios.index(statistics.median(ratios))] if repeats % 2 else early_late[0]
    report("per new token, tokens 124-128 / tokens 6-10 (0.7-1.3)",
           f"{late * 1000:.1f} ms / {early * 1000:.1f} ms", statistics.median(ratios))


def ablation_figure(lm, reader, contexts, latent, repeats, report):
    """3. The ablation section against one forward pass over the same 5 contexts, interleaved."""
    from trainer.interventions import ablation_effects

    def forward():
        with torch.no_grad(), lm.loaded.autocast():
            lm.loaded.causal_lm(input_ids=contexts, use_cache=False)

    forward()
    ablation_effects(lm, reader, contexts, latent)  # warm-up
    passes, sections = [], []
    for _ in range(repeats):
        passes.append(median_time(forward, 1))
        sections.append(median_time(lambda: ablation_effects(lm, reader, contexts, latent), 1))
    one_pass, ablation = statistics.median(passes), statistics.median(sections)
    report(f"ablation section ({tuple(contexts.shape)} tokens) / one forward pass (≤ 2.5)",
           f"{ablation:.3f} s / {one_pass:.3f} s", ablation / one_pass)


def harvest_ablation_figure(lm, reader, store, n_latents, report, pool=40, examples=5):
    """5. `saescope harvest --ablation-examples 5`'s stage (trainer.ablation_harvest) per latent,
    against one forward pass over 5 contexts: the `n_latents` latents firing on most of `pool`
    held-out contexts, each with its 5 contexts of highest activation among them (top examples
    shared between latents as a harvest's are), in batches of 32 contexts as the harvest's default."""
    import numpy as np

    from trainer.ablation_harvest import ablation_sections

    first = store.n_train_contexts
    tokens = np.asarray(store.tokens[first : first + pool])
    ids = torch.from_numpy(tokens).long()
    resid = lm.residual(ids)
    x_n, _ = reader.norm.normalize(resid.reshape(-1, resid.shape[-1]))
    per_context = reader.sae.encode_dense(x_n).view(pool, -1, reader.sae.n_latents).amax(1)  # (pool, n)
    latents = (per_context > 0).sum(0).topk(n_latents).indices
    top_context = per_context[:, latents].topk(examples, dim=0).indices.T.numpy()  # (m, 5)

    def forward():
        with torch.no_grad(), lm.loaded.autocast():
            lm.loaded.causal_lm(input_ids=ids[:examples], use_cache=False)

    forward()
    one_pass = median_time(forward, 3)
    began = time.perf_counter()
    ablation_sections(lm, reader, tokens, top_context, examples, 1, 32)
    per_latent = (time.perf_counter() - began) / n_latents
    report(f"harvest --ablation-examples {examples}, per latent ({n_latents} latents, {len(np.unique(top_context))} contexts) "
           "/ one forward pass over 5 contexts", f"{per_latent:.3f} s / {one_pass:.3f} s", per_latent / one_pass)


def eval_figure(run, downstream_contexts, repeats, report):
    """4. Eval with and without ablation sparsity (its defaults otherwise)."""
    from trainer.evaluate import evaluate_run

    evaluate_run(run, downstream_contexts=downstream_contexts)  # warm-up: caches the ablated CE for both
    with_it, without = [], []
    for _ in range(repeats):
        with_it.append(median_time(lambda: evaluate_run(run, downstream_contexts=downstream_contexts), 1))
        without.append(median_time(lambda: evaluate_run(run, downstream_contexts=downstream_contexts, ablation_samples=0), 1))
    with_it, without = statistics.median(with_it), statistics.median(without)
    report(f"saescope eval with / without ablation sparsity, {downstream_contexts} downstream contexts (≤ 1.5)",
           f"{with_it:.1f} s / {without:.1f} s", with_it / without)



if __name__ == "__main__":
    main()
