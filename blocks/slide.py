"""Slide attention, and the fast k x k local-attention kernel that ACmix shares.

Pan et al., "Slide-Transformer: Hierarchical Vision Transformer with Local Self-Attention", CVPR 2023,
https://arxiv.org/abs/2304.04237 (official code: https://github.com/LeapLabTHU/Slide-Transformer).

Every pixel attends to the k x k neighbourhood around it. The paper's point is the "row-based" view
of local attention: instead of gathering a k^2-long column of keys per query (Im2Col), take the whole
key map shifted towards each of the k^2 directions, which is a depthwise conv with one-hot kernels.
"Deformed shifting" adds a parallel learnable depthwise conv, so the key (and value) of slot d is a
learned mix of the k x k window: ``K_d(p) = sum_e (onehot + W)[d, e] k(p + e) + b_d``; after training
``reparameterize()`` merges the two convs into one.

Where hybridnas decides differently from the official code (shared BLOCKS.md):

* Keys outside the image are masked, not attended as zero-padded features; so any map size works and
  a kernel covering the map is exactly global attention. A kernel larger than the map is clamped.
* The relative position bias (heads x k^2, trunc-normal 0.02) is added to the logits per head and
  offset, instead of to every key channel (where it acted as ``rpb * sum_c q_c``).
* Only the learnable conv has a bias; the official fixed conv's bias was a second copy of it.
* Both branches are merged on the fly in training too (conv(W_fix) + conv(W) = conv(W_fix + W)), so
  training pays for one conv, and ``reparameterize()`` only bakes that sum in: outputs are identical.

The kernel, ``local_attention``, never materialises the k^2 shifted copies of K and V. It works on a
flat, zero-padded view of each map, where "the key map shifted by (dy, dx)" is a slice starting
``dy * W + dx`` further along (a view, no copy), and loops over the k^2 offsets:
``logit_d = sum_c q * K_d``, softmax over d, ``out = sum_d A_d * V_d``. The tricks, and what each
buys (CPU, batch 64, width 64, 4 heads, 28x28; ``hybridnas bench blocks`` has the whole table):

* A custom autograd Function that saves only q, the padded k and v and the attention weights (k^2/c
  of a feature map per head) and recomputes the rest in backward; gradients are added into slices of
  padded buffers in place. Plain autograd on the same loop was 2x slower than unfold: every slice's
  backward allocates and adds a zeroed full-size gradient.
* Chunks of a few images, sized so the loop's working set stays in a 2 MiB L2 cache: the 49 passes
  of ACmix over q, K, V then read cache instead of DRAM (3x on the forward loop).
* ``out=`` scratch buffers and in-place ``addcmul_`` instead of a fresh tensor per op (a fresh large
  CPU tensor is page-faulted in by the kernel on first touch, which cost more than the product).
* Flat slices are long and contiguous (H*W elements), so every elementwise op vectorises fully: 2x
  per op over 2-D slices of a padded map, whose inner loops are rows of only W = 28 floats. Their
  wrap-around at row ends (x + dx past the edge reads the next row) is harmless: those logits are
  masked. Only Slide's deformed keys need it zeroed, a strided slice of H*|dx| entries per tap.
* Slide's deformed shifting moves to the query side: ``q . K_d = sum_e M[:, d, e] . (q * k_e)``,
  so the logits are ONE matmul of a (k^2, (k^2+1)c) weight with the stacked products [q * k_e; q]
  (the conv bias is the last block), and the value side is its transpose. The deformed K and V (k^2
  maps each) are never built; the arithmetic is the depthwise conv's, done as matmuls.
* Tiny problems (batch-1 inference on small maps, the latency a search measures) run in one shot:
  one product over an overlapping strided view of all offsets (``as_strided``) instead of ~4 ops
  per offset, 2-6x faster when per-op overhead dominates.

MACs: the kernel's forward is one operator, ``hybridnas::local_attention``, which ``runners.macs``
counts by the papers' formula, not by the products it executes: k^2 C HW for the logits and as many
for the aggregation; for Slide also 2 k^4 C HW for the deformed shifting (what its two depthwise
convs on k and v cost). The conv bias and ACmix's position term are additions in the papers'
materialised code and free; executed here on the query side they are 2 k^2 C HW (Slide) and 2 C HW
(ACmix) products, which are not counted.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .conv import check_groups, check_int

# Per chunk of images, bytes of one (chunk, heads, c, H*W) tensor on the CPU. The inner loop touches
# about eight such tensors, which then fit a 2 MiB L2 cache; larger chunks spill and run 2-3x slower.
_CPU_CHUNK_BYTES = 192 * 1024
# Problems whose D-fold product is at most this many bytes run in one shot; see _LocalAttention.forward.
_TINY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class _Grid:
    """Geometry of the flat shifted-slice view for one (H, W, ry, rx), on one device and dtype."""

    H: int
    W: int
    ry: int
    rx: int
    offsets: tuple[tuple[int, int], ...]  # (dy, dx) per slot, dy-major: slot index = (dy+ry)*(2rx+1) + dx+rx
    starts: tuple[int, ...]  # where the slice of offset d starts in the padded flat map
    pad: int  # zeros before and after the flat map: ry rows plus rx
    mask: torch.Tensor  # (D, H*W) additive: 0, or -inf where (y+dy, x+dx) is outside the image
    shifts: torch.Tensor  # (2, D): dy and dx of every slot, for the gradient of the position term


@functools.lru_cache(maxsize=128)
def _grid(H: int, W: int, ry: int, rx: int, device: torch.device, dtype: torch.dtype) -> _Grid:
    offsets = tuple((dy, dx) for dy in range(-ry, ry + 1) for dx in range(-rx, rx + 1))
    pad = ry * W + rx
    # Pixel p = y*W + x sits at pad + p in the padded flat map; its neighbour (dy, dx) at pad + p + dy*W + dx.
    starts = tuple(pad + dy * W + dx for dy, dx in offsets)
    ys = torch.arange(H, device=device).view(H, 1)
    xs = torch.arange(W, device=device).view(1, W)
    outside = torch.stack(
        [((ys + dy < 0) | (ys + dy >= H) | (xs + dx < 0) | (xs + dx >= W)).flatten() for dy, dx in offsets]
    )
    # -inf is safe: slot (0, 0), the pixel itself, is never masked, so no row is all -inf.
    mask = torch.zeros(outside.shape, device=device, dtype=dtype).masked_fill_(outside, float("-inf"))
    shifts = torch.tensor(offsets, device=device, dtype=dtype).T.contiguous()
    return _Grid(H, W, ry, rx, offsets, starts, pad, mask, shifts)


def _chunk_size(x: torch.Tensor) -> int:
    """Images per chunk: cache-sized on the CPU, the whole batch elsewhere (GPUs want big launches)."""
    if x.device.type != "cpu":
        return x.shape[0]
    return max(1, _CPU_CHUNK_BYTES // max(1, x[0].numel() * x.element_size()))


def _forward(q, k, v, pe, rpb, wk, ry: int, rx: int):
    """The kernel's forward on flat maps: (out (B, N, c, L), attn (B, N, D, L), padded k, padded v)."""
    B, N, c, H, W = q.shape
    L = H * W
    g = _grid(H, W, ry, rx, q.device, q.dtype)
    D = len(g.offsets)
    with torch.autocast(q.device.type, enabled=False):  # every op below picks its dtype explicitly
        q = q.reshape(B, N, c, L)
        kp = F.pad(k.reshape(B, N, c, L), (g.pad, g.pad))
        vp = F.pad(v.reshape(B, N, c, L), (g.pad, g.pad))
        pos = None if pe is None else torch.matmul(pe.T, q)  # (B, N, 2, L): q . pe_y, q . pe_x
        bias = g.mask if rpb is None else g.mask + rpb[:, :, None]  # (D, L) or (N, D, L)
        attn = q.new_empty(B, N, D, L)
        out = q.new_empty(B, N, c, L)
        # A tiny problem (batch-1 inference on a small map) runs in one shot over all D offsets
        # at once, through an overlapping view of the padded map (the D-fold product is at most
        # _TINY_BYTES); per-op overheads dominate there, and the loop costs ~4 ops per offset.
        tiny = wk is None and D * q.numel() * q.element_size() <= _TINY_BYTES
        step = B if tiny else _chunk_size(q)
        tmp = q.new_empty(min(step, B), N, c, L)
        taps = None if wk is None else q.new_empty(min(step, B), N, D + 1, c, L)
        for b0 in range(0, B, step):
            s = slice(b0, b0 + step)
            qc, kc, vc, ac, oc = q[s], kp[s], vp[s], attn[s], out[s]
            n = qc.shape[0]
            if tiny:
                torch.sum(torch.mul(qc[:, :, :, None, None], _offsets_view(g, kc)), 2, out=_by_offset(g, ac))
            elif wk is None:
                _dots(g, qc, kc, ac, tmp[:n])
            else:  # logits = wk @ [q * k_e for every tap e; q]
                _bmm(wk, _tap_products(g, qc, kc, taps[:n]), ac)
            if pos is not None:  # q . (pe d) = dy * pos_y + dx * pos_x (integer weights)
                grid = _by_offset(g, ac)  # (n, N, 2ry+1, 2rx+1, L)
                for j in range(2 * ry + 1):
                    grid[:, :, j].add_(pos[s, :, :1], alpha=j - ry)
                for i in range(2 * rx + 1):
                    grid[:, :, :, i].add_(pos[s, :, 1:], alpha=i - rx)
            ac += bias
            # Softmax over the D offsets, in place in the tensor saved for backward.
            ac -= ac.amax(2, keepdim=True)
            ac.exp_()
            ac /= ac.sum(2, keepdim=True)
            if tiny:
                torch.sum(torch.mul(_by_offset(g, ac)[:, :, None], _offsets_view(g, vc)), (3, 4), out=oc)
            elif wk is None:
                _weighted_sum(g, ac, vc, oc, tmp[:n])
            else:  # out = sum_e (M_e A) * v_e + b A, with [M_e A for every e; b A] = wk^T @ A
                _mixed_sum(g, _zero_wraps(g, _bmm(wk.T, ac, taps[:n])), vc, oc)
    return out, attn, kp, vp


# The forward is also one operator, ``hybridnas::local_attention``, so that a dispatch-level counter
# (``runners.measure``, on PyTorch's FlopCounterMode) sees it as one op and counts it by the papers'
# formula instead of the products this kernel executes (see the module docstring). Going through the
# dispatcher costs 15-30 us per call (5% of a batch-1 ACmix or Slide on a small map), so the
# operator is used only while a dispatch mode is on (a counter, fake tensors), the plain function
# otherwise; the two run the same code.
torch.library.define(
    "hybridnas::local_attention",
    "(Tensor q, Tensor k, Tensor v, Tensor? pe, Tensor? rpb, Tensor? wk, int ry, int rx)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
)
torch.library.impl("hybridnas::local_attention", "CompositeExplicitAutograd", _forward)


@torch.library.register_fake("hybridnas::local_attention")
def _forward_shapes(q, k, v, pe, rpb, wk, ry: int, rx: int):
    B, N, c, H, W = q.shape
    L, D, pad = H * W, (2 * ry + 1) * (2 * rx + 1), ry * W + rx
    padded = q.new_empty(B, N, c, L + 2 * pad)
    return q.new_empty(B, N, c, L), q.new_empty(B, N, D, L), padded, torch.empty_like(padded)


local_attention_op = torch.ops.hybridnas.local_attention

try:  # torch-internal (one flag, kept by every mode's enter and exit); checked at import
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode as _dispatch_mode_on
except ImportError:  # pragma: no cover - depends on the torch version
    logging.getLogger(__name__).info(
        "torch.utils._python_dispatch.is_in_torch_dispatch_mode is missing in torch %s: local "
        "attention always runs as the hybridnas::local_attention operator (15-30 us slower per call)",
        torch.__version__,
    )

    def _dispatch_mode_on() -> bool:
        return True


class _LocalAttention(torch.autograd.Function):
    """Masked k x k local attention on flat (B, N, c, L = H*W) maps; see ``local_attention``.

    Saved for backward: q, the zero-padded flat k and v, the attention weights (B, N, D, L) and the
    small position/mixing tensors. Everything else is recomputed chunk by chunk in backward.
    """

    @staticmethod
    def forward(ctx: Any, q, k, v, pe, rpb, wk, ry: int, rx: int):
        B, N, c, H, W = q.shape
        run = local_attention_op.default if _dispatch_mode_on() else _forward
        out, attn, kp, vp = run(q, k, v, pe, rpb, wk, ry, rx)
        ctx.save_for_backward(q.reshape(B, N, c, H * W), kp, vp, attn, wk, pe)
        ctx.geometry = (B, N, c, H, W, ry, rx, pe is not None, rpb is not None)
        return out.view(B, N, c, H, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor):
        q, kp, vp, attn, wk, pe = ctx.saved_tensors
        B, N, c, H, W, ry, rx, has_pos, has_rpb = ctx.geometry
        L = H * W
        g = _grid(H, W, ry, rx, q.device, q.dtype)
        D = len(g.offsets)
        with torch.autocast(q.device.type, enabled=False):
            dout = grad_out.to(q.dtype).reshape(B, N, c, L)
            dq = torch.empty_like(q)
            dkp, dvp = torch.zeros_like(kp), torch.zeros_like(vp)
            dpos = q.new_empty(B, N, 2, L) if has_pos else None
            drpb = q.new_zeros(N, D) if has_rpb else None
            dwk = None if wk is None else torch.zeros_like(wk)
            step = _chunk_size(q)
            m = min(step, B)
            tmp, dlogits = q.new_empty(m, N, c, L), q.new_empty(m, N, D, L)
            taps = None if wk is None else (q.new_empty(m, N, D + 1, c, L), q.new_empty(m, N, D + 1, c, L))
            for b0 in range(0, B, step):
                s = slice(b0, b0 + step)
                qc, kc, vc, ac, dc = q[s], kp[s], vp[s], attn[s], dout[s]
                n = qc.shape[0]
                dl = dlogits[:n]
                # dA_d = dout . V_d
                if wk is None:
                    _dots(g, dc, vc, dl, tmp[:n])
                else:  # out = wk^T A (x) v  =>  dA = wk @ r and dwk += A r^T, r = [dout * v_e; dout]
                    r = _tap_products(g, dc, vc, taps[0][:n])
                    _bmm(wk, r, dl)
                    dwk += _bmm_t(ac, r)
                # Softmax backward, in place: dL = A * (dA - sum_d A_d dA_d).
                dl -= (ac * dl).sum(2, keepdim=True)
                dl *= ac
                if has_pos:
                    torch.matmul(g.shifts, dl, out=dpos[s])
                if has_rpb:
                    drpb += dl.sum((0, 3))
                if wk is None:
                    _shift_grads(g, qc, kc, ac, dc, dl, dq[s], dkp[s], dvp[s], tmp[:n])
                else:
                    p = _tap_products(g, qc, kc, taps[1][:n])  # recomputed
                    dwk += _bmm_t(dl, p)
                    dp = _zero_wraps(g, _bmm(wk.T, dl, taps[0][:n]))  # d[q * k_e; q]
                    gv = _zero_wraps(g, _bmm(wk.T, ac, taps[1][:n]))  # [M_e A; b A], recomputed
                    _mixed_grads(g, dp, gv, qc, kc, dc, dq[s], dkp[s], dvp[s])
        pad = g.pad

        def crop(t: torch.Tensor) -> torch.Tensor:
            return t[..., pad : pad + L].view(B, N, c, H, W)

        dpe = None
        if has_pos:  # pos = pe^T q: dq += pe dpos, dpe = sum q dpos^T
            dq += torch.matmul(pe, dpos)
            dpe = torch.matmul(q, dpos.transpose(-1, -2)).sum((0, 1))
        return dq.view(B, N, c, H, W), crop(dkp), crop(dvp), dpe, drpb, dwk, None, None


def _by_offset(g: _Grid, t: torch.Tensor) -> torch.Tensor:
    """(n, N, D, L) -> (n, N, 2ry+1, 2rx+1, L): the offsets as a dy x dx grid (a view)."""
    return t.unflatten(2, (2 * g.ry + 1, 2 * g.rx + 1))


def _offsets_view(g: _Grid, t: torch.Tensor) -> torch.Tensor:
    """(n, N, c, L + 2 pad) padded flat map -> (n, N, c, 2ry+1, 2rx+1, L): all D shifted maps at once.

    An overlapping strided view (shifting by dy rows is a step of W, by dx a step of 1), never a copy.
    """
    n, N, c, _ = t.shape
    shape = (n, N, c, 2 * g.ry + 1, 2 * g.rx + 1, g.H * g.W)
    return t.as_strided(shape, (*t.stride()[:3], g.W, 1, 1), t.storage_offset() + g.starts[0])


# Chunk helpers. Shapes: q, out, tmp (n, N, c, L); kp, vp (n, N, c, L + 2 pad); attn (n, N, D, L);
# stacked taps (n, N, D + 1, c, L). The key map shifted by offset d is ``kp[..., st : st + L]`` with
# st = g.starts[d]: a view, never a copy.


def _dots(g: _Grid, q, kp, logits, tmp) -> None:
    """logits[:, :, d] = sum_c q * K_d (in backward also dA_d = sum_c dout * V_d)."""
    L = q.shape[-1]
    for i, st in enumerate(g.starts):
        torch.sum(torch.mul(q, kp[..., st : st + L], out=tmp), dim=2, out=logits[:, :, i])


def _weighted_sum(g: _Grid, attn, vp, out, tmp) -> None:
    """out = sum_d A_d * V_d."""
    L = out.shape[-1]
    for i, st in enumerate(g.starts):
        if i == 0:
            torch.mul(attn[:, :, i : i + 1], vp[..., st : st + L], out=out)
        else:
            out.addcmul_(attn[:, :, i : i + 1], vp[..., st : st + L])


def _shift_grads(g: _Grid, q, kp, attn, dout, dl, dq, dkp, dvp, tmp) -> None:
    """dq = sum_d dL_d K_d; dK_d += dL_d q; dV_d += A_d dout (added into slices of the padded grads)."""
    L = q.shape[-1]
    for i, st in enumerate(g.starts):
        dli = dl[:, :, i : i + 1]
        if i == 0:
            torch.mul(dli, kp[..., st : st + L], out=dq)
        else:
            dq.addcmul_(dli, kp[..., st : st + L])
        dkp[..., st : st + L].addcmul_(dli, q)
        dvp[..., st : st + L].addcmul_(attn[:, :, i : i + 1], dout)


# Mixed ("deformed") keys, Slide: K_d = sum_e M[:, d, e] k_e + b[:, d] per channel, V_d likewise.
# Moved to the query side, logit_d = sum_e sum_c M[c, d, e] (q * k_e)_c + sum_c b[c, d] q_c is ONE
# matmul of wk (D, (D+1)c) = [M_0^T | ... | M_{D-1}^T | b^T] with the stacked [q * k_e; q], and the
# value side is its transpose: [M_e A; b A] = wk^T A. Flat slices of taps with dx != 0 wrap around
# row ends, where the conv must read zero padding: those entries of the stacks are zeroed.


def _bmm(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = w @ x for a shared 2-D w and x (n, N, ..., L) flattened to (n*N, rows, L)."""
    n, N, L = x.shape[0], x.shape[1], x.shape[-1]
    torch.bmm(w.expand(n * N, *w.shape), x.reshape(n * N, -1, L), out=out.view(n * N, w.shape[0], L))
    return out


def _bmm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over (n, N) of a @ b^T: the weight gradient of ``_bmm``."""
    n, N, L = a.shape[0], a.shape[1], a.shape[-1]
    return torch.bmm(a.reshape(n * N, -1, L), b.reshape(n * N, -1, L).transpose(1, 2)).sum(0)


def _zero_wraps(g: _Grid, t: torch.Tensor) -> torch.Tensor:
    """Zero, in the stacked taps t, the positions whose tap slice wrapped around a row end.

    For a tap with dx > 0 these are the last dx columns of every row, for dx < 0 the first -dx: a
    strided slice of H*|dx| entries per channel, so this costs next to nothing.
    """
    grid = t[:, :, :-1].unflatten(2, (2 * g.ry + 1, 2 * g.rx + 1)).unflatten(-1, (g.H, g.W))
    for j, dx in enumerate(range(-g.rx, g.rx + 1)):  # grid: (n, N, 2ry+1, 2rx+1, c, H, W)
        if dx > 0:
            grid[:, :, :, j, :, :, g.W - dx :] = 0
        elif dx < 0:
            grid[:, :, :, j, :, :, :-dx] = 0
    return t


def _tap_products(g: _Grid, a, kp, out):
    """out[:, :, e] = a * k_e for every tap e and out[:, :, D] = a, as (n, N, (D+1)c, L)."""
    # One product over the overlapping view of all taps, written tap-major into the stack.
    torch.mul(
        a[:, :, :, None, None],
        _offsets_view(g, kp),
        out=_by_offset(g, out[:, :, :-1]).movedim(4, 2),
    )
    out[:, :, -1].copy_(a)
    return _zero_wraps(g, out).flatten(2, 3)


def _mixed_sum(g: _Grid, gv, vp, out) -> None:
    """out = sum_e gv_e * v_e + gv_D, gv = [M_e A; b A] (n, N, D+1, c, L)."""
    L = out.shape[-1]
    out.copy_(gv[:, :, -1])
    for e, st in enumerate(g.starts):
        out.addcmul_(gv[:, :, e], vp[..., st : st + L])


def _mixed_grads(g: _Grid, dp, gv, q, kp, dout, dq, dkp, dvp) -> None:
    """From dp = d[q * k_e; q] and gv = [M_e A; b A]: dq = dp_D + sum_e dp_e * k_e,
    dk_e += dp_e * q and dv_e += gv_e * dout."""
    L = q.shape[-1]
    dq.copy_(dp[:, :, -1])
    for e, st in enumerate(g.starts):
        dq.addcmul_(dp[:, :, e], kp[..., st : st + L])
        dkp[..., st : st + L].addcmul_(dp[:, :, e], q)
        dvp[..., st : st + L].addcmul_(gv[:, :, e], dout)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: int,
    *,
    pe: torch.Tensor | None = None,
    rpb: torch.Tensor | None = None,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Masked k x k local attention: every pixel attends to its kernel x kernel neighbourhood.

    q, k, v: (B, heads, c, H, W), q already scaled. Returns (B, heads, c, H, W).
    ``logit_d(p) = q(p) . K_d(p) [+ q(p) . (pe d)] [+ rpb[head, d]]`` over the offsets
    d = (dy, dx), |dy|, |dx| <= kernel // 2, with neighbours outside the image masked; softmax over d;
    ``out(p) = sum_d A_d(p) V_d(p)``. Plain keys: ``K_d(p) = k(p + d)``. With ``mix = (M, b)``,
    M (c, k^2, k^2) and b (c, k^2) (Slide's deformed shifting, offsets in row-major order):
    ``K_d(p) = sum_e M[:, d, e] * k(p + e) + b[:, d]`` with k zero outside the image; V_d likewise.
    pe: (c, 2), a position term linear in the offset d = (dy, dx), shared by the heads (ACmix's
    ``q . (pe(p) - pe(p + d))`` with ``pe(p) = W_p p`` is ``pe = -W_p``).
    rpb: (heads, k^2), a bias per head and offset (Slide). A kernel larger than the map is clamped:
    offsets that can never land inside the image are dropped, which changes nothing.
    """
    B, N, c, H, W = q.shape
    r = kernel // 2
    ry, rx = min(r, H - 1), min(r, W - 1)
    if (ry, rx) != (r, r):  # keep the slots (and taps) that can land inside the map
        keep = [(dy + r) * kernel + dx + r for dy in range(-ry, ry + 1) for dx in range(-rx, rx + 1)]
        rpb = None if rpb is None else rpb[:, keep]
        mix = None if mix is None else (mix[0][:, keep][:, :, keep], mix[1][:, keep])
    # On CPU the kernel's elementwise passes are slower in bf16 than in fp32 (every load converts,
    # and there is no matmul to win back on), so under CPU autocast it computes in fp32 and hands
    # back bf16: ACmix trains 1.3x faster that way (`hybridnas bench train`). CUDA keeps bf16.
    out_dtype = q.dtype
    dtype = (
        torch.float32 if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) else q.dtype
    )
    q = q.to(dtype)
    wk = None
    if mix is not None:  # wk[d, e*c + i] = M[i, d, e], wk[d, D*c + i] = b[i, d]; see _tap_products
        m, b = mix
        wk = torch.cat([m.permute(1, 2, 0).flatten(1), b.T], 1).to(dtype)
    return _LocalAttention.apply(
        q,
        k.to(dtype),
        v.to(dtype),
        None if pe is None else pe.to(dtype),
        None if rpb is None else rpb.to(dtype),
        wk,
        ry,
        rx,
    ).to(out_dtype)


def _shift_kernels(channels: int, kernel: int) -> torch.Tensor:
    """(channels * k^2, 1, k, k) depthwise weight whose output channel c*k^2 + d is one-hot at tap d."""
    d = kernel * kernel
    return (
        torch.eye(d)
        .view(1, d, kernel, kernel)
        .expand(channels, d, kernel, kernel)
        .reshape(-1, 1, kernel, kernel)
    )


class SlideAttention(nn.Module):
    """Slide attention mixer, ``(B, C, H, W) -> (B, C, H, W)``.

    qkv (1x1) -> per head: keys and values through the shift conv + learnable depthwise conv
    (shared by heads, applied to k and v alike), k x k masked local attention with a relative
    position bias on the logits -> proj (1x1).
    """

    paper = (
        "Slide-Transformer: Hierarchical Vision Transformer with Local Self-Attention "
        "(Pan et al., CVPR 2023) https://arxiv.org/abs/2304.04237"
    )
    options: dict[str, Any] = {"heads": 4, "kernel": 3, "qkv_bias": True}

    def __init__(self, dim: int, heads: int = 4, kernel: int = 3, qkv_bias: bool = True) -> None:
        super().__init__()
        check_int("dim", dim)
        check_groups(heads, dim, "heads")
        check_int("kernel", kernel, odd=True)  # odd: the window is centred on the query pixel
        if not isinstance(qkv_bias, bool):
            raise ValueError(f"qkv_bias must be True or False, got {qkv_bias!r}")
        self.dim, self.heads, self.kernel = dim, heads, kernel
        hd = dim // heads
        self.head_dim, self.scale = hd, hd**-0.5
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=qkv_bias)
        self.proj = nn.Conv2d(dim, dim, 1)
        # Deformed shifting: a fixed one-hot depthwise conv (a frozen parameter, as in the official
        # code) plus a learnable one, hd -> hd * k^2 channels, shared by all heads.
        self.shift = nn.Parameter(_shift_kernels(hd, kernel), requires_grad=False)
        self.deform = nn.Conv2d(hd, hd * kernel * kernel, kernel, padding=kernel // 2, groups=hd)
        self.rpb = nn.Parameter(torch.zeros(heads, kernel * kernel))
        # The attention kernel; a benchmark can swap in a reference implementation with the same signature.
        self.attention = local_attention
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # qkv, proj and the learnable depthwise conv keep PyTorch's default init, as in the official code.
        nn.init.trunc_normal_(self.rpb, std=0.02)

    def mixing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The merged depthwise conv as (M (hd, k^2 slots, k^2 taps), bias (hd, k^2))."""
        w = self.deform.weight if self.shift is None else self.deform.weight + self.shift
        d = self.kernel * self.kernel
        return w.view(self.head_dim, d, d), self.deform.bias.view(self.head_dim, d)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the fixed shift conv into the learnable one (in place); outputs are unchanged."""
        if self.shift is not None:
            # The same fp32 sum ``mixing()`` computes every forward, so the outputs are bit-identical.
            self.deform.weight.copy_(self.deform.weight + self.shift)
            self.shift = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, 3, self.heads, self.head_dim, H, W).unbind(1)
        out = self.attention(q * self.scale, k, v, self.kernel, rpb=self.rpb, mix=self.mixing())
        return self.proj(out.reshape(B, C, H, W))

    def extra_repr(self) -> str:
        merged = ", merged" if self.shift is None else ""
        return f"dim={self.dim}, heads={self.heads}, kernel={self.kernel}{merged}"
