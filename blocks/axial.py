"""Axial-DeepLab position-sensitive axial attention.

Wang et al., "Axial-DeepLab: Stand-Alone Axial-Attention for Panoptic Segmentation", ECCV 2020,
https://arxiv.org/abs/2003.07853 (official PyTorch re-implementation:
https://github.com/csrhddlam/axial-deeplab, official TF2 layer: google-research/deeplab2).

A height-axis layer then a width-axis layer, each computing for query i and key j on one axis

    logits_ij = (q_i . k_j + q_i . r_q(i-j) + k_j . r_k(j-i)) / sqrt(d_q)
    y_i       = sum_j softmax_j(logits_ij) (v_j + r_v(i-j))

with q/k depth d_q half of the value depth d_v = dim / heads per head, and one learned relative table
(r_q | r_k | r_v) shared by all heads, as in both official implementations. The index convention is the
official PyTorch one: the q and v terms read offset i - j (query minus key), the k term j - i.

Where hybridnas decides differently from the official code:

* No BatchNorm on the logits or outputs. The official code normalises the three similarity terms with
  a BatchNorm in place of the 1/sqrt(d) scale and the two outputs with another; that couples samples in
  a batch and behaves differently in train and eval. Here the summed logits are scaled by
  1/sqrt(d_q) (standard attention) and the output is the plain sum of the value and r_v parts.
* Any resolution: the official tables have 2L-1 entries for a fixed axis length L (kernel_size must
  equal the map side). Here the table covers offsets -R..R and farther offsets are clipped to the
  edge entries. ``span=None`` (global along each axis, the official PyTorch setting) uses R = 64, the
  paper's span of 65, so every offset in a map of side <= 65 has its own entry. A finite ``span``
  uses R = span // 2 and masks keys with |i - j| > span // 2 (so an even span attends span + 1
  positions, like the paper's odd spans). The span is a mask over the full L x L logits, so it
  limits what is attended, not the cost: MACs (and the counter) stay those of the global layer.
* q/k depth is max(1, d_v // 2) so odd per-head widths work; it equals the official d_v / 2 whenever
  d_v is even.
* A final linear projection mixes the heads (the official bottleneck block's 1x1 ``conv_up`` plays that
  role; hybridnas' block template has no such layer around the mixer).
* Init follows the official PyTorch code: q/k/v weights N(0, 1/dim), tables N(0, 1/d_v).

All products are matmul/einsum, so the MAC counter sees q.k, the three position terms and both
weighted sums.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .conv import check_groups, check_int

_PAPER = "Axial-DeepLab (Wang et al., ECCV 2020) https://arxiv.org/abs/2003.07853"

# Table half-width for span=None: the paper's 65-wide span.
GLOBAL_MAX_OFFSET = 64

# Additive mask value for keys outside a finite span (the diagonal is always allowed).
_NEG = -1e4


def relative_index(length: int, max_offset: int, device: torch.device | None = None) -> torch.Tensor:
    """(L, L) table row for query i and key j: clamp(i - j, -R, R) + R."""
    pos = torch.arange(length, device=device)
    return (pos[:, None] - pos[None, :]).clamp(-max_offset, max_offset) + max_offset


class _AxialLayer(nn.Module):
    """Position-sensitive attention along dim 2 of a channels-last (B, A, L, C) tensor."""

    def __init__(self, dim: int, heads: int, dq: int, dv: int, max_offset: int, span: int | None, bias: bool):
        super().__init__()
        self.heads, self.dq, self.dv, self.max_offset, self.span = heads, dq, dv, max_offset, span
        self.qkv = nn.Linear(dim, heads * (2 * dq + dv), bias=bias)
        # Columns: r_q (dq) | r_k (dq) | r_v (dv); shared by all heads as in the official code.
        self.relative = nn.Parameter(torch.empty(2 * max_offset + 1, 2 * dq + dv))
        self._cache: dict[tuple, torch.Tensor | None] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.qkv.weight, 0.0, self.qkv.in_features**-0.5)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        nn.init.normal_(self.relative, 0.0, self.dv**-0.5)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, dq={self.dq}, dv={self.dv}, max_offset={self.max_offset}, span={self.span}"
        )

    def _index(self, length: int, device: torch.device) -> torch.Tensor:
        key = ("index", length, device)
        if key not in self._cache:
            # Outside inference mode: index_select saves the index for backward.
            with torch.inference_mode(False):
                self._cache[key] = relative_index(length, self.max_offset, device)
        return self._cache[key]

    def _mask(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        if self.span is None or self.span // 2 >= length - 1:
            return None
        key = ("mask", length, device, dtype)
        if key not in self._cache:
            with torch.inference_mode(False):
                pos = torch.arange(length, device=device)
                far = (pos[:, None] - pos[None, :]).abs() > self.span // 2
                self._cache[key] = torch.zeros(far.shape, device=device, dtype=dtype).masked_fill_(far, _NEG)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, a, length, c = x.shape
        heads, dq, dv = self.heads, self.dq, self.dv
        qkv = self.qkv(x).view(b * a, length, heads, 2 * dq + dv).transpose(1, 2)  # (N, h, L, 2dq+dv)
        q, k, v = qkv.split([dq, dq, dv], dim=-1)
        rel = self.relative[self._index(length, x.device)]  # (L, L, 2dq+dv): row for offset i - j
        r_q, r_k, r_v = rel.split([dq, dq, dv], dim=-1)
        scale = dq**-0.5
        q = q * scale
        r_k = r_k.transpose(0, 1) * scale  # k term reads offset j - i: entry [i, j] = table[j - i]

        logits = q @ k.transpose(-1, -2)  # (N, h, L_i, L_j)
        logits = logits + torch.einsum("nhic,ijc->nhij", q, r_q)
        logits = logits + torch.einsum("nhjc,ijc->nhij", k, r_k)
        mask = self._mask(length, x.device, logits.dtype)
        if mask is not None:
            logits = logits + mask
        attn = logits.softmax(dim=-1)
        y = attn @ v + torch.einsum("nhij,ijc->nhic", attn, r_v)  # (N, h, L, dv)
        return y.transpose(1, 2).reshape(b, a, length, heads * dv)


class AxialAttention(nn.Module):
    """Axial-DeepLab token mixer: height-axis then width-axis position-sensitive attention.

    Args:
        dim: channels C (input and output).
        heads: attention heads; must divide ``dim``. Value depth per head C/heads, q/k depth half.
        span: attended positions per axis, |i - j| <= span // 2; None = the whole axis.
        qkv_bias: bias on the q/k/v projections (official: False).
    """

    paper = f"position-sensitive axial attention: {_PAPER}"
    options: dict[str, Any] = {"heads": 4, "span": None, "qkv_bias": False}

    def __init__(self, dim: int, heads: int = 4, span: int | None = None, qkv_bias: bool = False) -> None:
        super().__init__()
        check_int("dim", dim)
        check_groups(heads, dim, "heads")
        if span is not None:
            check_int("span", span)
        self.dim, self.heads, self.span = dim, heads, span
        dv = dim // heads
        dq = max(1, dv // 2)
        max_offset = GLOBAL_MAX_OFFSET if span is None else span // 2
        self.height = _AxialLayer(dim, heads, dq, dv, max_offset, span, bool(qkv_bias))
        self.width = _AxialLayer(dim, heads, dq, dv, max_offset, span, bool(qkv_bias))
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, span={self.span}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c != self.dim:
            raise ValueError(f"expected {self.dim} input channels, got {c}")
        y = self.height(x.permute(0, 3, 2, 1))  # (B, W, H, C): sequences along the height axis
        y = self.width(y.transpose(1, 2))  # (B, H, W, C): sequences along the width axis
        return self.proj(y).permute(0, 3, 1, 2)
