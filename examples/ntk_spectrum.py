"""The eigenvalue spectrum of an empirical neural tangent kernel, from `tj.ntk`, plotted to a PNG.

The empirical NTK of a network f with parameters θ is K(x₁, x₂) = J(x₁) J(x₂)ᵀ with J = ∂f/∂θ.
`tj.ntk(model, x)` computes it without forming J (for a Linear layer the block is
(δ₁δ₂ᵀ) ⊙ (a₁a₂ᵀ + 1), from the layer's inputs a and output sensitivities δ). This script computes
K(x, x) for MLPs of growing width on the same inputs, checks the smallest against a Jacobian
contraction with `torch.func`, and plots the eigenvalues of each, divided by the largest: a few
large eigenvalues, then a long decay, along which the wider networks' curves come together.

    python examples/ntk_spectrum.py [--out ntk_spectrum.png] [--points 128]

Without --out the figure goes to a temporary directory; its path is printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import torchjac as tj


def mlp(width: int, n_in: int = 4, n_out: int = 2) -> nn.Module:
    """A two-hidden-layer tanh MLP with LeCun-normal weights (standard deviation 1/√fan-in)."""
    model = nn.Sequential(
        nn.Linear(n_in, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, n_out),
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
            nn.init.normal_(layer.bias, std=0.1)
    return model


def ntk_by_contraction(model: nn.Module, x: Tensor) -> Tensor:
    """The torch.func way: per-sample Jacobians of every parameter, then their contraction."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def single(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(single), (None, 0))(params, x)
    blocks = [torch.einsum("iaP,jbP->iajb", j.flatten(2), j.flatten(2)) for j in jac.values()]
    return torch.stack(blocks).sum(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="PNG path (default: a temporary directory)")
    parser.add_argument("--points", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    x = torch.randn(args.points, 4)
    spectra: dict[int, Tensor] = {}
    ok = True
    for width in (16, 64, 256, 1024):
        model = mlp(width)
        K = tj.ntk(model, x)  # [N, C, N, C]
        n = K.shape[0] * K.shape[1]
        mat = K.reshape(n, n).double()
        eig = torch.linalg.eigvalsh(mat).flip(0)  # descending
        spectra[width] = eig
        symmetric = torch.allclose(mat, mat.T, atol=1e-5 * mat.abs().max().item())
        psd = eig.min().item() > -1e-5 * eig.max().item()
        ok &= symmetric and psd
        top = ", ".join(f"{v:.3g}" for v in eig[:3].tolist())
        print(
            f"width {width:5d}: K {tuple(K.shape)}, trace {mat.trace().item():.4g}, "
            f"top eigenvalues {top}"
        )
        if width == 16:
            diff = (K - ntk_by_contraction(model, x)).abs().max().item()
            print(f"  against the torch.func Jacobian contraction: max |difference| {diff:.2e}")
            ok &= diff < 1e-4 * K.abs().max().item()
    print(f"symmetric and positive semi-definite: {ok}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "ntk_spectrum.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    for width, eig in spectra.items():
        ax.semilogy(range(1, len(eig) + 1), eig.clamp_min(1e-12) / eig[0], label=f"width {width}")
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("eigenvalue / largest")
    ax.set_title(f"Empirical NTK spectrum, {args.points} points, 2 outputs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
