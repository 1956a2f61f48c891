#!/usr/bin/env bash
# The training half of the demo: `bash configs/demo.sh` calls this once .demo/data is prepared.
#
# Trains configs/demo_gla.json (a 4-layer GLA, 4096-token vocab) with `flame train` for a few minutes on whatever
# is here: a GPU (bf16, FLA's Triton kernels) or the CPU (fp32, flame.kernels' torch versions), then samples from
# the checkpoint. Re-running continues the run from its newest checkpoint instead of starting over.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEMO=.demo
RUN="$DEMO/run"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    SETTINGS=(--context 1024 --batch 32 --steps "${DEMO_STEPS:-600}" --lr 2e-3 --warmup 50 --logging 20 --save 200 --eval 200)
    echo "demo: training on the GPU"
else
    # 1K tokens per update at about 2.9K tokens/s on 2 quiet CPU cores (measured 2026-11-28): ~1.5 minutes;
    # several times that on a busy machine (DEMO_STEPS=... for a longer or shorter run).
    SETTINGS=(--context 256 --batch 4 --steps "${DEMO_STEPS:-240}" --lr 2e-3 --warmup 16 --logging 10 --save 120 --eval 60)
    echo "demo: training on the CPU (no GPU found); a GPU runs the same command with bf16 and Triton kernels"
fi

RESUME=()
LATEST=$(ls -d "$RUN"/checkpoints/step-* 2>/dev/null | sort | tail -n 1 || true)
if [ -n "$LATEST" ]; then
    RESUME=(--checkpoint "$LATEST")
    echo "demo: continuing from $LATEST"
fi

"$PY" -m flame train --model configs/demo_gla.json --cache "$DEMO/data" --path "$RUN" --type demo-gla \
    --scheduler cosine --seed 42 "${SETTINGS[@]}" "${RESUME[@]}"

LATEST=$(ls -d "$RUN"/checkpoints/step-* | sort | tail -n 1)
"$PY" - "$RUN" "$LATEST" <<'PY'
import json, sys

run, ckpt = sys.argv[1], sys.argv[2]
records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
first, last = records[0]["loss"], records[-1]["loss"]
print(f"\ndemo: loss {first:.3f} at step {records[0]['step']} -> {last:.3f} at step {records[-1]['step']} "
      f"({100 * (1 - last / first):.0f}% lower), {records[-1]['tokens']:,} tokens")
evals = [r for r in records if r.get("val_loss") is not None]
if len(evals) > 1:
    a, b = evals[0], evals[-1]
    print(f"demo: validation loss (held-out files) {a['val_loss']:.3f} at step {a['step']} -> "
          f"{b['val_loss']:.3f} at step {b['step']}")

import warnings

warnings.filterwarnings("ignore")  # FLA's notices (no Triton on a CPU; generate()'s cache argument)

import flame.kernels

flame.kernels.install()  # imports fla, which registers the GLA model type with transformers

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
model = AutoModelForCausalLM.from_pretrained(f"{ckpt}/model")
tokenizer = AutoTokenizer.from_pretrained(f"{ckpt}/model")
prompt = tokenizer("def __init__(self", return_tensors="pt").input_ids
torch.manual_seed(0)
with torch.no_grad():
    out = model.generate(prompt, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=40)
print("demo: a sample from the checkpoint (temperature 0.8):\n" + tokenizer.decode(out[0]))
print(f"""
demo: checkpoint   {ckpt}
      model dir    {ckpt}/model   (AutoModelForCausalLM.from_pretrained after `import fla`)
      metrics      {run}/metrics.jsonl
      inspect      flame inspect {run}   (the run: progress, checkpoints, loss curve)
                   flame inspect {ckpt}   (the checkpoint: weights, state, integrity)
      continue     bash configs/demo_train.sh   (or: flame train ... --checkpoint {ckpt} --steps MORE)""")
PY
