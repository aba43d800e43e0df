"""runners.macs: MAC counts of every block against its closed form (shared DESIGN.md: "MACs count
attention correctly"), and the counter itself (what FlopCounterMode misses, no double counting, params).

Each test states the formula it checks. The convention (``runners.macs``'s docstring, as in the
papers' counters): the products of the block's formula computed the materialised way -- matmuls,
convolutions, attention logits and aggregation, and elementwise tensor x tensor products; additions,
bias adds, position terms added to keys or logits, softmax, normalisation, activations, pooling,
bilinear resampling and masks are free. Every form holds exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hybridnas.blocks import MIXERS, Block, build_addon, build_downsample, build_mixer, reparameterize
from hybridnas.runners.macs import custom_flop_mapping, profile, profile_spec

C, H, W = 32, 14, 14
HW = H * W


def macs(module: torch.nn.Module, c: int = C, h: int = H, w: int = W) -> int:
    return profile(module, (c, h, w))["macs"]


@pytest.mark.parametrize("kernel,groups", [(1, 1), (3, 1), (5, 1), (3, 4), (3, C)])
def test_conv_mixer_is_k2_hw_c2_over_groups(kernel, groups):
    # k^2 * hw * C^2 / groups
    assert macs(build_mixer("conv", C, kernel=kernel, groups=groups)) == kernel**2 * HW * C * C / groups


@pytest.mark.parametrize("heads,window", [(4, 7), (2, 7), (4, 2)])
def test_window_msa_matches_swin_formula(heads, window):
    # Swin: Omega(W-MSA) = 4hwC^2 + 2M^2hwC when M divides H and W (14 = 2*7 = 7*2).
    assert (
        macs(build_mixer("window", C, heads=heads, window=window)) == 4 * HW * C**2 + 2 * window**2 * HW * C
    )


def test_shifted_window_msa_costs_the_same_as_w_msa():
    # Cyclic shift and the region mask are free: SW-MSA = W-MSA = 4hwC^2 + 2M^2hwC.
    assert macs(build_mixer("shifted_window", C, heads=4, window=7)) == 4 * HW * C**2 + 2 * 49 * HW * C


@pytest.mark.parametrize("mixer", ["window", "shifted_window"])
def test_window_msa_on_a_padded_map_attends_over_the_padded_windows(mixer):
    # M=4 does not divide 14: the map is padded to 16x16 for attention (padded keys masked, still
    # computed), projections run on the real 14x14 tokens: 4hwC^2 + 2M^2 * hp*wp * C, hp = wp = 16.
    m, hp = 4, 16
    assert macs(build_mixer(mixer, C, heads=4, window=m)) == 4 * HW * C**2 + 2 * m * m * hp * hp * C


@pytest.mark.parametrize("mixer", ["window", "shifted_window"])
def test_window_covering_the_map_is_global_attention(mixer):
    # A window >= the map is one window (no shift): Omega(MSA) = 4hwC^2 + 2(hw)^2C.
    assert macs(build_mixer(mixer, C, heads=4, window=14)) == 4 * HW * C**2 + 2 * HW**2 * C
    assert macs(build_mixer(mixer, C, heads=4, window=20)) == 4 * HW * C**2 + 2 * HW**2 * C


def test_block_adds_the_mlp_to_the_mixer():
    # Block = mixer + MLP (1x1 C->rC, 1x1 rC->C): conv 3x3 gives 9hwC^2 + 2 r hwC^2 (norms are free).
    assert macs(Block(C, "conv", {"kernel": 3}, mlp_ratio=2.0)) == 9 * HW * C * C + 2 * 2 * HW * C * C


def test_gc_block_matches_gcnet_form():
    # GCNet (blocks_reference 5.2): 2C*HW (mask conv + attention pooling) + 2CP, P = max(8, C/16).
    p = max(8, C // 16)
    assert macs(build_addon("gc", C)) == 2 * C * HW + 2 * C * p


def test_coordinate_attention_matches_its_form():
    # CA (blocks_reference 6.2): 2(H+W)*C*mip for F1, F_h, F_w (mip = max(8, C//32)), plus the two
    # gating products x * a_h * a_w, each a tensor x tensor product of C*H*W MACs.
    mip = max(8, C // 32)
    assert macs(build_addon("ca", C)) == 2 * (H + W) * C * mip + 2 * C * HW


@pytest.mark.parametrize("size", [14, 15])
def test_spd_conv_is_four_times_a_strided_conv(size):
    # SPD-Conv (blocks_reference 7.2): space-to-depth is free; 3x3 conv 4C1 -> C2 on (S/2)^2 positions
    # = 9 * 4C1 * C2 * ceil(S/2)^2 (= k^2 C1 C2 S^2 for even S; odd S is padded to even).
    c2, s2 = 2 * C, -(-size // 2)
    assert macs(build_downsample("spd", C, c2), h=size, w=size) == 9 * 4 * C * c2 * s2 * s2


@pytest.mark.parametrize("size", [14, 15])
def test_strided_conv_downsample(size):
    # 3x3 stride-2 conv: 9 * C1 * C2 * ceil(S/2)^2.
    c2, s2 = 2 * C, -(-size // 2)
    assert macs(build_downsample("conv", C, c2), h=size, w=size) == 9 * C * c2 * s2 * s2


def test_patch_merging_is_one_linear_4c_to_out():
    # Swin patch merging: LayerNorm is free; Linear 4C -> C2 on (S/2)^2 tokens.
    c2 = 2 * C
    assert macs(build_downsample("patch_merge", C, c2)) == 4 * C * c2 * (H // 2) * (W // 2)


@pytest.mark.parametrize("groups", [1, 4])
def test_deformable_conv_counts_offsets_modulation_and_main_product(groups):
    # DCNv2 with k=3 (taps = 9): offset/modulation conv 3x3, C -> 3*taps: 9 * C * 27 * HW;
    # modulation product (tensor x tensor): C * taps * HW; main product C * (C/g) * taps * HW.
    # Bilinear sampling (a gather and lerps) is interpolation, not counted.
    taps = 9
    expected = 9 * C * 3 * taps * HW + C * taps * HW + C * (C // groups) * taps * HW
    assert macs(build_mixer("deform", C, kernel=3, groups=groups)) == expected


@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("span", [None, 5])
def test_axial_attention_matches_the_axial_deeplab_form(heads, span):
    # blocks_reference 3.4, per axis layer of length L with d_v = C/heads, d_q = d_v/2 per head:
    #   qkv projection   HW * C * heads(2 d_q + d_v)          (= 2C^2 HW)
    #   q.k, q.r_q, k.r_k  3 * HW * L * heads * d_q           (= 3 (C/2) L HW)
    #   A v, A r_v         2 * HW * L * heads * d_v           (= 2 C L HW)
    # height layer L = H, width layer L = W, then the output projection C^2 HW. A finite span masks
    # the L x L logits, so the cost is the global layer's.
    dv = C // heads
    dq = dv // 2

    def layer(length):
        return HW * C * heads * (2 * dq + dv) + 3 * HW * length * heads * dq + 2 * HW * length * heads * dv

    expected = layer(H) + layer(W) + C * C * HW  # = 5C^2 HW + 3.5 C HW (H + W)
    assert macs(build_mixer("axial", C, heads=heads, span=span)) == expected


def test_axial_attention_on_a_non_square_map_uses_each_axis_length():
    h, w = 7, 10
    hw = h * w

    def layer(length):
        return 2 * C * C * hw + 3 * hw * length * C // 2 + 2 * hw * length * C

    assert macs(build_mixer("axial", C, heads=4), h=h, w=w) == layer(h) + layer(w) + C * C * hw


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("heads", [2, 4])
def test_slide_attention_matches_the_paper_form(kernel, heads):
    # blocks_reference 4.3 at inference: 4C^2 HW (qkv + proj) + 2 k^2 C HW (logits + aggregation)
    # + 2 k^4 C HW (the deformed-shifting depthwise conv on k and v); its bias is an addition, free
    # (the no-copy kernel executes it as 2 k^2 C HW products; it is counted by this formula).
    # Masked out-of-image keys still count the full k^2 per pixel. Exact.
    k2 = kernel * kernel
    expected = 4 * C * C * HW + 2 * k2 * C * HW + 2 * k2 * k2 * C * HW
    assert macs(build_mixer("slide", C, heads=heads, kernel=kernel)) == expected


def test_slide_costs_the_same_after_reparameterization():
    m = build_mixer("slide", C, heads=4, kernel=3)
    before = macs(m)
    reparameterize(m)
    assert macs(m) == before


@pytest.mark.parametrize("kernel_att", [5, 7])
@pytest.mark.parametrize("heads", [2, 4])
def test_acmix_matches_the_paper_form(kernel_att, heads):
    # blocks_reference 1.5 (MACs, stride 1), with k_a = kernel_att, k_c = 3:
    #   Stage I, shared 1x1 q/k/v          3 C^2 HW
    #   attention logits + aggregation     2 k_a^2 C HW   (masked border keys still cost full k_a^2)
    #   position term q.(pe(p) - pe(p+d))  free: ACmix's code adds it to the keys (the kernel
    #                                      computes it as q . W_p, 2 C HW products, not counted)
    #   conv path: fc 3N -> k_c^2          3 C k_c^2 HW
    #              grouped k_c x k_c conv  C k_c^4 HW
    # rate1 * att + rate2 * conv are one-element rescales (free). Exact.
    ka2, kc = kernel_att**2, 3
    expected = 3 * C * C * HW + 2 * ka2 * C * HW + 3 * C * kc * kc * HW + C * kc**4 * HW
    assert macs(build_mixer("acmix", C, heads=heads, kernel_att=kernel_att)) == expected


@pytest.mark.parametrize("mixer,option", [("acmix", "kernel_att"), ("slide", "kernel")])
def test_local_attention_kernel_larger_than_the_map_is_clamped(mixer, option):
    # On a 4x4 map a 9x9 window can only reach offsets |d| <= 3: it costs what a 7x7 window costs.
    big = macs(build_mixer(mixer, C, heads=4, **{option: 9}), h=4, w=4)
    seven = macs(build_mixer(mixer, C, heads=4, **{option: 7}), h=4, w=4)
    assert big == seven


# Every registered mixer at its default options (C = 32 on 14 x 14), in the papers' closed forms.
DEFAULT_FORMS = {
    "conv": 9 * HW * C * C,
    "acmix": 3 * C * C * HW + 2 * 49 * C * HW + 3 * 9 * C * HW + 81 * C * HW,
    "window": 4 * HW * C * C + 2 * 49 * HW * C,
    "shifted_window": 4 * HW * C * C + 2 * 49 * HW * C,
    "slide": 4 * C * C * HW + 2 * 9 * C * HW + 2 * 81 * C * HW,
    "axial": 5 * C * C * HW + 7 * C * HW * (H + W) // 2,
    "deform": 9 * C * 27 * HW + C * 9 * HW + C * C * 9 * HW,
}


def test_every_registered_mixer_is_counted_by_its_closed_form():
    assert set(DEFAULT_FORMS) == set(MIXERS)  # a new mixer needs its form here
    counted = {name: macs(build_mixer(name, C)) for name in MIXERS}
    assert counted == DEFAULT_FORMS


# ---- the counter itself: what FlopCounterMode misses, no double counting, params ----------------


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, heads, HW, C/heads)."""
    b, c, h, w = x.shape
    return x.flatten(2).transpose(1, 2).reshape(b, h * w, heads, c // heads).transpose(1, 2)


def test_linear_and_conv_net_matches_hand_count():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 9 * 3 * 8 * 10*10
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),  # 9 * 2 * 8 * 5*5
        nn.Conv2d(8, 16, 1, bias=False),  # 8 * 16 * 5*5
        nn.Flatten(),
        nn.Linear(16 * 25, 10),  # 400 * 10
    )
    expected = 9 * 3 * 8 * 100 + 9 * 2 * 8 * 25 + 8 * 16 * 25 + 400 * 10
    out = profile(net, (3, 10, 10))
    assert out["macs"] == expected
    assert out["flops"] == 2 * expected
    assert out["params"] == sum(p.numel() for p in net.parameters())


def test_batch_dimension_scales_macs_linearly():
    net = nn.Conv2d(2, 4, 3, padding=1)
    assert profile(net, (3, 2, 6, 6))["macs"] == 3 * profile(net, (2, 6, 6))["macs"]


def sdpa_net(heads: int, mask: bool = False) -> nn.Module:
    def fn(x):
        q = heads_of(x, heads)
        m = torch.zeros(q.shape[-2], q.shape[-2]) if mask else None
        return F.scaled_dot_product_attention(q, q, q, attn_mask=m)

    return Lambda(fn)


@pytest.mark.parametrize("mask", [False, True])
def test_sdpa_is_counted_on_cpu(mask):
    # FlopCounterMode alone counts the CPU flash kernel as zero; QK^T and AV = 2 * B*h*L^2*d MACs.
    c, h, w, heads = 8, 3, 5, 2
    L, d = h * w, c // heads
    assert profile(sdpa_net(heads, mask), (c, h, w))["macs"] == 2 * heads * L * L * d


def test_plain_flop_counter_misses_cpu_sdpa():
    # Why the custom formulas exist: if this starts failing, torch counts SDPA itself and ours must
    # not be added on top (ours replaces the registry entry, so it still would not double count).
    q = torch.randn(1, 2, 6, 4)
    with torch.no_grad(), FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, q, q)
    assert plain.get_total_flops() == 0


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "grad"])
def test_sdpa_count_does_not_depend_on_autograd_mode(context):
    # Under inference_mode the top-level op reaches the counter undecomposed, under no_grad the CPU
    # flash kernel does, with grad enabled autograd's pieces: each counted exactly once.
    q = torch.randn(2, 3, 7, 4, requires_grad=context == "grad")
    k = torch.randn(2, 3, 5, 4)
    v = torch.randn(2, 3, 5, 6)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[
        context
    ]
    with ctx(), FlopCounterMode(display=False, custom_mapping=custom_flop_mapping()) as fc:
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(7, 5))
    assert fc.get_total_flops() == 2 * (2 * 3 * 7 * 5 * (4 + 6))


def test_einsum_is_counted_once_and_equals_matmul():
    a = torch.randn(2, 3, 7, 4)
    b = torch.randn(2, 3, 5, 4)

    def count(fn):
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom_flop_mapping()) as fc:
            fn()
        return fc.get_total_flops() // 2

    by_einsum = count(lambda: torch.einsum("bhqd,bhkd->bhqk", a, b))
    by_matmul = count(lambda: a @ b.transpose(-1, -2))
    assert by_einsum == by_matmul == 2 * 3 * 7 * 5 * 4


def test_elementwise_tensor_products_are_counted_and_scalar_rescales_are_not():
    def fn(x):
        y = x * x  # counted: numel
        y = y * 0.5  # Python scalar: free
        y = y * torch.ones(1)  # one-element tensor (a mixing rate): free
        y = y * x.mean(dim=1, keepdim=True)  # broadcast tensor x tensor: numel(out)
        return y

    c, h, w = 4, 3, 5
    assert profile(Lambda(fn), (c, h, w))["macs"] == 2 * c * h * w


def test_local_attention_written_as_mul_then_sum_is_counted():
    # "q * K then sum" (Slide/ACmix style): logits C*k^2*HW, aggregation C*k^2*HW.
    c, h, w, k = 4, 6, 5, 3

    def fn(x):
        keys = F.unfold(x, k, padding=k // 2).view(1, c, k * k, h, w)  # unfold itself is free
        logits = (x.unsqueeze(2) * keys).sum(1, keepdim=True)  # (1, 1, k^2, h, w)
        return (logits.softmax(2) * keys).sum(2)

    assert profile(Lambda(fn), (c, h, w))["macs"] == 2 * c * k * k * h * w


def test_params_count_frozen_parameters_and_shared_ones_once_but_not_buffers():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(lin, lin, nn.BatchNorm1d(4))  # shared layer; BN: 8 params + 2 running buffers
    frozen = nn.Conv2d(4, 4, 1, bias=False).requires_grad_(False)  # like Slide's fixed shift conv
    model = nn.ModuleDict({"net": net, "frozen": frozen})
    model.forward = lambda x: frozen(net(x.flatten(1)).view(1, 4, 1, 1))
    assert profile(model, (4, 1, 1))["params"] == 20 + 8 + 16


def test_profile_restores_training_mode_and_leaves_the_global_rng_alone():
    net = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Dropout(0.5))
    net.train()
    net[1].eval()
    state = torch.random.get_rng_state()
    profile(net, (2, 5, 5))
    assert torch.equal(state, torch.random.get_rng_state())
    assert net.training and net[0].training and not net[1].training


def test_profile_rejects_a_bad_input_size():
    with pytest.raises(ValueError, match="input_size"):
        profile(nn.Identity(), (3, 4))


def test_profile_spec_stages_add_up_to_the_total(tiny_spec):
    from hybridnas.search_space.build import build_model

    prof = profile_spec(tiny_spec)
    whole = profile(build_model(tiny_spec), (1, 8, 8))
    assert {k: prof[k] for k in ("macs", "flops", "params")} == whole
    parts = [prof["stem"], prof["head"], *prof["stages"]]
    assert sum(p["macs"] for p in parts) == prof["macs"]
    assert sum(p["params"] for p in parts) == prof["params"]
    assert [(s["stage"], s["mixer"], s["resolution"], s["channels"]) for s in prof["stages"]] == [
        (0, "conv", 8, 4),
        (1, "shifted_window", 4, 8),
    ]
