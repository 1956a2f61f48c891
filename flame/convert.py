"""Start an FLA model from a Llama-family checkpoint (the GSA paper's recipe, arXiv 2409.07146, section 4.2).

    flame convert from-llama --model mistralai/Mistral-7B-v0.1 --config configs/gla_7B_mistral.json \\
        --output converted/gla-7B

The target model is built from an FLA config (GLA, Gated DeltaNet, DeltaNet, GSA, RetNet, FLA's transformer: every
family whose layers have q/k/v/o projections and a gated MLP) and keeps its own initialisation for what Llama does
not have (gates, short convolutions, output norms). Everything Llama has is copied: embeddings, both norms of every
layer, q/k/v/o (and their biases where the target has them), the MLP's gate/up/down, the final norm and the LM head.

Memory: the source is read one tensor at a time, straight from its files (see `_read_tensor`), into the target that
was built once in the target dtype; so the peak stays near one copy of the target plus the largest source tensor.
"""

import functools
import gc
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch

from flame import checkpoint as ckpt
from flame import hub, models
from flame.data.tokenizer import replace_dir
from flame.errors import CheckpointError, ConfigError, ModelError, check_output_dir, first_line
from flame.ui import RateColumn, err_console, interactive, progress

# model_type -> the architecture name transformers writes for it. Qwen2 is Llama with q/k/v biases; Mistral is
# Llama with a sliding window (which a linear-attention target does not need).
SOURCE_FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# What the tokenizer of a transformers model dir is made of; copied as files, byte for byte.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# Bounds the extra memory of saving: safetensors serialises one shard at a time.
OUTPUT_SHARD_SIZE = "1GB"


class DType(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class VocabPolicy(str, Enum):
    source = "source"
    config = "config"


@dataclass
class ConvertOptions:
    model: str
    """Source model: a local transformers model dir or a hub id (Llama, Mistral or Qwen2 architecture)."""
    config: Path
    """FLA model config JSON (e.g. configs/gla_7B_mistral.json for Mistral-7B); its hidden size and layer count must
    match the source."""
    output: Path
    """Model dir to write: config.json, *.safetensors and the source's tokenizer."""
    dtype: DType | None = None
    """Dtype of the converted weights; default: the source's."""
    overwrite: bool = False
    """Replace OUTPUT if it exists (the old dir is removed only once the new one is complete)."""
    allow_partial: bool = False
    """Keep the target's initialisation where a tensor's shape does not fit, and drop source tensors the target has no
    place for (e.g. Qwen2's q/k/v biases in GLA), instead of stopping with an error. Every one is listed."""
    vocab: VocabPolicy = VocabPolicy.source
    """When the config's vocab_size differs from the source's: 'source' takes the source's (its tokenizer is copied);
    'config' keeps the config's, truncating the embedding and LM head rows or extending them with new rows."""
    seed: int = 0
    """Seed of the target's initialisation (the parameters Llama does not have): the same inputs give the same model."""


@dataclass
class Planned:
    """One target tensor filled from one source tensor: target[region] = transform(source)."""

    target: str
    source: str
    kind: str  # "copied" or "reshaped"
    note: str = ""
    transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    rows: int | None = None  # only the first `rows` rows come from the source (vocab extended)


@dataclass
class ConvertReport:
    output: Path
    source: str
    source_architecture: str
    target_type: str
    dtype: str
    total_params: int
    counts: dict[str, tuple[int, int]]
    """kind -> (tensors, parameters) for copied, reshaped, newly initialised."""
    new: list[str] = field(default_factory=list)
    """Target tensors that keep their initialisation, grouped over layers."""
    reshaped: list[str] = field(default_factory=list)
    """Target tensors filled from a source tensor of another shape, with how."""
    dropped: list[str] = field(default_factory=list)
    """Source tensors the target has no place for (only with --allow-partial)."""
    config_changes: list[tuple[str, object, object]] = field(default_factory=list)
    """(key, config's value, value written) for what the source decides."""
    verified: int = 0
    """Tensors read back from the written files and found equal to their source."""
    tokenizer_files: list[str] = field(default_factory=list)


# --- reading the source, one tensor at a time ------------------------------------------------------------------

_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str
    offsets: tuple[int, int] = (0, 0)
    """Absolute byte range in a safetensors file."""
    key: str = ""
    """The tensor's name in a pytorch_model*.bin file."""


def _safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensor table of a safetensors file, each tensor's absolute byte range in it."""
    size = path.stat().st_size
    try:
        header, start = ckpt.safetensors_header(path)
    except ckpt.NotSafetensors as e:
        raise CheckpointError(
            f"{path} is not a safetensors file" + (" but a git-lfs pointer" if e.lfs else " (damaged or truncated)"),
            "run `git lfs pull` in that clone" if e.lfs else "download or save the checkpoint again",
        ) from None
    table = {
        name: TensorInfo(
            path, tuple(h["shape"]), h["dtype"], (start + h["data_offsets"][0], start + h["data_offsets"][1])
        )
        for name, h in header.items()
    }
    if (end := max((t.offsets[1] for t in table.values()), default=start)) > size:
        raise CheckpointError(
            f"{path} is truncated ({size:,} of the {end:,} bytes its header lists)", "download or save it again"
        )
    return table


def _read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor, read with plain file I/O.

    safetensors' safe_open maps the whole shard and every page read stays mapped (and counted in RSS) until the
    shard is closed; a 7B checkpoint has 5-10 GB shards. Reading into a fresh buffer keeps the peak at one tensor.
    """
    if info.file.suffix != ".safetensors":
        return _load_bin(info.file)[info.key].clone()
    if info.dtype not in _ST_DTYPES:
        raise CheckpointError(f"{info.file} holds a tensor of dtype {info.dtype}", "convert it to bf16/fp16/fp32 first")
    begin, end = info.offsets
    buf = torch.empty(end - begin, dtype=torch.uint8)
    with open(info.file, "rb") as f:
        f.seek(begin)
        if f.readinto(buf.numpy()) != end - begin:
            raise CheckpointError(f"{info.file} is truncated", "download or save the checkpoint again")
    return buf.view(_ST_DTYPES[info.dtype]).reshape(info.shape)


def tensor_table(model_dir: Path) -> dict[str, TensorInfo]:
    """Name -> where the tensor lives, over all shards, without reading any data; a CheckpointError naming the file
    for a missing shard, a git-lfs pointer, or a file shorter than its header says."""
    # model*.safetensors: Mistral's repos also hold consolidated.safetensors (mistral-inference's names, same data).
    files = sorted(model_dir.glob("model*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        if missing := [f.name for f in files if not f.is_file()]:
            raise CheckpointError(
                f"{index} names {len(missing)} shard(s) that are not there ({', '.join(missing[:3])})",
                "download the checkpoint again, every shard",
            )
    if files:
        table = {}
        for f in files:
            table.update(_safetensors_header(f))
        return table
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(
            f"{model_dir} has no weights (model*.safetensors or pytorch_model*.bin)", "pass a transformers model dir"
        )
    table = {}
    for f in bins:
        # mmap: only the tensor table is needed here, the data is read when copied.
        for name, t in _load_bin(f).items():
            table[name] = TensorInfo(f, tuple(t.shape), str(t.dtype), key=name)
    return table


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model*.bin state dict, memory-mapped (its data is read when a tensor is used); a file saved in
    torch's legacy (pre-1.6) format cannot be mapped and is read whole. Tensors are copied file by file, so the
    last file read serves the next tensor too (kept while the file is unchanged)."""
    stat = path.stat()
    return _load_bin_once(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _load_bin_once(path: Path, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "_use_new_zipfile_serialization" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch state dict ({type(e).__name__}: {first_line(e)})",
            "download or save the checkpoint again",
        ) from e


def _source_dtype(table: dict[str, TensorInfo], raw_config: dict) -> torch.dtype:
    name = raw_config.get("dtype") or raw_config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    first = next(iter(table.values()))
    if first.file.suffix == ".safetensors":
        return _ST_DTYPES.get(first.dtype, torch.float32)
    return _read_tensor(first).dtype


# --- the source --------------------------------------------------------------------------------------------------


def resolve_source(model: str) -> Path:
    """A local model dir as is; otherwise a hub id, fetched (weights, config and tokenizer only)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"--model {model} is a file", "pass the model's directory (config.json + weights)")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise ModelError(f"--model {model}: no such directory", "pass a local model dir or a hub id like org/name")
    from huggingface_hub import snapshot_download

    hub.offline_unless_reachable()
    try:
        patterns = ["*.json", "model*.safetensors", "*.model", "*.txt", "*.jinja"]
        path = Path(snapshot_download(model, allow_patterns=patterns))
        if not any(path.glob("model*.safetensors")):  # an older repo: its weights only as PyTorch .bin files
            path = Path(
                snapshot_download(model, allow_patterns=["pytorch_model*.bin", "pytorch_model*.bin.index.json"])
            )
        return path
    except Exception as e:  # the hub client raises many kinds (offline, gated, not found); all mean the same here
        raise ModelError(
            f"--model {model} is not a local directory and could not be fetched from the hub ({type(e).__name__})",
            "check the hub id, your network and HF_HUB_OFFLINE, or pass a local model dir",
        ) from e


def read_source_config(source: Path):
    """The source's transformers config, after checking that it is a Llama-family model."""
    path = source / "config.json"
    if not path.exists():
        raise ModelError(f"{source} has no config.json", "pass a transformers model dir")
    raw = json.loads(path.read_text())
    model_type = raw.get("model_type")
    if model_type not in SOURCE_FAMILIES:
        arch = ", ".join(raw.get("architectures") or []) or f"model_type {model_type!r}"
        raise ModelError(
            f"{source} is a {arch} model, not Llama-family",
            f"from-llama reads {', '.join(SOURCE_FAMILIES.values())} checkpoints",
        )
    from transformers import AutoConfig

    return raw, AutoConfig.from_pretrained(source)


def _rope_theta(cfg) -> float | None:
    # transformers 5 keeps it in rope_parameters; 4.x had a plain attribute.
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(cfg, "rope_theta", None))


# --- the target ---------------------------------------------------------------------------------------------------


def target_config(opts: ConvertOptions, src, table: dict[str, TensorInfo], changes: list):
    """The FLA config from --config, with what the source decides taken from the source."""
    from flame.models import load_config

    cfg = load_config(opts.config)
    problems = [
        f"{key}={getattr(cfg, key)} but the source has {getattr(src, key)}"
        for key in ("hidden_size", "num_hidden_layers")
        if getattr(cfg, key, None) != getattr(src, key)
    ]
    if problems:
        raise ConfigError(
            f"--config {opts.config} does not fit the source: {'; '.join(problems)}",
            "use a config with the source's hidden_size and num_hidden_layers",
        )

    def take(key, value):
        if hasattr(cfg, key) and value is not None and getattr(cfg, key) != value:
            changes.append((key, getattr(cfg, key), value))
            setattr(cfg, key, value)

    # The copied norms were trained with the source's eps; the copied LM head is (or is not) the embedding; the
    # tokenizer is the source's, so are its special ids.
    take("norm_eps", src.rms_norm_eps)
    take("tie_word_embeddings", bool(getattr(src, "tie_word_embeddings", False)))
    take("max_position_embeddings", src.max_position_embeddings)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        take(key, getattr(src, key, None))
    # Only FLA's transformer (and hybrid attention layers) use rotary embeddings and q/k/v biases.
    take("rope_theta", _rope_theta(src))
    if any(n.endswith("self_attn.q_proj.bias") for n in table):
        take("qkv_bias", True)
    if opts.vocab is VocabPolicy.source:
        take("vocab_size", src.vocab_size)
    return cfg


def _check_vocab(target: int, rows: int, source: Path) -> None:
    """A vocabulary cut below the copied tokenizer's size gives a model its own tokenizer's ids index past; cutting
    only padding rows (embeddings larger than the tokenizer) is fine."""
    if target >= rows or not any((source / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        return
    from transformers import AutoTokenizer

    try:
        size = len(AutoTokenizer.from_pretrained(source))
    except Exception:  # a tokenizer transformers cannot load is copied as it is; nothing to count against
        return
    if target < size:
        raise ConfigError(
            f"--vocab config: the config's vocab_size {target:,} is below the {size:,} tokens of the source's "
            "tokenizer, which is copied: its ids would index past the embedding",
            f"set vocab_size to at least {size:,} in the config, or leave --vocab at source",
        )


def build_target(cfg, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM

    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream as it was
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    except ImportError as e:  # FLA's softmax attention needs flash-attn at construction
        raise ModelError(
            f"cannot build the {cfg.model_type} model: {e}", "install what it names, or pick another config"
        ) from e


# --- the mapping --------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_PROJ = re.compile(r"attn\.([qkvo])_proj\.(weight|bias)")
_MLP = re.compile(r"mlp\.(gate|up|down)_proj\.(weight|bias)")


def source_name(target: str, src_tied: bool) -> str | None:
    """The Llama tensor that becomes this FLA tensor, or None (an FLA-only parameter)."""
    if target == "model.embeddings.weight":
        return "model.embed_tokens.weight"
    if target == "model.norm.weight":
        return target
    if target == "lm_head.weight":
        return "model.embed_tokens.weight" if src_tied else target
    m = _LAYER.fullmatch(target)
    if not m:
        return None
    i, rest = m.groups()
    if rest in _LAYER_NAMES:
        return f"model.layers.{i}.{_LAYER_NAMES[rest]}"
    if p := _PROJ.fullmatch(rest):
        return f"model.layers.{i}.self_attn.{p[1]}_proj.{p[2]}"
    if _MLP.fullmatch(rest):
        return f"model.layers.{i}.{rest}"
    return None


def _repeat_kv(n_rep: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Grouped-query k/v -> one k/v head per target head: kv head j serves query heads j*n_rep..(j+1)*n_rep-1
    (transformers' repeat_kv), so repeating each head n_rep times in place keeps every query head's keys."""

    def f(t: torch.Tensor) -> torch.Tensor:
        heads = t.reshape(-1, head_dim, *t.shape[1:])
        return heads.repeat_interleave(n_rep, dim=0).reshape(-1, *t.shape[1:])

    return f


def plan(
    target_shapes: dict[str, tuple[int, ...]], table: dict[str, TensorInfo], src
) -> tuple[list[Planned], list[str], list[tuple[str, str]], list[str]]:
    """(planned copies, target tensors left as initialised, shape mismatches as (what, source tensor), source
    tensors not used: those of the mismatches and those with no place in the target)."""
    src_tied = bool(getattr(src, "tie_word_embeddings", False))
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    kv_heads = getattr(src, "num_key_value_heads", None) or src.num_attention_heads
    group = src.num_attention_heads // kv_heads
    planned, new, mismatched, used = [], [], [], set()
    for name, shape in target_shapes.items():
        sname = source_name(name, src_tied)
        if sname is None or sname not in table:
            new.append(name)
            continue
        used.add(sname)
        sshape = table[sname].shape
        if sshape == shape:
            planned.append(Planned(name, sname, "copied"))
            continue
        is_kv = re.search(r"attn\.[kv]_proj\.", name) is not None
        rep = shape[0] // sshape[0] if shape[0] % sshape[0] == 0 else 0
        if is_kv and shape[1:] == sshape[1:] and rep > 1 and group % rep == 0:
            planned.append(
                Planned(
                    name,
                    sname,
                    "reshaped",
                    f"{sshape[0] // head_dim} -> {shape[0] // head_dim} kv heads (repeated)",
                    _repeat_kv(rep, head_dim),
                )
            )
        elif name in ("model.embeddings.weight", "lm_head.weight") and shape[1:] == sshape[1:]:
            if shape[0] < sshape[0]:
                planned.append(
                    Planned(
                        name,
                        sname,
                        "reshaped",
                        f"vocab {sshape[0]} -> {shape[0]} (truncated)",
                        lambda t, n=shape[0]: t[:n],
                    )
                )
            else:
                planned.append(
                    Planned(
                        name,
                        sname,
                        "reshaped",
                        f"vocab {sshape[0]} -> {shape[0]} (rows {sshape[0]}+ new)",
                        rows=sshape[0],
                    )
                )
        else:
            used.discard(sname)  # not copied: listed with the dropped source tensors
            mismatched.append((f"{name} {list(shape)} (target) vs {list(sshape)} (source)", sname))
            new.append(name)
    # A tied source may still store its LM head; it is the embedding, so nothing is lost.
    dropped = [n for n in table if n not in used and not (src_tied and n == "lm_head.weight")]
    return planned, new, mismatched, dropped


def group_names(names: list[str]) -> list[str]:
    """model.layers.3.attn.g_proj.weight over 32 layers -> 'model.layers.*.attn.g_proj.weight (32)'."""
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"\.layers\.\d+\.", ".layers.*.", n)
        counts[key] = counts.get(key, 0) + 1
    return [f"{k} ({c})" if "*" in k else k for k, c in counts.items()]


# --- writing and checking -----------------------------------------------------------------------------------------


def _progress_iter(items: list, label: str, by_file: Callable) -> Iterator:
    """Iterate with a rich bar (tensors/s, ETA) on a terminal, one plain line per file elsewhere."""
    if interactive():
        with progress(RateColumn(unit="tensors")) as bar:
            task = bar.add_task(label, total=len(items))
            for item in items:
                yield item
                bar.advance(task)
        return
    last = None
    for item in items:
        f = by_file(item)
        if f != last:
            err_console.print(f"{label}: {f}")
            last = f
        yield item


@contextmanager
def _phase(label: str):
    """A step with no count to show (building, saving): a spinner on a terminal, one plain line elsewhere."""
    if interactive():
        with err_console.status(label):
            yield
    else:
        err_console.print(label)
        yield


def _copy_tokenizer(source: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
            copied.append(name)
    return copied


def _check_output(opts: ConvertOptions) -> None:
    check_output_dir(
        opts.output,
        [opts.model, opts.config],
        overwrite=opts.overwrite,
        replaces=("config.json",),
        what="a model dir",
        never=("checkpoints", "metrics.jsonl", "manifest.json"),  # a run dir's config.json is no model's
    )


def _save(model, out: Path) -> None:
    """save_pretrained without its own tqdm bar (ours reports the copy; the save is one step)."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model.save_pretrained(out, max_shard_size=OUTPUT_SHARD_SIZE)
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def verify(out: Path, planned: list[Planned], table: dict[str, TensorInfo]) -> int:
    """Read every planned tensor back from the written files and compare it with its source, bit for bit (after
    the cast to the output dtype): proves the mapping and the save, not just the in-memory copy."""
    written = {}
    for f in sorted(out.glob("*.safetensors")):
        written.update(_safetensors_header(f))
    bad = []
    items = sorted(planned, key=lambda p: (str(table[p.source].file), table[p.source].offsets))
    for p in _progress_iter(items, "verify", lambda p: table[p.source].file.name):
        if p.target not in written:
            bad.append(f"{p.target} (not written)")
            continue
        got = _read_tensor(written[p.target])
        # Cast as the copy did (to the parameter's dtype: FLA keeps a few parameters in fp32 in any model dtype).
        expected = p.transform(_read_tensor(table[p.source])).to(got.dtype)
        if p.rows is not None:
            got = got[: p.rows]
        if got.shape != expected.shape or not torch.equal(got, expected):
            bad.append(p.target)
    if bad:
        raise CheckpointError(f"{len(bad)} written tensors differ from their source: {', '.join(bad[:5])}", "report it")
    return len(items)


def convert_from_llama(opts: ConvertOptions) -> ConvertReport:
    """Convert; returns what was copied, reshaped and newly initialised. Nothing is written unless it all works."""
    # realpath: `.` has no name to put a temp dir beside, and a link is written where it points (the link stays)
    opts.output = Path(os.path.realpath(os.path.expanduser(opts.output)))
    _check_output(opts)
    models.name_cpu_accelerator()
    source = resolve_source(opts.model)
    raw, src = read_source_config(source)
    table = tensor_table(source)
    changes: list[tuple[str, object, object]] = []
    cfg = target_config(opts, src, table, changes)
    if cfg.model_type in SOURCE_FAMILIES:  # e.g. configs/transformer_*.json, the baselines, are transformers' Llama
        raise ConfigError(
            f"--config {opts.config} is a {cfg.model_type} model, not an FLA one: there is nothing to convert into",
            "give an FLA family's config (gla, gated_deltanet, delta_net, ...; FLA's softmax baseline is "
            "model_type transformer)",
        )
    _check_vocab(cfg.vocab_size, src.vocab_size, source)
    dtype = getattr(torch, opts.dtype.value) if opts.dtype else _source_dtype(table, raw)

    # Shapes first, from a model on the meta device (no memory, no time): a config that does not fit is one line in
    # seconds, not after a 7B model is built.
    with torch.device("meta"):
        meta = build_target(cfg, dtype, opts.seed)
    shapes = {n: tuple(p.shape) for n, p in meta.named_parameters()}  # tied weights appear once
    del meta
    if not any(_PROJ.search(n) for n in shapes) or not any(_MLP.search(n) for n in shapes):
        raise ModelError(
            f"the {cfg.model_type} model has no q/k/v/o projections and gated MLP to copy Llama's into",
            "use a GLA, Gated DeltaNet, DeltaNet, GSA, RetNet or transformer config",
        )
    planned, new, mismatched, dropped = plan(shapes, table, src)
    if (mismatched or dropped) and not opts.allow_partial:
        unfit = [d for d in dropped if d not in {src_name for _, src_name in mismatched}]
        what = [f"shapes differ: {m}" for m in group_names([m for m, _ in mismatched])[:3]]
        what += [f"no place in the target: {d}" for d in group_names(unfit)[:3]]
        fix = (
            "fix the config (heads, intermediate_size, expand_k/expand_v, head_dim), or pass --allow-partial to keep "
            "the target's initialisation for them"
            if mismatched
            else "pass --allow-partial to leave them out (each is listed; no config gives them a place)"
        )
        raise ConfigError(
            f"{len(mismatched)} tensors do not fit and {len(unfit)} source tensors have no place in the "
            f"{cfg.model_type} model ({'; '.join(what)})",
            fix,
        )

    with _phase(f"build: {cfg.model_type} model in {str(dtype).removeprefix('torch.')} (seed {opts.seed})"):
        model = build_target(cfg, dtype, opts.seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        items = sorted(planned, key=lambda p: (str(table[p.source].file), table[p.source].offsets))
        for p in _progress_iter(items, "copy", lambda p: table[p.source].file.name):
            value = p.transform(_read_tensor(table[p.source]))
            target = params[p.target]
            (target[: p.rows] if p.rows is not None else target).copy_(value)

    opts.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = opts.output.with_name(f".{opts.output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _phase(f"save: {opts.output}"):
            _save(model, tmp)
        tokenizer_files = _copy_tokenizer(source, tmp)
        counts = _counts(shapes, planned, new)
        del model, params
        gc.collect()
        verified = verify(tmp, planned, table)
        replace_dir(str(tmp), str(opts.output))  # an old one is removed only after the new one is there
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _load_bin_once.cache_clear()

    return ConvertReport(
        output=opts.output,
        source=opts.model,
        source_architecture=(raw.get("architectures") or [SOURCE_FAMILIES[src.model_type]])[0],
        target_type=cfg.model_type,
        dtype=str(dtype).removeprefix("torch."),
        total_params=sum(_numel(s) for s in shapes.values()),
        counts=counts,
        new=group_names(new),
        reshaped=[f"{p.target}: {p.note}" for p in planned if p.kind == "reshaped"],
        dropped=group_names(dropped),
        config_changes=changes,
        verified=verified,
        tokenizer_files=tokenizer_files,
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _counts(shapes: dict, planned: list[Planned], new: list[str]) -> dict[str, tuple[int, int]]:
    """kind -> (tensors, parameters). The rows an extended vocabulary adds keep the target's initialisation, so
    their parameters count as newly initialised (the tensor counts as reshaped)."""

    def from_source(p: Planned) -> int:
        n = _numel(shapes[p.target])
        return n if p.rows is None else n // shapes[p.target][0] * p.rows

    copied = [p for p in planned if p.kind == "copied"]
    reshaped = [p for p in planned if p.kind == "reshaped"]
    added = sum(_numel(shapes[p.target]) - from_source(p) for p in reshaped)
    return {
        "copied": (len(copied), sum(map(from_source, copied))),
        "reshaped": (len(reshaped), sum(map(from_source, reshaped))),
        "newly initialised": (len(new), sum(_numel(shapes[n]) for n in new) + added),
    }
