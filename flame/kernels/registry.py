"""What flame.kernels covers: every FLA entry point with its torch version, the FLA functions flame's own GPU kernels
stand in front of, and the model types that run.

Checked against flash-linear-attention 0.6.x (see FLA_VERSIONS in flame.kernels). Paths name where FLA 0.6
defines each object; a path that does not resolve means FLA's internals changed, and install() says so.
"""

from __future__ import annotations

from flame.kernels import delta, gla_states, linear_attn, modules, norm_backward, rwkv7, swiglu
from flame.kernels.dispatch import GpuTarget, Target

_NORM = "fla.modules.norm"
_ACT = "fla.modules.activations.ops"

TARGETS: tuple[Target, ...] = (
    # fla.modules
    Target(f"{_NORM}.layernorm:LayerNormFunction.apply", modules.layer_norm),
    Target(f"{_NORM}.layernorm:LayerNormLinearFunction.apply", modules.layer_norm_linear),
    Target(f"{_NORM}.fused_norm_gate:LayerNormGatedFunction.apply", modules.layer_norm_gated),
    Target(f"{_NORM}.fused_norm_gate:LayerNormGatedLinearFunction.apply", modules.layer_norm_gated_linear),
    Target(f"{_NORM}.layernorm_gated:LayerNormFn.apply", modules.layer_norm_group_gated),
    Target(f"{_NORM}.l2norm:L2NormFunction.apply", modules.l2norm),
    Target(f"{_ACT}:SigmoidFunction.apply", modules.sigmoid),
    Target(f"{_ACT}:SwishFunction.apply", modules.swish),
    Target(f"{_ACT}:LogSigmoidFunction.apply", modules.logsigmoid),
    Target(f"{_ACT}:ELUPlusOneFunction.apply", modules.elu_p1),
    Target(f"{_ACT}:SwiGLUFunction.apply", modules.swiglu),
    Target(f"{_ACT}:SwiGLULinearFunction.apply", modules.swiglu_linear),
    Target(f"{_ACT}:SigmoidGLUFunction.apply", modules.sigmoidglu),
    Target(f"{_ACT}:SquaredReLUFunction.apply", modules.sqrelu),
    Target(f"{_ACT}:FastGeLUFunction.apply", modules.fast_gelu),
    Target(f"{_ACT}:GeLUFunction.apply", modules.bias_gelu),
    Target("fla.modules.causal_conv1d.ops:causal_conv1d", modules.causal_conv1d),
    Target("fla.modules.causal_conv1d.ops:causal_conv1d_update", modules.causal_conv1d_update),
    Target("fla.modules.token_shift:TokenShift.apply", modules.token_shift),
    Target("fla.modules.rotary.ops:RotaryEmbeddingFunction.apply", modules.rotary_embedding),
    Target("fla.modules.fused_cross_entropy.ops:FusedCrossEntropyFunction.apply", modules.cross_entropy),
    Target("fla.modules.fused_cross_entropy.ops:FusedCrossEntropyLoss.forward", modules.cross_entropy_loss_forward),
    Target(
        "fla.modules.fused_linear_cross_entropy.ops:FusedLinearCrossEntropyFunction.apply",
        modules.linear_cross_entropy,
    ),
    # fla.ops
    Target("fla.ops.gla.chunk:chunk_gla", linear_attn.chunk_gla),
    Target("fla.ops.gla.fused_recurrent:fused_recurrent_gla", linear_attn.fused_recurrent_gla),
    Target("fla.ops.simple_gla.chunk:chunk_simple_gla", linear_attn.chunk_simple_gla),
    Target("fla.ops.simple_gla.fused_recurrent:fused_recurrent_simple_gla", linear_attn.fused_recurrent_simple_gla),
    Target("fla.ops.retention.chunk:chunk_retention", linear_attn.chunk_retention),
    Target("fla.ops.retention.fused_chunk:fused_chunk_retention", linear_attn.chunk_retention),
    Target("fla.ops.retention.fused_recurrent:fused_recurrent_retention", linear_attn.fused_recurrent_retention),
    Target("fla.ops.retention.parallel:parallel_retention", linear_attn.parallel_retention),
    Target("fla.ops.gsa.chunk:chunk_gsa", linear_attn.chunk_gsa),
    Target("fla.ops.gsa.fused_recurrent:fused_recurrent_gsa", linear_attn.fused_recurrent_gsa),
    Target("fla.ops.rwkv7.chunk:chunk_rwkv7", rwkv7.chunk_rwkv7),
    Target("fla.ops.rwkv7.fused_recurrent:fused_recurrent_rwkv7", rwkv7.fused_recurrent_rwkv7),
    Target("fla.ops.rwkv7.fused_recurrent:fused_mul_recurrent_rwkv7", rwkv7.fused_mul_recurrent_rwkv7),
    Target("fla.ops.rwkv7.fused_addcmul:fused_addcmul_rwkv7", rwkv7.fused_addcmul_rwkv7),
    Target("fla.ops.rwkv7.fused_k_update:fused_k_rwkv7", rwkv7.fused_k_rwkv7),
    Target("fla.ops.rwkv7.gate_output_correction:gate_output_correction", rwkv7.gate_output_correction),
    Target("fla.ops.delta_rule.chunk:chunk_delta_rule", delta.chunk_delta_rule),
    Target("fla.ops.delta_rule.fused_recurrent:fused_recurrent_delta_rule", delta.fused_recurrent_delta_rule),
    Target("fla.ops.gated_delta_rule.chunk:chunk_gated_delta_rule", delta.chunk_gated_delta_rule),
    Target(
        "fla.ops.gated_delta_rule.fused_recurrent:fused_recurrent_gated_delta_rule",
        delta.fused_recurrent_gated_delta_rule,
    ),
)

GPU_TARGETS: tuple[GpuTarget, ...] = (
    # FLA walks the rows one at a time at D > 512: 3.5-4.0x slower at GLA-340M's norms (benchmarks/norm_backward.py)
    GpuTarget(f"{_NORM}.layernorm:layer_norm_bwd", norm_backward.in_front_of),
    # FLA's backward recomputes the chunk states in fp32: in bf16 (or kept from the forward), 11 ms of GLA-1.3B's step
    GpuTarget("fla.ops.gla.chunk:ChunkGLAFunction.apply", gla_states.in_front_of),
    # FLA addresses each element by row and column (an int64 division per element): 2.7 TB/s, 15 ms of GLA-1.3B's step
    GpuTarget(f"{_ACT}:swiglu_fwd", swiglu.fwd_in_front_of),
    GpuTarget(f"{_ACT}:swiglu_fwdbwd", swiglu.fwdbwd_in_front_of),
    # FLA's fused MLP casts the down projection's weight twice a step and widens its bf16 gradient in a pass of its own
    GpuTarget(f"{_ACT}:swiglu_linear", swiglu.linear_in_front_of),
)
"""FLA functions that flame's own GPU kernels stand in front of (kernels mode `auto`)."""

SUPPORTED_MODEL_TYPES: tuple[str, ...] = (
    "gla",
    "gated_deltanet",
    "delta_net",
    "retnet",
    "hgrn2",
    "mamba2",
    "gsa",
    "rwkv7",
)
"""FLA model types whose forward, backward and cached generation run on CPU (tests/kernels pin each one)."""
