"""Models: build from a config JSON or a model dir, count parameters, count training FLOPs, estimate memory.

    from flame.models import build_model, count_params, flops_per_token
    model, config = build_model("configs/gla_340M.json", seed=42)
    flops_per_token(config, context=2048)

A config JSON (HF format, any FLA `model_type` after `import fla`, or any transformers causal LM such as `llama`)
builds a new model initialised from `seed`. A model dir (config.json + safetensors, as `flame train` checkpoints and
`flame convert` write them) is loaded with its weights exactly as saved: flame never re-initialises a checkpoint
(old flame did, by default, for converted models).

Training FLOPs per token
========================

MFU is only honest if it counts what the model really computes. fla-org/flame#7 reported 133% MFU because the
softmax-attention term (12 * L * d * T, which grows with the context T) was applied to linear-attention models
that never form a T x T matrix. Here the count is

    flops_per_token = 3 * (2 * N_matmul + sum over layers of F_mixer)

- 3x: the backward pass costs twice the forward (gradients w.r.t. inputs and weights), so training = 3 x forward.
- N_matmul: the weights of every nn.Linear and nn.Conv1d (and transformers' Conv1D, GPT-2's linear) of the model,
  the LM head included (counted even when tied to the input embedding: the output matmul happens regardless); each
  weight does one multiply-add per token,
  2 FLOPs. The embedding lookup, norms, gates and activations are elementwise and left out (< 1%).
  So 6 * N_matmul is the familiar "6N", with N = non-embedding parameters + LM head.
- F_mixer: the token mixer's own forward FLOPs per token, beyond its projections. C = chunk size (64 for FLA's
  chunked kernels, config.chunk_size for Mamba2), H heads, dk / dv the per-head key / value (state) dims:

  * chunked linear attention (GLA, RetNet, HGRN2, RWKV6, simple GLA, linear attention, ...): per chunk of C
    tokens the kernel forms Q K^T (C x C x dk) and multiplies it by V (C x C x dv), reads the state (Q S,
    dk x dv per token) and updates it (K^T V, dk x dv per token):
        F = 2 * H * (C * dk + C * dv + 2 * dk * dv)
    The C x C block is counted whole: the kernel computes the full tile and masks it. Independent of T.
  * delta rule, chunked with the WY representation (DeltaNet, Gated DeltaNet, RWKV7, KDA, Comba, ...):
    additionally K K^T (C x dk), the triangular inverse of the C x C matrix (C^3 / 3 per chunk, C^2 / 3 per
    token), W = A K (C x dk), U = A V (C x dv), and one more state product W S (dk x dv):
        F = 2 * H * (3 * C * dk + 2 * C * dv + C * C / 3 + 3 * dk * dv)
    Gated DeltaProduct applies it once per Householder step.
  * Mamba2 SSD (the state-space dual is chunked linear attention with dk = state_size, dv = head_dim; C and B are
    shared by the heads of a group, so C B^T is formed once per group):
        F = 2 * (G * C * N + H * C * P + 2 * H * N * P)     (G groups, N state_size, P head_dim, C chunk_size)
  * Gated Slot Attention: two GLA passes, keys -> slots (dk, M slots) then slots -> values (M, dv).
  * Mamba (selective scan, no matmul): 9 * d_inner * N FLOPs per token (Gu & Dao 2023, section 3.3).
  * softmax attention (FLA transformer, transformers Llama/Mistral/Qwen2, ...): Q K^T and A V over the keys a
    query attends to. Causal: position i attends to i keys, so the mean over a context of T is (T + 1) / 2 --
    the half that FlashAttention's causal kernel actually computes, not the full T x T the PaLM formula counts.
    With a sliding window W, position i attends to min(i, W) keys.
        F = 2 * 2 * H * d_head * mean_i(min(i, W))
    This is the only term that grows with T.
  A mixer this module does not know contributes 0 and is listed in flops_breakdown()["unknown_mixers"]; the
  count is then a lower bound, never an overestimate.

Memory estimate
===============

estimate_memory() adds, in GiB per device: weights (fp32 master, plus the bf16 copies autocast keeps for the
backward), grads (fp32; all of them only when they stay allocated: DDP buckets, ZeRO, accumulation), optimizer
(AdamW: two fp32 moments), each divided by the world size from the ZeRO / FSDP stage that shards it, and
activations: the tensors autograd keeps per token, term by term per layer from what each FLA / transformers
module saves (activation_breakdown(): _mixer_activations() per family, _block_activations() for norms and MLP),
plus the LM head's logits. ACTIVATION_SCALE and FAMILY_ACTIVATION_SCALE are the knobs to calibrate against a
measured peak (torch.cuda.max_memory_allocated; benchmarks/memory_estimate.py).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

from flame.errors import ModelError, read_json_object
from flame.kernels.config import settings as kernel_settings

#: Chunk size of FLA's chunked linear-attention kernels (fla/ops/*/chunk.py: chunk_size=64).
CHUNK_SIZE = 64

#: Multiplies the per-layer activation bytes of estimate_memory(); calibrate against a measured peak.
ACTIVATION_SCALE = 1.0

GIB = 1024**3


def _import_fla() -> None:
    """Register FLA's model types with transformers' Auto classes (importing fla does that) and install the portable
    CPU kernels; idempotent."""
    from flame import kernels

    kernels.install()


def fla_model_types() -> list[str]:
    """The model_type names FLA registers with transformers (gla, gated_deltanet, mamba2, ...)."""
    _import_fla()
    import fla.models
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    configs = (getattr(fla.models, name) for name in fla.models.__all__ if name.endswith("Config"))
    # a few FLA configs are exported but not registered with AutoConfig; those cannot be built from a JSON
    return sorted({c.model_type for c in configs if getattr(c, "model_type", "") in CONFIG_MAPPING})


def load_config(path: str | os.PathLike):
    """A transformers PretrainedConfig from a config JSON file or a model dir (one holding config.json)."""
    from transformers import AutoConfig

    _import_fla()
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model config or dir {path} does not exist", "give a config JSON (configs/) or a model dir")
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        if (path / "model" / "config.json").is_file():  # a checkpoint folder: the model is inside
            raise ModelError(f"{path} is a checkpoint, not a model dir", f"give its model dir, {path / 'model'}")
        raise ModelError(f"{path} has no config.json", "give a model dir written by flame train / flame convert")
    raw = read_json_object(
        file,
        ModelError,
        "fix the file or use one from configs/",
        not_object_fix="a model config is a JSON object with a model_type",
    )
    model_type = raw.get("model_type")
    if not model_type and {"cache", "path", "lr"} <= set(raw):  # what flame train writes to RUN/config.json
        raise ModelError(
            f"{path} is a flame run dir, not a model",
            f"give one of its checkpoints' model dirs ({Path(path) / 'checkpoints' / 'step-N' / 'model'}), or continue "
            f"the run with `flame resume {path}`",
        )
    if not model_type:
        raise ModelError(f"{file} has no model_type", f'add "model_type": one of {", ".join(fla_model_types())}')
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelError(
            f"unknown model_type {model_type!r} in {file}",
            f"use an FLA type ({', '.join(fla_model_types())}) or a transformers causal LM type such as llama",
        )
    try:
        if path.is_dir():
            return AutoConfig.from_pretrained(path)
        fields = {k: v for k, v in raw.items() if k != "model_type"}
        return AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError, AssertionError) as e:
        raise ModelError(f"config {file} is invalid: {e}", "fix the named field") from None


@contextmanager
def _whole():
    """Build a model whole, as on one device: not under DeepSpeed's zero.Init, which transformers enters for every
    model built while a ZeRO-3 config is registered with it (accelerate registers one for deepspeed_zero3.yaml,
    even with zero3_init_flag false). Such a model's weights are empty shards at once: counting its parameters and
    FLOPs finds next to nothing (measured on 2 H200s: MFU 0.1% instead of 6.5%), and its initial weights are not the
    ones --seed gives in every other setup. accelerate's prepare() partitions the whole model afterwards.
    transformers has no public switch for this (`unset_hf_deepspeed_config` cannot be undone), so the registration
    is put aside and put back."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        hf_deepspeed = None
    if not hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref"):
        # no integration, or a transformers that keeps it elsewhere: build as is (the ZeRO-3 CPU test then fails)
        yield
        return
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def _from_config(config, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM

    try:
        with _whole():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:  # a config type with no causal LM head (e.g. an encoder)
        raise ModelError(f"no causal LM for model_type {config.model_type!r}: {e}", "use a causal LM type") from None
    except (ImportError, AssertionError, NotImplementedError, TypeError, KeyError, RuntimeError) as e:
        # FLA validates shapes with asserts (e.g. hidden_size * expand_k must divide into num_heads); torch refuses
        # negative sizes with a RuntimeError
        raise ModelError(f"cannot build model_type {config.model_type!r}: {e}", "fix the config") from None


def name_cpu_accelerator() -> None:
    """accelerate and transformers import DeepSpeed when it is installed; on a machine without a GPU DeepSpeed
    picks its CPU accelerator anyway, but first prints a warning that it is "unable to detect" one. Name it, so it
    need not (a DS_ACCELERATOR the user set stays)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_model(
    path: str | os.PathLike,
    *,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    meta: bool = False,
):
    """(model, config) from a config JSON (new weights from `seed`) or a model dir (weights as saved; `seed`
    plays no part).

    dtype: parameter dtype, float32 by default (fp32 master weights; bf16 comes from autocast).
    device: where the model ends up; a new model is initialised on the CPU first so that `seed` gives the
        same weights on every machine, then moved.
    meta: build on the meta device (shapes only, no memory, nothing read from disk but config.json): for
        --dry-run and inspect.
    """
    config = load_config(path)
    dtype = dtype or torch.float32
    if meta:
        with torch.device("meta"):
            model = _from_config(config, dtype)
        return model, config

    if Path(path).is_dir():
        model = _load_pretrained(Path(path), dtype)
    else:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream as it was
            if seed is not None:
                torch.manual_seed(seed)
            with torch.device("cpu"):
                model = _from_config(config, dtype)
    if device is not None:
        model = model.to(device)
    return model, model.config


def _load_pretrained(path: Path, dtype: torch.dtype):
    """from_pretrained, refusing a checkpoint that lacks weights (transformers would fill them randomly)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from flame import ui

    # transformers' own load report (with ANSI codes even into a file) would come before flame's one line about
    # missing weights; its progress bar only on a terminal
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not ui.interactive():
        hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except OSError as e:
        fix = "a model dir holds config.json and *.safetensors"
        raise ModelError(f"cannot load weights from {path}: {e}", fix) from None
    except SafetensorError as e:  # truncated or damaged
        raise ModelError(f"the weights in {path} are damaged ({e})", "copy or convert the model dir again") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        names = ", ".join(list(missing)[:5] + [str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched][:5])
        raise ModelError(
            f"{path} does not hold every weight of its config ({len(missing)} missing, {len(mismatched)} of the "
            f"wrong shape: {names})",
            "the checkpoint is incomplete or its config.json does not match; flame never fills weights randomly",
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        ui.warn(
            f"{path} holds {len(unexpected)} weights its {model.config.model_type} model does not use, left out: "
            + ", ".join(unexpected[:5])
        )
    return model


POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")  # GPT-2, OPT/BART, BERT-style


def max_context(config) -> int | None:
    """The longest sequence the model can run at all, or None when nothing in it limits the length.

    Only a learned absolute position table (GPT-2's wpe, OPT's embed_positions) is a hard limit. Recurrent and
    linear-attention models have no position table; RoPE models (Llama) compute positions on the fly, so their
    max_position_embeddings is the length they were trained for, not a limit.
    """
    model = _as_model(config)
    for name, module in model.named_modules():
        # by name: another embedding (FLA's CAT compresses with one of the vocabulary's size) is no position table
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            return module.num_embeddings - getattr(module, "offset", 0)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Parameters


def _meta_model(config):
    """A meta-device model for counting; cached by the config's JSON so repeated counts cost nothing."""
    return _meta_model_cached(config.to_json_string(use_diff=False))


@lru_cache(maxsize=16)
def _meta_model_cached(config_json: str):
    from transformers import AutoConfig

    _import_fla()
    raw = json.loads(config_json)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        return _from_config(config, torch.float32)


def _as_model(model_or_config) -> nn.Module:
    return model_or_config if isinstance(model_or_config, nn.Module) else _meta_model(model_or_config)


def count_params(model_or_config) -> dict[str, int]:
    """Parameters: total (tied weights once), embedding (vocab tables: input embedding, plus the LM head when
    it is not tied), non_embedding (the rest: what scales with depth and width)."""
    model = _as_model(model_or_config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    tables = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        tables[id(out.weight)] = out.weight.numel()
    embedding = sum(tables.values())
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


# ---------------------------------------------------------------------------------------------------------------
# FLOPs: pure formulas (forward FLOPs per token of one layer's token mixer; see the module docstring)


def linear_attention_flops(heads: int, dk: int, dv: int, chunk: int = CHUNK_SIZE) -> float:
    """Chunked (gated) linear attention: intra-chunk Q K^T and (Q K^T) V, inter-chunk Q S and K^T V."""
    return 2.0 * heads * (chunk * dk + chunk * dv + 2 * dk * dv)


def delta_rule_flops(heads: int, dk: int, dv: int, chunk: int = CHUNK_SIZE) -> float:
    """Chunked delta rule (WY form): linear attention plus K K^T, the C x C triangular inverse, W, U and W S."""
    return 2.0 * heads * (3 * chunk * dk + 2 * chunk * dv + chunk * chunk / 3 + 3 * dk * dv)


def ssd_flops(heads: int, head_dim: int, state: int, groups: int, chunk: int) -> float:
    """Mamba2's chunked state-space dual: C B^T once per group, then per head (C B^T) X, C S and B^T X."""
    return 2.0 * (groups * chunk * state + heads * chunk * head_dim + 2 * heads * state * head_dim)


def softmax_attention_flops(heads: int, head_dim: int, context: int, window: int | None = None) -> float:
    """Causal softmax attention: Q K^T and A V over the keys each query attends to, averaged over the context."""
    return 4.0 * heads * head_dim * mean_attended_keys(context, window)


def mean_attended_keys(context: int, window: int | None = None) -> float:
    """Mean over positions i = 1..T of min(i, W): (T + 1) / 2 when causal without a window."""
    t = context
    if window is None or window <= 0 or window >= t:
        return (t + 1) / 2
    # positions 1..W attend to i keys, positions W+1..T to W keys
    return (window * (window + 1) / 2 + (t - window) * window) / t


@dataclass
class MixerCost:
    """One token mixer's forward FLOPs per token and the formula that gave them."""

    kind: str
    flops: float


def _window(module) -> int | None:
    """The attention window: FLA's window_size, transformers' per-layer sliding_window (Qwen2) or, where a layer
    keeps none, the config's (Mistral)."""
    a = module.__dict__
    if "window_size" in a or "sliding_window" in a:
        w = a.get("window_size") or a.get("sliding_window")
    else:
        w = getattr(a.get("config"), "sliding_window", None)
    return int(w) if isinstance(w, int) and w > 0 else None


#: FLA layers that compute dense causal softmax attention (sparse ones, NSA and MoBA, are not counted as dense).
_FLA_SOFTMAX = {
    "Attention",
    "BitAttention",
    "ForgettingAttention",
    "PaTHAttention",
    "StickBreakingAttention",
    "DeltaFormerAttention",
    "WallAttention",
}


def _mixer_cost(module: nn.Module, context: int) -> MixerCost | None:
    """The forward FLOPs per token of a token-mixer module, from its real shapes; None if unknown."""
    name = type(module).__name__
    a = module.__dict__  # plain attributes only (shapes the layer computed in __init__)
    heads = a.get("num_heads")

    if name in ("GatedDeltaProduct",):
        steps = int(a.get("num_householder", 1))
        return MixerCost(
            "delta_rule", steps * delta_rule_flops(a.get("num_v_heads", heads), a["head_k_dim"], a["head_v_dim"])
        )
    if name in (
        "DeltaNet",
        "GatedDeltaNet",
        "GatedDeltaNet2",
        "KimiDeltaAttention",
        "Comba",
        "MesaNet",
        "MomentumDeltaNet",
        "PrecondGatedDeltaNet",
        "PrecondKimiDeltaAttention",
    ):
        if "head_k_dim" in a and "head_v_dim" in a:
            return MixerCost(
                "delta_rule", delta_rule_flops(a.get("num_v_heads", heads), a["head_k_dim"], a["head_v_dim"])
            )
    if name == "RWKV7Attention":
        return MixerCost("delta_rule", delta_rule_flops(heads, a["head_dim"], a["head_v_dim"]))
    if name in (
        "GatedLinearAttention",
        "MultiScaleRetention",
        "SimpleGatedLinearAttention",
        "LinearAttention",
        "RWKV6Attention",
    ):
        return MixerCost("linear_attention", linear_attention_flops(heads, a["head_k_dim"], a["head_v_dim"]))
    if name in ("HGRN2Attention", "LightNetAttention"):
        dv = a.get("head_v_dim") or module.o_proj.in_features // heads
        return MixerCost("linear_attention", linear_attention_flops(heads, a["expand_ratio"], dv))
    if name in ("GatedSlotAttention", "ABCAttention"):
        m = a["num_slots"]
        flops = linear_attention_flops(heads, a["head_k_dim"], m) + linear_attention_flops(heads, m, a["head_v_dim"])
        return MixerCost("slot_attention", flops)
    if name == "Mamba2":
        return MixerCost("ssd", ssd_flops(heads, a["head_dim"], a["ssm_state_size"], a["n_groups"], a["chunk_size"]))
    if name == "Mamba":
        return MixerCost("selective_scan", 9.0 * a["intermediate_size"] * a["ssm_state_size"])
    # softmax attention: FLA's dense-attention layers and transformers' *Attention (Llama, Mistral, Qwen2, ...)
    dense = name in _FLA_SOFTMAX or (type(module).__module__.startswith("transformers.") and name.endswith("Attention"))
    if dense and "head_dim" in a:
        config = a.get("config")
        if heads is None and config is not None:
            heads = getattr(config, "num_attention_heads", None)
        if heads:
            return MixerCost(
                "softmax_attention", softmax_attention_flops(heads, a["head_dim"], context, _window(module))
            )
    return None


_MIXER_ATTRS = ("attn", "self_attn", "mixer", "token_mixer", "attention")


def _mixers(model: nn.Module):
    """(block, mixer) for each layer: the mixer is the child a block calls attn / self_attn / mixer. Modules
    inside a mixer are part of it, never mixers of their own."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        for attr in _MIXER_ATTRS:
            child = module._modules.get(attr)
            if child is not None:
                inside.append(f"{name}.{attr}." if name else f"{attr}.")
                yield module, child
                break


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's layers: each module that holds a token mixer (as _mixers finds them), in order."""
    return [block for block, _ in _mixers(model)]


# The norms in front of a block's mixer and of its MLP (FLA, transformers).
_MIXER_NORMS, _MLP_NORMS = ("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")


def _cast_sharing_norms(block: nn.Module, mixer: nn.Module) -> dict[str, nn.Module]:
    """{"mixer" / "mlp": norm} that share_norm_casts hooks in this block."""
    if type(mixer).__name__.startswith("RWKV"):  # token shift mixes the normed input elementwise first
        return {}
    found = {}
    for part, names in (("mixer", _MIXER_NORMS), ("mlp", _MLP_NORMS)):
        norm = next((block._modules[n] for n in names if block._modules.get(n) is not None), None)
        if norm is not None:
            found[part] = norm
    return found


def checkpointing(model: nn.Module) -> bool:
    """Activation checkpointing of every decoder layer, non-reentrant (it works with inputs that need no grad and
    under accelerate's autocast). False, changing nothing, when the model type does not support it.

    transformers >= 5.2x renamed the method (the old name warns); older ones have only the old name."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return True


def share_norm_casts(model: nn.Module) -> int:
    """Under autocast, cast the output of each block's pre-mixer and pre-MLP norm to the autocast dtype once, in
    the norm; returns how many norms do it. Outside autocast nothing changes.

    The norm reads the fp32 residual stream, so its output is fp32, and autocast casts it again for every
    projection that reads it (q, k, v and the gates: five in a GLA layer), keeping each copy for the backward;
    the backward then casts each copy's gradient back to fp32 and sums them in fp32. With one shared copy the
    forward is the same bit for bit, the copies are not kept, and the gradients are summed in bf16 before the one
    cast back (as in training with bf16 activations). RWKV mixers are left alone: their token shift mixes the
    normed input elementwise before any projection.
    """
    hooked = 0
    for block, mixer in _mixers(model):
        for norm in _cast_sharing_norms(block, mixer).values():
            norm.register_forward_hook(_cast_for_autocast)
            hooked += 1
    return hooked


def bf16_residual(model: nn.Module) -> bool:
    """Under autocast, cast the input embeddings' output to the autocast dtype, so the residual stream the blocks
    add into is bf16 instead of fp32 (as when training bf16 weights, e.g. torchtitan's FSDP mixed precision). Every
    residual add, norm input and saved residual then moves half the bytes; the weights and the optimizer stay fp32.
    Outside autocast nothing changes.

    Returns False, changing nothing, when the model's config asks for an fp32 residual itself (residual_in_fp32:
    Mamba2's default): the config decides."""
    if keeps_fp32_residual(model.config):
        return False
    model.get_input_embeddings().register_forward_hook(_cast_for_autocast)
    return True


def keeps_fp32_residual(config) -> bool:
    """Whether the model config asks for an fp32 residual stream itself (residual_in_fp32), whatever bf16_residual
    says."""
    return bool(getattr(config, "residual_in_fp32", False))


def _cast_for_autocast(module: nn.Module, args, out):
    first = out[0] if isinstance(out, tuple) else out  # FLA's fused prenorm returns (normed, residual)
    kind = first.device.type
    if not torch.is_autocast_enabled(kind) or not first.is_floating_point():
        return None
    dtype = torch.get_autocast_dtype(kind)
    if first.dtype == dtype:
        return None
    cast = first.to(dtype)
    return (cast, *out[1:]) if isinstance(out, tuple) else cast


def flops_breakdown(config, context: int) -> dict:
    """The training FLOPs per token and their parts: matmul (6 N_matmul), mixer (3 x sum of F_mixer), total,
    n_matmul, mixer kinds, and unknown_mixers (class names not counted)."""
    if context <= 0:
        raise ValueError(f"context must be positive, got {context}")
    model = _as_model(config)
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers (a transposed nn.Linear)

    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, Conv1D)))
    # a tied LM head shares its weight with the embedding and is an nn.Linear: counted above once already;
    # an LM head that is not an nn.Linear (rare) is added here
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not isinstance(head, nn.Linear):
        n_matmul += head.weight.numel()
    mixer, kinds, unknown = 0.0, {}, []
    for _, module in _mixers(model):
        cost = _mixer_cost(module, context)
        if cost is None:
            unknown.append(type(module).__name__)
            continue
        mixer += cost.flops
        kinds[cost.kind] = kinds.get(cost.kind, 0) + 1
    matmul = 6.0 * n_matmul
    return {
        "total": matmul + 3.0 * mixer,
        "matmul": matmul,
        "mixer": 3.0 * mixer,
        "n_matmul": n_matmul,
        "mixers": kinds,
        "unknown_mixers": sorted(set(unknown)),
    }


def flops_per_token(config, context: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `context`; see the module docstring."""
    return flops_breakdown(config, context)["total"]


# ---------------------------------------------------------------------------------------------------------------
# Memory
#
# What autograd keeps between the forward and the backward, per token, is listed term by term below from the
# tensors each FLA / transformers module saves (save_for_backward in fla/ops/*/chunk.py, fla/modules/*), for
# bf16 autocast over fp32 weights: the residual stream stays fp32 (the embedding output is fp32 and every
# residual add promotes), so a norm's output is fp32 too and each projection reading it keeps its own bf16 cast.

#: DeepSpeed ZeRO-3's default max_live_parameters (and max_reuse_distance): gathered weights it keeps alive.
DEEPSPEED_MAX_LIVE = 1e9

#: Per-family multipliers on the activation terms, for calibration against measured peaks (1.0 = as listed).
FAMILY_ACTIVATION_SCALE: dict[str, float] = {}


def estimate_memory(
    config,
    batch: int,
    context: int,
    *,
    precision: str = "bf16",
    zero_stage: int = 0,
    world_size: int = 1,
    activation_checkpointing: bool = False,
    accumulation: int = 1,
    shared_casts: bool = False,
    bf16_residual: bool = False,
    deepspeed: bool = False,
    fsdp: bool = False,
    varlen: bool = False,
) -> dict[str, float]:
    """Estimated peak training memory per device in GiB (what torch.cuda.max_memory_allocated reports).

    precision "bf16": fp32 master weights, grads and AdamW moments, bf16 autocast (flame's default on GPU);
    "fp32": everything fp32. zero_stage 1 shards the AdamW moments over world_size, 2 also the grads, 3 (or FSDP
    full shard) also the weights. batch is per device.

    weights: fp32 master weights plus, under autocast, the bf16 copy of each matmul weight the forward keeps for
        the backward. grads: the fp32 gradients alive at the peak: all of them when they stay allocated through
        the backward (DDP's gradient buckets when world_size > 1, ZeRO partitions, accumulation > 1), else only
        the LM head's (the peak is at the start of the backward; zero_grad(set_to_none=True) freed the rest).
    deepspeed: as DeepSpeed trains under "bf16" (no autocast): the weights themselves are bf16 (sharded at stage
        3), its optimizer keeps an fp32 master copy sharded as the moments, the residual stream is bf16; at stage 3
        its default max_live_parameters / max_reuse_distance (1e9) keep up to 1e9 gathered bf16 weights alive.
    fsdp: as FSDP trains under "bf16" at zero_stage 2 (shard grad op) or 3 (full shard): fp32 weight shards; the
        bf16 weights it gathers, freed after each block at full shard (the root unit's, embeddings and head, stay,
        with the block computing and the one prefetched), kept from forward to backward at shard grad op; the
        residual stream bf16 (at every stage: its bf16 parameters make the embedding's output bf16, as
        bf16_residual); gradients reduce-scattered into shards during the backward, so none alive at its
        start, except under accumulation (no_sync), which keeps them all, unsharded, in the gathered weights' bf16.
    varlen: documents passed as cu_seqlens (--varlen), as activation_breakdown() takes it.
    optimizer: AdamW's two fp32 moments. activations: activation_breakdown() for batch x context tokens, plus
        one layer's worth for the gradients its backward creates. total: the larger of the backward peak
        (all of the above) and the optimizer-step peak (weights + all grads + moments).
    """
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, got {precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    model = _as_model(config)
    params = count_params(model)["total"]
    n_matmul = flops_breakdown(model, context)["n_matmul"]
    shard = max(1, world_size)
    w_shard = shard if zero_stage >= 3 else 1
    g_shard = shard if zero_stage >= 2 else 1
    o_shard = shard if zero_stage >= 1 else 1
    as_fsdp = fsdp and precision == "bf16" and zero_stage >= 2
    bf16_residual = bf16_residual or ((fsdp or deepspeed) and precision == "bf16")  # their weights are bf16
    if deepspeed and precision == "bf16":
        live = 2.0 * min(params, DEEPSPEED_MAX_LIVE) if zero_stage >= 3 else 0.0
        # the bf16 weights stay through the optimizer step (the step peak counts them), the gathered ones do not
        master, copies = 4.0 * params / o_shard + 2.0 * params / w_shard, live
    elif as_fsdp:
        sizes = [sum(p.numel() for p in block.parameters()) for block in blocks(model)]
        gathered = params - sum(sizes) + 2 * max(sizes, default=0) if zero_stage >= 3 else params
        master, copies = 4.0 * params / shard, 2.0 * gathered
    else:
        master = 4.0 * params / w_shard
        copies = 2.0 * n_matmul / w_shard if precision == "bf16" else 0.0
    all_grads = 4.0 * params / g_shard
    head = model.get_output_embeddings()
    head_grad = 4.0 * (head.weight.numel() if head is not None else 0)
    if as_fsdp:  # its shards are made as the backward goes; under no_sync every gradient stays, unsharded, bf16
        grads = 2.0 * params if accumulation > 1 else head_grad
    else:
        resident = world_size > 1 or zero_stage > 0 or accumulation > 1
        grads = all_grads if resident else head_grad
    optimizer = 8.0 * params / o_shard
    parts = activation_breakdown(model, precision, activation_checkpointing, shared_casts, bf16_residual, varlen)
    act = parts["total"] * batch * context
    backward_peak = master + copies + grads + optimizer + act
    step_peak = master + all_grads + optimizer
    out = {
        "weights": master + copies,
        "grads": grads,
        "optimizer": optimizer,
        "activations": act,
        "total": max(backward_peak, step_peak),
    }
    return {k: v / GIB for k, v in out.items()}


def activation_breakdown(
    model_or_config,
    precision: str = "bf16",
    checkpointing: bool = False,
    shared_casts: bool = False,
    bf16_residual: bool = False,
    varlen: bool = False,
) -> dict:
    """Activation bytes per token: {"layers": [{term: bytes}, ...], "head": {term: bytes}, "total": bytes}.

    shared_casts: the block norms' outputs are cast to bf16 once, shared by the projections (share_norm_casts).
    bf16_residual: the residual stream is bf16 (bf16_residual): the norms keep bf16 inputs, and their outputs are
        bf16 already, so the projections share them as with shared_casts.
    varlen: documents are passed to the kernels as cu_seqlens (--varlen), which changes what GLA keeps.

    total = sum of the layers (or, with checkpointing, each layer's fp32 input plus one layer rebuilt at a time)
    + the largest layer once more (the gradients its backward creates) + the head (final norm, logits).
    """
    model = _as_model(model_or_config)
    config = model.config
    e = 2 if precision == "bf16" else 4
    r = 2 if bf16_residual and e == 2 and not keeps_fp32_residual(config) else 4  # bytes a residual element
    h = config.hidden_size
    mixers = list(_mixers(model))
    hf_norm = bool(mixers) and "input_layernorm" in mixers[0][0]._modules
    layers = []
    for block, mixer in mixers:
        family, terms = _mixer_activations(mixer, h, e, varlen)
        terms.update(_block_activations(block, mixer, h, e, r))
        # FLA's norms return the dtype they read, so a bf16 residual stream shares their outputs as shared_casts
        # does; transformers' RMSNorm multiplies by its fp32 weight and returns fp32 either way
        shared = _cast_sharing_norms(block, mixer) if e == 2 and (shared_casts or r == 2 and not hf_norm) else {}
        if "mixer" in shared and "input_casts" in terms:
            terms["input_casts"] = min(terms["input_casts"], e * h)  # one bf16 copy, whatever reads it
        if "mlp" in shared and "mlp_input" in terms:
            terms["mlp_input"] = e * h
        scale = ACTIVATION_SCALE * FAMILY_ACTIVATION_SCALE.get(family, 1.0)
        layers.append({k: v * scale for k, v in terms.items()})
    if not layers:
        raise ModelError(f"no token mixer found in {type(model).__name__}", "use an FLA or transformers causal LM")
    sizes = [sum(t.values()) for t in layers]
    if checkpointing:  # only each layer's input survives the forward; one layer is rebuilt at a time
        layer_total = r * h * len(sizes) + max(sizes)
    else:
        layer_total = sum(sizes)
    vocab = config.vocab_size
    fused = bool(getattr(config, "fuse_cross_entropy", False) or getattr(config, "fuse_linear_cross_entropy", False))
    head = {
        # the norm's input (and, for transformers' RMSNorm, its fp32 normalised output), the LM head's input
        "final_norm": (r + 4 * hf_norm) * h + e * h,
        # the half-precision logits (FLA's fused cross entropy keeps them and writes their gradient in place)
        "logits": e * vocab,
    }
    if not fused:  # plain cross entropy keeps fp32 log-probabilities; the backward starts with their gradient
        head["log_probs"] = 4 * vocab
        head["log_probs_grad"] = 4 * vocab
    total = layer_total + max(sizes) + sum(head.values())
    return {"layers": layers, "head": head, "total": total}


def _out(module: nn.Module | None) -> int:
    return module.out_features if isinstance(module, nn.Linear) else 0


def _input_casts(mixer: nn.Module, hidden: int) -> int:
    """Projections that read the block's (fp32) normed input, each keeping its own half-precision cast."""
    return sum(
        1
        for name, m in mixer.named_modules()
        if isinstance(m, nn.Linear) and m.in_features == hidden and not name.startswith(("o_proj", "out_proj"))
    )


def _mixer_activations(mixer: nn.Module, h: int, e: int, varlen: bool) -> tuple[str, dict[str, float]]:
    """(family, {term: bytes per token}) for one token mixer; varlen: documents passed as cu_seqlens."""
    name = type(mixer).__name__
    a = mixer.__dict__
    m = mixer._modules
    heads = a.get("num_heads") or 1
    # under autocast each projection keeps its own bf16 cast of the fp32 normed input; in fp32 they share it
    casts = {"input_casts": e * h * _input_casts(mixer, h) if e == 2 else 4 * h}
    cost = _mixer_cost(mixer, 1)
    kind = cost.kind if cost else "unknown"
    qkv = _out(m.get("q_proj")) + _out(m.get("k_proj")) + _out(m.get("v_proj"))
    value = a.get("value_dim") or _out(m.get("v_proj"))
    conv = any(k.endswith("conv1d") for k in m)

    if name == "GatedLinearAttention":
        key = a["key_dim"]
        kept = kernel_settings.gla_states_taken(varlen) == "keep"
        return "gla", {
            **casts,
            "short_conv": e * qkv if conv else 0,
            "qkv": e * qkv,  # q, k, v kept by chunk_gla
            "gate": e * key * 2 + e * m["gk_proj"][0].out_features,  # logsigmoid input, gate into the kernel
            "intra_chunk_A": 4 * heads * CHUNK_SIZE,  # fp32 C x C block per chunk
            "output": 3 * e * value,  # kernel output and output gate (gated norm), o_proj input
            # the forward's bf16 chunk states, saved for the backward (FLAME_GLA_STATES=keep, on a GPU)
            "chunk_states": 2 * key * value / (heads * CHUNK_SIZE) if kept else 0,
        }
    if kind == "delta_rule":
        out_gate = bool(a.get("use_gate")) or "g_proj" in m
        return "delta_rule", {
            **casts,
            "short_conv": e * qkv if conv else 0,  # the convolutions keep their inputs
            "qkv": e * qkv + 8 * heads,  # l2-normed q, k and v kept by the kernel, fp32 rstd
            "gate_beta": 12 * heads,  # fp32 decay, beta before and after the sigmoid
            "wy_A": e * heads * CHUNK_SIZE,  # the WY-representation block per chunk
            "output": (3 if out_gate else 2) * e * value,  # kernel output (+ gate), o_proj input
        }
    if name == "Mamba2":
        inner = a["intermediate_size"]
        return "ssd", {
            **casts,
            # mamba_ssm's fused split-conv1d-scan keeps the in_proj output and its own output and recomputes
            # the rest; without mamba_ssm FLA falls back to a PyTorch path that keeps far more
            "in_proj_out": e * m["in_proj"].out_features,
            "scan_out": e * inner + 4,
            "out_proj_in": e * inner,
        }
    if kind == "softmax_attention":
        q = _out(m.get("q_proj"))
        return "softmax_attention", {
            **casts,
            # flash / memory-efficient attention keeps q, k, v after RoPE, the output and its log-sum-exp (no
            # T x T matrix); o_proj reads a view of that output
            "qkv_rope": e * qkv,
            "attn_out": e * q + 4 * heads,
        }
    # other linear-attention mixers: q, k, v and their conv inputs, gates, output, gate, o_proj input
    return kind, {**casts, "short_conv": e * qkv if conv else 0, "qkv": e * qkv, "output": 3 * e * value}


def _block_activations(block: nn.Module, mixer: nn.Module, h: int, e: int, r: int) -> dict[str, float]:
    """{term: bytes per token} of a block around its mixer: norms, residual stream (r bytes an element), MLP."""
    m = block._modules
    mlp = m.get("mlp") or m.get("feed_forward")
    terms = {}
    if "input_layernorm" in m:  # transformers (Llama): the norm keeps its input and fp32 normalised output
        norms = 2 if mlp is not None else 1
        terms["norms"] = norms * (r + 4) * h
        mlp_in_casts = 2
    else:  # FLA: the fused RMSNorm keeps its input / residual sum and the normalised output's dtype follows
        norms = 2 if mlp is not None else 1
        terms["norms"] = norms * r * h
        fused = type(m.get("mlp_norm")).__module__.startswith("fla.")
        mlp_in_casts = 1 if fused else 2  # the fused norm returns bf16 from the bf16 attention output
    if mlp is None:
        return terms
    inter = _out(mlp._modules.get("gate_proj")) or _out(mlp._modules.get("up_proj"))
    terms["mlp_input"] = e * h * (mlp_in_casts if e == 2 else 1)
    if getattr(mlp, "fuse_swiglu", False):
        terms["mlp"] = 2 * e * inter  # fused SwiGLU-linear keeps gate and up, recomputes the product
    elif type(mlp).__module__.startswith("fla."):
        terms["mlp"] = 3 * e * inter  # gate, up, and the product kept by down_proj
    else:
        terms["mlp"] = 4 * e * inter  # act(gate) input and output, up, the product kept by down_proj
    return terms
