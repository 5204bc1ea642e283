"""Per-sample convolution weight Jacobians by one grouped convolution (NOTE [per-sample
convolutions]) against ``vmap(jacrev(functional_call))`` in float64, for the geometries the
closed form must get right."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import randn
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import torchjac as tj
from torchjac._engine.modules import closed_forms


class _Twice(nn.Module):
    """One convolution called twice: both uses accumulate into its Jacobian."""

    def __init__(self, channels: int = 2) -> None:
        super().__init__()
        self.c = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels * 5 * 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.c(torch.relu(self.c(x))).flatten(1))


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...], int]]:
    """name -> (model, input shape, whether the grouped convolution serves it)."""
    return {
        "stride 2": (
            nn.Sequential(
                nn.Conv2d(2, 4, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 4 * 4, 3),
            ),
            (5, 2, 8, 8),
            1,
        ),
        "dilation, same padding": (
            nn.Sequential(
                nn.Conv2d(2, 3, 3, padding="same", dilation=2),
                nn.Tanh(),
                nn.Flatten(),
                nn.Linear(3 * 6 * 6, 2),
            ),
            (4, 2, 6, 6),
            1,
        ),
        "rectangular kernel, no bias": (
            nn.Sequential(
                nn.Conv2d(1, 3, (2, 3), stride=(1, 2), bias=False),
                nn.Flatten(),
                nn.Linear(3 * 6 * 4, 2),
            ),
            (3, 1, 7, 9),
            1,
        ),
        "conv1d": (
            nn.Sequential(
                nn.Conv1d(3, 4, 3, stride=2, padding=2),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 6, 2),
            ),
            (4, 3, 10),
            1,
        ),
        "conv1d same": (
            nn.Sequential(
                nn.Conv1d(3, 2, 3, padding="same", dilation=2), nn.Flatten(), nn.Linear(2 * 9, 2)
            ),
            (4, 3, 9),
            1,
        ),
        "groups: the unfolded form": (
            nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)),
            (3, 4, 5, 5),
            0,
        ),
        "many input columns: the unfolded form": (
            nn.Sequential(nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(2 * 3 * 3, 2)),
            (3, 4, 5, 5),
            0,
        ),
        "called twice": (_Twice(), (3, 2, 5, 5), 2),
        "many input columns, called twice: the second use adds to the first's rows": (
            _Twice(channels=4),
            (3, 4, 5, 5),
            0,
        ),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_per_sample_convolutions_match_vmap_jacrev(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    model, shape, grouped = _models()[name]
    model = model.double()
    calls = []
    conv_weight = closed_forms._conv_weight

    def counted(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return conv_weight(*args)

    monkeypatch.setattr(closed_forms, "_conv_weight", counted)
    x = randn(*shape, gen=gen)
    got = tj.param_jacobian(model, x, batch_dim=0)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def single(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    want = vmap(jacrev(single), (None, 0))(params, x)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    assert bool(calls) == bool(grouped)


_GROUP_NORM_SCRIPT = """
import torch, torchjac as tj
from torch import nn
from torch.func import functional_call, jacrev
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                    nn.Linear(36, 2)).double().to(memory_format=torch.channels_last)
x = torch.randn(BATCH, 2, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
want = jacrev(lambda p: functional_call(net, p, (x,)))(
    {k: v.detach() for k, v in net.named_parameters()})
for got in (tj.param_jacobian(net, x, batch_dim=0), tj.param_jacobian(net, x, params=["1.weight"])):
    for k, j in got.items():
        torch.testing.assert_close(j, want[k])
print("ok")
"""


@pytest.mark.parametrize("batch", [1, 3])
def test_group_norm_on_channels_last_input_without_grad(batch: int) -> None:
    """torch's CPU ``group_norm`` backward crashes the process (segfault) on a channels-last input
    that does not require grad: the general path's call after a covered convolution, or with a
    ``params`` subset (NOTE [group norm layout]). Run in a child process: a crash is a failure."""
    script = _GROUP_NORM_SCRIPT.replace("BATCH", str(batch))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr)
