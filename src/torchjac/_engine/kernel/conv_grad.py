"""The input gradient of a 2-d convolution for many rows at once (``R = probes × samples``).

NOTE [convolution input gradient]: ``conv_input_grad`` returns ``dL/dx [R, C_in, H, W]`` from
``g = dL/dy [R, C_out, H', W']``. On a CPU, for few channels and little overlap between taps
(``_scatter_pays``), it is one matrix product and a scatter by kernel tap: ``C[(ky, kx, c_in),
(r, o)] = Σ_c_out w[c_out, c_in, ky, kx] g[r, c_out, o]``, then tap ``(ky, kx)`` lands on input
position ``i = s·o + d·k - p`` (per spatial axis). The input positions of one residue ``i mod s``
form a strided sub-grid that a tap fills at a fixed offset, so the first tap of a residue that
covers its whole sub-grid is copied (no zero fill), the others are added. torch's own kernels
measured slower on the 10 probes × 32 samples of a small CNN's per-sample Jacobian (8→16
channels, 3×3, stride 2, 14×14 input, one thread, Zen 4): 1.5 ms here, against 3.2 for ten
``convolution_backward`` calls through oneDNN (which ``is_grads_batched`` makes, one per probe),
2.7 for one call on all rows and 1.8 for torch's non-oneDNN kernel. Elsewhere it is torch's
``convolution_backward`` on all rows at once (a GPU has its own tuned kernels; on a CPU, more
channels or a stride of 1 make the matrix product's result, ``taps ×`` the input, too big to
scatter).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchjac._engine.core import fast

__all__ = ["conv_input_grad", "scatter_input_grad"]

_MAX_CHANNELS = 16
Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # stride, padding, dilation


def conv_input_grad(
    g: Tensor, weight: Tensor, in_size: tuple[int, int], geometry: Geometry, groups: int
) -> Tensor:
    """``[R, C_in, *in_size]``: the input gradient of ``conv2d(x, weight)`` for ``g [R, C_out,
    H', W']`` (NOTE [convolution input gradient]); ``geometry`` is (stride, padding, dilation)."""
    stride, padding, dilation = geometry
    if fast.enabled() and g.device.type == "cpu" and _scatter_pays(weight, stride, groups):
        return scatter_input_grad(g, weight, in_size, geometry, groups)
    # the input's shape only: convolution_backward reads no input for the input gradient alone
    # (torch.nn.grad.conv2d_input passes the same)
    x = g.new_empty(1).expand(g.shape[0], weight.shape[1] * groups, *in_size)
    return torch.ops.aten.convolution_backward(
        g, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False]
    )[0]


def scatter_input_grad(
    g: Tensor, weight: Tensor, in_size: tuple[int, int], geometry: Geometry, groups: int
) -> Tensor:
    """``conv_input_grad`` as one matrix product and a scatter by tap, on any device."""
    stride, padding, dilation = geometry
    r, _, oh, ow = g.shape
    c_og, c_ig, kh, kw = weight.shape[0] // groups, *weight.shape[1:]
    # [G, kh·kw·C_in/G, C_out/G] @ [G, C_out/G, R·H'·W'] -> taps [G, kh, kw, C_in/G, R, H', W']
    a = weight.reshape(groups, c_og, c_ig, kh * kw).permute(0, 3, 2, 1).reshape(groups, -1, c_og)
    b = g.reshape(r, groups, c_og, oh * ow).permute(1, 2, 0, 3).reshape(groups, c_og, -1)
    prod = (a[0] @ b[0]).unsqueeze(0) if groups == 1 else torch.bmm(a, b)
    taps = prod.view(groups, kh, kw, c_ig, r, oh, ow)
    out = g.new_empty(groups, c_ig, r, *in_size)
    per_axis = [
        _placements(n_in, n_out, k, s, p, d)
        for n_in, n_out, k, s, p, d in zip(in_size, (oh, ow), (kh, kw), stride, padding, dilation)
    ]
    for ry, y_taps in enumerate(per_axis[0]):
        for rx, x_taps in enumerate(per_axis[1]):
            sub = out[..., ry :: stride[0], rx :: stride[1]]
            filled = False
            for ky, (ys, yd, y_full) in y_taps:
                for kx, (xs, xd, x_full) in x_taps:
                    src = taps[:, ky, kx, :, :, ys, xs]
                    if not filled and y_full and x_full:
                        sub.copy_(src)
                    else:
                        if not filled:
                            sub.zero_()
                        sub[..., yd, xd] += src
                    filled = True
            if not filled:
                sub.zero_()
    return out.view(groups * c_ig, r, *in_size).transpose(0, 1)


def _scatter_pays(weight: Tensor, stride: tuple[int, int], groups: int) -> bool:
    """Few channels per group (torch's kernels then leave most of a vector register idle) and
    at most 2.25 taps per input position (the scatter's passes over the result). Against one
    ``convolution_backward`` of all rows through oneDNN (one thread, Zen 4), besides the case of
    the NOTE: 1→8 channels, 0.7 against 4.9 ms; but 16→32 channels, 16 against 14 ms; 16→16
    channels at stride 1, 6.2 against 1.8 ms; 3×3 at stride 1 and 64 channels, 39 against 11."""
    c_out, c_ig, kh, kw = weight.shape
    few = c_out // groups <= _MAX_CHANNELS and c_ig <= _MAX_CHANNELS
    return few and 4 * kh * kw <= 9 * stride[0] * stride[1]


_Placement = tuple[int, tuple[slice, slice, bool]]  # tap, (source, destination, covers all)


def _placements(n_in: int, n_out: int, k: int, s: int, p: int, d: int) -> list[list[_Placement]]:
    """Per residue ``i mod s`` of one input axis: the taps landing there, each with the output
    positions it reads, the sub-grid positions it writes, and whether it writes all of them
    (those first: a residue with a tap covering it along both axes starts with a copy)."""
    out: list[list[_Placement]] = [[] for _ in range(min(s, n_in))]
    for tap in range(k):
        shift = d * tap - p  # i = s·o + shift
        res = shift % s
        if res >= n_in:
            continue
        q = (shift - res) // s  # sub-grid position m = o + q
        m_len = (n_in - res + s - 1) // s
        o0, o1 = max(0, -q), min(n_out, m_len - q)
        if o1 <= o0:
            continue
        full = o0 + q == 0 and o1 + q == m_len
        out[res].append((tap, (slice(o0, o1), slice(o0 + q, o1 + q), full)))
    return [sorted(taps, key=lambda t: not t[1][2]) for taps in out]  # a full one first
