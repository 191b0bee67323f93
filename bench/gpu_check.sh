#!/usr/bin/env bash
# One short check for a machine with a GPU: training, evaluation and harvest run on CUDA, with
# throughput printed; with several GPUs, also multi-process training (torchrun, NCCL). Uses the
# bundled SmolLM2 and the stdlib corpus (offline).
#
#   bash bench/gpu_check.sh            # from the repository root, after `make setup`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| GPUs:", torch.cuda.device_count())
PYEOF
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SAESCOPE="$PY -m saescope.cli"
$SAESCOPE train --out "$WORK/run" --layer 6 --latents 16384 --k 32 --tokens 300032 --context-length 128 --device cuda
$SAESCOPE eval "$WORK/run"
$SAESCOPE harvest "$WORK/run"
"$PY" - "$WORK/run" <<'PYEOF'
import json, sys
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
keys = ["fvu", "l0", "dead_fraction", "ce_clean", "ce_spliced", "kl", "sae_tokens_per_s", "end_to_end_tokens_per_s"]
print("  ".join(f"{key}={m[key]:.4g}" for key in keys if m.get(key) is not None))
PYEOF

# The training pass split into reading and steps, on a synthetic store (where a GPU's time goes).
"$PY" bench/sae_pass.py --device cuda

# More than one GPU: the same SAE on the same store over every GPU with torchrun (NCCL), data
# parallel and then latent sharded; both must land near the single-GPU run's FVU.
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 1 ]; then
  for SHARD in 0 1; do
    $SAESCOPE train --nproc "$NGPU" --shard-latents "$SHARD" --out "$WORK/run-$NGPU-$SHARD" --store "$WORK/run/activations" \
      --layer 6 --latents 16384 --k 32 --tokens 300032 --context-length 128
    $SAESCOPE eval "$WORK/run-$NGPU-$SHARD" --downstream-contexts 0
    "$PY" - "$WORK/run" "$WORK/run-$NGPU-$SHARD" "$NGPU" "$SHARD" <<'PYEOF'
import json, sys
one, many = (json.load(open(f"{run}/metrics.json")) for run in sys.argv[1:3])
mode = "latent-sharded" if sys.argv[4] == "1" else "data-parallel"
print(f"{sys.argv[3]} GPUs, {mode}: fvu={many['fvu']:.4g} (1 GPU: {one['fvu']:.4g}), "
      f"sae_tokens_per_s={many['sae_tokens_per_s']:.4g} ({many['sae_tokens_per_s'] / one['sae_tokens_per_s']:.2f}x 1 GPU)")
assert abs(many["fvu"] - one["fvu"]) < 0.01, "multi-GPU training disagrees with the single-GPU run"
PYEOF
  done
fi
