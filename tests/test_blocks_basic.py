"""Properties of the conv, deform, GC, CA and SPD blocks, the Block template, reparameterize and describe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridnas.blocks import ADDONS, DOWNSAMPLES, MIXERS, Block, describe, reparameterize
from hybridnas.blocks.block import DropPath, make_norm
from hybridnas.blocks.conv import ConvDownsample, ConvMixer
from hybridnas.blocks.coord_attn import CoordAttention
from hybridnas.blocks.deform import DeformConv
from hybridnas.blocks.gc import ContextBlock
from hybridnas.blocks.spd import SPDConv, space_to_depth

SIZES = [(1, 1), (3, 5), (7, 7), (28, 28)]
MINE = {
    "conv": lambda d: ConvMixer(d),
    "deform": lambda d: DeformConv(d),
    "gc": lambda d: ContextBlock(d),
    "ca": lambda d: CoordAttention(d),
}


def _randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Non-trivial weights, so that zero-initialised parts (gc's last conv, deform's offsets) do something."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def _support(grad: torch.Tensor) -> torch.Tensor:
    """(H, W) bool map of input positions that received a gradient."""
    return grad.abs().sum(dim=(0, 1)) > 0


# --- shapes, dtypes, backward ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MINE))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_my_blocks_keep_shape_and_backprop(name, size, batch, bf16):
    m = MINE[name](8)
    x = torch.randn(batch, 8, *size, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = m(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    y.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("cls", [ConvDownsample, SPDConv])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_my_downsamplers_halve_with_ceil(cls, size):
    m = cls(6, 10)
    x = torch.randn(2, 6, *size, requires_grad=True)
    y = m(x)
    assert y.shape == (2, 10, -(-size[0] // 2), -(-size[1] // 2))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_deform_and_my_blocks_run_as_pure_bf16_modules():
    x = torch.randn(2, 8, 5, 6, dtype=torch.bfloat16)
    for make in [*MINE.values(), lambda d: SPDConv(d, d), lambda d: ConvDownsample(d, d)]:
        m = make(8).to(torch.bfloat16)
        y = m(x)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


# --- conv ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("groups", [1, 8])
def test_conv_receptive_field_is_kernel_by_kernel(kernel, groups):
    m = ConvMixer(8, kernel=kernel, groups=groups)
    x = torch.randn(1, 8, 11, 11, requires_grad=True)
    m(x)[0, :, 5, 5].sum().backward()
    expected = torch.zeros(11, 11, dtype=torch.bool)
    r = kernel // 2
    expected[5 - r : 6 + r, 5 - r : 6 + r] = True
    assert torch.equal(_support(x.grad), expected)


def test_conv_groups_equal_dim_is_depthwise():
    m = ConvMixer(8, kernel=3, groups=8)
    x = torch.zeros(1, 8, 5, 5, requires_grad=True)
    m(x)[0, 3, 2, 2].backward()
    per_channel = x.grad.abs().sum(dim=(0, 2, 3)) > 0
    assert per_channel.tolist() == [c == 3 for c in range(8)]


def _check_translation_equivariance(m: nn.Module, margin: int) -> None:
    x = torch.randn(1, 8, 20, 20, dtype=torch.float64)
    s = (2, 3)
    y = m(x)
    y_shifted = m(torch.roll(x, s, dims=(2, 3)))
    inner = (slice(None), slice(None), slice(margin + s[0], 20 - margin), slice(margin + s[1], 20 - margin))
    torch.testing.assert_close(y_shifted[inner], torch.roll(y, s, dims=(2, 3))[inner])


def test_conv_is_translation_equivariant_away_from_borders():
    _check_translation_equivariance(ConvMixer(8, kernel=5).double(), margin=2)


# --- deform -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,groups", [(3, 1), (3, 2), (5, 1), (1, 1)])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_deform_at_init_is_the_plain_conv_with_its_weights(kernel, groups, size):
    m = DeformConv(8, kernel=kernel, groups=groups).double()
    x = torch.randn(2, 8, *size, dtype=torch.float64)
    expected = F.conv2d(x, m.weight, m.bias, padding=kernel // 2, groups=groups)
    torch.testing.assert_close(m(x), expected)


def test_deform_at_init_in_bf16_autocast_stays_close_to_the_fp32_conv():
    # Sampling positions are kept in fp32: bf16 coordinates would blur the zero-offset taps.
    m = DeformConv(8)
    x = torch.randn(1, 8, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    expected = F.conv2d(x, m.weight, m.bias, padding=1)
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dy,dx", [(1, 0), (0, -2), (2, 1)])
def test_deform_with_constant_integer_offset_is_a_shifted_conv_in_the_interior(dy, dx):
    m = DeformConv(8).double()
    taps = 9
    with torch.no_grad():
        m.offset.bias[0 : 2 * taps : 2] = dy  # every tap moves by (dy, dx)
        m.offset.bias[1 : 2 * taps : 2] = dx
    x = torch.randn(1, 8, 12, 12, dtype=torch.float64)
    conv = F.conv2d(x, m.weight, m.bias, padding=1)
    y = m(x)
    # y(h, w) = conv(x)(h + dy, w + dx) wherever all taps land inside the image.
    for h in range(1 + max(0, -dy), 11 - max(0, dy)):
        for w in range(1 + max(0, -dx), 11 - max(0, dx)):
            torch.testing.assert_close(y[0, :, h, w], conv[0, :, h + dy, w + dx])


def test_deform_half_pixel_offset_interpolates_bilinearly():
    # kernel 1, groups = dim and unit weights: the output is the modulated sample itself.
    m = DeformConv(2, kernel=1, groups=2).double()
    with torch.no_grad():
        m.weight.fill_(1.0)
        m.bias.zero_()
        m.offset.bias[:2] = torch.tensor([0.5, 0.25], dtype=torch.float64)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    y = m(x)
    h, w = 1, 1
    expected = (
        0.5 * 0.75 * x[0, :, h, w]
        + 0.5 * 0.25 * x[0, :, h, w + 1]
        + 0.5 * 0.75 * x[0, :, h + 1, w]
        + 0.5 * 0.25 * x[0, :, h + 1, w + 1]
    )
    torch.testing.assert_close(y[0, :, h, w], expected)
    # The last row samples half outside the image: the outside half contributes zero.
    torch.testing.assert_close(y[0, :, 3, 0], 0.5 * 0.75 * x[0, :, 3, 0] + 0.5 * 0.25 * x[0, :, 3, 1])


def test_deform_modulation_starts_at_one_and_scales_the_output():
    m = DeformConv(8).double()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        m.bias.zero_()
        m.offset.bias[18:] = 100.0  # 2 * sigmoid(100) == 2
    torch.testing.assert_close(m(x), 2 * F.conv2d(x, m.weight, padding=1))


def test_deform_is_translation_equivariant_away_from_borders():
    m = DeformConv(8).double()
    with torch.no_grad():
        m.offset.weight.normal_(0, 0.02)  # learned-looking offsets, well under one pixel here
    x = torch.randn(1, 8, 20, 20, dtype=torch.float64)
    assert m.offset(x)[:, :18].abs().max() < 1.0
    # taps reach 1 (kernel) + 1 (offset) pixels; the offset conv itself reaches 1.
    _check_translation_equivariance(m, margin=3)


def test_deform_receptive_field_at_init_is_kernel_by_kernel():
    m = DeformConv(8, kernel=3)
    x = torch.randn(1, 8, 9, 9, requires_grad=True)
    m(x)[0, :, 4, 4].sum().backward()
    # The offset conv sees 3x3 too, so the support is exactly the 3x3 neighbourhood.
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[3:6, 3:6] = True
    assert torch.equal(_support(x.grad), expected)


def test_deform_offsets_receive_gradient_at_init():
    m = DeformConv(8)
    m(torch.randn(2, 8, 6, 6)).square().sum().backward()
    assert m.offset.weight.grad.abs().sum() > 0


def test_deform_caches_grids_per_resolution_and_dtype():
    m = DeformConv(4)
    m(torch.randn(1, 4, 5, 5))
    m(torch.randn(1, 4, 6, 5))
    m.double()(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    assert {(k[0], k[1], k[3]) for k in m._grids} == {
        (5, 5, torch.float32),
        (6, 5, torch.float32),
        (5, 5, torch.float64),
    }


def test_deform_trains_after_an_inference_mode_forward():
    m = DeformConv(4)
    with torch.inference_mode():
        m(torch.randn(1, 4, 5, 5))
    m(torch.randn(1, 4, 5, 5)).sum().backward()  # the cached grid must not break autograd
    assert m.weight.grad is not None


# --- gc -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gc_is_identity_at_init(size):
    x = torch.randn(2, 16, *size)
    assert torch.equal(ContextBlock(16)(x), x)


def _gc_random() -> ContextBlock:
    return _randomize(ContextBlock(16)).double()


def test_gc_commutes_with_any_permutation_of_positions():
    m = _gc_random()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    perm = torch.randperm(30)
    permute = lambda t: t.flatten(2)[:, :, perm].view_as(t)  # noqa: E731
    torch.testing.assert_close(m(permute(x)), permute(m(x)))


def test_gc_adds_one_context_vector_per_image():
    m = _gc_random()
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    delta = m(x) - x
    torch.testing.assert_close(delta, delta[:, :, :1, :1].expand_as(delta))
    assert not torch.allclose(delta[0], delta[1])  # but a different one per image


def test_gc_with_zero_mask_conv_pools_the_mean():
    m = _gc_random()
    with torch.no_grad():
        m.conv_mask.weight.zero_()
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    expected = x + m.transform(x.mean(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(m(x), expected)


def test_gc_bottleneck_and_parameter_count_follow_the_paper():
    # 2CP + 2C + 3P + 1 with P = max(8, C // 16)
    for c, p in [(16, 8), (64, 8), (256, 16)]:
        m = ContextBlock(c)
        assert m.transform[0].out_channels == p
        assert sum(t.numel() for t in m.parameters()) == 2 * c * p + 2 * c + 3 * p + 1


# --- ca -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_ca_commutes_with_independent_row_and_column_permutations(train):
    m = _randomize(CoordAttention(16), std=0.2).double().train(train)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    rows, cols = torch.randperm(5), torch.randperm(7)
    permute = lambda t: t[:, :, rows][:, :, :, cols]  # noqa: E731
    torch.testing.assert_close(m(permute(x)), permute(m(x)))


def test_ca_gate_is_rank_one_per_channel():
    m = _randomize(CoordAttention(16), std=0.2).double()
    x = torch.rand(1, 16, 5, 7, dtype=torch.float64) + 0.5  # away from zero, so y / x is defined
    gate = m(x) / x  # a_h(i) * a_w(j) for every channel
    ranks = torch.linalg.matrix_rank(gate[0])
    assert (ranks == 1).all()


def test_ca_is_not_transpose_equivariant():
    # F_h and F_w are separate convs: rows and columns are not interchangeable.
    m = _randomize(CoordAttention(16), std=0.2).double().eval()
    x = torch.randn(1, 16, 6, 6, dtype=torch.float64)
    assert not torch.allclose(m(x.transpose(2, 3)), m(x).transpose(2, 3))


def test_ca_reduction_and_parameter_count_follow_the_paper():
    assert sum(p.numel() for p in CoordAttention(64).parameters()) == 1688  # reference count, mip = 8
    assert CoordAttention(16).conv1.out_channels == 8
    assert CoordAttention(1024).conv1.out_channels == 32


# --- spd ----------------------------------------------------------------------------------------------


def _depth_to_space(y: torch.Tensor) -> torch.Tensor:
    B, C4, h, w = y.shape
    C = C4 // 4
    x = y.new_zeros(B, C, 2 * h, 2 * w)
    for r in range(2):
        for s in range(2):
            x[:, :, r::2, s::2] = y[:, (r + 2 * s) * C : (r + 2 * s + 1) * C]
    return x


@pytest.mark.parametrize("size", [(4, 6), (5, 7), (1, 1), (2, 3)], ids=str)
def test_space_to_depth_matches_the_paper_slicing_and_is_lossless(size):
    x = torch.randn(2, 3, *size)
    y = space_to_depth(x)
    H, W = size
    xp = F.pad(x, (0, W % 2, 0, H % 2))
    slices = [xp[..., ::2, ::2], xp[..., 1::2, ::2], xp[..., ::2, 1::2], xp[..., 1::2, 1::2]]
    assert torch.equal(y, torch.cat(slices, dim=1))
    back = _depth_to_space(y)
    assert torch.equal(back[..., :H, :W], x)
    assert (back[..., H:, :] == 0).all() and (back[..., :, W:] == 0).all()  # padding is zeros


def test_space_to_depth_is_not_pixel_unshuffle_order():
    x = torch.randn(1, 3, 4, 4)
    assert not torch.equal(space_to_depth(x), F.pixel_unshuffle(x, 2))


@pytest.mark.parametrize("size", [(6, 8), (5, 7)], ids=str)
def test_spd_then_1x1_conv_equals_2x2_stride_2_conv(size):
    C, O = 3, 5
    w1 = torch.randn(O, 4 * C, 1, 1, dtype=torch.float64)
    # Map weights: input block r + 2s, channel c -> kernel tap (r, s) of channel c.
    w2 = torch.empty(O, C, 2, 2, dtype=torch.float64)
    for r in range(2):
        for s in range(2):
            w2[:, :, r, s] = w1[:, (r + 2 * s) * C : (r + 2 * s + 1) * C, 0, 0]
    x = torch.randn(2, C, *size, dtype=torch.float64)
    x_even = F.pad(x, (0, size[1] % 2, 0, size[0] % 2))  # what SPD does to odd maps
    torch.testing.assert_close(F.conv2d(space_to_depth(x), w1), F.conv2d(x_even, w2, stride=2))


def test_spdconv_equals_a_6x6_stride_2_conv():
    C, O = 3, 4
    m = SPDConv(C, O).double().eval()
    w3 = m.conv.weight  # (O, 4C, 3, 3)
    w6 = torch.empty(O, C, 6, 6, dtype=torch.float64)
    for r in range(2):
        for s in range(2):
            w6[:, :, r::2, s::2] = w3[:, (r + 2 * s) * C : (r + 2 * s + 1) * C]
    x = torch.randn(2, C, 8, 10, dtype=torch.float64)
    expected = m.norm(F.conv2d(x, w6, stride=2, padding=2))
    torch.testing.assert_close(m(x), expected)


# --- Block, norms, DropPath, reparameterize ------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
@pytest.mark.parametrize("addon", ["none", "gc", "ca"])
@pytest.mark.parametrize("mixer", ["conv", "deform"])
def test_block_keeps_shape_for_each_norm(norm, addon, mixer):
    b = Block(8, mixer=mixer, addon=addon, norm=norm, drop_path=0.2, mlp_ratio=1.5)
    assert b.mlp.fc1.out_channels == 12
    for size in [(1, 1), (3, 5)]:
        x = torch.randn(2, 8, *size, requires_grad=True)
        y = b(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_block_is_the_metaformer_template():
    b = Block(8, mixer="conv", mixer_opts={"kernel": 5}, addon="gc", norm="layernorm").eval()
    assert b.mixer.conv.kernel_size == (5, 5)
    x = torch.randn(2, 8, 6, 6)
    h = x + b.mixer(b.norm1(x))
    h = b.addon(h)
    torch.testing.assert_close(b(x), h + b.mlp(b.norm2(h)))


def test_layernorm_normalises_each_position_over_channels():
    n = make_norm("layernorm", 8)
    x = torch.randn(2, 8, 3, 4) * 5 + 2
    y = n(x)
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=1, unbiased=False), torch.ones(2, 3, 4), atol=1e-3, rtol=0)
    assert isinstance(make_norm("batchnorm", 8), nn.BatchNorm2d)


def test_droppath_drops_whole_samples_and_keeps_the_mean():
    d = DropPath(0.5)
    x = torch.ones(4000, 3, 2, 2)
    y = d(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()  # dropped, or scaled by 1/keep
    assert abs(y.mean().item() - 1.0) < 0.1
    assert torch.equal(d.eval()(x), x)
    assert torch.equal(DropPath(0.0)(x), x)


def test_reparameterize_calls_every_submodule_children_first_and_returns_the_module():
    calls = []

    class Branchy(nn.Module):
        def __init__(self, name, *children):
            super().__init__()
            self.name = name
            self.kids = nn.ModuleList(children)

        def reparameterize(self):
            calls.append(self.name)

    shared = Branchy("shared")
    model = nn.Sequential(Branchy("outer", Branchy("inner"), shared), shared, nn.Conv2d(2, 2, 1))
    assert reparameterize(model) is model
    assert calls == ["inner", "shared", "outer"]


def test_reparameterize_leaves_a_block_without_branches_unchanged():
    b = Block(8, mixer="conv", addon="ca").eval()
    x = torch.randn(1, 8, 5, 5)
    before = b(x)
    torch.testing.assert_close(reparameterize(b)(x), before)


# --- describe -----------------------------------------------------------------------------------------


def test_describe_lists_every_block_with_its_options_and_paper_link():
    text = describe(width=100)
    for table in (MIXERS, ADDONS, DOWNSAMPLES):
        for name, cls in table.items():
            assert any(line.startswith(f"  {name} ") for line in text.splitlines()), name
            for opt, default in cls.options.items():
                assert f"{opt}={default!r}" in text
            link = [w for w in cls.paper.split() if w.startswith("http")]
            assert all(u in text for u in link)
    assert "kernel=3, groups=1" in text
    assert max(map(len, text.splitlines())) <= 100


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,arg",
    [
        (lambda: ConvMixer(8, kernel=2), "kernel"),
        (lambda: ConvMixer(8, kernel=0), "kernel"),
        (lambda: ConvMixer(8, kernel=3.0), "kernel"),
        (lambda: ConvMixer(8, groups=3), "groups"),
        (lambda: ConvMixer(8, groups=0), "groups"),
        (lambda: ConvMixer(0), "dim"),
        (lambda: DeformConv(8, kernel=4), "kernel"),
        (lambda: DeformConv(8, groups=5), "groups"),
        (lambda: DeformConv(-1), "dim"),
        (lambda: ContextBlock(0), "dim"),
        (lambda: CoordAttention(True), "dim"),
        (lambda: SPDConv(0, 8), "in_dim"),
        (lambda: SPDConv(8, 0), "out_dim"),
        (lambda: ConvDownsample(8, 2.5), "out_dim"),
        (lambda: make_norm("groupnorm", 8), "norm"),
        (lambda: Block(8, norm="instancenorm"), "norm"),
        (lambda: Block(8, mlp_ratio=0), "mlp_ratio"),
        (lambda: Block(8, drop_path=1.0), "drop_path"),
        (lambda: Block(8, mixer="convv"), "mixer"),
        (lambda: Block(8, addon="se"), "addon"),
        (lambda: Block(8, mixer_opts={"kernal": 3}), "kernal"),
        (lambda: Block(8, mixer_opts=[3]), "mixer_opts"),
        (lambda: reparameterize("model"), "module"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_groups_error_lists_the_allowed_values():
    with pytest.raises(ValueError, match=r"groups=3.*dim=8.*1, 2, 4, 8"):
        ConvMixer(8, groups=3)
