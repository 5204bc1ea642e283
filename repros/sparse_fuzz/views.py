"""Random as_strided/view reads and in-place writes on tracked buffers."""
import random, sys, warnings
import torch
import torchjac as tj
D = torch.float64

def rand_view(rng, t):
    """a random strided view of 1-D contiguous t (may overlap if read-only)."""
    n = t.numel()
    nd = rng.randint(1, 3)
    shape = [rng.randint(1, 3) for _ in range(nd)]
    stride = [rng.randint(0, 3) for _ in range(nd)]
    span = sum((s - 1) * st for s, st in zip(shape, stride))
    if span >= n:
        return None
    off = rng.randint(0, n - 1 - span)
    return shape, stride, off

def nonoverlap(shape, stride):
    seen = set()
    import itertools
    for idx in itertools.product(*[range(s) for s in shape]):
        p = sum(i * s for i, s in zip(idx, stride))
        if p in seen:
            return False
        seen.add(p)
    return True

def build(seed):
    rng = random.Random(seed)
    n = 12
    steps = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["read", "write", "write_from_x", "swap", "fresh_buf", "view_chain", "scale"])
        a = rng.randint(0, 10 ** 6)
        steps.append((kind, a))
    def f(x):
        r = random.Random(seed + 1)
        buf = x.reshape(-1).clone()
        other = torch.zeros(n, dtype=D)
        outs = []
        for kind, a in steps:
            rr = random.Random(a)
            v = rand_view(rr, buf)
            if v is None:
                continue
            shape, stride, off = v
            if kind == "read":
                outs.append((buf.as_strided(shape, stride, off) * 1.5).reshape(-1))
            elif kind in ("write", "write_from_x", "scale"):
                if not nonoverlap(shape, stride):
                    continue
                tgt = buf.as_strided(shape, stride, off)
                if kind == "write":
                    tgt.copy_(torch.full(shape, 0.25, dtype=D))
                elif kind == "write_from_x":
                    src = x.reshape(-1)[: tgt.numel()].reshape(shape) ** 2
                    tgt.copy_(src)
                else:
                    tgt.mul_(tgt.detach().abs() + 1) if rr.random() < 0.5 else tgt.add_(other.as_strided(shape, stride, off))
            elif kind == "swap":
                buf, other = other, buf
            elif kind == "fresh_buf":
                other[rr.randrange(n)] = buf[rr.randrange(n)] * 3
            elif kind == "view_chain":
                w = buf.view(3, 4).t()[1:, ::2]
                w.add_(buf.view(3, 4).t()[:-1, 1::2].clone())
        outs.append(buf)
        outs.append(other)
        return torch.cat(outs)
    return f

def main(start, count):
    bad = 0
    for seed in range(start, start + count):
        f = build(seed)
        x = torch.randn(12, dtype=D, generator=torch.Generator().manual_seed(seed))
        try:
            J = torch.autograd.functional.jacobian(f, x)
        except Exception as e:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            P = tj.sparsity_pattern(f, x).to_dense()
        miss = (J != 0) & ~P
        extra = P & (J == 0)
        if miss.any():
            bad += 1
            print("seed", seed, "MISS", int(miss.sum()), miss.nonzero()[:3].tolist())
        for mode, cs in (("fwd", None), ("rev", None), ("fwd", 1), ("rev", 1), ("rev", 2)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    S = tj.sparse_jacobian(f, x, mode=mode, chunk_size=cs).to_dense()
                if not torch.allclose(S, J):
                    print("seed", seed, mode, "WRONG")
            except Exception as e:
                print("seed", seed, mode, "raised", str(e)[:120])
    print("done", count, "bad", bad)

main(int(sys.argv[1]), int(sys.argv[2]))
