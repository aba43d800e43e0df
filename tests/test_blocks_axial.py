"""Axial-DeepLab position-sensitive axial attention: shapes, receptive fields, index convention, span."""

import pytest
import torch

from hybridnas.blocks.axial import GLOBAL_MAX_OFFSET, AxialAttention, relative_index

SIZES = [(1, 1), (3, 5), (7, 7), (28, 28)]


def _height_only(mod: AxialAttention, x: torch.Tensor) -> torch.Tensor:
    """The height-axis layer alone, NCHW in and out."""
    return mod.height(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)


def _randomize(mod: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0.0, 0.5)
    return mod


@pytest.mark.parametrize("span", [None, 3])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 2])
def test_axial_keeps_shape_in_fp32_bf16_and_backward(span, size, batch):
    mod = AxialAttention(8, heads=2, span=span)
    x = torch.randn(batch, 8, *size, requires_grad=True)
    y = mod(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mod.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = mod(x)
    assert yb.shape == x.shape and yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y, rtol=0.05, atol=0.05 * y.abs().max().item() + 1e-3)
    yb.float().sum().backward()
    yh = mod.to(torch.bfloat16)(x.detach().bfloat16())
    assert yh.dtype == torch.bfloat16 and torch.isfinite(yh).all()


def test_depths_follow_the_paper_q_and_k_half_of_v():
    mod = AxialAttention(16, heads=2)
    assert (mod.height.dq, mod.height.dv) == (4, 8)
    assert mod.height.qkv.out_features == 2 * (4 + 4 + 8)
    assert mod.height.relative.shape == (2 * GLOBAL_MAX_OFFSET + 1, 16)  # shared by the heads
    assert mod.height.qkv.bias is None  # official: no qkv bias
    assert (AxialAttention(12, heads=4).height.dq, AxialAttention(4, heads=4).height.dq) == (1, 1)


def test_height_layer_reaches_only_its_column_and_both_layers_the_whole_map():
    mod = _randomize(AxialAttention(8, heads=2))
    x = torch.randn(1, 8, 6, 5, requires_grad=True)
    _height_only(mod, x)[0, :, 2, 3].sum().backward()
    footprint = x.grad[0].abs().sum(0) > 0
    expected = torch.zeros(6, 5, dtype=torch.bool)
    expected[:, 3] = True
    assert torch.equal(footprint, expected)

    x.grad = None
    mod(x)[0, :, 2, 3].sum().backward()
    assert (x.grad[0].abs().sum(0) > 0).all()


@pytest.mark.parametrize("span", [None, 11])
def test_height_layer_without_position_terms_is_per_column_mhsa_with_half_depth_qk(span):
    mod = _randomize(AxialAttention(8, heads=2, span=span, qkv_bias=True))  # span 11 covers H = 6
    with torch.no_grad():
        mod.height.relative.zero_()
    x = torch.randn(2, 8, 6, 5)
    y = _height_only(mod, x)
    heads, dq, dv = 2, 2, 4
    cols = x.permute(0, 3, 2, 1).reshape(2 * 5, 6, 8)  # (B*W, H, C)
    qkv = (cols @ mod.height.qkv.weight.T + mod.height.qkv.bias).view(10, 6, heads, 2 * dq + dv)
    q, k, v = qkv.transpose(1, 2).split([dq, dq, dv], dim=-1)
    attn = ((q @ k.transpose(-1, -2)) / dq**0.5).softmax(-1)
    ref = (attn @ v).transpose(1, 2).reshape(2, 5, 6, 8).permute(0, 3, 2, 1)
    torch.testing.assert_close(y, ref)


def test_relative_index_is_query_minus_key_clipped_at_the_table_edge():
    idx = relative_index(70, GLOBAL_MAX_OFFSET)
    for i, j in [(0, 0), (5, 2), (2, 5), (69, 0), (0, 69), (64, 0), (65, 0)]:
        assert idx[i, j] == max(-64, min(64, i - j)) + 64


def _convention_module():
    """heads=1, dq=4, dv=8; q/k/v weights zero, so q and k are their biases and v = x."""
    mod = AxialAttention(8, heads=1, qkv_bias=True)
    with torch.no_grad():
        layer = mod.height
        layer.qkv.weight.zero_()
        layer.qkv.bias.zero_()
        layer.qkv.weight[8:].copy_(torch.eye(8))  # v = x
        layer.relative.zero_()
    return mod, mod.height


def test_q_term_reads_offset_query_minus_key():
    mod, layer = _convention_module()
    with torch.no_grad():
        layer.qkv.bias[:4] = 1.0  # q = 1
        layer.relative[GLOBAL_MAX_OFFSET + 1, :4] = 40.0  # r_q at i - j = +1: attend the row above
    x = torch.randn(1, 8, 6, 3)
    y = _height_only(mod, x)
    torch.testing.assert_close(y[:, :, 1:], x[:, :, :-1])


def test_k_term_reads_offset_key_minus_query():
    mod, layer = _convention_module()
    with torch.no_grad():
        layer.qkv.bias[4:8] = 1.0  # k = 1
        layer.relative[GLOBAL_MAX_OFFSET + 1, 4:8] = 40.0  # r_k at j - i = +1: attend the row below
    x = torch.randn(1, 8, 6, 3)
    y = _height_only(mod, x)
    torch.testing.assert_close(y[:, :, :-1], x[:, :, 1:])


def test_v_term_reads_offset_query_minus_key():
    mod, layer = _convention_module()
    e = torch.randn(8)
    with torch.no_grad():
        layer.qkv.weight.zero_()  # q = k = v = 0: uniform attention, output = mean_j r_v(i - j)
        layer.relative[GLOBAL_MAX_OFFSET + 1, 8:] = e
    y = _height_only(mod, torch.randn(1, 8, 6, 3))
    expected = torch.zeros(1, 8, 6, 3)
    expected[:, :, 1:] = (e / 6).view(1, 8, 1, 1)  # only rows with a key at i - 1
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("span,rows", [(3, (3, 6)), (4, (2, 7)), (1, (4, 5))])
def test_finite_span_masks_positions_farther_than_half_span(span, rows):
    mod = _randomize(AxialAttention(8, heads=2, span=span))
    assert mod.height.relative.shape[0] == 2 * (span // 2) + 1
    x = torch.randn(1, 8, 9, 4, requires_grad=True)
    _height_only(mod, x)[0, :, 4, 1].sum().backward()
    footprint = x.grad[0].abs().sum(0) > 0
    expected = torch.zeros(9, 4, dtype=torch.bool)
    expected[rows[0] : rows[1], 1] = True
    assert torch.equal(footprint, expected)


def test_axis_longer_than_the_table_and_inference_mode_then_training():
    mod = AxialAttention(8, heads=2)
    with torch.inference_mode():
        mod(torch.randn(1, 8, 70, 2))  # offsets beyond 64 share the edge entries
    x = torch.randn(1, 8, 70, 2, requires_grad=True)
    mod(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "build,arg",
    [
        (lambda: AxialAttention(16, heads=3), "heads"),
        (lambda: AxialAttention(16, heads=0), "heads"),
        (lambda: AxialAttention(16, span=0), "span"),
        (lambda: AxialAttention(16, span=2.5), "span"),
        (lambda: AxialAttention(0), "dim"),
    ],
)
def test_bad_options_raise_value_error_naming_the_argument(build, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        build()


def test_options_declare_defaults():
    assert AxialAttention.options == {"heads": 4, "span": None, "qkv_bias": False}
    assert "arxiv.org/abs/2003.07853" in AxialAttention.paper


@pytest.mark.parametrize("size", [(6, 6), (5, 9)])
def test_macs_match_the_axial_closed_form(size):
    from torch.utils.flop_counter import FlopCounterMode

    c, (h, w) = 16, size
    mod = AxialAttention(c, heads=2)
    with FlopCounterMode(display=False) as counter:
        mod(torch.randn(1, c, h, w))

    def layer(length: int) -> int:  # qkv (2C^2 per pixel), q.k + q.r_q + k.r_k (3 C/2 L), A.v + A.r_v (2CL)
        return (2 * c * c + 3 * (c // 2) * length + 2 * c * length) * h * w

    assert counter.get_total_flops() // 2 == layer(h) + layer(w) + c * c * h * w  # + output projection
