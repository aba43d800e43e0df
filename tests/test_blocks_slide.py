"""Slide attention and the shared local-attention kernel: shapes, exactness against the unfold
reference, re-parameterisation, global-attention equivalence, receptive field, equivariance, MACs."""

import pytest
import torch
import torch.nn.functional as F

import hybridnas.blocks.slide as slide
from hybridnas.blocks import build_mixer, reparameterize
from hybridnas.blocks.slide import SlideAttention, local_attention
from hybridnas.runners.bench.blocks import unfold_local_attention
from hybridnas.runners.macs import profile

SIZES = [(1, 1), (3, 5), (7, 7), (28, 28)]


def _randomize(mod: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Weights large enough that attention is far from uniform and every term matters."""
    with torch.no_grad():
        for p in mod.parameters():
            if p.requires_grad:
                p.normal_(0.0, std)
    return mod


# ---------------------------------------------------------------------------------------- kernel


def _kernel_inputs(b, n, c, h, w, kernel, pos, rpb, mix, dtype=torch.float64):
    g = torch.Generator().manual_seed(h * 100 + w * 10 + kernel)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)

    d = kernel * kernel
    return dict(
        q=rnd(b, n, c, h, w),
        k=rnd(b, n, c, h, w),
        v=rnd(b, n, c, h, w),
        pe=rnd(c, 2) if pos else None,
        rpb=rnd(n, d) if rpb else None,
        mix=(rnd(c, d, d), rnd(c, d)) if mix else None,
    )


@pytest.mark.parametrize(
    "size,kernel",
    [((1, 1), 3), ((1, 1), 7), ((3, 5), 7), ((5, 7), 3), ((9, 8), 5), ((12, 12), 7)],
)
@pytest.mark.parametrize("terms", ["plain", "pos", "all"])
@pytest.mark.parametrize(
    "chunk_bytes,tiny_bytes", [(1, 0), (1 << 30, 0), (1 << 30, 1 << 30)], ids=["chunk1", "whole", "one-shot"]
)
def test_fast_kernel_equals_unfold_reference_with_gradients(
    size, kernel, terms, chunk_bytes, tiny_bytes, monkeypatch
):
    # float64 so that the comparison tests the algorithm, not rounding. The three code paths:
    # chunk1 = the offset loop over one image per chunk with an uneven batch of 3 (chunk boundaries
    # and a last partial chunk), whole = the loop over the whole batch, one-shot = the tiny-problem
    # forward over all offsets at once.
    monkeypatch.setattr(slide, "_CPU_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(slide, "_TINY_BYTES", tiny_bytes)
    pos, rpb, mix = terms != "plain", terms == "all", terms == "all"
    t = _kernel_inputs(3, 2, 4, *size, kernel, pos, rpb, mix)
    leaves = [x for x in (t["q"], t["k"], t["v"], t["pe"], t["rpb"]) if x is not None] + list(t["mix"] or ())
    args = (t["q"], t["k"], t["v"], kernel)
    fast = local_attention(*args, pe=t["pe"], rpb=t["rpb"], mix=t["mix"])
    ref = unfold_local_attention(*args, pe=t["pe"], rpb=t["rpb"], mix=t["mix"])
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("size", [(5, 7), (14, 14)])
def test_fast_kernel_matches_unfold_in_fp32_to_1e_5(size):
    t = _kernel_inputs(2, 2, 8, *size, 7, True, True, False, dtype=torch.float32)
    fast = local_attention(t["q"], t["k"], t["v"], 7, pe=t["pe"], rpb=t["rpb"])
    ref = unfold_local_attention(t["q"], t["k"], t["v"], 7, pe=t["pe"], rpb=t["rpb"])
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_kernel_geometry_is_cached_per_size_device_and_dtype():
    slide._grid.cache_clear()
    a = slide._grid(5, 7, 1, 1, torch.device("cpu"), torch.float32)
    assert slide._grid(5, 7, 1, 1, torch.device("cpu"), torch.float32) is a
    b = slide._grid(5, 7, 1, 1, torch.device("cpu"), torch.bfloat16)
    assert b is not a and b.mask.dtype == torch.bfloat16 and a.mask.dtype == torch.float32
    # the mask forbids exactly the neighbours outside the image; the pixel itself is never masked
    centre = a.offsets.index((0, 0))
    assert (a.mask[centre] == 0).all()
    corner = a.offsets.index((-1, -1))
    assert (
        torch.isinf(a.mask[corner].view(5, 7)[0]).all() and torch.isinf(a.mask[corner].view(5, 7)[:, 0]).all()
    )
    assert (a.mask[corner].view(5, 7)[1:, 1:] == 0).all()


# ----------------------------------------------------------------------------------------- module


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 2])
def test_slide_keeps_shape_and_backprops_in_fp32_and_bf16_autocast(size, batch):
    mod = SlideAttention(16, heads=4, kernel=3)
    x = torch.randn(batch, 16, *size, requires_grad=True)
    y = mod(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in mod.named_parameters():
        assert p.requires_grad == (name != "shift")
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = mod(x)
    assert yb.dtype == torch.bfloat16 and yb.shape == x.shape
    yb.float().sum().backward()
    torch.testing.assert_close(yb.float(), y, rtol=0.1, atol=0.1)


def test_kernel_computes_bf16_inputs_in_fp32_on_the_cpu():
    # On the CPU the kernel's elementwise passes are faster in fp32: bf16 inputs are upcast, the
    # result is rounded back once. So it equals the fp32 kernel on the same (bf16-valued) inputs,
    # bit for bit, and its gradients reach the bf16 inputs in bf16.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 5, 6, generator=g).bfloat16().requires_grad_() for _ in range(3))
    rpb = torch.randn(2, 9, generator=g).bfloat16()
    y = local_attention(q, k, v, 3, rpb=rpb)
    ref = local_attention(q.detach().float(), k.detach().float(), v.detach().float(), 3, rpb=rpb.float())
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref.bfloat16())
    y.float().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad.float()).all() for t in (q, k, v))


def test_slide_runs_as_a_pure_bf16_module():
    mod = SlideAttention(16, heads=2, kernel=5).to(torch.bfloat16)
    x = torch.randn(2, 16, 6, 9, dtype=torch.bfloat16, requires_grad=True)
    y = mod(x)
    y.float().sum().backward()
    assert (
        y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all() and torch.isfinite(x.grad.float()).all()
    )


def test_slide_module_with_unfold_kernel_gives_the_same_output_and_gradients():
    mod = _randomize(SlideAttention(8, heads=2, kernel=3)).double()
    x = torch.randn(2, 8, 6, 7, dtype=torch.double, requires_grad=True)
    y = mod(x)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, mod.deform.weight))
    mod.attention = unfold_local_attention
    y2 = mod(x)
    gx2, gw2 = torch.autograd.grad(y2.square().sum(), (x, mod.deform.weight))
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gw, gw2)


def test_fixed_branch_is_frozen_one_hot_shift_kernels():
    mod = SlideAttention(8, heads=2, kernel=3)
    assert not mod.shift.requires_grad and mod.shift.shape == (4 * 9, 1, 3, 3)
    x = torch.randn(1, 4, 5, 5)
    shifted = F.conv2d(x, mod.shift, padding=1, groups=4)  # channel c*9 + d = x shifted by offset d
    unfolded = F.unfold(x, 3, padding=1).view(1, 4 * 9, 5, 5)
    torch.testing.assert_close(shifted, unfolded)


def test_reparameterize_merges_the_two_convs_with_identical_outputs():
    mod = _randomize(SlideAttention(16, heads=4, kernel=3))
    x = torch.randn(2, 16, 9, 11)
    before = mod(x)
    n_before = sum(p.numel() for p in mod.parameters())
    assert reparameterize(mod) is mod
    assert mod.shift is None and "merged" in repr(mod)
    after = mod(x)
    assert torch.equal(before, after)  # the same fp32 sum, so bit-identical
    assert sum(p.numel() for p in mod.parameters()) == n_before - 16 // 4 * 81
    mod.reparameterize()  # a second call is a no-op
    assert torch.equal(mod(x), after)
    after.sum().backward()  # the merged conv still trains
    assert mod.deform.weight.grad is not None


def _global_attention(mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention over all H*W tokens with the module's qkv and proj weights."""
    b, c, h, w = x.shape
    heads, d = mod.heads, c // mod.heads
    qkv = F.conv2d(x, mod.qkv.weight, mod.qkv.bias).view(b, 3, heads, d, h * w)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, d, L)
    attn = ((q.transpose(-1, -2) @ k) * d**-0.5).softmax(-1)  # (B, heads, L, L)
    out = (v @ attn.transpose(-1, -2)).reshape(b, c, h, w)
    return F.conv2d(out, mod.proj.weight, mod.proj.bias)


@pytest.mark.parametrize("kernel,size", [(9, (4, 5)), (11, (5, 5)), (15, (3, 6))])
def test_slide_with_kernel_covering_the_map_is_global_attention(kernel, size):
    # With the learnable deformation and the position bias zeroed the keys are pure shifts; masking
    # the neighbours outside the image then leaves exactly the H*W real tokens.
    mod = _randomize(SlideAttention(8, heads=2, kernel=kernel))
    with torch.no_grad():
        mod.deform.weight.zero_()
        mod.deform.bias.zero_()
        mod.rpb.zero_()
    x = torch.randn(2, 8, *size)
    torch.testing.assert_close(mod(x), _global_attention(mod, x), rtol=1e-5, atol=1e-5)


def _support(mod: torch.nn.Module, size: int, y0: int, x0: int) -> torch.Tensor:
    x = torch.randn(1, mod.dim, size, size, requires_grad=True)
    mod(x)[0, :, y0, x0].sum().backward()
    return x.grad.abs().sum(1)[0] > 0


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("where", [(6, 6), (0, 0), (1, 10)])
def test_slide_receptive_field_is_kernel_by_kernel(kernel, where):
    mod = _randomize(SlideAttention(8, heads=2, kernel=kernel))
    y0, x0 = where
    r = kernel // 2
    expected = torch.zeros(11, 11, dtype=torch.bool)
    expected[max(0, y0 - r) : y0 + r + 1, max(0, x0 - r) : x0 + r + 1] = True
    assert torch.equal(_support(mod, 11, y0, x0), expected)


def test_slide_is_translation_equivariant_away_from_borders():
    mod = _randomize(SlideAttention(8, heads=2, kernel=3))
    x = torch.randn(1, 8, 14, 15)
    ty, tx, r = 2, 3, 1 + 1  # the deformed keys reach one tap further than the window
    y_full = mod(x)[..., ty:, tx:]
    y_crop = mod(x[..., ty:, tx:])
    torch.testing.assert_close(y_full[..., r:-r, r:-r], y_crop[..., r:-r, r:-r], rtol=1e-5, atol=1e-5)


def test_slide_macs_match_the_paper_form():
    # Slide-Transformer's count (blocks_reference 4.3): qkv + proj 4C^2 HW; logits and aggregation
    # 2 k^2 C HW; the depthwise conv that deforms k and v 2 k^4 C HW; its bias is an addition. Small
    # maps clamp k^2 to the (2ry+1)(2rx+1) offsets that can land inside the image.
    c = 16
    for kernel, h, w, d in ((3, 9, 7, 9), (5, 9, 7, 25), (9, 3, 4, 5 * 7)):
        mod = SlideAttention(c, heads=4, kernel=kernel)
        expected = 4 * c * c * h * w + 2 * d * d * c * h * w + 2 * d * c * h * w
        assert profile(mod, (c, h, w))["macs"] == expected


@pytest.mark.parametrize("size", [(9, 7), (3, 4)])
def test_slide_counts_what_the_materialised_unfold_version_multiplies(size):
    # The no-copy kernel executes 2 k^2 C HW more products (the conv bias on the query side); it is
    # counted as the unfold (Im2Col) version, which builds the deformed keys and values, multiplies.
    mod = SlideAttention(16, heads=4, kernel=3)
    fast = profile(mod, (16, *size))["macs"]
    mod.attention = unfold_local_attention
    assert fast == profile(mod, (16, *size))["macs"]


@pytest.mark.parametrize(
    "opts,arg",
    [
        ({"heads": 3}, "heads"),
        ({"heads": 0}, "heads"),
        ({"kernel": 4}, "kernel"),
        ({"kernel": 0}, "kernel"),
        ({"kernel": -3}, "kernel"),
        ({"kernel": 3.0}, "kernel"),
        ({"qkv_bias": "yes"}, "qkv_bias"),
    ],
)
def test_bad_options_raise_value_error_naming_them(opts, arg):
    with pytest.raises(ValueError, match=arg):
        SlideAttention(16, **opts)


def test_unknown_option_raises_through_the_registry():
    with pytest.raises(ValueError, match="window"):
        build_mixer("slide", 16, window=7)
