"""Compare two implementations of one FLA op (outputs, final state, every input gradient) on any device.

Used by test_gpu.py (flame's torch path against FLA's Triton path) and checked on CPU by test_harness.py.

The cotangents `do` and `dht` are drawn once, contiguous and in logical order, and the same tensors are fed to
both backward passes. Drawing them per run with `torch.randn_like(o)` is wrong: randn_like fills memory in
stride order, so an output that is a transposed view (flame's torch path returned `[B, H, T, V]` memory as
`[B, T, H, V]`) receives other random numbers at every logical position than a contiguous output does, and every
gradient then differs by a ratio of about sqrt(2) (two unrelated tensors of equal rms), although both are right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """FLA's error measure (fla/utils testing): rms(a - b) / rms(b)."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh leaf with the same values (and memory layout) as `x`, so that each run owns its gradients."""
    return x.detach().clone().requires_grad_()


def _cotangent(like: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor | None:
    if like is None:
        return None
    # torch.randn(shape) is contiguous whatever the strides of `like`: the same logical values for any layout.
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)


def run_backward(fn, inputs, kwargs, cotangents=None, seed=1, backward=True):
    """Call fn on fresh leaves of the floating-point inputs, backpropagate sum(o*do) + sum(ht*dht).

    Returns (o, ht, grads, cotangents); grads is one entry per floating-point input tensor, in input order (None
    where the op gave it no gradient). Pass the cotangents of a first run to reuse exactly the same ones.
    backward=False: the forward only (an op with no backward of its own), grads empty."""
    args = [leaf(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    o, ht = fn(*args, **kwargs)
    if cotangents is None:
        generator = torch.Generator(device=o.device).manual_seed(seed)
        cotangents = (_cotangent(o, generator), _cotangent(ht, generator))
    do, dht = cotangents
    assert do.shape == o.shape, ("output shape", tuple(o.shape), tuple(do.shape))
    assert (ht is None) == (dht is None), "one run returned a final state and the other did not"
    loss = (o.float() * do).sum()
    if ht is not None:
        assert dht.shape == ht.shape, ("final state shape", tuple(ht.shape), tuple(dht.shape))
        loss = loss + (ht.float() * dht).sum()
    if not backward:
        return o, ht, [], cotangents
    loss.backward()
    grads = [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return o, ht, grads, cotangents


def compare(portable, original, inputs, tol, kwargs=None, names=None, label=None, backward=True):
    """Assert that portable(*inputs) matches original(*inputs): output and final state within tol, every input
    gradient within 2 * tol (FLA's ratio). Reports every mismatch at once, not only the first. With `label`, prints
    the measured ratios on one line (`RATIO label output=... state=... grad=max...`), for the tolerance table."""
    kwargs = kwargs or {}
    o_t, h_t, g_t, cotangents = run_backward(original, inputs, kwargs, backward=backward)
    o_p, h_p, g_p, _ = run_backward(portable, inputs, kwargs, cotangents=cotangents, backward=backward)
    names = names or [f"input {i}" for i in range(len(g_t))]
    if label:
        grads = [ratio(a, b) for a, b in zip(g_p, g_t) if a is not None and b is not None]
        state = f"{ratio(h_p, h_t):.3g}" if h_t is not None else "-"
        print(f"RATIO {label} output={ratio(o_p, o_t):.3g} state={state} grad={max(grads, default=0):.3g}")
    failures = []
    if ratio(o_p, o_t) >= tol:
        failures.append(f"output: ratio {ratio(o_p, o_t):.3g}")
    if h_t is not None and ratio(h_p, h_t) >= tol:
        failures.append(f"final state: ratio {ratio(h_p, h_t):.3g}")
    for name, a, b in zip(names, g_p, g_t):
        if (a is None) != (b is None):
            failures.append(f"grad of {name}: {'portable' if a is None else 'original'} gave none")
        elif a is not None and ratio(a, b) >= 2 * tol:
            failures.append(f"grad of {name}: ratio {ratio(a, b):.3g}")
    assert not failures, "; ".join(failures)


def interpreted(script: str, cases: list) -> list:
    """Run `script` (which reads the JSON `cases` from argv[1] and prints one JSON line last) in Triton's interpreter,
    in a subprocess since TRITON_INTERPRET is read when a kernel is defined; its results."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
