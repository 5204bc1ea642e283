"""batch_dim and float32 variants of the fuzz programs."""
import sys, warnings, random, traceback
import torch
import torchjac as tj
from fuzz import build, oracle, check_csr

D = torch.float64


def run_batch(seed):
    rng = random.Random(seed * 31 + 5)
    shape = rng.choice([(6,), (2, 3), (4,), (2, 2, 2)])
    B = rng.randint(1, 3)
    bd = rng.randrange(len(shape) + 1)
    func, names = build(seed, shape, rng.randint(1, 5))
    try:
        y0 = func(torch.randn(shape, dtype=D))
    except Exception:
        return names, None
    ob = bd
    if y0.dim() < bd:
        return names, None

    def f(u):
        samples = u.movedim(bd, 0)
        outs = [func(samples[i]) for i in range(samples.shape[0])]
        return torch.stack(outs, 0).movedim(0, ob)

    full = list(shape)
    full.insert(bd, B)
    x = torch.randn(full, dtype=D, generator=torch.Generator().manual_seed(seed))
    problems = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ors = [oracle(func, x.movedim(bd, 0)[i]) for i in range(B)]
            wants = {}
            for k, how in enumerate(("fwd", "rev")):
                if all(o[k] is not None for o in ors):
                    wants[how] = torch.stack([o[k] for o in ors])
            if not wants:
                return names, None
    except Exception:
        return names, None
    if ob != 0 and y0.dim() > 0:
        # the per-sample rows are the sample's output (batch dim set aside): same order as func's output
        pass
    for mode in ("auto", "fwd", "rev"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                S = tj.sparse_jacobian(f, x, mode=mode, batch_dim=bd)
        except Exception as e:
            msg = str(e)
            if "batch_dim" in msg and "output" in msg:
                return names, None
            if "modified by an inplace" in msg and "rev" not in wants:
                continue
            problems.append(f"batch bd={bd} ob={ob} {mode}: raised {type(e).__name__}: {msg[:200]}")
            continue
        Sd = S.to_dense()
        cands = [wants[mode]] if mode in wants else list(wants.values())
        if not any(Sd.shape == w.shape and torch.allclose(Sd, w, rtol=1e-9, atol=1e-10) for w in cands):
            problems.append(f"batch bd={bd} ob={ob} {mode}: wrong (shape {tuple(Sd.shape)})")
    return names, problems


def run_f32(seed):
    rng = random.Random(seed * 17 + 3)
    shape = rng.choice([(12,), (4, 6), (2, 3, 4), (16,)])
    func, names = build(seed, shape, rng.randint(1, 6))

    def f(u):
        return func(u.to(D)).to(torch.float32)

    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).float()
    problems = []
    try:
        Jf, Jr = oracle(lambda u: func(u), x.to(D))
        J = Jf if Jf is not None else Jr
    except Exception:
        return names, None
    if J is None:
        return names, None
    for mode in ("auto", "fwd", "rev"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                S = tj.sparse_jacobian(f, x, mode=mode)
        except Exception as e:
            if "modified by an inplace" in str(e):
                continue
            problems.append(f"f32 {mode}: raised {type(e).__name__}: {str(e)[:200]}")
            continue
        Sd = S.to_dense().to(D)
        cands = [c for c in ((Jf if mode == "fwd" else Jr if mode == "rev" else None),) if c is not None] or [c for c in (Jf, Jr) if c is not None]
        if not any(torch.allclose(Sd, c, rtol=1e-3, atol=1e-3 * (c.abs().max().item() + 1)) for c in cands):
            problems.append(f"f32 {mode}: wrong max err {(Sd - J).abs().max().item()}")
    return names, problems


if __name__ == "__main__":
    which, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    run = run_batch if which == "batch" else run_f32
    bad = skipped = 0
    for seed in range(start, start + count):
        try:
            names, problems = run(seed)
        except Exception as e:
            print(f"seed {seed}: HARNESS {type(e).__name__}: {e}")
            continue
        if problems is None:
            skipped += 1
            continue
        if problems:
            bad += 1
            print(f"seed {seed}: {names}")
            for p in problems[:4]:
                print("   ", p)
        sys.stdout.flush()
    print(f"done {count} bad {bad} skipped {skipped}")
