"""Global context (GC) block, the `gc` add-on.

Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", ICCVW 2019,
https://arxiv.org/abs/1904.11492 (official code: xvjiarui/GCNet, mmdet/ops/gcb/context_block.py).

    z = x + W2 ReLU(LN(W1 sum_j softmax_j(Wk x_j) x_j))

One query-independent attention map pools the whole image into a context vector, an SE-like
bottleneck transforms it, and it is added to every position ("channel_add" fusion). The last conv
starts at zero, so the block is an exact identity at initialisation and can be dropped into a
trained network without changing it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .conv import check_int


class ContextBlock(nn.Module):
    """GCNet context block with attention pooling and add fusion, ``(B, C, H, W) -> (B, C, H, W)``."""

    paper = (
        "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond "
        "(Cao et al., ICCVW 2019) https://arxiv.org/abs/1904.11492"
    )
    options: dict[str, Any] = {}

    def __init__(self, dim: int) -> None:
        super().__init__()
        check_int("dim", dim)
        hidden = max(8, dim // 16)  # the paper's r16 bottleneck, floored so tiny widths still have one
        self.conv_mask = nn.Conv2d(dim, 1, 1)  # W_k: one attention logit per position
        self.transform = nn.Sequential(
            nn.Conv2d(dim, hidden, 1),
            # LayerNorm over the (P, 1, 1) context vector, per sample (the paper: LN eases optimisation
            # of the bottleneck; BN here would couple the batch through a single vector per image).
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, 1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        # Zero last conv: identity at init. (With 'channel_mul' fusion this would give 0.5 x instead.)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        attn = self.conv_mask(x).view(B, 1, H * W).softmax(dim=-1)  # (B, 1, HW), one map per image
        # matmul (not mul + sum) so MAC counters see the pooling: (B, C, HW) @ (B, HW, 1) -> (B, C, 1)
        context = torch.matmul(x.reshape(B, C, H * W), attn.transpose(1, 2).to(x.dtype))
        return x + self.transform(context.view(B, C, 1, 1))
