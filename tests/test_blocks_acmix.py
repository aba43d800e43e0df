"""ACmix: shapes, the conv path as a plain conv at init, global-attention equivalence, receptive fields
of the whole block and of each path, a position term that does not depend on the map size,
equivariance, the unfold reference, MACs and option checks."""

import pytest
import torch
import torch.nn.functional as F

from hybridnas.blocks import build_mixer
from hybridnas.blocks.acmix import ACmix
from hybridnas.runners.bench.blocks import unfold_local_attention
from hybridnas.runners.macs import profile

SIZES = [(1, 1), (3, 5), (7, 7), (28, 28)]


def _randomize(mod: ACmix, std: float = 0.3) -> ACmix:
    """Random weights everywhere (the conv path too), keeping the rates at 0.5."""
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if not name.startswith("rate"):
                p.normal_(0.0, std)
    return mod


def _only(mod: ACmix, path: str) -> ACmix:
    with torch.no_grad():
        mod.rate1.fill_(1.0 if path == "attention" else 0.0)
        mod.rate2.fill_(1.0 if path == "conv" else 0.0)
    return mod


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [1, 2])
def test_acmix_keeps_shape_and_backprops_in_fp32_and_bf16_autocast(size, batch):
    mod = ACmix(16, heads=4, kernel_att=7, kernel_conv=3)
    x = torch.randn(batch, 16, *size, requires_grad=True)
    y = mod(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = mod(x)
    assert yb.dtype == torch.bfloat16 and yb.shape == x.shape
    yb.float().sum().backward()
    torch.testing.assert_close(yb.float(), y, rtol=0.1, atol=0.1)


def test_acmix_runs_as_a_pure_bf16_module():
    mod = ACmix(16, heads=2, kernel_att=5).to(torch.bfloat16)
    x = torch.randn(2, 16, 6, 9, dtype=torch.bfloat16, requires_grad=True)
    y = mod(x)
    y.float().sum().backward()
    assert (
        y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all() and torch.isfinite(x.grad.float()).all()
    )


def test_rates_are_learnable_and_one_half_at_init():
    mod = ACmix(8, heads=2)
    assert mod.rate1.item() == 0.5 and mod.rate2.item() == 0.5
    assert mod.rate1.requires_grad and mod.rate2.requires_grad
    mod(torch.randn(1, 8, 5, 5)).sum().backward()
    assert mod.rate1.grad.abs() > 0 and mod.rate2.grad.abs() > 0


def _conv_path_as_plain_conv(mod: ACmix) -> tuple[torch.Tensor, torch.Tensor]:
    """The k_c x k_c kernel (and the kernel on a constant-ones channel that carries the q/k/v biases)
    that the conv path equals at its shift initialisation: K[o, :, tap] = sum_j Phi[tap, j] W_qkv[j*hd + o//N]."""
    c, n, hd, kc = mod.dim, mod.heads, mod.head_dim, mod.kernel_conv
    w = mod.qkv.weight.view(3 * n, hd, c)  # row j*hd + i of the (q | k | v) 1x1 convs
    b = mod.qkv.bias.view(3 * n, hd)
    phi = mod.fc.weight.view(kc * kc, 3 * n)
    i = torch.arange(c) // n  # head-dim index feeding output channel o (group o // N)
    kern = torch.einsum("tj,joc->oct", phi, w[:, i]).reshape(c, c, kc, kc)
    kern_bias = torch.einsum("tj,jo->ot", phi, b[:, i]).reshape(c, 1, kc, kc)
    return kern, kern_bias


@pytest.mark.parametrize("kernel_conv,size", [(3, (6, 7)), (3, (1, 1)), (5, (9, 8))])
def test_conv_path_at_init_is_one_plain_conv(kernel_conv, size):
    mod = _only(ACmix(8, heads=2, kernel_conv=kernel_conv), "conv")
    with torch.no_grad():
        for p in (mod.qkv.weight, mod.qkv.bias, mod.fc.weight):
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 8, *size)
    kern, kern_bias = _conv_path_as_plain_conv(mod)
    # The q/k/v biases are zero-padded with the features, so they act as a conv of a ones channel.
    expected = F.conv2d(
        torch.cat([x, torch.ones_like(x[:, :1])], 1),
        torch.cat([kern, kern_bias], 1),
        padding=kernel_conv // 2,
    )
    torch.testing.assert_close(mod(x), expected, rtol=1e-5, atol=1e-5)
    # the N output channels of each group are the same map at init
    y = mod(x).view(2, 4, 2, *size)
    torch.testing.assert_close(y[:, :, 0], y[:, :, 1])


def _global_attention(mod: ACmix, x: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention over all H*W tokens with the module's q/k/v weights (no projection)."""
    b, c, h, w = x.shape
    heads, d = mod.heads, c // mod.heads
    qkv = F.conv2d(x, mod.qkv.weight, mod.qkv.bias).view(b, 3, heads, d, h * w)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    attn = ((q.transpose(-1, -2) @ k) * d**-0.5).softmax(-1)
    return (v @ attn.transpose(-1, -2)).reshape(b, c, h, w)


@pytest.mark.parametrize("kernel_att,size", [(7, (4, 3)), (9, (5, 5)), (13, (2, 7))])
def test_attention_path_with_kernel_covering_the_map_is_global_attention(kernel_att, size):
    mod = _only(_randomize(ACmix(8, heads=2, kernel_att=kernel_att)), "attention")
    with torch.no_grad():
        mod.pe.zero_()
    x = torch.randn(2, 8, *size)
    torch.testing.assert_close(mod(x), _global_attention(mod, x), rtol=1e-5, atol=1e-5)


def _support(mod: torch.nn.Module, size: int, y0: int, x0: int) -> torch.Tensor:
    x = torch.randn(1, mod.dim, size, size, requires_grad=True)
    mod(x)[0, :, y0, x0].sum().backward()
    return x.grad.abs().sum(1)[0] > 0


def _square(size: int, y0: int, x0: int, k: int) -> torch.Tensor:
    r = k // 2
    out = torch.zeros(size, size, dtype=torch.bool)
    out[max(0, y0 - r) : y0 + r + 1, max(0, x0 - r) : x0 + r + 1] = True
    return out


@pytest.mark.parametrize("where", [(6, 6), (0, 0), (2, 11)])
@pytest.mark.parametrize("path,k", [("both", 5), ("attention", 5), ("conv", 3)])
def test_receptive_fields_of_the_block_and_of_each_path(where, path, k):
    # the block and its attention path see k_att x k_att; the conv path alone k_c x k_c
    mod = _randomize(ACmix(8, heads=2, kernel_att=5, kernel_conv=3))
    if path != "both":
        _only(mod, path)
    assert torch.equal(_support(mod, 13, *where), _square(13, *where, k))


def test_position_term_does_not_depend_on_the_map_size():
    # A pixel whose 7x7 window lies inside both maps sees the same inputs and, with a position term
    # linear in pixel offsets, gives the same output in a 9x9 crop as in the 15x15 map.
    mod = _randomize(ACmix(8, heads=2, kernel_att=7), std=0.5)
    x = torch.randn(1, 8, 15, 15)
    big = mod(x)[..., 7, 7]
    small = mod(x[..., 3:12, 3:12])[..., 4, 4]
    torch.testing.assert_close(big, small, rtol=1e-5, atol=1e-5)
    # and the term is there: moving W_p changes the output
    with torch.no_grad():
        mod.pe.add_(1.0)
    assert not torch.allclose(mod(x)[..., 7, 7], big)


def test_acmix_is_translation_equivariant_away_from_borders():
    mod = _randomize(ACmix(8, heads=2, kernel_att=5))
    x = torch.randn(1, 8, 14, 15)
    ty, tx, r = 2, 3, 2
    y_full = mod(x)[..., ty:, tx:]
    y_crop = mod(x[..., ty:, tx:])
    torch.testing.assert_close(y_full[..., r:-r, r:-r], y_crop[..., r:-r, r:-r], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(1, 1), (4, 6), (11, 9)])
def test_acmix_with_unfold_kernel_gives_the_same_output_and_gradients(size):
    mod = _randomize(ACmix(8, heads=2, kernel_att=7)).double()
    x = torch.randn(2, 8, *size, dtype=torch.double, requires_grad=True)
    y = mod(x)
    grads = torch.autograd.grad(y.square().sum(), (x, mod.pe, mod.qkv.weight))
    mod.attention = unfold_local_attention
    y2 = mod(x)
    grads2 = torch.autograd.grad(y2.square().sum(), (x, mod.pe, mod.qkv.weight))
    torch.testing.assert_close(y, y2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


def test_acmix_macs_match_the_paper_form():
    # blocks_reference 1.5: q/k/v 3C^2 HW; logits + aggregation 2 k_att^2 C HW (k_att^2 clamped to the
    # offsets that fit a small map); the position term joins the keys as an addition (free); conv
    # path: FC 3 k_c^2 C HW, grouped conv k_c^4 C HW.
    c = 16
    for k_att, k_c, h, w, d in ((7, 3, 9, 7, 49), (5, 3, 9, 7, 25), (7, 5, 9, 7, 49), (7, 3, 2, 3, 3 * 5)):
        mod = ACmix(c, heads=4, kernel_att=k_att, kernel_conv=k_c)
        hw = h * w
        expected = 3 * c * c * hw + 2 * d * c * hw + 3 * k_c**2 * c * hw + k_c**4 * c * hw
        assert profile(mod, (c, h, w))["macs"] == expected


def test_acmix_counts_what_the_materialised_unfold_version_multiplies():
    # The kernel computes the position term as q . W_p (2 C HW products); ACmix's code adds the
    # position differences to the unfolded keys instead. Both are counted as the latter.
    mod = ACmix(16, heads=4, kernel_att=5)
    fast = profile(mod, (16, 9, 7))["macs"]
    mod.attention = unfold_local_attention
    assert fast == profile(mod, (16, 9, 7))["macs"]


@pytest.mark.parametrize(
    "opts,arg",
    [
        ({"heads": 3}, "heads"),
        ({"heads": 0}, "heads"),
        ({"kernel_att": 6}, "kernel_att"),
        ({"kernel_att": 0}, "kernel_att"),
        ({"kernel_att": True}, "kernel_att"),
        ({"kernel_conv": 2}, "kernel_conv"),
        ({"kernel_conv": -1}, "kernel_conv"),
    ],
)
def test_bad_options_raise_value_error_naming_them(opts, arg):
    with pytest.raises(ValueError, match=arg):
        ACmix(16, **opts)


def test_unknown_option_raises_through_the_registry():
    with pytest.raises(ValueError, match="kernel"):
        build_mixer("acmix", 16, kernel=3)
