#!/usr/bin/env bash
# One short check for a machine with a GPU: training, evaluation and harvest run on CUDA, with
# throughput printed. Uses the bundled SmolLM2 and the stdlib corpus (offline).
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
