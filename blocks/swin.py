"""Swin Transformer window attention (W-MSA, SW-MSA) and patch merging.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021,
https://arxiv.org/abs/2103.14030 (official code: https://github.com/microsoft/Swin-Transformer).

What the official ``WindowAttention``/``SwinTransformerBlock`` compute is kept: non-overlapping M x M
windows, a learned relative position bias table of (2M-1)^2 x heads entries (trunc-normal, std 0.02),
cyclic shift by M//2 plus a region mask for the shifted variant, and the rule that a map no larger than
the window (min(H, W) <= M) uses M = min(H, W) and no shift. Where hybridnas decides differently,
so that any map size works:

* Maps whose sides are not multiples of M are zero-padded right/bottom (as the official det/seg
  backbones do) but the padded tokens are *masked as keys*, not attended as zeros. A partial border
  window is therefore exactly attention over its real tokens.
* Masks are built per forward from (H, W, M, shift) on the input's device and cached, never fixed at
  construction. The shifted variant is exactly attention over windows offset by ``shift`` with
  partial windows at the borders (cyclic shift + mask is the fast way to compute that).
* When the window is clamped to a smaller m, the bias for the m x m window is the centred
  (2m-1)^2 sub-table of the (2M-1)^2 table: offset (dy, dx) reads the same entry at every m.
* Masked logits use a large finite negative value (-1e4), not -inf: a padded query whose window holds
  only padding has no valid key, and -inf would turn its (discarded) row into NaN in forward and
  backward. exp(-1e4) is exactly 0 in fp32 and bf16, so real rows are masked exactly.
* The attention itself is one ``F.scaled_dot_product_attention`` call with an additive float mask
  (bias + masks) on GPUs, and the same math as two matmuls and a softmax on the CPU, where that is
  faster (see ``_WindowMSA.use_sdpa``). Windows are folded into the heads dimension so the mask
  broadcasts over the batch.
  q/k/v are projected before padding and the output projection runs after cropping, so the MACs are
  Swin's ``4hwC^2 + 2M^2hwC`` whenever M divides H and W.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .conv import check_groups, check_int
from .spd import space_to_depth

_PAPER = "Swin Transformer (Liu et al., ICCV 2021) https://arxiv.org/abs/2103.14030"

# Additive mask value for forbidden (query, key) pairs; see the module docstring for why not -inf.
_NEG = -1e4


def _relative_index(window: int) -> torch.Tensor:
    """(M^2, M^2) index into the (2M-1)^2 bias table: (dy + M-1) * (2M-1) + (dx + M-1)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


class _WindowMSA(nn.Module):
    """Shared W-MSA / SW-MSA implementation: (B, C, H, W) -> (B, C, H, W)."""

    # Attention kernel: None = SDPA off the CPU, plain matmul + softmax on the CPU. With a float mask
    # that needs a gradient (the bias), CPU SDPA runs its math fallback plus a NaN-safe softmax, and
    # its fused forward is slow for 49-token windows: at batch 64, C=64, 28x28, M=7 the plain version
    # measured ~1.2x faster forward+backward and 2-3x faster forward-only. Same math, same MACs.
    use_sdpa: bool | None = None

    def __init__(self, dim: int, heads: int, window: int, shift: int, qkv_bias: bool) -> None:
        super().__init__()
        check_int("dim", dim)
        check_groups(heads, dim, "heads")
        check_int("window", window)
        if not isinstance(shift, int) or isinstance(shift, bool) or not 0 <= shift < window:
            raise ValueError(f"shift must be an integer in [0, window={window}), got {shift!r}")
        self.dim, self.heads, self.window, self.shift = dim, heads, window, shift
        self.qkv = nn.Linear(dim, 3 * dim, bias=bool(qkv_bias))
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_index(window), persistent=False)
        # (H, W, m, shift, device, dtype) -> (nW, m^2, m^2) additive mask, or None when nothing is masked.
        self._mask_cache: dict[tuple, torch.Tensor | None] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Swin's init: trunc-normal(0.02) for the table and linear weights, zero biases.
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        for lin in (self.qkv, self.proj):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, window={self.window}, shift={self.shift}"

    def window_and_shift(self, h: int, w: int) -> tuple[int, int]:
        """Swin's rule: a map no larger than the window is one window (per short side), unshifted."""
        if min(h, w) <= self.window:
            return min(h, w), 0
        return self.window, self.shift

    def relative_bias(self, m: int) -> torch.Tensor:
        """(heads, m^2, m^2) bias; for m < M the centred sub-table (same entry per offset)."""
        big = self.window
        idx = self.relative_position_index
        if m != big:
            # Offsets inside the top-left m x m window of the M x M index span exactly [-(m-1), m-1].
            idx = idx.view(big, big, big, big)[:m, :m, :m, :m].reshape(m * m, m * m)
        bias = self.relative_position_bias_table[idx.reshape(-1)]
        return bias.view(m * m, m * m, self.heads).permute(2, 0, 1)

    def _region_mask(
        self, h: int, w: int, m: int, s: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | None:
        key = (h, w, m, s, device, dtype)
        if key in self._mask_cache:
            return self._mask_cache[key]
        # Built outside inference mode so a mask first made under torch.inference_mode() can later be
        # used in a training forward.
        with torch.inference_mode(False), torch.no_grad():
            hp, wp = -(-h // m) * m, -(-w // m) * m

            def axis(size: int, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
                # Rolled coordinate r holds original coordinate (r + s) mod padded. Tokens share a
                # (shifted) window iff floor((y - s) / m) agrees: windows offset by s, partial at borders.
                r = torch.arange(padded, device=device)
                y = (r + s) % padded
                return torch.div(y - s, m, rounding_mode="floor"), y < size

            gy, vy = axis(h, hp)
            gx, vx = axis(w, wp)

            def windows(t: torch.Tensor) -> torch.Tensor:  # (hp, wp) -> (nW, m*m) in partition order
                return t.view(hp // m, m, wp // m, m).transpose(1, 2).reshape(-1, m * m)

            group_y = windows(gy[:, None].expand(hp, wp))
            group_x = windows(gx[None, :].expand(hp, wp))
            valid = windows(vy[:, None] & vx[None, :])
            allowed = (
                (group_y[:, :, None] == group_y[:, None, :])
                & (group_x[:, :, None] == group_x[:, None, :])
                & valid[:, None, :]
            )
            mask = None
            if not bool(allowed.all()):
                mask = torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill_(~allowed, _NEG)
        self._mask_cache[key] = mask
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if c != self.dim:
            raise ValueError(f"expected {self.dim} input channels, got {c}")
        m, s = self.window_and_shift(h, w)
        heads, d = self.heads, c // self.heads
        hp, wp = -(-h // m) * m, -(-w // m) * m
        nh, nw = hp // m, wp // m

        qkv = self.qkv(x.permute(0, 2, 3, 1))  # (B, H, W, 3C): project before padding (fewer MACs)
        if hp != h or wp != w:
            qkv = F.pad(qkv, (0, 0, 0, wp - w, 0, hp - h))
        if s:
            qkv = torch.roll(qkv, shifts=(-s, -s), dims=(1, 2))
        # (B, nh, m, nw, m, 3, heads, d) -> (3, B, nh, nw, heads, m, m, d); windows folded into heads so
        # one (1, nW*heads, N, N) mask broadcasts over the batch.
        qkv = qkv.view(b, nh, m, nw, m, 3, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
        q, k, v = qkv.reshape(3, b, nh * nw * heads, m * m, d).unbind(0)

        bias = self.relative_bias(m).to(q.dtype)  # (heads, N, N)
        region = self._region_mask(h, w, m, s, x.device, q.dtype)
        if region is None:
            attn_mask = bias.unsqueeze(0).expand(nh * nw, -1, -1, -1)
        else:
            attn_mask = bias.unsqueeze(0) + region.unsqueeze(1)
        attn_mask = attn_mask.reshape(1, nh * nw * heads, m * m, m * m)

        use_sdpa = self.use_sdpa if self.use_sdpa is not None else x.device.type != "cpu"
        if use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nW*heads, N, d)
        else:
            y = ((q * d**-0.5) @ k.transpose(-1, -2) + attn_mask).softmax(dim=-1) @ v
        y = y.view(b, nh, nw, heads, m, m, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, c)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        y = y[:, :h, :w]
        return self.proj(y).permute(0, 3, 1, 2)


class WindowAttention(_WindowMSA):
    """Swin W-MSA token mixer: multi-head self-attention inside non-overlapping window x window tiles.

    Args:
        dim: channels C (input and output).
        heads: attention heads; must divide ``dim``.
        window: window side M (>= 1); clamped to min(H, W) when the map is smaller.
        qkv_bias: bias on the q/k/v projection (Swin: True).
    """

    paper = f"W-MSA: {_PAPER}"
    options: dict[str, Any] = {"heads": 4, "window": 7, "qkv_bias": True}

    def __init__(self, dim: int, heads: int = 4, window: int = 7, qkv_bias: bool = True) -> None:
        super().__init__(dim, heads, window, 0, qkv_bias)


class ShiftedWindowAttention(_WindowMSA):
    """Swin SW-MSA token mixer: windows shifted by ``shift`` (default window // 2) via roll + mask.

    Args:
        dim: channels C (input and output).
        heads: attention heads; must divide ``dim``.
        window: window side M (>= 1); clamped to min(H, W) (and the shift dropped) on small maps.
        shift: shift s in [0, window); None means window // 2.
        qkv_bias: bias on the q/k/v projection (Swin: True).
    """

    paper = f"SW-MSA: {_PAPER}"
    options: dict[str, Any] = {"heads": 4, "window": 7, "shift": None, "qkv_bias": True}

    def __init__(
        self, dim: int, heads: int = 4, window: int = 7, shift: int | None = None, qkv_bias: bool = True
    ) -> None:
        check_int("window", window)
        super().__init__(dim, heads, window, window // 2 if shift is None else shift, qkv_bias)


class PatchMerging(nn.Module):
    """Swin patch merging: space-to-depth (2x2 -> 4C), LayerNorm(4C), Linear(4C -> out_dim, no bias).

    (B, in_dim, H, W) -> (B, out_dim, ceil(H/2), ceil(W/2)); odd sides are zero-padded (the official
    classification model asserts even sides).
    """

    paper = f"patch merging: {_PAPER}"
    options: dict[str, Any] = {}

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        check_int("in_dim", in_dim)
        check_int("out_dim", out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm = nn.LayerNorm(4 * in_dim)
        self.reduction = nn.Linear(4 * in_dim, out_dim, bias=False)
        nn.init.trunc_normal_(self.reduction.weight, std=0.02)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = space_to_depth(x).permute(0, 2, 3, 1)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(y)).permute(0, 3, 1, 2)
