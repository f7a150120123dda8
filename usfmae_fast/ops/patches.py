"""Public ``patchify`` / ``unpatchify`` with argument checks (pixels in (p, p, C) order)."""
from __future__ import annotations

import torch

from . import _checks, reference


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, C, H, W] -> [N, (H/p)*(W/p), p*p*C]``."""
    _checks.tensor("imgs", imgs, 4, "[N, C, H, W]", contiguous=False)
    p = _checks.positive_int("patch_size", patch_size)
    _checks.divisible("image height", imgs.shape[2], p)
    _checks.divisible("image width", imgs.shape[3], p)
    return reference.patchify(imgs, p)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None,
               in_chans: int | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`; ``grid`` = (rows, cols) of patches, square when omitted."""
    _checks.tensor("x", x, 3, "[N, L, p*p*C]", contiguous=False)
    p = _checks.positive_int("patch_size", patch_size)
    length, dim = x.shape[1:]
    if grid is None:
        side = int(round(length ** 0.5))
        if side * side != length:
            raise ValueError(f"x has L = {length} patches, not a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    if grid[0] * grid[1] != length:
        raise ValueError(f"grid {tuple(grid)} holds {grid[0] * grid[1]} patches but x has L = {length}")
    c = dim // (p * p) if in_chans is None else in_chans
    if p * p * c != dim:
        raise ValueError(f"x last dim {dim} != patch_size**2 * in_chans = {p * p * c}")
    return reference.unpatchify(x, p, tuple(grid), c)
