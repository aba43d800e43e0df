"""MACs and params of a network, attention included.

MACs are multiply-accumulates (what vision papers print as "FLOPs"); ``flops = 2 * macs``.

The MAC convention, one for every block: count the multiply-accumulates of the block's formula
computed the materialised way, as the papers' code and FLOP counters do -- matmuls and convolutions,
the attention logits and the weighted sum of values over every slot of the window (masked and
padded slots included), and elementwise products of two tensors; additions are free, and so are
bias adds, position terms added to keys or logits, softmax, normalisation, activations, pooling,
bilinear resampling, masks and rescales by a constant. A kernel that computes the same result
another way is counted by this formula, not by the products it executes: the no-copy local
attention shared by ACmix and Slide (``hybridnas::local_attention``) moves Slide's deformed
shifting to the query side, where the depthwise conv's bias becomes 2 k^2 C HW products, and
computes ACmix's position term as 2 C HW products; in the papers' code both are additions. So every
mixer's count is its paper's closed form (``tests/test_macs.py``): Slide ``4C^2 HW + 2k^2 C HW +
2k^4 C HW``, ACmix ``3C^2 HW + 2k_a^2 C HW + 3k_c^2 C HW + k_c^4 C HW``, Swin ``4hwC^2 + 2M^2 hwC``.

Counting builds on PyTorch's ``FlopCounterMode`` (a ``TorchDispatchMode`` that sees every aten op
after autograd and composite decomposition). On torch 2.13 it counts ``mm``, ``addmm``, ``bmm``,
``baddbmm`` and convolutions, and through them ``matmul`` and ``linear`` of 2-D and larger
operands and every contracting ``einsum`` (it decomposes into batched matmuls). It misses, and this
module adds formulas for:

* scaled dot-product attention on the CPU: the flash kernel that ``F.scaled_dot_product_attention``
  runs there (``_scaled_dot_product_flash_attention_for_cpu``, with or without grad) is counted as
  zero, and the undecomposed op that ``inference_mode`` dispatches not at all. Every aten overload
  is counted as ``B*heads*Lq*Lk*(dk + dv)`` MACs (``Q K^T`` and ``A V``; softmax, scaling, masks free);
* elementwise products of two tensors (``aten.mul`` / ``mul_`` / ``addcmul`` / ``addcmul_`` where
  both factors have more than one element, which includes an ``einsum`` without a contracted index,
  e.g. an outer product): ``numel(out)`` MACs. A product with a Python number or a one-element
  tensor (``q * scale``, a learnable mixing rate) is a rescale and is not counted;
* ``mv``/``dot``/``vdot``/``addmv``/``addbmm``, which 1-D ``matmul`` operands reach;
* ``hybridnas::local_attention``: the papers' count above.

``grid_sample``, ``lerp`` (interpolation) and pooling stay uncounted, as the convention says.
No double counting: an op with a formula is executed with the dispatch mode switched off, so the
kernels it calls internally are never seen; an op without one (``einsum``, ``matmul``, ``linear``)
is decomposed, and only its pieces (``bmm``, ``mm``, ``addmm``) are counted.
Each mixer's count is tested against its paper's closed form (tests/test_macs.py; README "Measuring").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hybridnas.blocks.slide import local_attention_op
from hybridnas.runners.device import as_input_shape, eval_mode, example_input, model_device

aten = torch.ops.aten


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _sdpa_flops(
    q: torch.Size, k: torch.Size, v: torch.Size, *args: Any, out_shape: Any = None, **kw: Any
) -> int:
    # q: (..., Lq, dk), k: (..., Lk, dk), v: (..., Lk, dv); leading dims of q are batch x heads (with
    # grouped-query attention k/v have fewer heads and are broadcast, so q's count is the right one).
    lq, dk = q[-2], q[-1]
    lk, dv = k[-2], v[-1]
    return 2 * _numel(q[:-2]) * lq * lk * (dk + dv)


def _is_tensor_factor(x: Any) -> bool:
    """A tensor operand (the formula receives shapes) with more than one element."""
    return isinstance(x, torch.Size) and _numel(x) > 1


def _mul_flops(a: Any, b: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    if _is_tensor_factor(a) and _is_tensor_factor(b):
        return 2 * _numel(out_shape)
    return 0


def _addcmul_flops(s: Any, t1: Any, t2: Any, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return _mul_flops(t1, t2, out_shape=out_shape)


def _mv_flops(m: torch.Size, v: torch.Size, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return 2 * m[0] * m[1]


def _addmv_flops(s: Any, m: torch.Size, v: torch.Size, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return 2 * m[0] * m[1]


def _dot_flops(a: torch.Size, b: torch.Size, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return 2 * a[0]


def _local_attention_flops(
    q: torch.Size, k: Any, v: Any, pe: Any, rpb: Any, wk: Any, ry: int, rx: int, *args: Any, **kw: Any
) -> int:
    # q: (B, heads, c, H, W), D = (2ry+1)(2rx+1) slots (the kernel clamped to the map). Per pixel,
    # head and channel: D logit and D aggregation products; with Slide's deformed shifting (wk) also
    # the depthwise conv that builds D keys and D values from D taps each, 2 D^2. The position term
    # (pe), the conv bias and the bias per head and slot (rpb) are additions: free.
    d = (2 * ry + 1) * (2 * rx + 1)
    return 2 * _numel(q) * (2 * d + (2 * d * d if wk is not None else 0))


def _addbmm_flops(s: Any, a: torch.Size, b: torch.Size, *args: Any, out_shape: Any = None, **kw: Any) -> int:
    return 2 * a[0] * a[1] * a[2] * b[2]


_SDPA_OPS = (
    "scaled_dot_product_attention",  # reaches the mode undecomposed under inference_mode
    "_scaled_dot_product_flash_attention_for_cpu",  # torch 2.13 counts it as zero
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_attention_math_for_mps",
    "_scaled_dot_product_fused_attention_overrideable",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
_EXTRA_FORMULAS: dict[str, Callable[..., int]] = {
    **dict.fromkeys(_SDPA_OPS, _sdpa_flops),
    "mul": _mul_flops,
    "mul_": _mul_flops,
    "addcmul": _addcmul_flops,
    "addcmul_": _addcmul_flops,
    "mv": _mv_flops,
    "addmv": _addmv_flops,
    "dot": _dot_flops,
    "vdot": _dot_flops,
    "addbmm": _addbmm_flops,
}


def custom_flop_mapping() -> dict[Any, Callable[..., int]]:
    """The formulas added to FlopCounterMode's registry (keyed by aten overload packet)."""
    # getattr: an op missing from an older or newer torch is skipped rather than breaking import.
    mapping = {getattr(aten, name): f for name, f in _EXTRA_FORMULAS.items() if hasattr(aten, name)}
    mapping[local_attention_op] = _local_attention_flops
    return mapping


def count_params(model: nn.Module) -> int:
    """Parameters (shared ones once), frozen ones included, buffers (BN statistics, caches) not.

    Frozen parameters are part of the model a user deploys (Slide's fixed one-hot shift conv is
    a parameter with ``requires_grad=False`` until ``reparameterize()`` merges it), so they count.
    """
    return sum(p.numel() for p in model.parameters())


def _count(model: nn.Module, x: torch.Tensor) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, custom_mapping=custom_flop_mapping())
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter


def profile(model: nn.Module, input_size: Sequence[int]) -> dict[str, int]:
    """``{"macs", "flops", "params"}`` of one forward pass (eval mode, no grad).

    ``input_size`` is ``(C, H, W)`` (batch 1) or ``(B, C, H, W)``. ``flops == 2 * macs``.
    """
    shape = as_input_shape(input_size)
    counter = _count(model, example_input(shape, model_device(model)))
    flops = int(counter.get_total_flops())
    return {"macs": flops // 2, "flops": flops, "params": count_params(model)}


def profile_spec(spec: Any) -> dict[str, Any]:
    """MACs, flops and params of ``build_model(spec)`` with a per-stage breakdown.

    Returns ``{"macs", "flops", "params", "stem": {...}, "head": {...}, "stages": [{stage,
    mixer, resolution, channels, depth, macs, params}, ...]}``; stage indices are 0-based as in
    spec paths, and a stage's numbers include its downsampler.
    """
    from hybridnas.search_space.build import build_model

    model = build_model(spec)
    inp = spec.input
    counter = _count(model, example_input((1, inp.channels, inp.size, inp.size), model_device(model)))
    per_module = counter.get_flop_counts()
    root = type(model).__name__

    def macs_of(name: str) -> int:
        return int(sum(per_module.get(f"{root}.{name}", {}).values())) // 2

    flops = int(counter.get_total_flops())
    resolutions = spec.resolutions()
    stages = [
        {
            "stage": i,
            "mixer": st.mixer,
            "resolution": resolutions[i],
            "channels": st.channels,
            "depth": st.depth,
            "macs": macs_of(f"stages.{i}"),
            "params": count_params(model.stages[i]),
        }
        for i, st in enumerate(spec.stages)
    ]
    return {
        "macs": flops // 2,
        "flops": flops,
        "params": count_params(model),
        "stem": {"macs": macs_of("stem"), "params": count_params(model.stem)},
        "head": {"macs": macs_of("head"), "params": count_params(model.head)},
        "stages": stages,
    }
