"""Sparse Hessians: the pattern of torch.func.grad(E) for random programs E (the tracer sees
the backward's ops), against the dense Hessian."""
import sys, warnings, random
import torch
import torchjac as tj
import fuzz
D = torch.float64
start, count = int(sys.argv[1]), int(sys.argv[2])
bad = skipped = 0
for seed in range(start, start + count):
    rng = random.Random(seed * 13 + 7)
    shape = rng.choice([(8,), (3, 4), (2, 2, 3), (9,)])
    func, names = fuzz.build(seed, shape, rng.randint(1, 5))
    if "writes_x" in names:
        skipped += 1; continue
    def E(u):
        y = func(u)
        return (y * y).sum() * 0.5 + y.sin().sum()
    g = torch.func.grad(E)
    x = torch.randn(shape, dtype=D, generator=torch.Generator().manual_seed(seed))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            H = torch.autograd.functional.jacobian(lambda u: g(u), x).reshape(x.numel(), x.numel())
    except Exception:
        skipped += 1; continue
    if not torch.isfinite(H).all():
        skipped += 1; continue
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            P = tj.sparsity_pattern(g, x).to_dense()
    except Exception as e:
        bad += 1; print(seed, names, "pattern RAISE", str(e)[:150]); continue
    miss = (H != 0) & ~P
    if miss.any():
        bad += 1; print(seed, names, "MISS", int(miss.sum()))
    try:
        Hf = torch.stack([torch.func.jvp(g, (x,), (e.view(shape),))[1].reshape(-1) for e in torch.eye(x.numel(), dtype=D)], 1)
    except Exception:
        Hf = None
    tol = dict(rtol=1e-5, atol=1e-6) if "cast_f32" in names else dict(rtol=1e-8, atol=1e-9)
    for mode in ("fwd", "rev", "auto"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                S = tj.sparse_jacobian(g, x, mode=mode).to_dense()
            refs = [H] if mode == "rev" else [Hf] if mode == "fwd" and Hf is not None else [H, Hf]
            if not any(R is not None and torch.allclose(S, R, **tol) for R in refs):
                bad += 1; print(seed, names, mode, "WRONG", (S - H).abs().max().item())
        except Exception as e:
            print(seed, names, mode, "raise", type(e).__name__, str(e)[:120])
    sys.stdout.flush()
print("done", count, "bad", bad, "skipped", skipped)
