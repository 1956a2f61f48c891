"""The torch kernels against FLA's naive references, finite differences, and per-document runs (CPU)."""

import pytest
import torch
import torch.nn.functional as F

from flame.kernels import delta, linear_attn, modules, rwkv7, settings

B, T, H, K, V = 2, 37, 2, 8, 6  # T not a multiple of the chunk size: the padding path runs too


@pytest.fixture
def chunk_size():
    """Run a test with a given chunk size (None = per-token recurrence) and restore the setting after."""
    old = settings.chunk_size
    yield lambda size: setattr(settings, "chunk_size", size)
    settings.chunk_size = old


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=g, dtype=dtype), torch.randn(B, T, H, K, generator=g, dtype=dtype)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    gk = F.logsigmoid(torch.randn(B, T, H, K, generator=g, dtype=dtype)) * 4  # strong decay: exp(cumsum) underflows
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    gs = F.logsigmoid(torch.randn(B, T, H, generator=g, dtype=dtype))
    h0 = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return q, k, v, gk, beta, gs, h0


@pytest.mark.parametrize("size", [None, 4, 16, 64])
def test_gla_matches_fla_naive_recurrent(chunk_size, size):
    from fla.ops.gla.naive import naive_recurrent_gla

    chunk_size(size)
    q, k, v, gk, _, _, h0 = _inputs()
    o_ref, h_ref = naive_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    o, h = linear_attn.chunk_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


def test_gla_state_v_first_transposes_the_state():
    q, k, v, gk, _, _, h0 = _inputs()
    o, h = linear_attn.fused_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    o_t, h_t = linear_attn.chunk_gla(
        q, k, v, gk, initial_state=h0.transpose(-1, -2), output_final_state=True, state_v_first=True
    )
    torch.testing.assert_close(o_t, o)
    torch.testing.assert_close(h_t, h.transpose(-1, -2))


def test_simple_gla_and_retention_are_gla_with_a_head_decay():
    q, k, v, _, _, gs, h0 = _inputs()
    o_ref, h_ref = linear_attn.chunk_gla(q, k, v, gs[..., None].expand_as(q), initial_state=h0, output_final_state=True)
    o, h = linear_attn.chunk_simple_gla(q, k, v, g=gs, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(h, h_ref)
    gamma = (1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float))).log()
    o_r, _ = linear_attn.chunk_retention(q, k, v)
    o_s, _ = linear_attn.fused_recurrent_simple_gla(q, k, v, g_gamma=gamma)
    torch.testing.assert_close(o_r, o_s)


@pytest.mark.parametrize("size", [None, 4, 16, 64])
def test_gated_delta_rule_matches_fla_naive_recurrent(chunk_size, size):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    chunk_size(size)
    q, k, v, _, beta, gs, h0 = _inputs()
    k = F.normalize(k, dim=-1)
    o_ref, h_ref = naive_recurrent_gated_delta_rule(q, k, v, beta, gs, initial_state=h0, output_final_state=True)
    o, h = delta.chunk_gated_delta_rule(q, k, v, gs, beta, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [None, 16])
def test_delta_rule_matches_fla_naive_recurrent(chunk_size, size):
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    chunk_size(size)
    q, k, v, _, beta, _, h0 = _inputs()
    k = F.normalize(k, dim=-1)

    def tr(x):
        return x.transpose(1, 2).contiguous()

    o_ref, h_ref = delta_rule_recurrence(tr(q), tr(k), tr(v), tr(beta), initial_state=h0)
    o, h = delta.chunk_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, tr(o_ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


def test_gated_delta_rule_in_kernel_gate_beta_and_l2norm():
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate

    q, k, v, _, beta, gs, _ = _inputs()
    A_log, dt_bias = torch.randn(H), torch.randn(H)
    o_ref, _ = delta.chunk_gated_delta_rule(
        F.normalize(q, dim=-1, eps=1e-6),
        F.normalize(k, dim=-1, eps=1e-6),
        v,
        naive_gdn_gate(gs, A_log, dt_bias),
        2 * torch.sigmoid(beta),
    )
    o, _ = delta.fused_recurrent_gated_delta_rule(
        q,
        k,
        v,
        g=gs,
        beta=beta,
        use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=True,
    )
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)


def _varlen_equals_separate(run, tensors, lens):
    """Packing documents with cu_seqlens gives what running each document alone gives."""
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    packed = [torch.cat([x[i, : lens[i]] for i in range(len(lens))])[None] for x in tensors]
    o, h = run(*packed, cu_seqlens=cu)
    for i, n in enumerate(lens):
        o_i, h_i = run(*(x[i : i + 1, :n] for x in tensors), cu_seqlens=None)
        torch.testing.assert_close(o[:, cu[i] : cu[i + 1]], o_i, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h[i : i + 1], h_i, atol=1e-5, rtol=1e-5)


def test_varlen_resets_state_per_document():
    q, k, v, gk, beta, gs, _ = _inputs()
    lens = [T, 5]
    _varlen_equals_separate(
        lambda q, k, v, g, cu_seqlens: linear_attn.chunk_gla(
            q, k, v, g, output_final_state=True, cu_seqlens=cu_seqlens
        ),
        (q, k, v, gk),
        lens,
    )
    k = F.normalize(k, dim=-1)
    _varlen_equals_separate(
        lambda q, k, v, g, b, cu_seqlens: delta.chunk_gated_delta_rule(
            q, k, v, g, b, output_final_state=True, cu_seqlens=cu_seqlens
        ),
        (q, k, v, gs, beta),
        lens,
    )


def test_short_convolution_does_not_cross_documents_and_keeps_the_last_inputs():
    x = torch.randn(2, 9, 5)
    w, b = torch.randn(5, 4), torch.randn(5)
    y, state = modules.causal_conv1d(x, w, b, output_final_state=True, activation="silu")
    ref = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None], b, groups=5)).transpose(1, 2)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(state, x[:, -4:].transpose(1, 2))
    # continuing from the state equals running the whole sequence
    y1, s1 = modules.causal_conv1d(x[:, :6], w, b, output_final_state=True)
    y2, _ = modules.causal_conv1d(x[:, 6:], w, b, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), modules.causal_conv1d(x, w, b)[0])
    # one-token update from the cache, as generation does it
    cache = s1.clone()
    y_step, _ = modules.causal_conv1d_update(x[:, 6:7], cache, weight=w, bias=b)
    torch.testing.assert_close(y_step, y2[:, :1])
    # varlen: two documents packed into one row
    cu = torch.tensor([0, 9, 13])
    packed = torch.cat([x[0], x[1, :4]])[None]
    y_p, s_p = modules.causal_conv1d(packed, w, b, cu_seqlens=cu, output_final_state=True)
    torch.testing.assert_close(y_p[:, 9:], modules.causal_conv1d(x[1:, :4], w, b)[0])
    torch.testing.assert_close(s_p[1], F.pad(x[1, :4], (0, 0, 0, 0)).transpose(0, 1))


def test_norms_match_fla_references():
    from fla.modules.norm.layernorm import group_norm_ref, layer_norm_ref, rms_norm_ref

    x, r = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    w, b = torch.randn(16), torch.randn(16)
    torch.testing.assert_close(modules.layer_norm(x, w, b, eps=1e-5), layer_norm_ref(x, w, b, eps=1e-5))
    y, res = modules.layer_norm(x, w, None, residual=r, prenorm=True, is_rms_norm=True)
    y_ref, res_ref = rms_norm_ref(x, w, None, residual=r, prenorm=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(res, res_ref)
    torch.testing.assert_close(
        modules.layer_norm(x, w, b, num_groups=4, is_rms_norm=True),
        group_norm_ref(x, w, b, num_groups=4, is_rms_norm=True),
    )
    g = torch.randn(3, 7, 16)
    torch.testing.assert_close(
        modules.layer_norm_gated(x, g, w, None, "swish", eps=1e-5, is_rms_norm=True),
        rms_norm_ref(x, w, None) * F.silu(g),
    )


def test_cross_entropy_matches_torch():
    logits, target = torch.randn(10, 33), torch.randint(0, 33, (10,))
    target[3] = -100
    loss, _ = modules.cross_entropy(logits, target, label_smoothing=0.1)
    ref = F.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(loss, ref)
    x, w = torch.randn(10, 8), torch.randn(33, 8)
    torch.testing.assert_close(modules.linear_cross_entropy(x, target, w), F.cross_entropy(x @ w.T, target))


def test_rotary_matches_fla_reference():
    from fla.modules.rotary.ops import rotary_embedding_ref

    x = torch.randn(2, 6, 3, 8)
    angles = torch.randn(10, 4)
    out = modules.rotary_embedding(x, angles.cos(), angles.sin(), seqlen_offsets=2)
    torch.testing.assert_close(out, rotary_embedding_ref(x, angles[2:8].cos(), angles[2:8].sin()))


@pytest.mark.parametrize("size", [None, 4])
def test_gradients_match_finite_differences(chunk_size, size):
    chunk_size(size)
    g = torch.Generator().manual_seed(1)
    shape = (1, 6, 1, 3)

    def rand(*s, fn=lambda x: x):
        return fn(torch.randn(*s, generator=g, dtype=torch.float64)).requires_grad_()

    q, k, v = rand(*shape), rand(*shape, fn=lambda x: F.normalize(x, dim=-1)), rand(*shape)
    gk = rand(*shape, fn=F.logsigmoid)
    beta, gs = rand(1, 6, 1, fn=torch.sigmoid), rand(1, 6, 1, fn=F.logsigmoid)
    h0 = rand(1, 1, 3, 3)
    assert torch.autograd.gradcheck(
        lambda *a: linear_attn.chunk_gla(*a[:4], initial_state=a[4], output_final_state=True), (q, k, v, gk, h0)
    )
    assert torch.autograd.gradcheck(
        lambda *a: delta.chunk_gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True),
        (q, k, v, gs, beta, h0),
    )
    x, w = rand(2, 5, 4), rand(4, 3)
    assert torch.autograd.gradcheck(lambda x, w: modules.causal_conv1d(x, w, activation="silu")[0], (x, w))
    assert torch.autograd.gradcheck(lambda x, w: modules.layer_norm(x, w, None, is_rms_norm=True), (x, rand(4)))


@pytest.mark.parametrize("with_gate", [True, False])
def test_gsa_matches_fla_naive_recurrent(with_gate):
    from fla.ops.gsa.naive import naive_recurrent_gsa

    q, _, _, _, _, _, _ = _inputs()
    g = torch.Generator().manual_seed(3)
    k, v, s = (torch.randn(B, T, 1, n, generator=g) for n in (K, V, 5))  # one key head for two query heads
    gate = F.logsigmoid(torch.randn(B, T, 1, 5, generator=g)) * 3 if with_gate else None
    h0 = (torch.randn(B, 1, K, 5, generator=g), torch.randn(B, 1, 5, V, generator=g))
    o_ref, (hk_ref, hv_ref) = naive_recurrent_gsa(q, k, v, s, gate, initial_state=h0, output_final_state=True)
    o, (hk, hv) = linear_attn.chunk_gsa(q, k, v, s, gate, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hk, hk_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hv, hv_ref, atol=1e-5, rtol=1e-5)


def test_value_side_gate_chunked_matches_recurrence(chunk_size):
    q, k, v, gk, _, _, h0 = _inputs()
    gv = F.logsigmoid(torch.randn(B, T, H, V)) * 3
    o, h = linear_attn.fused_recurrent_gla(q, k, v, gk, gv, initial_state=h0, output_final_state=True)
    chunk_size(None)
    o_ref, h_ref = linear_attn.fused_recurrent_gla(q, k, v, gk, gv, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [None, 16])
def test_rwkv7_dplr_matches_fla_naive_recurrence(chunk_size, size):
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    chunk_size(size)
    r, k, v, _, _, _, h0 = _inputs()
    g = torch.Generator().manual_seed(4)
    kk = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    a = torch.rand(B, T, H, K, generator=g)
    w = -0.6065306597126334 * torch.rand(B, T, H, K, generator=g)

    def tr(x):
        return x.transpose(1, 2)

    o_ref, h_ref = dplr_recurrence(tr(r), tr(k), tr(v), tr(-kk), tr(kk * a), tr(w), initial_state=h0)
    o, h = rwkv7.fused_mul_recurrent_rwkv7(r, w, k, v, kk, a, scale=K**-0.5, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, tr(o_ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)


def test_rwkv7_dplr_gradients_match_finite_differences(chunk_size):
    chunk_size(4)
    g = torch.Generator().manual_seed(5)
    r, k, v = (torch.randn(1, 6, 1, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    kk = F.normalize(torch.randn(1, 6, 1, 3, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    a = torch.rand(1, 6, 1, 3, generator=g, dtype=torch.float64).requires_grad_()
    w = (-0.6 * torch.rand(1, 6, 1, 3, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *x: rwkv7.chunk_rwkv7(x[0], x[1], x[2], x[3], -x[4], x[4] * x[5], output_final_state=True),
        (r, w, k, v, kk, a),
    )


def test_compiled_activations_match_fla_formulas():
    x, bias = torch.randn(4, 8), torch.randn(8)
    torch.testing.assert_close(modules.sqrelu(x), torch.relu(x) ** 2)
    # the formula of fla.modules.activations.gelu_fwd
    gelu = x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))
    torch.testing.assert_close(modules.fast_gelu(x), gelu, atol=1e-6, rtol=1e-5)
    xb = x + bias
    torch.testing.assert_close(
        modules.bias_gelu(x, bias), xb * 0.5 * (1.0 + torch.tanh(0.79788456 * xb * (1 + 0.044715 * xb * xb)))
    )


@pytest.mark.parametrize("size", [None, 4, 16, 64])
@pytest.mark.parametrize("op", ["chunk_gla", "chunk_gated_delta_rule"])
def test_gradients_match_fla_naive_recurrent_per_element(chunk_size, size, op):
    """Every input gradient (q, k, v, gate, [beta,] h0), element by element, against autograd through FLA's naive
    recurrence: several batches and heads, an initial state, and T = 37, so that the last chunk is partial for
    every chunk size (64 > T: a single partial chunk). A gradient wrong in one region (the padded chunk, one
    batch or head) fails here with its position, where finite differences on one tiny head would not look."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.gla.naive import naive_recurrent_gla

    from tests.kernels.harness import run_backward

    chunk_size(size)
    q, k, v, gk, beta, gs, h0 = _inputs(seed=3)
    if op == "chunk_gla":
        inputs, names = (q, k, v, gk / 4, h0), ["q", "k", "v", "g", "h0"]

        def ours(q, k, v, g, h0):
            return linear_attn.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)

        def reference(q, k, v, g, h0):
            return naive_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    else:
        inputs, names = (q, F.normalize(k, dim=-1), v, gs, beta, h0), ["q", "k", "v", "g", "beta", "h0"]

        def ours(q, k, v, g, beta, h0):
            return delta.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)

        def reference(q, k, v, g, beta, h0):
            return naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)

    *_, expected, cotangents = run_backward(reference, inputs, {})
    *_, actual, _ = run_backward(ours, inputs, {}, cotangents=cotangents)
    assert len(actual) == len(names)
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, atol=2e-4, rtol=2e-4, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_outputs_are_contiguous_like_flas():
    """FLA's kernels return contiguous outputs; ours compute in [B, H, T, D] and must not hand back the transpose
    (a caller's .view or randn_like would then see the values in another order)."""
    q, k, v, gk, beta, gs, h0 = _inputs()
    kn = F.normalize(k, dim=-1)
    outputs = {
        "chunk_gla": linear_attn.chunk_gla(q, k, v, gk, initial_state=h0, output_final_state=True),
        "chunk_gla bf16": linear_attn.chunk_gla(*(x.bfloat16() for x in (q, k, v, gk)), initial_state=h0),
        "chunk_simple_gla": linear_attn.chunk_simple_gla(q, k, v, g=gs),
        "chunk_retention": linear_attn.chunk_retention(q, k, v),
        "chunk_gated_delta_rule": delta.chunk_gated_delta_rule(q, kn, v, gs, beta, initial_state=h0),
        "chunk_delta_rule": delta.chunk_delta_rule(q, kn, v, beta),
        "chunk_rwkv7": rwkv7.chunk_rwkv7(q, -gk.abs() / 4, k, v, -kn, kn * 0.5),
        "chunk_gsa": linear_attn.chunk_gsa(q, k, v, k[..., :4], F.logsigmoid(k[..., :4])),
    }
    for name, (o, _) in outputs.items():
        assert o.is_contiguous(), name
