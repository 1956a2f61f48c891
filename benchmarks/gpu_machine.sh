#!/usr/bin/env bash
# Set up a bare GPU machine without network for this repo, then run timed steps, each with its own log.
#
#   bash benchmarks/gpu_machine.sh 'SECONDS:COMMAND' ['SECONDS:COMMAND' ...]
#   bash benchmarks/gpu_machine.sh '120:python3 -m pytest -q -m gpu tests/kernels/test_adamw.py' \
#       '200:PYTHONPATH=. python3 benchmarks/throughput.py --models gla-1.3B --engines flame,hf'
#
# Setup: the wheels in .wheelhouse/ (built here by the wheelhouse script beside the device docs, resolved against
# the GPU image) and this repo, installed without the network; FLA's tuning for the shapes in flame/tuning/
# restored into ~/.triton/cache (else each new shape tunes for minutes). Then each step runs under `timeout
# SECONDS`, its output in LOGS/stepN.log (LOGS: $OUT where the device tool sets it, else ./gpu-logs), a step that
# fails or runs out of time does not stop the next, and a table of every step's exit code and seconds comes last.
# With .tilelang/ carried (benchmarks/tilelang_kit.sh), TileLang is put on the path first.
# FLA's tuning results the steps added (shapes no tarball had) come back as LOGS/tuning-new.tgz: copied into
# flame/tuning/ under a name that says the GPU and the shapes, they spare the next machine that tuning.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-gpu-logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline NCCL_NVLS_ENABLE=0  # NVLink multicast off on several GPUs
install() {  # quiet unless pip fails; then its output and a stop (one wheel pip refuses stops them all)
    local out
    out=$(python3 -m pip install -q --no-deps "$@" 2>&1) || { echo "$out" >&2; echo "gpu_machine: pip install failed" >&2; exit 1; }
}
if [ -d .wheelhouse ]; then
    install --no-index .wheelhouse/*.whl
fi
install --no-build-isolation -e .
if [ -f .tilelang/site.tar.xz ]; then  # benchmarks/tilelang_kit.sh: TileLang for Gated DeltaNet on Hopper
    mkdir -p /tmp/tilelang-site && tar xJf .tilelang/site.tar.xz -C /tmp/tilelang-site
    # a .pth file, not PYTHONPATH, which a step's own `PYTHONPATH=. ...` would replace
    echo /tmp/tilelang-site > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/flame-tilelang-kit.pth"
fi
mkdir -p ~/.triton/cache && for f in flame/tuning/*.tgz; do tar xzf "$f" -C ~/.triton/cache; done
marker=$(mktemp)  # what is newer than this in the cache, the steps tuned
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)"
[ ! -f .tilelang/site.tar.xz ] || python3 -c "import tilelang; print('tilelang', tilelang.__version__)"
summary=()
n=0
for step in "$@"; do
    n=$((n + 1))
    limit=${step%%:*}
    command=${step#*:}
    echo "== step $n (${limit} s): $command"
    start=$(date +%s)
    timeout "$limit" bash -c "$command" 2>&1 | tee "$logs/step$n.log" | tail -25
    rc=${PIPESTATUS[0]}
    summary+=("step $n  rc $rc  $(($(date +%s) - start)) s  $command")
done
new=$(cd ~/.triton/cache && find . -name '*.autotune.json' -newer "$marker" | sort)
if [ -n "$new" ]; then
    (cd ~/.triton/cache && tar czf - $new) > "$logs/tuning-new.tgz"
    echo "== FLA's tuning for $(echo "$new" | wc -l) new kernel/shape pairs: $logs/tuning-new.tgz"
fi
echo "== $(date -u +%FT%TZ)"
printf '%s\n' "${summary[@]}"
