#!/usr/bin/env bash
# Build .tilelang/site.tar.xz: TileLang and what it needs beyond the GPU image, for a device call that trains
# Gated DeltaNet on Hopper (FLA refuses the gated delta rule's backward on Triton 3.6.0 and runs it in TileLang
# when tilelang imports; benchmarks/RESULTS.md, eighteenth session).
#
#   bash benchmarks/tilelang_kit.sh [VERSION]      # default 0.1.15, the version measured; then carry
#                                                  # [".wheelhouse", ".tilelang"] and run benchmarks/gpu_machine.sh
#
# The wheels (tilelang, z3-solver, apache-tvm-ffi, torch-c-dlpack-ext: about 82 MB) do not fit beside the
# wheelhouse in the 64 MiB a call carries. Installed for the device's Python 3.12, with z3's command-line solver
# left out and identical shared libraries kept once, they pack into one tar.xz of about 36 MB; gpu_machine.sh
# unpacks it and puts it on the path. Beside it the wheelhouse must leave out wandb (20 MB; these runs log to no
# wandb): the script moves wandb's wheel to .wheelhouse-aside/ when the two would not fit.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."
version=${1:-0.1.15}
freeze=../shared/device/gpu-image-freeze.txt
[ -f "$freeze" ] || { echo "tilelang_kit: $freeze not found (the GPU image's packages)" >&2; exit 2; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
plat=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform linux_x86_64 --only-binary=:all:)
gpu='^(torch|triton|nvidia-.*|cuda-.*)=='  # the image's CUDA build of torch: never carried, never pinned
grep -v -E "$gpu" "$freeze" > "$tmp/image.txt"
python3 -m pip install -q --dry-run --ignore-installed --target "$tmp/t" --report "$tmp/report.json" "${plat[@]}" \
    -c "$tmp/image.txt" "tilelang==$version" 2>&1 | grep -v '^WARNING: Location' || true
python3 - "$tmp/report.json" "$tmp/image.txt" "$gpu" > "$tmp/list" <<'PY'
import json, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image = {norm(line.split("==")[0]): line.split("==")[1].strip() for line in open(sys.argv[2]) if "==" in line}
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = norm(item["metadata"]["name"]), item["metadata"]["version"]
    if image.get(name) != version and not re.match(sys.argv[3], f"{name}=="):  # $gpu: the image's own
        print(f"{name}=={version}")
PY
echo "tilelang_kit: beyond the image: $(tr '\n' ' ' < "$tmp/list")"
python3 -m pip download -q --no-deps "${plat[@]}" -d "$tmp/wheels" -r "$tmp/list" 2>&1 | grep -v '^WARNING: Location' || true
python3 -m pip install -q --no-deps --no-compile --no-index --target "$tmp/site" "${plat[@]}" "$tmp"/wheels/*.whl 2>&1 \
    | grep -v '^WARNING: Location' || true
[ -d "$tmp/site/tilelang" ] || { echo "tilelang_kit: tilelang did not install into the kit" >&2; exit 1; }
rm -rf "$tmp/site/bin" "$tmp/site/z3/bin"  # console scripts and z3's solver binary: not used by FLA's kernels
python3 - "$tmp/site" <<'PY'
import hashlib, os, sys
seen = {}
for root, _, files in sorted(os.walk(sys.argv[1])):
    for name in sorted(files):
        path = os.path.join(root, name)
        if os.path.islink(path) or os.path.getsize(path) < 1 << 20:
            continue
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        if digest in seen:  # the same library under another name (z3's libz3.so and libz3.so.4.15): a link
            os.remove(path)
            os.symlink(os.path.relpath(seen[digest], root), path)
        else:
            seen[digest] = path
PY
mkdir -p .tilelang
XZ_OPT=-9 tar cJf .tilelang/site.tar.xz -C "$tmp/site" .
size=$(du -m .tilelang/site.tar.xz | cut -f1)
echo "tilelang_kit: .tilelang/site.tar.xz, ${size} MB"
if [ -d .wheelhouse ]; then
    total=$(( size + $(du -sm .wheelhouse | cut -f1) ))
    if [ "$total" -gt 62 ]; then
        mkdir -p .wheelhouse-aside
        mv .wheelhouse/wandb-*.whl .wheelhouse-aside/ 2>/dev/null || true
        echo "tilelang_kit: wandb's wheel moved to .wheelhouse-aside/ (put it back for runs that log to wandb)"
    fi
    echo "tilelang_kit: carry [\".wheelhouse\", \".tilelang\"]: $(( size + $(du -sm .wheelhouse | cut -f1) )) MB"
fi
