"""ACmix: self-attention and convolution sharing one set of 1x1 projections.

Pan et al., "On the Integration of Self-Attention and Convolution", CVPR 2022,
https://arxiv.org/abs/2111.14556 (official code: https://github.com/LeapLabTHU/ACmix).

Both a k x k convolution and local self-attention start with 1x1 projections (Stage I) and differ
only in how they aggregate (Stage II). ACmix computes the 1x1 q/k/v projections once and feeds them
to two paths:

* attention: k_att x k_att local attention per head (default 7), with the paper's relative position
  term ``q . (pe(p) - pe(p + d))`` added to the logit of offset d;
* convolution: a light fully connected layer maps the 3N head pieces of q/k/v to k_c^2 maps, and a
  grouped k_c x k_c convolution initialised to shift kernels does the "shift and sum" of a conv;

and returns ``rate1 * attention + rate2 * conv`` with both rates learnable and 0.5 at init. As in the
ResNet variant of the official code there is no output projection, the conv path has no bias, and
its output channel o comes from head-dim index ``o // heads`` (the official channel order).

Where hybridnas decides differently (shared BLOCKS.md):

* ``pe`` is linear in *pixel* offsets, ``pe(p) = W_p p``, so the term is ``-q . (W_p d)``: a learned
  linear function of the integer offset d that means the same at every map size. (The official code
  feeds linspace(-1, 1) coordinates, so one pixel is encoded differently at 14x14 and at 56x56.)
  W_p starts trunc-normal with std 0.02, about the official per-pixel scale at 28x28; the bias of
  the official ``conv_p`` cancels in the difference and is dropped.
* Neighbours outside the image are masked, not reflected: any map size works (1x1 included), and a
  kernel covering the map is exactly global attention.

The attention runs on ``blocks.slide.local_attention``, the shifted-slice kernel that never
materialises the k^2 unfolded copies of K and V (ACmix issues #13/#28: the unfold version needs
C * k^2 * H * W floats per tensor per image).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .conv import check_groups, check_int
from .slide import local_attention


class ACmix(nn.Module):
    """ACmix mixer, ``(B, C, H, W) -> (B, C, H, W)``."""

    paper = (
        "ACmix: On the Integration of Self-Attention and Convolution (Pan et al., CVPR 2022) "
        "https://arxiv.org/abs/2111.14556"
    )
    options: dict[str, Any] = {"heads": 4, "kernel_att": 7, "kernel_conv": 3}

    def __init__(self, dim: int, heads: int = 4, kernel_att: int = 7, kernel_conv: int = 3) -> None:
        super().__init__()
        check_int("dim", dim)
        check_groups(heads, dim, "heads")
        check_int("kernel_att", kernel_att, odd=True)  # odd: windows and kernels centred on the pixel
        check_int("kernel_conv", kernel_conv, odd=True)
        self.dim, self.heads, self.kernel_att, self.kernel_conv = dim, heads, kernel_att, kernel_conv
        hd = dim // heads
        self.head_dim, self.scale = hd, hd**-0.5
        kc2 = kernel_conv * kernel_conv
        # Stage I, shared by both paths: the q, k, v 1x1 convs as one (output channels q | k | v).
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        # Attention path: W_p of pe(p) = W_p (y, x), shared by the heads (official conv_p: 2 -> hd).
        self.pe = nn.Parameter(torch.zeros(hd, 2))
        # Conv path: the light FC over the 3N head pieces (3N -> k_c^2, a 1x1 conv with no bias as in
        # the official code), then the grouped conv: one group per head-dim index, k_c^2 -> N channels.
        self.fc = nn.Conv2d(3 * heads, kc2, 1, bias=False)
        self.dep_conv = nn.Conv2d(kc2 * hd, dim, kernel_conv, padding=kernel_conv // 2, groups=hd, bias=False)
        self.rate1 = nn.Parameter(torch.tensor(0.5))
        self.rate2 = nn.Parameter(torch.tensor(0.5))
        # The attention kernel; a benchmark can swap in a reference implementation with the same signature.
        self.attention = local_attention
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pe, std=0.02)
        # Shift kernels: input i of every group is one-hot at tap (i // k_c, i % k_c), so at init the
        # conv path is "1x1 projections to k_c^2 maps, shift each by its tap, sum" = a k_c x k_c conv.
        kc = self.kernel_conv
        shift = torch.eye(kc * kc).view(1, kc * kc, kc, kc)
        self.dep_conv.weight.copy_(shift.expand_as(self.dep_conv.weight))
        self.rate1.fill_(0.5)
        self.rate2.fill_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        N, hd = self.heads, self.head_dim
        qkv = self.qkv(x)  # (B, 3C, H, W); channel t*C + n*hd + i for t in (q, k, v), head n
        q, k, v = qkv.view(B, 3, N, hd, H, W).unbind(1)

        # Attention path. q.(pe(p) - pe(p+d)) = -q . (W_p d): the kernel's linear position term.
        q = q * self.scale
        att = self.attention(q, k, v, self.kernel_att, pe=-self.pe).reshape(B, C, H, W)

        # Conv path: the FC mixes the 3N maps of each head-dim index i into k_c^2 maps, which the
        # grouped conv (group i) shifts and sums. The official code does not scale q here either.
        # The FC is one batched matmul over the (3N, hd*HW) view of qkv (a 1x1 conv with 3N input
        # channels is slow on CPUs), and a single copy reorders its output to the channels (i, tap)
        # that the grouped conv wants, in channels_last layout, which makes that conv ~5x faster on
        # the CPU (measured at batch 64, width 64, 28x28).
        kc2 = self.kernel_conv**2
        f = torch.matmul(
            self.fc.weight.reshape(kc2, 3 * N), qkv.reshape(B, 3 * N, hd * H * W)
        )  # (B, kc2, hd*HW)
        f = f.view(B, kc2, hd, H, W).permute(0, 3, 4, 2, 1).reshape(B, H, W, hd * kc2).permute(0, 3, 1, 2)
        conv = self.dep_conv(f).contiguous()  # channel o from group o // N (the official order)

        return self.rate1 * att + self.rate2 * conv

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, kernel_att={self.kernel_att}, kernel_conv={self.kernel_conv}"
