"""Benchmark `flame data prepare` against the straightforward way, at one corpus size and at double that size.

    python benchmarks/data_prepare.py                 # ~50 MB corpus, then 100 MB
    python benchmarks/data_prepare.py --size-mb 25    # a smaller pair on a slow machine

The straightforward way is what the datasets docs suggest: `load_dataset("json", data_files=...)`, `map` with
batched tokenization and `num_proc`, then `save_to_disk`. Both get the same corpus (Python sources found on this
machine, one document per file, in .jsonl shards), the same tokenizer (a byte-level BPE trained here on a
sample) and the same number of processes. Each run is its own subprocess; its peak memory is sampled every
0.1 s as the PSS (proportional set size: shared pages split between the processes sharing them, so forked
workers are not counted twice) summed over the process and all its children. Tokens/s is over the whole
command, start-up and writing included.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

STRAIGHTFORWARD = r"""
import sys
from datasets import load_dataset
from transformers import AutoTokenizer

files, tokenizer, output, cache, num_proc = sys.argv[1:6]
tok = AutoTokenizer.from_pretrained(tokenizer)
eos = tok.eos_token_id
ds = load_dataset("json", data_files=sorted(files.split(",")), split="train", cache_dir=cache)

def tokenize(batch):
    return {"input_ids": [ids + [eos] for ids in tok(batch["text"])["input_ids"]]}

ds = ds.map(tokenize, batched=True, num_proc=int(num_proc), remove_columns=ds.column_names)
ds.save_to_disk(output)
"""


def gather_sources(total_bytes: int) -> list[Path]:
    """Python files on this machine (stdlib, then site-packages), sorted, each under 1 MB, until total_bytes."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    chosen, size, seen = [], 0, set()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                n = path.stat().st_size
            except OSError:
                continue
            if not 0 < n < 1 << 20 or path.resolve() in seen:
                continue
            seen.add(path.resolve())
            chosen.append(path)
            size += n
            if size >= total_bytes:
                return chosen
    raise SystemExit(f"only {size / 1e6:.0f} MB of Python sources on this machine")


def write_corpus(paths: list[Path], folder: Path, shard_bytes: int = 8 << 20) -> list[str]:
    """One JSON document per source file, in .jsonl shards of ~8 MB (the shape of a real corpus)."""
    folder.mkdir(parents=True)
    shards, out, written = [], None, shard_bytes
    for path in paths:
        if written >= shard_bytes:
            if out:
                out.close()
            shards.append(str(folder / f"shard-{len(shards):04d}.jsonl"))
            out, written = open(shards[-1], "w"), 0
        line = json.dumps({"text": path.read_text(encoding="utf-8", errors="replace"), "path": str(path)}) + "\n"
        out.write(line)
        written += len(line)
    out.close()
    return shards


def measure(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """Wall seconds, peak summed PSS (bytes) and CPU seconds (user + sys) of a command and all its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    # Output goes to a file: a pipe nobody reads while the command runs would block it once full.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak = max(peak, total)
        time.sleep(0.1)
    seconds = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Pool workers are reaped by the command, so their CPU time is in its children's total, hence in ours.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    log.seek(0)
    output = log.read()
    log.close()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{output[-3000:]}")
    return seconds, peak, cpu


def tokens_in(folder: str) -> int:
    import datasets

    ds = datasets.load_from_disk(folder)
    splits = ds.values() if isinstance(ds, datasets.DatasetDict) else [ds]
    total = 0
    for split in splits:
        for batch in split.with_format("arrow").iter(batch_size=10_000):
            import pyarrow.compute as pc

            total += pc.sum(pc.list_value_length(batch["input_ids"])).as_py()
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=50, help="first corpus size; the second is double")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(), help="processes for both ways")
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir, removed)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="flame-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "FLAME_QUIET": "1",
    }
    size = int(args.size_mb * 1e6)
    try:
        sources = gather_sources(2 * size)
        half = next(i for i in range(len(sources)) if sum(p.stat().st_size for p in sources[: i + 1]) >= size) + 1
        corpora = {1: write_corpus(sources[:half], work / "corpus-1x")}
        # Double: the same documents plus as many new ones, so the second corpus is 2x with no repeats.
        corpora[2] = corpora[1] + write_corpus(sources[half:], work / "corpus-2x-extra")
        sample = work / "tokenizer-sample"
        sample.mkdir()
        shutil.copy(corpora[1][0], sample / "sample.jsonl")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "flame",
                "data",
                "tokenizer",
                str(sample),
                "--vocab-size",
                str(args.vocab_size),
                "--output",
                str(work / "tokenizer"),
            ],
            env=env,
            check=True,
            capture_output=True,
        )

        rows = []
        for scale, files in corpora.items():
            mb = sum(os.path.getsize(f) for f in files) / 1e6
            runs = {}
            flame_out = work / f"flame-{scale}x"
            flame_in = work / f"flame-in-{scale}x"
            flame_in.mkdir()
            for f in files:
                os.symlink(f, flame_in / Path(f).name.replace("shard", Path(f).parent.name))
            cmd = [
                sys.executable,
                "-m",
                "flame",
                "data",
                "prepare",
                "--dataset",
                str(flame_in),
                "--tokenizer",
                str(work / "tokenizer"),
                "--output",
                str(flame_out),
                "--num-proc",
                str(args.num_proc),
                "--val-docs",
                "0",
            ]
            runs["flame"] = (*measure(cmd, env), tokens_in(str(flame_out)))
            hf_out = work / f"datasets-{scale}x"
            cmd = [
                sys.executable,
                "-c",
                STRAIGHTFORWARD,
                ",".join(files),
                str(work / "tokenizer"),
                str(hf_out),
                str(work / f"hf-cache-{scale}x"),
                str(args.num_proc),
            ]
            runs["datasets"] = (*measure(cmd, env), tokens_in(str(hf_out)))
            assert runs["flame"][3] == runs["datasets"][3], f"token counts differ: {runs}"
            for way, (seconds, peak, cpu, tokens) in runs.items():
                rows.append((f"{mb:.0f} MB", way, seconds, tokens / seconds, tokens / cpu, peak / 2**20))
                print(
                    f"{mb:6.0f} MB  {way:9s} {seconds:7.1f} s  {tokens / seconds / 1e3:8.1f} K tokens/s  "
                    f"{tokens / cpu / 1e3:8.1f} K tokens/cpu-s  peak {peak / 2**20:7.0f} MiB  ({tokens:,} tokens)",
                    flush=True,
                )
            (fs, _, fc, ft), (ds, _, dc, dt) = runs["flame"], runs["datasets"]
            print(
                f"{mb:6.0f} MB  flame / datasets: tokens/s {(ft / fs) / (dt / ds):.2f}x, "
                f"tokens per CPU-second {(ft / fc) / (dt / dc):.2f}x",
                flush=True,
            )
            shutil.rmtree(flame_out)
            shutil.rmtree(hf_out)
            shutil.rmtree(work / f"hf-cache-{scale}x", ignore_errors=True)

        print("\n| corpus | way | seconds | tokens/s | tokens/CPU-s | peak memory (PSS, MiB) |")
        print("|---|---|---|---|---|---|")
        for corpus, way, seconds, rate, cpu_rate, peak in rows:
            print(f"| {corpus} | {way} | {seconds:.1f} | {rate / 1e3:.0f}K | {cpu_rate / 1e3:.0f}K | {peak:.0f} |")
        print(
            f"\nmachine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}, "
            f"num_proc {args.num_proc}, vocab {args.vocab_size}"
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
