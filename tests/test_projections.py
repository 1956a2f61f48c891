"""flame.projections: the projections of a block that read one input run as one autograd node."""

import pytest
import torch

import flame.kernels
from flame.models import blocks
from flame.projections import find_groups, install
from tests.kernels.test_models import CONFIGS, VOCAB, build


def _loss_and_grads(model, ids, autocast):
    model.zero_grad()
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


#: The groups found in each family's 2-layer test model: the mixer's projections of the normed input, then the
#: MLP's gate and up. RWKV7 mixes each projection's input on its own (token shift), except layer 1's v_proj and the
#: first linear of its v_lora (layer 0 has none); Mamba2 has one in_proj, nothing to group.
GROUPS = {
    "delta_net": [4, 2, 4, 2], "gated_deltanet": [6, 2, 6, 2], "gla": [5, 2, 5, 2], "gsa": [4, 2, 4, 2],
    "hgrn2": [3, 2, 3, 2], "mamba2": [], "retnet": [4, 2, 4, 2], "rwkv7": [2],
}  # fmt: skip


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_projections_train_the_same(model_type, autocast):
    flame.kernels.install()
    model = build(model_type).train()
    ids = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(0))
    before = _loss_and_grads(model, ids, autocast)
    with torch.no_grad():
        groups = find_groups(blocks(model), lambda: model(ids))
    assert install(groups) == GROUPS[model_type]
    after = _loss_and_grads(model, ids, autocast)
    assert before[0] == pytest.approx(after[0], rel=1e-6 if not autocast else 1e-3)
    assert before[1].keys() == after[1].keys()
    worst = max(((after[1][n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in before[1].items())
    assert worst < (1e-4 if not autocast else 2e-2), worst


def test_a_run_groups_its_projections_by_default_and_trains_the_losses_of_one_without(tmp_path, capsys):
    """flame train groups before update 1 (a forward without gradients finds the groups), so every update is
    grouped; --no-group-projections trains the same losses to rounding."""
    import json

    from flame import engine
    from flame.config import TrainConfig
    from tests.prepared import counting_docs, gla_config, make_prepared

    make_prepared(tmp_path / "ds", counting_docs(300, 64), 64)
    gla_config(tmp_path / "gla.json")

    def losses(run, **kw):
        cfg = TrainConfig(
            model=str(tmp_path / "gla.json"), cache=str(tmp_path / "ds"), path=str(tmp_path / run), context=32,
            batch=4, update=2, lr=3e-3, warmup=2, seed=0, logging=1, save=1000, steps=4, **kw,
        )  # fmt: skip
        engine.train(cfg)
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    def weights(run):
        from safetensors.torch import load_file

        return load_file(tmp_path / run / "checkpoints" / "step-00000004" / "model" / "model.safetensors")

    grouped = losses("grouped")  # by default: silently
    assert "grouped" not in capsys.readouterr().out
    plain = losses("plain", group_projections=False)
    assert grouped == pytest.approx(plain, rel=1e-5)
    # the input gradients are summed in another order from update 1 on: the weights differ by rounding (the losses
    # may print the same)
    ours, theirs = weights("grouped"), weights("plain")
    assert ours.keys() == theirs.keys() and any(not torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-6) for k in ours)
    assert losses("asked", group_projections=True) == grouped
    assert "--group-projections: projections that read one input, grouped: 4 groups of 2/5" in capsys.readouterr().out


@pytest.mark.gpu
def test_grouped_projections_on_a_gpu_train_the_same(tmp_path):
    """GLA-340M's layer x 2 under bf16 autocast with FLA's kernels: grouped as ungrouped, to bf16 rounding."""
    import json
    from pathlib import Path

    from flame.models import build_model, share_norm_casts

    config = json.loads((Path(__file__).resolve().parents[1] / "configs" / "gla_340M.json").read_text())
    (tmp_path / "gla.json").write_text(json.dumps(config | {"num_hidden_layers": 2}))
    model, _ = build_model(tmp_path / "gla.json", seed=0, device="cuda")
    share_norm_casts(model)
    ids = torch.randint(
        3, config["vocab_size"], (2, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )

    plain = _loss_and_grads(model, ids, autocast=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        groups = find_groups(blocks(model), lambda: model(ids))
    assert install(groups) == [5, 2, 5, 2]
    grouped = _loss_and_grads(model, ids, autocast=True)
    assert grouped[0] == pytest.approx(plain[0], rel=1e-3)
    worst = max(((grouped[1][n] - g).norm() / g.norm()).item() for n, g in plain[1].items())
    print(f"worst gradient difference {worst:.2e}")
    assert worst < 2e-2


class _TwoHeads(torch.nn.Module):
    """Two projections of one input, as a block's q and k."""

    def __init__(self, width=16, out=8, bias=False):
        super().__init__()
        self.q, self.k = torch.nn.Linear(width, out, bias=bias), torch.nn.Linear(width, out, bias=bias)

    def forward(self, x):
        return self.q(x) * 2 + self.k(x)


def _weight_grads(model, x, device):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(x)
    out.float().pow(2).sum().backward()
    return out, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("bias", [False, True])
def test_under_autocast_the_node_casts_the_weights_and_hands_back_their_fp32_gradients(bias):
    torch.manual_seed(0)
    model, x = _TwoHeads(bias=bias), torch.randn(3, 5, 16)
    _, plain = _weight_grads(model, x, "cpu")
    install(find_groups([model], lambda: model(x)))
    out, grouped = _weight_grads(model, x, "cpu")
    # the weights and biases feed the node directly: no cast node of autocast's between them and their gradients
    node = out.grad_fn.next_functions[1][0]  # out = q(x) * 2 + k(x): k(x) comes straight out of the node
    assert type(node).__name__ == "_SharedInputBackward"
    fed = {id(f.variable) for f, _ in node.next_functions if type(f).__name__ == "AccumulateGrad"}
    assert fed == {id(p) for p in model.parameters()} and len(fed) == (4 if bias else 2)
    assert [g.dtype for g in grouped] == [torch.float32] * len(plain)
    for a, b in zip(grouped, plain, strict=True):
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-3)  # the CPU's: the bf16 product cast to fp32, as autocast's


@pytest.mark.gpu
def test_on_a_gpu_the_weight_gradients_come_out_of_the_gemm_in_fp32():
    """cuBLAS writes dW from its fp32 accumulator: far closer to the exact product of the same bf16 operands than
    autocast's bf16 product cast to fp32."""
    torch.manual_seed(0)
    model = _TwoHeads(width=2048, out=1024, bias=True).cuda()
    x = torch.randn(4, 1024, 2048, device="cuda")
    _, plain = _weight_grads(model, x, "cuda")
    install(find_groups([model], lambda: model(x)))
    out, grouped = _weight_grads(model, x, "cuda")
    # the exact gradient of q's weight for the same bf16 operands: dout/dq = 2 * 2 * out (bf16) against x (bf16)
    g = (4 * out.float()).to(torch.bfloat16).reshape(-1, 1024).double()
    exact = g.t() @ x.to(torch.bfloat16).reshape(-1, 2048).double()

    def error(w):
        return ((w.double() - exact).norm() / exact.norm()).item()

    assert grouped[0].dtype == torch.float32
    assert error(grouped[0]) < 1e-4 < error(plain[0])
