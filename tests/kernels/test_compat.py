"""FLA refuses some backward passes on Hopper with Triton 3.4.0 to 3.7.0: flame says so before training starts."""

import pytest

from flame.kernels.compat import hopper_triton_blocker

H200 = {"capability": (9, 0), "device_name": "NVIDIA H200"}


def test_gated_deltanet_on_hopper_with_triton_3_6_is_refused_with_the_fix():
    why, fix = hopper_triton_blocker("gated_deltanet", **H200, triton_version="3.6.0", tilelang=False)
    assert why == (
        "gated_deltanet cannot train on this NVIDIA H200 with Triton 3.6.0: FLA refuses its backward pass there "
        "(wrong results on Hopper with Triton 3.4.0 to 3.7.0, flash-linear-attention#640)"
    )
    assert fix == (
        "pip install tilelang (FLA then runs that kernel in TileLang), or pip install 'torch>=2.13' (its Triton "
        "3.7.1 is fixed), or train on another GPU (or with flame's slower portable kernels: FLAME_KERNELS=torch)"
    )


def test_simple_gla_is_refused_even_with_tilelang_whose_backend_does_not_take_it():
    why, fix = hopper_triton_blocker("simple_gla", **H200, triton_version="3.5.1", tilelang=True)
    assert fix.startswith("pip install 'torch>=2.13' (its Triton 3.7.1 is fixed), or train on another GPU")


@pytest.mark.parametrize(
    "model_type, capability, triton, tilelang",
    [
        ("gated_deltanet", (9, 0), "3.6.0", True),  # FLA's TileLang backend takes the gated delta rule
        ("gated_deltanet", (9, 0), "3.7.1", False),  # fixed Triton
        ("gated_deltanet", (9, 0), "3.3.1", False),  # before the regression
        ("gated_deltanet", (8, 0), "3.6.0", False),  # an A100: not Hopper
        ("gla", (9, 0), "3.6.0", False),  # GLA has its own backward kernels
        ("retnet", (9, 0), "3.6.0", False),  # a fixed decay (g_gamma), not a gate
    ],
)
def test_everything_else_trains(model_type, capability, triton, tilelang):
    assert hopper_triton_blocker(model_type, capability=capability, triton_version=triton, tilelang=tilelang) is None


def test_flames_portable_kernels_on_the_gpu_are_not_refused():
    assert hopper_triton_blocker("gated_deltanet", **H200, triton_version="3.6.0", tilelang=False, mode="torch") is None


def test_on_a_machine_without_cuda_nothing_is_refused():
    assert hopper_triton_blocker("gated_deltanet") is None  # CI has no GPU


def test_gsa_with_fewer_than_16_slots_is_refused_before_triton_fails_to_compile():
    from types import SimpleNamespace

    from flame.kernels.compat import triton_shape_blocker

    why, fix = triton_shape_blocker(SimpleNamespace(model_type="gsa", num_slots=8), mode="triton")
    assert why == "gsa with num_slots=8 cannot run on FLA's Triton kernels: they need at least 16 slots"
    assert fix == "set num_slots to 16 or more in the model config (FLA's default is 64)"
    assert triton_shape_blocker(SimpleNamespace(model_type="gsa", num_slots=16), mode="triton") is None
    assert triton_shape_blocker(SimpleNamespace(model_type="gsa", num_slots=8), mode="torch") is None  # portable
    assert triton_shape_blocker(SimpleNamespace(model_type="gla", num_slots=8), mode="triton") is None
