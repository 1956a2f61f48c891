"""Optimizer and learning-rate schedules.

The schedule is a pure function of the update index (`lr_at`), set on the optimizer before each update, so a
resumed run needs nothing but the step to continue the schedule exactly and tests can pin every value.
"""

import math

import torch

from flame.config import TrainConfig


def lr_at(
    step: int,
    *,
    lr: float,
    steps: int,
    warmup: int = 0,
    scheduler: str = "cosine",
    min_lr: float = 0.0,
    decay_ratio: float = 0.1,
) -> float:
    """LR of update `step` (0-based) of `steps`.

    warmup: linear from lr/warmup (update 0) to lr (update warmup-1), so no update is wasted at LR 0.
    cosine: lr * (m + (1 - m) * (1 + cos(pi * p)) / 2), p the fraction of the post-warmup updates done
            (Loshchilov & Hutter, SGDR), m = min_lr.
    linear: lr * (m + (1 - m) * (1 - p)).
    wsd:    warmup-stable-decay (Hu et al., MiniCPM): lr until the last decay_ratio * steps updates, then linear to m.
    constant: lr.
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if scheduler == "constant":
        return lr
    if scheduler == "wsd":
        decay_steps = max(1, round(decay_ratio * steps))
        decay_start = max(warmup, steps - decay_steps)
        if step < decay_start:
            return lr
        p = min(1.0, (step - decay_start + 1) / max(1, steps - decay_start))
        return lr * (min_lr + (1 - min_lr) * (1 - p))
    p = min(1.0, (step - warmup) / max(1, steps - warmup - 1))
    if scheduler == "cosine":
        return lr * (min_lr + (1 - min_lr) * 0.5 * (1 + math.cos(math.pi * p)))
    if scheduler == "linear":
        return lr * (min_lr + (1 - min_lr) * (1 - p))
    raise ValueError(f"unknown scheduler {scheduler}")


def schedule(cfg: TrainConfig, steps: int):
    """lr_at bound to the run's options: step -> lr."""
    return lambda step: lr_at(
        step,
        lr=cfg.lr,
        steps=steps,
        warmup=cfg.warmup,
        scheduler=cfg.scheduler,
        min_lr=cfg.min_lr,
        decay_ratio=cfg.decay_ratio,
    )


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device_type: str, own_step: bool = False
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings and projections), not on norms, biases or gates.

    Fused (one kernel for the whole update) on CUDA and on the CPU, where torch has it for every float dtype; the
    foreach implementation elsewhere. The fused kernel also takes `found_inf`, with which the engine skips an update
    whose loss or gradient is not finite without waiting for the GPU to say so (flame.engine.Updates).

    own_step (where the launcher leaves the optimizer whole: one process, DDP): flame's AdamW
    (flame.kernels.adamw), torch's with flame's one-kernel step on a GPU and the clip folded into it (`clip_`).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = True if device_type in ("cuda", "cpu") else None
    kind = torch.optim.AdamW
    if own_step and fused:
        from flame.kernels.adamw import AdamW as kind  # Triton: imported only where it is used
    return kind(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def fill_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state (AdamW: zero moments, step 1) without changing a weight, when it
    has none yet: one step with zero gradients at LR 0 (decoupled weight decay scales by LR, so it is 0 too).

    Loading an FSDP checkpoint needs it: accelerate reads the sharded optimizer state into the dict the live
    optimizer would save (FSDP.optim_state_dict, then torch.distributed.checkpoint.load), and a new optimizer has
    no state, so nothing is read and training goes on with fresh moments (seen on 2 H200s: the update after a
    resume differed; on the CPU the loaded optimizer held no state at all)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper steps only at accumulation ends
    if inner.state:
        return
    lrs = [group["lr"] for group in inner.param_groups]
    for group in inner.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    inner.step()
    for group, lr in zip(inner.param_groups, lrs):
        group["lr"] = lr
    inner.zero_grad(set_to_none=True)
