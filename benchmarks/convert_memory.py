"""Peak memory of `flame convert from-llama` against the size of the model it writes.

    python benchmarks/convert_memory.py             # ~1.1B Llama (TinyLlama geometry) -> GLA, bf16
    python benchmarks/convert_memory.py --size 160m # a quick run

Writes a Llama checkpoint with random bf16 weights (sharded safetensors, written one tensor at a time so making it
costs no memory), then converts it into GLA of the same geometry in a child process and reads that child's peak
RSS (VmHWM). A second child that only imports what the conversion imports gives the fixed cost of the
interpreter and libraries, so what the conversion itself holds is peak - baseline, compared with the target's size.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SIZES = {
    # TinyLlama-1.1B's geometry: grouped-query attention, 4 kv heads of 64 dims.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip
SHARD_BYTES = 1 << 30


def llama_shapes(g: dict) -> dict[str, tuple[int, ...]]:
    h, i, kv = g["hidden_size"], g["intermediate_size"], g["num_key_value_heads"] * g["hidden_size"] // g[
        "num_attention_heads"]  # fmt: skip
    shapes = {"model.embed_tokens.weight": (g["vocab_size"], h)}
    for n in range(g["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (g["vocab_size"], h)}


def write_llama(out: Path, g: dict) -> int:
    """A Llama model dir with random bf16 weights in ~1 GiB shards; returns the bytes of weights."""
    out.mkdir(parents=True)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], dtype="bfloat16", rms_norm_eps=1e-5, **g)
    (out / "config.json").write_text(json.dumps(config))
    shards, shard, size, total = [], {}, 0, 0
    for name, shape in llama_shapes(g).items():
        t = torch.randn(shape, dtype=torch.bfloat16) * 0.02
        shard[name], size = t, size + t.nbytes
        if size >= SHARD_BYTES:
            shards.append(shard)
            save_file(shard, out / f"part-{len(shards)}.safetensors")
            total, shard, size = total + size, {}, 0
    if shard:
        shards.append(shard)
        save_file(shard, out / f"part-{len(shards)}.safetensors")
        total += size
    n = len(shards)
    weight_map = {}
    for k, s in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        (out / f"part-{k}.safetensors").rename(out / name)
        weight_map |= dict.fromkeys(s, name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def child_peak(code: str) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of a python child running `code`.

    The child reports its own VmHWM: ru_maxrss of a child also counts the parent's pages it had between fork and
    exec (here, the source just written), which would hide the conversion's own peak.
    """
    t = time.time()
    report = "; print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    proc = subprocess.run([sys.executable, "-c", code + report], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    return int(proc.stdout.split()[-1]) / 2**20, time.time() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir, removed)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="flame-convert-bench-"))
    g = SIZES[args.size]
    try:
        t = time.time()
        source_bytes = write_llama(root / "llama", g)
        print(f"source: {source_bytes / 2**30:.2f} GiB of bf16 weights, written in {time.time() - t:.0f}s")
        keep = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
        cfg = dict(model_type="gla", num_heads=g["num_attention_heads"], num_kv_heads=g["num_key_value_heads"],
                   expand_k=1, expand_v=1, **{k: g[k] for k in keep})  # fmt: skip
        (root / "gla.json").write_text(json.dumps(cfg))

        baseline, _ = child_peak("import fla, transformers, flame.convert, flame.models")
        code = (
            "from pathlib import Path; from flame.convert import ConvertOptions, convert_from_llama; "
            f"convert_from_llama(ConvertOptions(model={str(root / 'llama')!r}, "
            f"config=Path({str(root / 'gla.json')!r}), output=Path({str(root / 'gla')!r})))"
        )
        peak, seconds = child_peak(code)
        target_bytes = sum(f.stat().st_size for f in (root / "gla").glob("*.safetensors"))
        held = peak - baseline
        print(f"target: {target_bytes / 2**30:.2f} GiB written; conversion {seconds:.0f}s")
        print(f"peak RSS {peak:.2f} GiB, baseline (imports) {baseline:.2f} GiB, held by the conversion {held:.2f} GiB")
        print(f"held / target size = {held / (target_bytes / 2**30):.2f}")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
