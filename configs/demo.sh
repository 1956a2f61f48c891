#!/usr/bin/env bash
# flame demo, end to end on a built-in corpus: `make demo` (or `bash configs/demo.sh`).
#
# 1. corpus    the Python standard library's own sources on this machine, one document per file
# 2. tokenizer a 4096-token byte-level BPE trained offline on that corpus (no hub access needed)
# 3. prepare   tokenize the corpus into a prepared dataset (.demo/data)
# Re-running skips every step whose output is already there; `make clean` (or rm -rf .demo) starts over.
set -euo pipefail
cd "$(dirname "$0")/.."

# The project's venv when there is one (make demo), else the active python; PY=... overrides.
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
flame() { "$PY" -m flame "$@"; }
DEMO=.demo
mkdir -p "$DEMO"

# 1. Corpus: stdlib modules and packages one level down (tests, GUI and vendored code left out), ~10 MB.
if [ ! -f "$DEMO/corpus/stdlib.jsonl" ]; then
    echo "demo: building the corpus from the Python standard library"
    "$PY" - "$DEMO/corpus" <<'PY'
import glob, json, os, sys, sysconfig

out = sys.argv[1]
root = sysconfig.get_paths()["stdlib"]
skip = ("site-packages", "/test", "/idlelib", "/lib2to3", "/tkinter", "/turtledemo")
files = sorted(p for p in glob.glob(f"{root}/*.py") + glob.glob(f"{root}/*/*.py") if not any(s in p for s in skip))
os.makedirs(out, exist_ok=True)
tmp = os.path.join(out, ".stdlib.jsonl.tmp")
with open(tmp, "w") as f:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as src:
            f.write(json.dumps({"text": src.read(), "path": os.path.relpath(path, root)}) + "\n")
os.replace(tmp, os.path.join(out, "stdlib.jsonl"))
print(f"demo: {len(files)} files from {root}")
PY
fi

# 2. Tokenizer, trained offline.
if [ ! -f "$DEMO/tokenizer/tokenizer.json" ]; then
    flame data tokenizer "$DEMO/corpus" --vocab-size 4096 --output "$DEMO/tokenizer" --overwrite
fi

# 3. Prepared dataset: documents whole with EOS, 50 held out for validation.
if [ ! -f "$DEMO/data/manifest.json" ]; then
    flame data prepare --dataset "$DEMO/corpus" --tokenizer "$DEMO/tokenizer" --output "$DEMO/data" \
        --context_length 512 --val-docs 50 --overwrite
fi

# ---- training goes here ------------------------------------------------------------------------------------------
# The engine appends `flame train` on $DEMO/data (tokenizer: $DEMO/data/tokenizer) below this line.
