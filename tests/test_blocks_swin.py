"""Swin W-MSA / SW-MSA / patch merging: shapes, exact equivalences with plain attention, receptive fields."""

import pytest
import torch
import torch.nn.functional as F

from hybridnas.blocks.swin import PatchMerging, ShiftedWindowAttention, WindowAttention

SIZES = [(1, 1), (3, 5), (7, 7), (28, 28)]


def _randomize(mod: torch.nn.Module) -> torch.nn.Module:
    """Weights large enough that attention is far from uniform and the bias matters."""
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0.0, 0.4)
    return mod


def _reference(mod, x: torch.Tensor, m: int, s: int) -> torch.Tensor:
    """Attention over all H*W tokens written with plain matmuls: token i may attend key j iff
    floor((y - s) / m) and floor((x - s) / m) agree (windows offset by s, partial at the borders, no
    padding tokens at all); the bias comes from the (2M-1)^2 table at the configured M."""
    b, c, h, w = x.shape
    heads, d, big = mod.heads, c // mod.heads, mod.window
    t = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    qkv = t @ mod.qkv.weight.T
    if mod.qkv.bias is not None:
        qkv = qkv + mod.qkv.bias
    q, k, v = qkv.view(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4)  # (B, heads, L, d) each
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    gy, gx = torch.div(ys - s, m, rounding_mode="floor"), torch.div(xs - s, m, rounding_mode="floor")
    allowed = (gy[:, None] == gy[None, :]) & (gx[:, None] == gx[None, :])
    dy = (ys[:, None] - ys[None, :]).clamp(-(big - 1), big - 1) + big - 1
    dx = (xs[:, None] - xs[None, :]).clamp(-(big - 1), big - 1) + big - 1
    bias = mod.relative_position_bias_table[dy * (2 * big - 1) + dx].permute(2, 0, 1)  # (heads, L, L)
    logits = (q @ k.transpose(-1, -2)) * d**-0.5 + bias
    attn = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    y = (attn @ v).transpose(1, 2).reshape(b, h * w, c)
    y = y @ mod.proj.weight.T + mod.proj.bias
    return y.view(b, h, w, c).permute(0, 3, 1, 2)


@pytest.fixture(params=[False, True], ids=["matmul", "sdpa"])
def kernel(request, monkeypatch):
    """Run a test with both attention kernels (the CPU default is matmul, GPUs use SDPA)."""
    from hybridnas.blocks import swin

    monkeypatch.setattr(swin._WindowMSA, "use_sdpa", request.param)
    return request.param


def _check_against_reference(mod, x, m, s):
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y = mod(x1)
    table = mod.relative_position_bias_table
    g = torch.randn_like(y)
    (grad_x, grad_table) = torch.autograd.grad(y, (x1, table), g)
    ref = _reference(mod, x2, m, s)
    (ref_x, ref_table) = torch.autograd.grad(ref, (x2, table), g)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_x, ref_x, rtol=1e-4, atol=1e-5)
    # the bias reaches SDPA as a float mask: its gradient must flow back into the table
    torch.testing.assert_close(grad_table, ref_table, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [WindowAttention, ShiftedWindowAttention])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 2])
def test_window_mixers_keep_shape_in_fp32_bf16_and_backward(cls, size, batch, kernel):
    mod = cls(8, heads=2, window=4)
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


@pytest.mark.parametrize("cls", [WindowAttention, ShiftedWindowAttention])
@pytest.mark.parametrize("size,window", [((7, 7), 7), ((5, 5), 7), ((4, 4), 4)])
def test_window_attention_equals_global_when_window_covers_map(cls, size, window, kernel):
    mod = _randomize(cls(12, heads=3, window=window))
    assert mod.window_and_shift(*size) == (size[0], 0)  # Swin: one window, no shift
    x = torch.randn(2, 12, *size)
    # a single window over the whole map: every token attends every token (s=0, m >= H, W)
    _check_against_reference(mod, x, m=max(size), s=0)


def test_clamped_window_reads_the_centred_sub_table():
    mod = _randomize(WindowAttention(8, heads=2, window=5))
    full = mod.relative_bias(5)  # (heads, 25, 25)
    for m in (1, 2, 3, 4):
        sub = mod.relative_bias(m)
        for i in range(m * m):
            for j in range(m * m):
                # the same (dy, dx) offset inside the 5x5 window, anchored at the top-left token
                yi, xi, yj, xj = i // m, i % m, j // m, j % m
                torch.testing.assert_close(sub[:, i, j], full[:, yi * 5 + xi, yj * 5 + xj])
    centre = (5 - 1) * (2 * 5 - 1) + (5 - 1)
    assert (mod.relative_position_index.diagonal() == centre).all()


@pytest.mark.parametrize(
    "size,pixel,rows,cols", [((12, 12), (5, 6), (4, 8), (4, 8)), ((10, 10), (9, 8), (8, 10), (8, 10))]
)
def test_window_output_depends_exactly_on_its_own_window(size, pixel, rows, cols):
    mod = _randomize(WindowAttention(8, heads=2, window=4))
    x = torch.randn(1, 8, *size, requires_grad=True)
    mod(x)[0, :, pixel[0], pixel[1]].sum().backward()
    footprint = x.grad[0].abs().sum(0) > 0
    expected = torch.zeros(size, dtype=torch.bool)
    expected[rows[0] : rows[1], cols[0] : cols[1]] = True
    assert torch.equal(footprint, expected)


def test_regular_then_shifted_pair_reaches_at_most_2M_by_2M():
    m = 4
    pair = torch.nn.Sequential(
        _randomize(WindowAttention(8, heads=2, window=m)),
        _randomize(ShiftedWindowAttention(8, heads=2, window=m)),
    )
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    pair(x)[0, :, 8, 8].sum().backward()
    footprint = (x.grad[0].abs().sum(0) > 0).nonzero()
    rows, cols = footprint[:, 0], footprint[:, 1]
    assert rows.max() - rows.min() + 1 <= 2 * m and cols.max() - cols.min() + 1 <= 2 * m
    # token (8, 8) sits in the shifted window [6, 10)^2, which overlaps regular windows [4, 12)^2
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 11, 4, 11)
    assert len(footprint) == 64


@pytest.mark.parametrize(
    "size,window,shift", [((12, 12), 4, 2), ((10, 9), 4, 1), ((13, 11), 5, 2), ((9, 9), 4, 3)]
)
def test_shifted_window_equals_explicit_offset_windows_with_partial_borders(size, window, shift, kernel):
    mod = _randomize(ShiftedWindowAttention(8, heads=2, window=window, shift=shift))
    assert mod.window_and_shift(*size) == (window, shift)
    _check_against_reference(mod, torch.randn(2, 8, *size), m=window, s=shift)


def test_padded_keys_are_masked_on_5x5_map_with_window_4(kernel):
    mod = _randomize(WindowAttention(8, heads=2, window=4))
    x = torch.randn(2, 8, 5, 5)
    # windows [0,4) and [4,5) per axis, each attending only its real tokens
    _check_against_reference(mod, x, m=4, s=0)


def test_window_attention_is_equivariant_to_cyclic_shifts_by_multiples_of_window():
    mod = _randomize(WindowAttention(8, heads=2, window=4))
    x = torch.randn(2, 8, 8, 12)
    y = mod(x)
    for shifts in [(4, 8), (-4, 4), (0, 4)]:
        torch.testing.assert_close(mod(x.roll(shifts, dims=(2, 3))), y.roll(shifts, dims=(2, 3)))
    # and not to a shift that is not a multiple of M
    assert not torch.allclose(mod(x.roll(1, dims=2)), y.roll(1, dims=2), atol=1e-4)


def test_masks_follow_the_resolution_and_survive_inference_mode(kernel):
    mod = _randomize(ShiftedWindowAttention(8, heads=2, window=4))
    with torch.inference_mode():
        mod(torch.randn(1, 8, 10, 9))
    for size in [(10, 9), (12, 12), (10, 9)]:  # cached masks reused and rebuilt per resolution
        _check_against_reference(mod, torch.randn(1, 8, *size), m=4, s=2)


@pytest.mark.parametrize("size", [(6, 4), (5, 7), (1, 1)])
def test_patch_merging_equals_space_to_depth_layernorm_linear(size):
    mod = _randomize(PatchMerging(8, 12))
    x = torch.randn(2, 8, *size)
    h, w = size
    xp = F.pad(x, (0, w % 2, 0, h % 2))  # odd sides zero-padded bottom/right
    # Swin's gather order: offsets (row, col) = (0,0), (1,0), (0,1), (1,1)
    spd = torch.cat([xp[..., 0::2, 0::2], xp[..., 1::2, 0::2], xp[..., 0::2, 1::2], xp[..., 1::2, 1::2]], 1)
    t = spd.permute(0, 2, 3, 1)
    t = F.layer_norm(t, (32,), mod.norm.weight, mod.norm.bias, mod.norm.eps)
    ref = (t @ mod.reduction.weight.T).permute(0, 3, 1, 2)
    y = mod(x)
    assert y.shape == (2, 12, -(-h // 2), -(-w // 2))
    torch.testing.assert_close(y, ref)
    assert mod.reduction.bias is None


@pytest.mark.parametrize(
    "build,arg",
    [
        (lambda: WindowAttention(16, heads=3), "heads"),
        (lambda: WindowAttention(16, heads=0), "heads"),
        (lambda: WindowAttention(16, window=0), "window"),
        (lambda: ShiftedWindowAttention(16, window=-1), "window"),
        (lambda: ShiftedWindowAttention(16, window=4, shift=4), "shift"),
        (lambda: ShiftedWindowAttention(16, window=4, shift=-1), "shift"),
        (lambda: WindowAttention(0), "dim"),
        (lambda: PatchMerging(0, 8), "in_dim"),
        (lambda: PatchMerging(8, 0), "out_dim"),
    ],
)
def test_bad_options_raise_value_error_naming_the_argument(build, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        build()


def test_options_declare_defaults_and_shift_defaults_to_half_window():
    assert WindowAttention.options == {"heads": 4, "window": 7, "qkv_bias": True}
    assert ShiftedWindowAttention.options == {"heads": 4, "window": 7, "shift": None, "qkv_bias": True}
    assert ShiftedWindowAttention(8).shift == 3 and WindowAttention(8).shift == 0
    assert "arxiv.org/abs/2103.14030" in WindowAttention.paper


@pytest.mark.parametrize("cls", [WindowAttention, ShiftedWindowAttention])
def test_cpu_kernel_macs_match_swin_formula(cls):
    from torch.utils.flop_counter import FlopCounterMode

    c, h, w, m = 16, 8, 12, 4
    mod = cls(c, heads=4, window=m)
    with FlopCounterMode(display=False) as counter:
        mod(torch.randn(1, c, h, w))
    # Omega(W-MSA) = 4hwC^2 + 2M^2hwC: q/k/v/proj projections plus QK^T and AV inside the windows
    assert counter.get_total_flops() // 2 == 4 * h * w * c * c + 2 * m * m * h * w * c
