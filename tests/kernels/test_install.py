"""install(): idempotent, modes, version check, and what it wraps."""

import pytest
import torch

import flame.kernels
from flame.errors import ConfigError, ModelError
from flame.kernels import dispatch


@pytest.fixture
def mode():
    old = flame.kernels.settings.mode
    yield
    flame.kernels.settings.mode = old


def test_install_is_idempotent_and_wraps_the_names_fla_layers_imported():
    import fla.layers.gla as gla_layer
    import fla.modules.activations as act
    from fla.ops.gla import chunk_gla

    flame.kernels.install()
    flame.kernels.install()
    assert flame.kernels.is_installed()
    assert gla_layer.chunk_gla is chunk_gla
    assert chunk_gla.__flame_portable__.__module__ == "flame.kernels.linear_attn"
    assert getattr(chunk_gla.__flame_original__, "__flame_original__", None) is None  # wrapped once, not twice
    assert act.ACT2FN["swish"].__flame_portable__.__name__ == "swish"


def test_mode_picks_the_implementation(mode):
    x = torch.randn(3, 4)
    flame.kernels.install(mode="auto")
    assert dispatch.use_portable((x,), {})
    flame.kernels.install(mode="triton")
    assert not dispatch.use_portable((x,), {})
    flame.kernels.install(mode="torch")
    assert dispatch.use_portable((x.to("meta"),), {})
    with pytest.raises(ConfigError, match="unknown kernels mode 'cuda'"):
        flame.kernels.install(mode="cuda")


def test_unknown_fla_version_is_refused():
    with pytest.raises(ModelError, match="checked against flash-linear-attention 0.6.x, found 0.7.1"):
        flame.kernels._check_fla_version("0.7.1")
    flame.kernels._check_fla_version("0.6.3")


def test_unrecognised_internals_fail_clearly():
    from flame.kernels.dispatch import Target

    bogus = (Target("fla.ops.gla.chunk:chunk_gla", None), Target("fla.ops.gla.chunk:no_such_kernel", None))
    with pytest.raises(ModelError, match="flash-linear-attention 0.6.9 does not have fla.ops.gla.chunk:no_such_kernel"):
        flame.kernels._check_targets(bogus, "0.6.9")
    with pytest.raises(ModelError, match="does not have fla.ops.no_such_op:chunk"):
        flame.kernels._check_targets((Target("fla.ops.no_such_op:chunk", None),), "0.6.9")


def test_flame_package_import_stays_light():
    import subprocess
    import sys

    code = "import sys, flame; print('fla' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("make", ["dispatcher", "guard"])
def test_under_torch_compile_fla_kernels_run_outside_the_graph_and_torch_versions_inside(mode, make):
    """Traced by torch.compile, a dispatcher calls FLA's kernel as a graph break (so inductor never re-tunes FLA's
    autotuned Triton kernels), and traces the portable torch version like any torch code; eagerly, both as they
    are. The kernel here is a CPU stand-in, run as the Triton branch by mode="triton"."""
    seen = []

    def kernel(x):
        seen.append(("kernel", torch.compiler.is_compiling()))
        return x * 2

    def portable(x):
        seen.append(("portable", torch.compiler.is_compiling()))
        return x * 3

    op = (
        dispatch._make_dispatcher("t.op", kernel, portable)
        if make == "dispatcher"
        else dispatch._make_guard("t.op", kernel)
    )
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: op(x + 1) - 1, backend="eager", fullgraph=False)
    x = torch.ones(2)
    flame.kernels.install(mode="triton")
    assert torch.equal(compiled(x), torch.full((2,), 3.0)) and seen == [("kernel", False)]
    assert torch.equal(op(x), torch.full((2,), 2.0)) and seen[-1] == ("kernel", False)
    if make == "dispatcher":
        seen.clear()
        flame.kernels.install(mode="torch")
        assert torch.equal(compiled(x), torch.full((2,), 5.0)) and seen == [("portable", True)]
    torch._dynamo.reset()


def test_every_dispatcher_has_its_own_code_named_after_its_entry_point():
    """Dynamo caches compiled frames per code object: dispatchers sharing one hit its recompile limit (and warned)."""
    from flame.kernels.registry import TARGETS

    flame.kernels.install()
    ops = [dispatch.resolve(target.path)[2] for target in TARGETS]
    assert len({op.__code__ for op in ops}) == len(ops)
    chunk_gla = dispatch.resolve("fla.ops.gla.chunk:chunk_gla")[2]
    assert chunk_gla.__code__.co_name == "fla.ops.gla.chunk.chunk_gla_dispatch"
    assert chunk_gla.__name__ == "chunk_gla"  # functools.wraps: what FLA's callers and help() see is unchanged
