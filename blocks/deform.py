"""Modulated deformable convolution (DCNv2), the `deform` token mixer.

Zhu, Hu, Lin and Dai, "Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019,
https://arxiv.org/abs/1811.11168.

    y(p) = sum_t w_t * m_t(p) * x(p + p_t + dp_t(p))

for the k*k taps p_t of a k x k kernel. A 3x3 conv predicts, per position, 2 offsets (dy, dx) and
one modulation scalar per tap; x is read by bilinear interpolation, zero outside the image.

hybridnas decisions:
- The offset/modulation conv starts at zero and the modulation is ``2 * sigmoid``, so at
  initialisation every offset is 0 and every modulation exactly 1: the block *is* a plain k x k
  conv (DCNv2's ``sigmoid`` would start at 0.5 x the conv).
- Pure PyTorch, no compiled kernel. Sampling is a gather in pixel coordinates, as DCNv2 and
  torchvision do it: the low corner is ``floor(p)``, the weights are ``p - floor(p)``. Bilinear
  interpolation has a kink at integer positions, and taking the floor gives the one-sided derivative
  towards +1 there on every pixel; this matters at initialisation, where every sample sits exactly
  on a pixel. (``grid_sample`` would round-trip through normalised coordinates, land some integer
  positions at p - 1e-16 and take the other side: 400 of the 3,528 offset gradients of a 14x14 map
  differed.) Corners outside the image are zero, also for the derivative: at p = -1 it is the
  value of the pixel at 0, as in torchvision (DCNv2's CUDA code cuts it to zero there).
  How: x goes channels-last into a zero-bordered table; positions are clamped to [-1, size] (every
  corner beyond is zero), so ``floor(p)`` and ``floor(p) + 1`` always land in the table and no
  bounds test is needed; one ``index_select`` on an overlapping (pixel, next pixel) view fetches all
  four corners, in blocks of positions that fit a 4 MiB buffer; two ``lerp`` finish the sample. A
  custom autograd Function saves only the table and the positions (what ``grid_sample`` keeps) and
  gathers the corners again in backward. Against the grid_sample version (CPU, one thread, forward
  + backward, offsets of about a pixel): on par at batch 64, width 64, 28x28 and 14x14; 1.15x the time at
  batch 8, width 32, 28x28; batch-1 inference 1.1-1.2x (per-op overhead on small maps); peak memory
  +3%. Then one matmul contracts (taps x channels) with the weights, so MAC counters see the main
  conv product.
- Sampling positions are computed and sampled in fp32 even under bf16 autocast: in bf16 a pixel
  coordinate of 28 is only exact to 1/8, which would blur even the zero-offset conv.

MACs (``runners.measure``): the offset conv, the modulation product (C per tap and pixel) and the
main product. Bilinear sampling is interpolation and free (it is written with ``lerp``, which the
counter does not count), as the papers' counters treat resampling.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .conv import check_groups, check_int

# Elements of the four corners of one block of positions, (n, k, 4, C), on the CPU: 4 MiB in fp32
# (fewer, larger blocks were as fast; smaller ones pay per-op overhead); the buffer is reused block
# after block. GPUs want large launches: 256 MiB blocks there, so a batch is one block or a few.
_BLOCK_ELEMS = 1 << 20
_GPU_BLOCK_ELEMS = 1 << 26


def _table(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, W, C) inside a zero border: (B, S + 3, S + 3, C) with S = max(H, W).

    Pixel (y, x) of image i is row ``(i * (S + 3) + y + 1) * (S + 3) + x + 1`` of the flat table;
    one zero row and column lie before the image, two or more after it.
    """
    _, H, W, _ = x.shape
    S = max(H, W)
    return F.pad(x, (0, 0, 1, S + 2 - W, 1, S + 2 - H))


def _blocks(B: int, P: int, C: int, device: torch.device) -> tuple[int, list[tuple[slice, slice]]]:
    """(images, positions) blocks of about a block's worth of corner elements each, and the
    elements of the largest block (the buffer's size)."""
    budget = _BLOCK_ELEMS if device.type == "cpu" else _GPU_BLOCK_ELEMS
    per_image = 4 * P * C
    if per_image <= budget:
        n = min(B, budget // per_image)
        return n * per_image, [(slice(b0, min(b0 + n, B)), slice(0, P)) for b0 in range(0, B, n)]
    k = max(1, budget // (4 * C))
    blocks = [(slice(b, b + 1), slice(p0, min(p0 + k, P))) for b in range(B) for p0 in range(0, P, k)]
    return k * 4 * C, blocks


@functools.lru_cache(maxsize=64)
def _row_steps(i0: int, i1: int, Sp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat-table row of pixel (0, 0) of images i0..i1-1, (n, 1); and the steps (0, one row down)."""
    first = torch.arange(i0, i1, device=device).view(-1, 1) * (Sp * Sp) + (Sp + 1)
    return first, torch.tensor([0, Sp], device=device)


def _corners(table: torch.Tensor, pos: torch.Tensor, images: slice, buf: torch.Tensor):
    """The four bilinear corners of a block of positions, and where they are.

    pos: (n, k, 2) pixel coordinates (y, x) of images ``images``. Positions are clamped to [-1, S]
    first (every corner beyond is zero anyway), so ``floor(p)`` and ``floor(p) + 1`` always land
    in the table. Returns the corners (n, k, 4, C) in the order (y0, x0), (y0, x0+1), (y0+1, x0),
    (y0+1, x0+1), written into ``buf``; the fractions (n, k, 2); and the flat-table rows of (y0, x0)
    and (y0+1, x0), (n * k * 2,). Each of those rows starts a pair of adjacent pixels (x0, x0 + 1),
    so one gather on an overlapping (row, 2C) view of the table fetches all four corners.
    """
    n, k, _ = pos.shape
    _, Sp, _, C = table.shape
    clamped = pos.clamp(-1, Sp - 3)
    low = clamped.floor()
    frac = clamped - low
    first, down = _row_steps(images.start, images.stop, Sp, pos.device)
    top_left = torch.add(low[..., 1], low[..., 0], alpha=Sp).long().add_(first)
    rows = (top_left.unsqueeze(-1) + down).view(-1)
    flat = table.view(-1)
    pairs = flat.as_strided((flat.numel() // C - 1, 2 * C), (C, 1))
    v = torch.index_select(pairs, 0, rows, out=buf[: n * k * 4 * C].view(-1, 2 * C))
    return v.view(n, k, 4, C), frac, rows


def _gather(table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    B, _, _, C = table.shape
    P = pos.shape[1]
    out = table.new_empty(B, P, C)
    size, blocks = _blocks(B, P, C, table.device)
    buf = table.new_empty(size)
    for images, positions in blocks:
        v, frac, _ = _corners(table, pos[images, positions], images, buf)
        pairs = v.unflatten(2, (2, 2)).flatten(3)  # (n, k, [top, bottom], [x0 | x0 + 1] channels)
        wy, wx = frac.unsqueeze(-1).unbind(2)
        rows = pairs[:, :, 0].lerp_(pairs[:, :, 1], wy)  # (n, k, 2C): column x0, then column x0 + 1
        torch.lerp(rows[..., :C], rows[..., C:], wx, out=out[images, positions])
    return out


def bilinear_gather(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of x (B, H, W, C) at pixel positions pos (B, P, 2) = (y, x): (B, P, C).

    Zero outside the image; floor-based, as DCNv2 and torchvision: a sample on a pixel is that pixel
    bit for bit (``lerp`` is exact at weight 0), and the derivative there is the one-sided one towards
    +1. Differentiable in x and pos (see ``_BilinearGather``).
    """
    if torch.is_grad_enabled() and (x.requires_grad or pos.requires_grad):
        return _BilinearGather.apply(x, pos)
    return _gather(_table(x), pos)


class _BilinearGather(torch.autograd.Function):
    """``bilinear_gather`` with a backward that saves x's table and the positions only.

    The corners are gathered again in backward, block by block, so memory stays at what
    ``grid_sample`` keeps (the input and the sampling grid).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        table = _table(x)
        ctx.save_for_backward(table, pos)
        ctx.size = x.shape[1:3]
        return _gather(table, pos)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        table, pos = ctx.saved_tensors
        B, _, _, C = table.shape
        P = pos.shape[1]
        grad = grad.to(table.dtype)
        dtable = torch.zeros_like(table) if ctx.needs_input_grad[0] else None
        dpos = torch.empty_like(pos)
        size, blocks = _blocks(B, P, C, table.device)
        buf = table.new_empty(size)
        pair = torch.tensor([0, 1], device=pos.device)
        for images, positions in blocks:
            g = grad[images, positions].unsqueeze(2)  # (n, k, 1, C)
            v, frac, pair_rows = _corners(table, pos[images, positions], images, buf)
            d = v.mul_(g).sum(-1)  # (n, k, 4): the gradient's dot product with every corner
            fy, fx = frac.unbind(-1)
            # d/dy = (1-fx)(v10 - v00) + fx (v11 - v01); d/dx = (1-fy)(v01 - v00) + fy (v11 - v10).
            torch.lerp(d[..., 2] - d[..., 0], d[..., 3] - d[..., 1], fx, out=dpos[images, positions, 0])
            torch.lerp(d[..., 1] - d[..., 0], d[..., 3] - d[..., 2], fy, out=dpos[images, positions, 1])
            if dtable is not None:
                gy, gx = 1 - fy, 1 - fx
                w = torch.stack([gy * gx, gy * fx, fy * gx, fy * fx], -1).unsqueeze(-1)  # corner weights
                src = torch.mul(g, w, out=v)
                rows = (pair_rows.view(-1, 2, 1) + pair).view(-1)
                dtable.view(-1, C).index_add_(0, rows, src.view(-1, C))
        # A position below -1 was clamped onto the border row, where the formula sees pixel 0; its
        # true gradient is zero (every corner is outside). Beyond the far border it is zero already.
        dpos.masked_fill_(pos < -1, 0)
        H, W = ctx.size
        dx = None if dtable is None else dtable[:, 1 : H + 1, 1 : W + 1]
        return dx, dpos


class DeformConv(nn.Module):
    """k x k modulated deformable conv (DCNv2), ``(B, C, H, W) -> (B, C, H, W)``."""

    paper = (
        "Deformable ConvNets v2: More Deformable, Better Results (Zhu et al., CVPR 2019) "
        "https://arxiv.org/abs/1811.11168"
    )
    options: dict[str, Any] = {"kernel": 3, "groups": 1}

    def __init__(self, dim: int, kernel: int = 3, groups: int = 1) -> None:
        super().__init__()
        check_int("dim", dim)
        check_int("kernel", kernel, odd=True)  # odd: taps are centred on the output pixel
        check_groups(groups, dim)
        self.dim, self.kernel, self.groups = dim, kernel, groups
        taps = kernel * kernel
        # Per tap t: channels 2t, 2t+1 = (dy, dx) offsets in pixels; channel 2*taps + t = modulation logit.
        self.offset = nn.Conv2d(dim, 3 * taps, 3, padding=1)
        self.weight = nn.Parameter(torch.empty(dim, dim // groups, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(dim))
        self._grids: dict[tuple, torch.Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Main weights as nn.Conv2d initialises them, so "deform at init" is a drop-in for "conv".
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt((self.dim // self.groups) * self.kernel**2)
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def _base_grid(self, H: int, W: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Zero-offset sampling positions in pixels, (H*W, taps, 2): (row, column) of every tap."""
        key = (H, W, device, dtype)
        grid = self._grids.get(key)
        if grid is None:
            r = self.kernel // 2
            d = torch.arange(-r, r + 1, device=device, dtype=dtype)
            taps = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1).view(1, -1, 2)  # t = i * k + j
            ys = torch.arange(H, device=device, dtype=dtype)
            xs = torch.arange(W, device=device, dtype=dtype)
            pixels = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).view(-1, 1, 2)
            grid = pixels + taps
            if len(self._grids) >= 8:  # a model sees a handful of resolutions; don't grow without bound
                self._grids.clear()
            self._grids[key] = grid
        return grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        taps, g, L = self.kernel * self.kernel, self.groups, H * W
        om = self.offset(x)
        sample_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 at least, fp64 kept
        with torch.autocast(device_type=x.device.type, enabled=False):
            om = om.to(sample_dtype)
            # Sample positions (B, L * taps, 2), position-major: index p * taps + t.
            off = om[:, : 2 * taps].view(B, taps, 2, L).permute(0, 3, 1, 2)
            pos = (self._base_grid(H, W, x.device, sample_dtype) + off).view(B, L * taps, 2)
            cols = bilinear_gather(x.to(sample_dtype).permute(0, 2, 3, 1), pos)
            modulation = 2.0 * om[:, 2 * taps :].sigmoid()  # (B, taps, H, W), 1.0 at init
            cols = cols.view(B, L, taps, C) * modulation.view(B, taps, L).transpose(1, 2).unsqueeze(-1)
        # The main product: (B, L, taps * C) @ (taps * C, C) per group, with the columns as they
        # come (position-major), so neither they nor their gradient are transposed; a plain matmul
        # (addmm), so autocast runs it in bf16 and FlopCounterMode counts it. Back to x's dtype so
        # a model cast to bf16 (no autocast) matches its bf16 weights.
        cg = C // g
        cols = cols.to(x.dtype)
        weight = self.weight.reshape(g, cg, cg, taps).permute(0, 3, 2, 1).reshape(g, taps * cg, cg)
        if g == 1:
            out = F.linear(cols.view(B, L, taps * C), weight[0].T, self.bias)  # (B, L, C)
        else:  # (B, g, L, taps * cg) @ (g, taps * cg, cg) -> (B, g, L, cg) -> (B, L, C)
            cols = cols.view(B, L, taps, g, cg).permute(0, 3, 1, 2, 4).reshape(B, g, L, taps * cg)
            out = torch.matmul(cols, weight).transpose(1, 2).reshape(B, L, C) + self.bias.to(cols.dtype)
        return out.transpose(1, 2).reshape(B, C, H, W)
