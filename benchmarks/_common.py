"""Shared pieces of the workloads: MLPs with fixed seeds, float64 copies, torchjac calls."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FunctionalNet",
    "SlicedOutput",
    "as_double",
    "flat_cat",
    "fork_rng",
    "mlp",
    "module_styles",
    "plain_params",
    "randn",
    "styles",
]


def mlp(sizes: Sequence[int], activation: Callable[[], nn.Module], *, seed: int) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]), act, ..., Linear(sizes[-2], sizes[-1])`` with a fixed seed."""
    with fork_rng(seed):
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        return nn.Sequential(*layers)


class fork_rng:
    """Context manager: seeded RNG inside, the caller's global RNG state restored after."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._state: Tensor | None = None

    def __enter__(self) -> None:
        self._state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        assert self._state is not None
        torch.random.set_rng_state(self._state)


def randn(*shape: int, seed: int) -> Tensor:
    """A seeded standard normal tensor (float32), without touching the global RNG."""
    with fork_rng(seed):
        return torch.randn(*shape)


def as_double(model: nn.Module) -> nn.Module:
    """A float64 deep copy of ``model`` (for references)."""
    return copy.deepcopy(model).double()


def plain_params(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the parameters, for ``torch.func.functional_call``."""
    return {k: v.detach() for k, v in model.named_parameters()}


def flat_cat(tensors: Sequence[Tensor], lead: int) -> Tensor:
    """Concatenate tensors ``[lead, *p]`` into ``[lead, sum p]``."""
    return torch.cat([t.reshape(lead, -1) for t in tensors], dim=1)


_FUNCTIONAL: dict[type, Callable[[Tensor], Tensor]] = {
    nn.ReLU: F.relu,
    nn.Tanh: torch.tanh,
    nn.Flatten: lambda t: torch.flatten(t, 1),
}


class FunctionalNet(nn.Module):
    """An ``nn.Sequential``'s layers as a module class: the layers with parameters in an
    ``nn.ModuleList``, activations and flattening as functions called in ``forward``."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.layers = nn.ModuleList(m for m in seq if type(m) not in _FUNCTIONAL)
        self.steps = [_FUNCTIONAL.get(type(m)) for m in seq]

    def forward(self, x: Tensor) -> Tensor:
        layers = iter(self.layers)
        for step in self.steps:
            x = next(layers)(x) if step is None else step(x)
        return x


class SlicedOutput(nn.Module):
    """A module around a model whose ``forward`` slices the model's output, as a lambda
    around it would (``param_jacobian`` and ``ntk`` take modules)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[..., :]


def module_styles(seq: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """The same model in two more styles than the ``nn.Sequential``, sharing its parameters (in
    the same order): a module class with a functional ``forward``, and a module slicing the
    model's output."""
    return [("module class", FunctionalNet(seq)), ("wrapper slicing the output", SlicedOutput(seq))]


def styles(f: nn.Sequential) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    """The same function in two more styles than the ``nn.Sequential``: a module class with a
    functional ``forward``, and a lambda around the model that slices its output."""
    return [
        ("module class", FunctionalNet(f)),
        ("lambda slicing the output", lambda x: f(x)[..., :]),
    ]
