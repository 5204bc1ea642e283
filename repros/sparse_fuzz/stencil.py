"""Random stencils (periodic rolls, padded slices, conv kernels with holes) on small grids:
the lattice colouring's hardest cases (offsets that alias on a small periodic grid)."""
import random, sys, warnings
import torch, torch.nn.functional as F
import torchjac as tj
D = torch.float64

def build(seed):
    rng = random.Random(seed)
    nd = rng.choice([1, 2, 3])
    shape = tuple(rng.randint(1, 7 if nd == 3 else 13) for _ in range(nd))
    terms = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.choice(["roll", "pad", "conv", "nonlin"])
        off = tuple(rng.randint(-3, 3) for _ in range(nd))
        c = rng.uniform(-2, 2)
        k = tuple(rng.choice([1, 3, 5]) for _ in range(nd))
        w = torch.randn(1, 1, *k, dtype=D, generator=torch.Generator().manual_seed(rng.randrange(99999)))
        w = w * (torch.rand(w.shape, generator=torch.Generator().manual_seed(rng.randrange(99999))) > 0.5)
        terms.append((kind, off, c, w))
    def f(u):
        out = torch.zeros_like(u)
        for kind, off, c, w in terms:
            if kind == "roll":
                out = out + c * torch.roll(u, off, tuple(range(nd)))
            elif kind == "pad":
                p = []
                for o in off[::-1]:
                    p += [max(o, 0), max(-o, 0)]
                v = F.pad(u.unsqueeze(0), p).squeeze(0)
                sl = tuple(slice(max(-o, 0), max(-o, 0) + s) for o, s in zip(off, u.shape))
                out = out + c * v[sl]
            elif kind == "conv":
                conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
                pad = [(s - 1) // 2 for s in w.shape[2:]]
                out = out + conv(u[None, None], w, padding=pad)[0, 0]
            else:
                out = out + c * torch.roll(u, off, tuple(range(nd))) * u
        return out + u ** 3
    return f, shape

bad = 0
start, count = int(sys.argv[1]), int(sys.argv[2])
for seed in range(start, start + count):
    f, shape = build(seed)
    x = torch.randn(shape, dtype=D, generator=torch.Generator().manual_seed(seed))
    try:
        J = torch.func.jacfwd(f)(x).reshape(x.numel(), x.numel())
    except Exception:
        continue
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P = tj.sparsity_pattern(f, x).to_dense()
    if ((J != 0) & ~P).any():
        bad += 1; print(seed, shape, "MISS")
    for mode in ("fwd", "rev", "auto"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                S = tj.sparse_jacobian(f, x, mode=mode).to_dense()
            if not torch.allclose(S, J, rtol=1e-10, atol=1e-10):
                bad += 1; print(seed, shape, mode, "WRONG", (S - J).abs().max().item())
        except Exception as e:
            bad += 1; print(seed, shape, mode, "RAISE", str(e)[:150])
print("done", count, "bad", bad)
