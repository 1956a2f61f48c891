"""AdamW's update as one Triton kernel over every weight, with gradient-norm clipping folded into it, on the GPU.

torch's fused AdamW moves each weight's bytes (the weight, its gradient and the two moments read, three written) at
3.4 TB/s on an H200, and clipping before it is a pass of its own that reads and writes every gradient again:
`clip_grad_norm_` then the step took 15.9 ms of GLA-1.3B's 311 ms step at batch 8 (benchmarks/RESULTS.md,
twenty-fourth session). Here one launch updates every tensor of a parameter group (a table of their addresses), and
multiplies each gradient by the clip coefficient as it reads it, so the clip writes nothing. The arithmetic is
torch's fused AdamW's on a GPU (aten/src/ATen/native/cuda/fused_adam_utils.cuh), in fp32 with betas rounded to fp32
(the per-tensor scalars, the bias corrections among them, in double: a weight differs from torch's by about one fp32
rounding an update), and the optimizer's state is torch's, so checkpoints move between the two either way.

`AdamW` is torch.optim.AdamW (fused) with that step where it applies: CUDA, the `auto` kernels mode, fp32 weights,
no amsgrad, maximize or grad scaler; everywhere else (the CPU, other dtypes, sharded weights) torch's step runs, the
clip coefficient applied first as torch's clip does.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from flame.kernels.config import Launch, settings

LAUNCH = Launch(block=1024, warps=4)


@triton.jit
def _adamw_kernel(
    ADDRESSES,  # int64 [4, T]: weight, gradient, exp_avg, exp_avg_sq of each tensor
    NUMELS,  # int64 [T]
    SCALARS,  # float32 [3, T]: each tensor's lr / (1 - beta1^step), sqrt(1 - beta2^step), 1 - lr * weight_decay
    BLOCKS,  # int32 [2, programs]: each program's tensor and block within it
    T,
    PROGRAMS,
    FOUND_INF,  # 0-d float32: 1 skips the update (torch's found_inf)
    COEF,  # 0-d float32: the clip coefficient each gradient is multiplied by
    BETA1: tl.constexpr,
    BETA2: tl.constexpr,
    ONE_MINUS_BETA1: tl.constexpr,
    ONE_MINUS_BETA2: tl.constexpr,
    EPS: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_COEF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(BLOCKS + pid)
    block = tl.load(BLOCKS + PROGRAMS + pid)
    # every address is a multiple of 16 bytes (checked on the host), so the loads can be vectorised
    p_ptr = tl.multiple_of(tl.load(ADDRESSES + t), 16).to(tl.pointer_type(tl.float32))
    g_ptr = tl.multiple_of(tl.load(ADDRESSES + T + t), 16).to(tl.pointer_type(tl.float32))
    m_ptr = tl.multiple_of(tl.load(ADDRESSES + 2 * T + t), 16).to(tl.pointer_type(tl.float32))
    v_ptr = tl.multiple_of(tl.load(ADDRESSES + 3 * T + t), 16).to(tl.pointer_type(tl.float32))
    n = tl.load(NUMELS + t)
    if HAS_FOUND_INF:
        n = tl.where(tl.load(FOUND_INF) == 0.0, n, 0)  # nothing is read or written
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    step_size = tl.load(SCALARS + t)
    bc2_sqrt = tl.load(SCALARS + T + t)

    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if HAS_COEF:
        g = g * tl.load(COEF)  # as torch's clip does to the gradient
    if HAS_DECAY:
        p = p * tl.load(SCALARS + 2 * T + t)
    m = BETA1 * m + ONE_MINUS_BETA1 * g
    v = BETA2 * v + ONE_MINUS_BETA2 * g * g
    # IEEE-rounded square root and divisions, as CUDA C++ compiles std::sqrt and / by default
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + EPS
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


def scalars(steps: list[torch.Tensor], lr, beta1: float, beta2: float, weight_decay: float) -> torch.Tensor:
    """Each tensor's per-update scalars, float32 [3, T], computed on the device in double from its fp32 step (as
    torch's fused AdamW computes its bias corrections): lr / (1 - beta1^step), sqrt(1 - beta2^step), and the weight
    decay's factor 1 - lr * weight_decay. `lr` a float or a 0-d tensor on the steps' device, rounded to fp32 either
    way: a CUDA graph reads it from an fp32 tensor, and an eager update must be the captured one's (with a float in
    double, DDP's eager and captured runs parted at their first update on 2 H200s)."""
    counted = torch.stack(steps).double()
    lr = lr.float().double() if isinstance(lr, torch.Tensor) else float(torch.tensor(lr, dtype=torch.float32))
    step_size = lr / (1 - torch.pow(beta1, counted))
    decay = (1 - lr * weight_decay) * torch.ones_like(counted)
    return torch.stack([step_size, torch.sqrt(1 - torch.pow(beta2, counted)), decay]).float()


class _Tables:
    """The device tables of one parameter group's launch: the blocks (by the tensors' sizes, kept while they stay)
    and the addresses (rebuilt when a gradient moves: eagerly, `zero_grad(set_to_none=True)` may hand the next
    backward other memory)."""

    def __init__(self, launch: Launch):
        self.launch = launch
        self.sizes: tuple | None = None
        self.blocks: torch.Tensor | None = None
        self.numels: torch.Tensor | None = None
        self.addresses: dict[tuple, torch.Tensor] = {}
        self.captured: list[torch.Tensor] = []  # a CUDA graph's tables and the host memory its replays copy from

    def _blocks(self, sizes: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(each program's tensor and block within it, int32 [2, programs]; the sizes, int64 [T]) on the host."""
        counts = torch.tensor([triton.cdiv(n, self.launch.block) for n in sizes], dtype=torch.int64)
        which = torch.repeat_interleave(torch.arange(len(sizes)), counts)
        within = torch.arange(int(counts.sum())) - (torch.cumsum(counts, 0) - counts)[which]
        return torch.stack([which, within]).to(torch.int32), torch.tensor(sizes, dtype=torch.int64)

    def get(self, tensors: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(addresses, sizes, blocks) on the tensors' device for `tensors` (weights, gradients, exp_avgs,
        exp_avg_sqs)."""
        device = tensors[0][0].device
        sizes = tuple(p.numel() for p in tensors[0])
        key = tuple(t.data_ptr() for ts in tensors for t in ts)
        addresses = torch.tensor(key, dtype=torch.int64).view(4, -1)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A capture records the copies without running them, and each replay copies again from the same host
            # memory: these tables hold values only once the graph replays, and they and their pinned host copies
            # are kept as long as this optimizer (freed, the host memory could be handed to another copy).
            hosts = [t.pin_memory() for t in (addresses, *self._blocks(sizes))]
            tables = [t.to(device, non_blocking=True) for t in hosts]
            self.captured += hosts + tables
            return tables[0], tables[2], tables[1]
        if sizes != self.sizes:
            blocks, numels = self._blocks(sizes)
            self.blocks, self.numels = _to(blocks, device), _to(numels, device)
            self.sizes, self.addresses = sizes, {}
        if key not in self.addresses:
            if len(self.addresses) >= 4:
                self.addresses.pop(next(iter(self.addresses)))
            self.addresses[key] = _to(addresses, device)
        return self.addresses[key], self.numels, self.blocks


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without the host waiting (through pinned memory onto a GPU; torch's pinned-memory cache keeps
    the host copy until the copy has run)."""
    cuda = device.type == "cuda"
    return (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)


def _one_minus(beta: float) -> float:
    """1 - beta as torch's fused AdamW takes it on a GPU: beta rounded to fp32 first (its kernel computes in the
    weights' precision), so the two weights of each moment's average add up to 1 in fp32. In double, 1 - 0.999 would
    weight the squared gradient 1.3e-5 more than torch does."""
    return 1.0 - float(torch.tensor(beta, dtype=torch.float32))


def adamw_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    found_inf: torch.Tensor | None = None,
    clip_coef: torch.Tensor | None = None,
    tables: _Tables | None = None,
    launch: Launch = LAUNCH,
) -> None:
    """One AdamW update of every tensor in place, torch's fused AdamW's in fp32 (`scalars` in double): the steps
    counted (and counted back where `found_inf` is 1), each gradient multiplied by `clip_coef` as it is read (the
    gradients themselves are left as they are). Every tensor fp32 and contiguous, on one device; `steps` 0-d fp32
    on that device; `lr` a float or a 0-d tensor there."""
    if not params:
        return
    tables = tables or _Tables(launch)
    torch._foreach_add_(steps, 1)
    per_tensor = scalars(steps, lr, beta1, beta2, weight_decay)
    addresses, numels, blocks = tables.get([params, grads, exp_avgs, exp_avg_sqs])
    programs = blocks.shape[1]
    _adamw_kernel[(programs,)](
        addresses, numels, per_tensor, blocks, len(params), programs,
        found_inf if found_inf is not None else per_tensor, clip_coef if clip_coef is not None else per_tensor,
        BETA1=beta1, BETA2=beta2, ONE_MINUS_BETA1=_one_minus(beta1), ONE_MINUS_BETA2=_one_minus(beta2), EPS=eps,
        HAS_DECAY=weight_decay != 0, HAS_FOUND_INF=found_inf is not None, HAS_COEF=clip_coef is not None,
        BLOCK=tables.launch.block, num_warps=tables.launch.warps,
    )  # fmt: skip
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def covers(tensors: list[torch.Tensor]) -> bool:
    """Whether the kernel takes these tensors: CUDA, fp32, contiguous, dense, 16-byte aligned, on one device."""
    first = tensors[0]
    return all(
        t.is_cuda
        and t.device == first.device
        and t.dtype == torch.float32
        and t.layout == torch.strided
        and t.is_contiguous()
        and t.data_ptr() % 16 == 0
        and type(t) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor (FSDP2's shards) or another subclass
        for t in tensors
    )


def _torch_step():
    """torch's AdamW step without the optimizer hooks that torch wraps around the `step` of an optimizer class once it
    has an instance (the hooks of a flame AdamW run around its own step; through super().step() they ran twice)."""
    return inspect.unwrap(torch.optim.AdamW.step, stop=lambda f: not getattr(f, "hooked", False))


class AdamW(torch.optim.AdamW):
    """torch's fused AdamW, stepping with flame's kernel where it applies (see the module's docstring).

    `clip_(parameters, max_norm)` replaces `torch.nn.utils.clip_grad_norm_` before a step: it returns the same total
    norm and leaves the gradients as they are; the next step multiplies them by the same clip coefficient as it
    reads them. The engine sets `found_inf` as for torch's fused AdamW."""

    def __init__(self, params, **kwargs):
        kwargs.setdefault("fused", True)
        super().__init__(params, **kwargs)
        self.clip_coef: torch.Tensor | None = None
        self._tables: dict[int, _Tables] = {}  # by param group

    def clip_(self, parameters, max_norm: float) -> torch.Tensor:
        """The total 2-norm of the gradients (torch.nn.utils.get_total_norm); the next step clips to max_norm with
        torch's coefficient, max_norm / (norm + 1e-6) capped at 1."""
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        self.clip_coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        coef, self.clip_coef = self.clip_coef, None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = []
        for group in self.param_groups:
            tensors = [], [], [], [], []  # weights with a gradient, the gradients, exp_avgs, exp_avg_sqs, steps
            self._init_group(group, tensors[0], tensors[1], tensors[2], tensors[3], [], tensors[4])
            groups.append(tensors)
        if not self._own_step(groups):
            if coef is not None and (grads := [g for tensors in groups for g in tensors[1]]):
                torch._foreach_mul_(grads, coef.to(grads[0].device))  # torch's clip
            _torch_step()(self)  # not super().step(): torch's hooks already ran around this step
            return loss
        found_inf = getattr(self, "found_inf", None)
        for i, (group, (params, grads, exp_avgs, exp_avg_sqs, steps)) in enumerate(zip(self.param_groups, groups)):
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adamw_step_(
                params, grads, exp_avgs, exp_avg_sqs, steps,
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], found_inf=found_inf, clip_coef=coef,
                tables=self._tables.setdefault(i, _Tables(LAUNCH)),
            )  # fmt: skip
        return loss

    def _own_step(self, groups: list[tuple]) -> bool:
        """Whether this step is flame's kernel's (else torch's)."""
        if settings.mode != "auto" or getattr(self, "grad_scale", None) is not None:
            return False
        if any(g["amsgrad"] or g["maximize"] or g["differentiable"] for g in self.param_groups):
            return False
        tensors = [t for group in groups for kind in group[:4] for t in kind]
        steps = [s for group in groups for s in group[4]]
        return (
            bool(tensors)
            and covers(tensors)
            and all(s.device == tensors[0].device and s.dtype == torch.float32 and s.ndim == 0 for s in steps)
        )
