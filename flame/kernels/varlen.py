"""Document boundaries (cu_seqlens) for the portable kernels.

FLA packs a varlen batch as one row `[1, T, ...]` with `cu_seqlens = [0, l0, l0+l1, ...]`. The torch kernels
run on a padded batch `[N, max(l), ...]` instead: every document starts from its own initial state, and the
zero padding sits after each document's last token, where it cannot change the document's outputs. For the
linear-attention recurrences a zero key (and zero log-gate) leaves the state untouched, so the final state
read at the end of the padded row is the state after the document's last token.
"""

from __future__ import annotations

import torch


def pack(cu_seqlens: torch.Tensor, *xs: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """`[1, T, ...]` tensors -> `[N, L, ...]` zero-padded per document; returns the mask `[N, L]` too."""
    cu = cu_seqlens.to(torch.long)
    lens = cu[1:] - cu[:-1]
    length = int(lens.max()) if len(lens) else 0
    pos = torch.arange(length, device=cu.device)
    mask = pos[None, :] < lens[:, None]
    total = next(x for x in xs if x is not None).shape[1]
    index = (cu[:-1, None] + pos[None, :]).clamp(max=max(total - 1, 0))
    out = []
    for x in xs:
        if x is None:
            out.append(None)
            continue
        mask_x = mask.to(x.device).view(*mask.shape, *([1] * (x.dim() - 2)))
        out.append(torch.where(mask_x, x[0][index.to(x.device)], 0))
    return mask, out


def unpack(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[N, L, ...]` -> `[1, T, ...]`, dropping the padding `pack` added."""
    return x[mask.to(x.device)].unsqueeze(0)
