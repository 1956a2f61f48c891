"""How flame.kernels puts itself between FLA's layers and FLA's Triton kernels.

Each covered entry point (a function such as `fla.ops.gla.chunk_gla`, or the `apply` of an autograd Function
such as `fla.modules.norm.layernorm.LayerNormFunction`) is replaced by a dispatcher that, per call, looks at
the first tensor argument: on a CUDA (or other Triton) device it calls FLA's original (under torch.compile outside
the graph: see _outside_graphs), on the CPU the torch version. FLA's modules bind these names at import (`from
fla.ops.gla import chunk_gla`, `swish = SwishFunction.apply`, the ACT2FN table), so the dispatcher replaces the
object everywhere an `fla.*` module holds it, not only where it is defined.

The public ops of `fla.ops` that have no torch version get a guard instead: on CPU it raises a ModelError
naming the op and the model type that called it, rather than Triton's "0 active drivers".
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flame.errors import ModelError
from flame.kernels.config import settings


@dataclass(frozen=True)
class Target:
    """One FLA entry point and its torch version."""

    path: str
    """`module:name` of a function, or `module:Class.apply` of an autograd Function, where FLA defines it."""
    portable: Callable
    """The torch function, taking the same arguments (an autograd Function's forward arguments, minus ctx)."""


@dataclass(frozen=True)
class GpuTarget:
    """One FLA function that flame puts a faster GPU kernel of its own in front of."""

    path: str
    """`module:name` of the function, where FLA defines it."""
    in_front_of: Callable
    """original -> the function to call in its place (which calls the original for what it does not cover)."""


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def use_portable(args, kwargs) -> bool:
    """True where the torch version must run: forced by the mode, or the tensors live on the CPU."""
    if settings.mode == "torch":
        return True
    if settings.mode == "triton":
        return False
    tensor = _first_tensor(args, kwargs)
    return tensor is not None and tensor.device.type == "cpu"


def _model_type_in_stack() -> str | None:
    """The `config.model_type` of the nearest PreTrainedModel on the call stack (for error messages)."""
    frame = sys._getframe(2)
    while frame is not None:
        owner = frame.f_locals.get("self")
        model_type = getattr(getattr(owner, "config", None), "model_type", None)
        if isinstance(model_type, str):
            return model_type
        frame = frame.f_back
    return None


def missing_op_error(op: str, detail: str | None = None) -> ModelError:
    model_type = _model_type_in_stack()
    who = f"model type {model_type!r}" if model_type else "this FLA model"
    why = f" ({detail})" if detail else ""
    return ModelError(
        f"{who} cannot run on CPU: FLA op {op} has no portable torch implementation in flame.kernels{why}",
        "run it on a CUDA GPU, or pick a model type that flame.kernels covers (flame.kernels.SUPPORTED_MODEL_TYPES)",
    )


def _outside_graphs(name: str, original: Callable) -> Callable:
    """`original` as the dispatcher calls it: directly, or, while torch.compile traces, as a graph break, so FLA's
    kernel runs as it does eagerly. Inside a graph, inductor would take each of FLA's `triton.autotune` kernels over
    and benchmark every launch config itself, ignoring Triton's autotune cache (minutes per shape: GLA-340M's first
    compiled step had not finished after 7 minutes on an H200). Out of the graph, FLA's kernels keep their tuned
    configs and cache, and inductor compiles the torch code between them. The portable torch versions stay traced."""
    eager = torch.compiler.disable(original)

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return eager(*args, **kwargs)
        return original(*args, **kwargs)

    return _own_code(call, f"{name}_outside_graphs")


def _own_code(fn: Callable, name: str) -> Callable:
    """`fn` with a code object of its own, named `name`. Dynamo keeps its compiled frames per code object, and every
    dispatcher shares one: a dispatcher frame that dynamo compiles on its own (after a graph break in its caller)
    was recompiled for each FLA entry point's arguments until dynamo's limit of 8 and a warning (10-layer GLA on
    the CPU). With its own code each has its own few; profiles and tracebacks name the entry point."""
    names = {"co_name": name, "co_qualname": name} if sys.version_info >= (3, 11) else {"co_name": name}
    fn.__code__ = fn.__code__.replace(**names)
    return fn


def _make_dispatcher(name: str, original: Callable, portable: Callable) -> Callable:
    kernel = _outside_graphs(name, original)

    @functools.wraps(original)
    def op(*args, **kwargs):
        if use_portable(args, kwargs):
            try:
                return portable(*args, **kwargs)
            except NotImplementedError as error:
                raise missing_op_error(name, str(error)) from error
        return kernel(*args, **kwargs)

    op.__flame_original__ = original
    op.__flame_portable__ = portable
    return _own_code(op, f"{name}_dispatch")


def _make_guard(name: str, original: Callable) -> Callable:
    kernel = _outside_graphs(name, original)

    @functools.wraps(original)
    def op(*args, **kwargs):
        if use_portable(args, kwargs):
            raise missing_op_error(name)
        return kernel(*args, **kwargs)

    op.__flame_original__ = original
    op.__flame_portable__ = None
    return _own_code(op, f"{name}_guard")


def _same(value, original) -> bool:
    # Bound `Function.apply` objects are created anew on each attribute access: compare them by equality.
    return value is original or (inspect.ismethod(value) and inspect.ismethod(original) and value == original)


def _replace_everywhere(original: Callable, replacement: Callable) -> None:
    """Swap `original` for `replacement` in every loaded fla.* module namespace and its dict-valued tables."""
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "fla" or module_name.startswith("fla.")):
            continue
        namespace = vars(module)
        for key, value in list(namespace.items()):
            if _same(value, original):
                namespace[key] = replacement
            elif isinstance(value, dict) and key.isupper():
                # name tables such as fla.modules.activations.ACT2FN
                for entry, fn in list(value.items()):
                    if _same(fn, original):
                        value[entry] = replacement


def resolve(path: str):
    """`module:attr` or `module:Class.apply` -> (owner object, attribute name, current value)."""
    module_name, _, attr = path.partition(":")
    module = importlib.import_module(module_name)
    owner = module
    *parents, leaf = attr.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, leaf, getattr(owner, leaf)


def _swap(path: str, make: Callable) -> None:
    """Put `make(current)` where `path` names FLA's object, and everywhere an fla.* module holds that object."""
    owner, leaf, current = resolve(path)
    if getattr(current, "__flame_original__", None) is not None:
        return  # installed already
    op = make(current)
    if isinstance(owner, type) and inspect.ismethod(current):
        # `Function.apply` is a classmethod: callers that spell `Cls.apply(...)` look it up on the class.
        setattr(owner, leaf, staticmethod(op))
    else:
        setattr(owner, leaf, op)
    _replace_everywhere(current, op)


def patch(target: Target) -> None:
    _swap(target.path, lambda current: _make_dispatcher(target.path.replace(":", "."), current, target.portable))


def patch_gpu(target: GpuTarget) -> None:
    def make(current):
        op = target.in_front_of(current)
        op.__flame_original__ = current
        return op

    _swap(target.path, make)


# torch helpers (index bookkeeping, context parallelism plumbing), not kernels
_NOT_OPS = ("fla.ops.utils", "fla.ops.common", "fla.ops.cp", "fla.ops.backends")


def _is_kernel_entry(value) -> bool:
    module = getattr(value, "__module__", None) or ""
    if not inspect.isfunction(value) or getattr(value, "__flame_original__", None) is not None:
        return False
    if not module.startswith("fla.ops.") or module.startswith(_NOT_OPS):
        return False
    # FLA's naive references are torch code and run on CPU as they are.
    return not (module.endswith(".naive") or value.__name__.startswith("naive"))


def guard_uncovered_ops() -> list[str]:
    """Guard the fla.ops functions without a torch version: the public ones of every loaded fla.ops package, and
    every one that an fla.layers / fla.models module imported by name. Returns their qualified names."""
    candidates = {}
    for module_name, module in list(sys.modules.items()):
        if module is None:
            continue
        if module_name.startswith("fla.ops.") and module_name.count(".") == 2:
            names = getattr(module, "__all__", ())
        elif module_name.startswith(("fla.layers.", "fla.models.")):
            names = list(vars(module))
        else:
            continue
        for name in names:
            value = getattr(module, name, None)
            if _is_kernel_entry(value):
                candidates[id(value)] = value
    guarded = []
    for value in candidates.values():
        qualified = f"{value.__module__}.{value.__name__}"
        _replace_everywhere(value, _make_guard(qualified, value))
        guarded.append(qualified)
    return sorted(guarded)
