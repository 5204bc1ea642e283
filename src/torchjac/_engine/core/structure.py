"""Structure checks: is the declared batch really independent?

NOTE [coupling check]: with ``batch_dim``, sample i of the outputs must depend only on sample i of
the inputs. A vector-Jacobian product with a random cotangent on a set S of the samples must give
exactly zero gradient outside S: any independent graph does, structurally, since zero cotangents
multiply into exact zeros. A leak means coupling (BatchNorm in train mode, ``x - x.mean(0)``,
attention over the batch). Each S is checked with its complement, so every coupling between S
and the rest is caught. With at most 8 samples the sets are the bits of the sample index, which
catches every coupled pair (two samples differ in some bit); with more, they are the two lowest
bits (neighbours, as in ``roll`` or a convolution over the batch) and a random half, which
catches every coupling through a batch statistic and most others. That is at most six backward
passes, with their own generator, so the user's RNG state is untouched. Where the check rides in
the result's own pass (layer probes) each set costs a column of the result, and a large batch
gets the random half alone (``sample_masks(rows=True)``). The Taylor mode checks in forward mode,
in a pass of its own, and only what it cannot prove (NOTE [taylor check])."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.core.basis import Group
from torchjac._errors import BatchCouplingError

__all__ = ["check_independent", "masked_random", "reachable", "sample_mask", "sample_masks"]


def sample_mask(batch_size: int, device: torch.device) -> Tensor:
    """Boolean mask of a random half of the samples, containing 0 and missing at least one."""
    gen = torch.Generator().manual_seed(20240917)
    mask = torch.rand(batch_size, generator=gen, dtype=torch.float64) < 0.5  # any default dtype
    mask[0] = True
    if bool(mask.all()):
        mask[-1] = False
    return mask.to(device)


# Batches up to this size are checked on every bit of the sample index (every pair).
ALL_PAIRS_MAX_BATCH = 8


def sample_masks(batch_size: int, device: torch.device, *, rows: bool = False) -> list[Tensor]:
    """The sets S of NOTE [coupling check] (each is checked with its complement too).

    ``rows``: the check rides in the same pass as the result (extra probes of a layer backward),
    where each set costs as much as a column of the result: beyond ``ALL_PAIRS_MAX_BATCH``
    samples, the random half alone.
    """
    index = torch.arange(batch_size)
    n_bits = max(1, (batch_size - 1).bit_length())
    small = batch_size <= ALL_PAIRS_MAX_BATCH
    bits = range(n_bits) if small else range(0 if rows else 2)
    masks = [((index >> k) & 1).bool().to(device) for k in bits]
    if batch_size > ALL_PAIRS_MAX_BATCH:
        masks.append(sample_mask(batch_size, device))
    return masks


def masked_random(
    group: Group, i: int, mask: Tensor, gen: torch.Generator, dtype: torch.dtype, device: Any
) -> Tensor:
    """``[1, *shapes[i]]``: a random tensor from ``gen`` on the samples of ``mask``, zero
    elsewhere (a probe of NOTE [coupling check], as a cotangent or a tangent)."""
    bsz = group.batch_size
    rand = torch.randn(1, bsz, group.sizes[i], generator=gen).to(device=device, dtype=dtype)
    return group.expand(i, rand * mask.reshape(1, bsz, 1).to(dtype))


def check_independent(
    fn_name: str,
    batch_dim: int,
    outputs: Group,
    inputs: Group,
    input_names: Sequence[str],
    dtype: torch.dtype,
    device: torch.device,
    vjp: Callable[[list[Tensor]], Sequence[Tensor | None]],
) -> None:
    """Raise ``BatchCouplingError`` if the outputs' samples leak into other input samples.

    ``vjp(cotangents)`` maps one cotangent per output (full output shape) to one gradient per
    input (full input shape, or ``None`` when unused).
    """
    bsz = outputs.batch_size
    if bsz <= 1:
        return
    gen = torch.Generator().manual_seed(7)
    for mask in (m for s in sample_masks(bsz, device) for m in (s, ~s)):
        cotangents = []
        for i in range(len(outputs.sizes)):
            cotangents.append(masked_random(outputs, i, mask, gen, dtype, device)[0])
        for j, g in enumerate(vjp(cotangents)):
            if g is None:
                continue
            outside = inputs.probe_major(j, g.unsqueeze(0))[0][~mask]  # [B - |mask|, rest]
            leak = outside.nan_to_num(0.0).abs().amax(dim=-1) if outside.numel() else outside
            if leak.numel() and bool((leak > 0).any()):
                where = torch.nonzero(~mask).flatten()[leak > 0][:5].tolist()
                shown = torch.nonzero(mask).flatten()[:5].tolist()
                raise BatchCouplingError(
                    f"{fn_name}: `batch_dim={batch_dim}` declares that output sample i depends "
                    f"only on input sample i, but the outputs of samples {shown}"
                    f"{'...' if int(mask.sum()) > 5 else ''} depend on {input_names[j]} at "
                    f"samples {where}. Samples are coupled, e.g. by BatchNorm in train mode (call "
                    f"model.eval()), batch statistics such as `x - x.mean(0)`, or attention "
                    f"across the batch. Drop `batch_dim` to get the full Jacobian instead."
                )


# NOTE [node identity]: a walk of the autograd graph keys the nodes it visits by the node objects
# themselves (identity hash), never by ``id(node)``. Before torch 2.13 the Python object of a node
# lives only while something refers to it: once a walk drops it, the next node read may get its
# ``id``, and a walk keyed on ids takes that node for one already seen and skips its subgraph.
# Holding the objects (a set or dict of nodes) keeps each alive for the walk, and torch hands out
# the same object for a node while it lives. Leaves are matched by the ``id`` of tensors that the
# caller holds, which cannot be reused meanwhile.


def reachable(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    blocked: Mapping[Any, Collection[int]] | None = None,
) -> list[bool]:
    """For each input, whether some output depends on it through the autograd graph.

    One walk of ``grad_fn.next_functions``, stopped as soon as every input is reached; leaves are
    matched through their ``AccumulateGrad`` node, non-leaves by ``(grad_fn, output_nr)``.
    ``blocked`` maps a node to the ``id``s of leaves whose edges from that node are not followed.
    Nodes are keyed by themselves, never by ``id`` (NOTE [node identity]).
    """
    # lists, not single indices: the same tensor may be passed twice (tied inputs)
    wanted_leaf: dict[int, list[int]] = {}
    wanted_node: dict[tuple[object, int], list[int]] = {}
    for k, x in enumerate(inputs):
        if x.grad_fn is None:
            wanted_leaf.setdefault(id(x), []).append(k)
        else:
            wanted_node.setdefault((x.grad_fn, x.output_nr), []).append(k)
    found = [False] * len(inputs)
    for y in outputs:  # an output that is itself an input
        for k in wanted_leaf.get(id(y), ()):
            found[k] = True
    missing = found.count(False)
    stack = [(y.grad_fn, y.output_nr) for y in outputs if y.grad_fn is not None]
    seen: set[Any] = set()  # the nodes themselves: NOTE [node identity]
    while stack and missing:
        node, nr = stack.pop()
        hits = wanted_node.get((node, nr), [])
        if node not in seen:
            seen.add(node)
            variable = getattr(node, "variable", None)
            if variable is not None:
                hits = hits + wanted_leaf.get(id(variable), [])
            nexts = [(n, i) for n, i in node.next_functions if n is not None]
            cut = blocked.get(node) if blocked else None
            if cut:
                nexts = [(n, i) for n, i in nexts if id(getattr(n, "variable", None)) not in cut]
            stack.extend(nexts)
        for k in hits:
            missing -= not found[k]
            found[k] = True
    return found
