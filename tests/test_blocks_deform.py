"""The deform block's sampling against independent references: DCNv2's floor-based bilinear rule.

Bilinear interpolation has a kink at integer positions. DCNv2 and torchvision take the low corner
``floor(p)`` and the weights ``p - floor(p)``, so the derivative there is the one-sided one towards
+1; at initialisation every sample sits exactly on a pixel, so this decides the offset predictor's
first updates. The references below are explicit per-sample loops in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hybridnas.blocks.deform as deform
from hybridnas.blocks.deform import DeformConv, bilinear_gather


def _bilinear(img: torch.Tensor, y: float, x: float) -> tuple[float, float, float]:
    """Value, d/dy and d/dx of the floor-based bilinear sample of img (H, W) at (y, x), zero outside."""
    H, W = img.shape
    y0, x0 = math.floor(y), math.floor(x)
    fy, fx = y - y0, x - x0

    def at(r: int, c: int) -> float:
        return float(img[r, c]) if 0 <= r < H and 0 <= c < W else 0.0

    v00, v01, v10, v11 = at(y0, x0), at(y0, x0 + 1), at(y0 + 1, x0), at(y0 + 1, x0 + 1)
    value = (1 - fy) * ((1 - fx) * v00 + fx * v01) + fy * ((1 - fx) * v10 + fx * v11)
    return value, (1 - fx) * (v10 - v00) + fx * (v11 - v01), (1 - fy) * (v01 - v00) + fy * (v11 - v10)


def _reference(m: DeformConv, x: torch.Tensor, om: torch.Tensor, grad_out: torch.Tensor):
    """Output and d(sum(grad_out * y))/d(om) of a groups=1 DCNv2 with offsets/modulation om, by loops."""
    B, C, H, W = x.shape
    k, r = m.kernel, m.kernel // 2
    taps = k * k
    weight = m.weight.detach()
    y = torch.zeros(B, C, H, W, dtype=torch.float64)
    dom = torch.zeros_like(om, dtype=torch.float64)
    for b in range(B):
        for py in range(H):
            for px in range(W):
                for t in range(taps):
                    dy, dx = float(om[b, 2 * t, py, px]), float(om[b, 2 * t + 1, py, px])
                    logit = float(om[b, 2 * taps + t, py, px])
                    mod = 2 / (1 + math.exp(-logit))
                    sy, sx = py + t // k - r + dy, px + t % k - r + dx
                    for c in range(C):
                        value, d_sy, d_sx = _bilinear(x[b, c], sy, sx)
                        w = weight[:, c, t // k, t % k]  # (C_out,)
                        y[b, :, py, px] += w * mod * value
                        a = float((grad_out[b, :, py, px] * w).sum())  # d loss / d (modulated sample)
                        dom[b, 2 * t, py, px] += a * mod * d_sy
                        dom[b, 2 * t + 1, py, px] += a * mod * d_sx
                        dom[b, 2 * taps + t, py, px] += a * value * mod * (1 - mod / 2)
    return y + m.bias.detach().view(1, C, 1, 1), dom


def _run(m: DeformConv, x: torch.Tensor, grad_out: torch.Tensor):
    """Output, the gradient w.r.t. the offset conv's output, and the offset conv's weight/bias grads."""
    captured = {}
    handle = m.offset.register_forward_hook(lambda mod, inp, out: captured.setdefault("om", out))
    try:
        y = m(x)
    finally:
        handle.remove()
    om = captured["om"]
    dom, dw, db = torch.autograd.grad((y * grad_out).sum(), (om, m.offset.weight, m.offset.bias))
    return y, om, dom, dw, db


@pytest.mark.parametrize("size", [(4, 5), (1, 3), (3, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_offset_gradient_at_zero_offsets_is_the_floor_based_one_on_every_pixel(size):
    torch.manual_seed(0)
    m = DeformConv(3).double()  # offsets and modulation logits start at exactly zero
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    grad_out = torch.randn(2, 3, *size, dtype=torch.float64)
    y, om, dom, dw, db = _run(m, x, grad_out)
    assert om.abs().max() == 0  # every sample sits exactly on a pixel (or on the -1 / size border)
    y_ref, dom_ref = _reference(m, x, om.detach(), grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    # Every entry: the (dy, dx) gradients of all taps at all pixels, and the modulation's.
    torch.testing.assert_close(dom, dom_ref, rtol=1e-12, atol=1e-12)
    # ... and so the offset conv's weight and bias gradients (an ordinary conv's, from dom_ref).
    dw_ref = torch.nn.grad.conv2d_weight(x, m.offset.weight.shape, dom_ref, padding=1)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, dom_ref.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)


def test_at_an_integer_position_the_derivative_looks_towards_plus_one():
    # One pixel, one channel, a unit weight: y = x(p + d) for the centre tap; at d = 0 the
    # derivative in y is x(p + 1) - x(p) on every row, the last one included (x(H) = 0).
    m = DeformConv(1, kernel=1).double()
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.zero_()
    x = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    _, _, dom, _, _ = _run(m, x, torch.ones_like(x))
    below = F.pad(x[0, 0, 1:], (0, 0, 0, 1))  # x(p + 1 row), zero past the last row
    right = F.pad(x[0, 0, :, 1:], (0, 1))
    torch.testing.assert_close(dom[0, 0], below - x[0, 0], rtol=0, atol=1e-15)
    torch.testing.assert_close(dom[0, 1], right - x[0, 0], rtol=0, atol=1e-15)


def test_gradients_at_random_offsets_match_the_loop_reference():
    torch.manual_seed(1)
    m = DeformConv(3).double()
    with torch.no_grad():
        m.offset.weight.normal_(0, 0.3)  # offsets of a pixel or two, many samples partly outside
        m.offset.bias.normal_(0, 1.0)
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64)
    grad_out = torch.randn(1, 3, 5, 4, dtype=torch.float64)
    y, om, dom, _, _ = _run(m, x, grad_out)
    y_ref, dom_ref = _reference(m, x, om.detach(), grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dom, dom_ref, rtol=1e-12, atol=1e-12)


def _grid_sample_deform(m: DeformConv, x: torch.Tensor) -> torch.Tensor:
    """The previous implementation: all taps through one grid_sample (normalised coordinates)."""
    B, C, H, W = x.shape
    taps, r = m.kernel**2, m.kernel // 2
    om = m.offset(x)
    d = torch.arange(-r, r + 1, dtype=x.dtype)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    py = dy.reshape(-1, 1, 1) + torch.arange(H, dtype=x.dtype).view(1, H, 1) + om[:, 0 : 2 * taps : 2]
    px = dx.reshape(-1, 1, 1) + torch.arange(W, dtype=x.dtype).view(1, 1, W) + om[:, 1 : 2 * taps : 2]
    grid = torch.stack([(2 * px + 1) / W - 1, (2 * py + 1) / H - 1], -1).view(B, taps * H, W, 2)
    cols = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    cols = cols.view(B, C, taps, H, W) * (2 * om[:, 2 * taps :].sigmoid()).unsqueeze(1)
    g = m.groups
    out = torch.einsum("gok,bgkhw->bgohw", m.weight.reshape(g, C // g, -1), cols.view(B, g, -1, H, W))
    return out.reshape(B, C, H, W) + m.bias.view(1, C, 1, 1)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("size", [(7, 7), (3, 5), (1, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_outputs_equal_the_grid_sample_implementation_at_random_offsets(groups, size):
    torch.manual_seed(2)
    m = DeformConv(4, groups=groups).double()
    with torch.no_grad():
        m.offset.weight.normal_(0, 0.5)
        m.offset.bias.normal_(0, 2.0)  # far samples too, beyond the border
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    torch.testing.assert_close(m(x), _grid_sample_deform(m, x), rtol=1e-10, atol=1e-10)


def test_gather_gradcheck_with_samples_inside_on_and_beyond_the_border():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)  # (B, H, W, C)
    pos = torch.rand(2, 9, 2, dtype=torch.float64) * 9 - 3  # -3 .. 6: inside and far outside
    pos = pos + (pos.frac().abs() < 1e-3) * 0.01  # finite differences need a distance from the kinks
    pos.requires_grad_(True)
    assert torch.autograd.gradcheck(bilinear_gather, (x, pos))


def test_far_samples_are_zero_and_get_no_gradient():
    x = torch.randn(1, 4, 3, 2, dtype=torch.float64, requires_grad=True)  # (B, H, W, C)
    pos = torch.tensor(
        [[[-1.5, 1.0], [1.0, -7.0], [5.0, 1.0], [1.0, 1e9], [-1e9, -1e9], [3.5, 0.0]]],
        dtype=torch.float64,
        requires_grad=True,
    )
    out = bilinear_gather(x, pos)
    assert out[0, :5].abs().max() == 0
    torch.testing.assert_close(out[0, 5], 0.5 * x[0, 3, 0])  # half a row past the last one
    dx, dpos = torch.autograd.grad(out.sum(), (x, pos))
    assert dpos[0, :5].abs().max() == 0
    assert torch.isfinite(dx).all()


def test_bf16_autocast_matches_fp32_at_random_offsets():
    torch.manual_seed(4)
    m = DeformConv(8)
    with torch.no_grad():
        m.offset.weight.normal_(0, 0.05)
    x = torch.randn(2, 8, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    torch.testing.assert_close(y.float(), m(x), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("block", [40, 1000, 1 << 30], ids=["positions-of-one-image", "two-images", "whole"])
def test_gather_does_not_depend_on_the_block_size(block, monkeypatch):
    # 40 elements: blocks of a few positions inside one image; 1000: two images per block (odd
    # batch, so the last block is partial); 2^30: the whole batch at once.
    torch.manual_seed(5)
    x = torch.randn(3, 5, 4, 2, dtype=torch.float64, requires_grad=True)
    pos = (torch.rand(3, 30, 2, dtype=torch.float64) * 8 - 2).requires_grad_(True)
    g = torch.randn(3, 30, 2, dtype=torch.float64)
    expected = bilinear_gather(x, pos)
    dx, dpos = torch.autograd.grad(expected, (x, pos), g)
    monkeypatch.setattr(deform, "_BLOCK_ELEMS", block)
    got = bilinear_gather(x, pos)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(got, (x, pos), g), (dx, dpos)):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)
