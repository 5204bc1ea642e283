import math, random, torch
import torch.nn.functional as F
from fuzz import pick, const, idx, match, GENS
D = torch.float64

def g_exotic(rng, S):
    a = pick(rng, S)
    b = rng.randrange(len(S))
    kind = rng.choice(["slice_scatter", "select_scatter", "diagonal_scatter", "block_diag", "cartesian", "combinations",
                       "tril_indices", "bucketize_idx", "embedding_maxnorm", "index_reduce", "take_along_bcast",
                       "as_strided_scatter", "unfold_write", "masked_select", "nonzero_idx", "searchsorted_idx",
                       "flip_write", "narrow_copy", "chunk_write", "unbind_stack", "index_copy_dim", "scatter_2d",
                       "gather_2d_neg", "where_scalar", "clamp_tensor", "roll_multi", "cummax_idx", "repeat_interleave_t",
                       "tensor_split", "hsplit_vstack", "atleast", "kron_const", "diag_mat", "trace", "outer_write",
                       "index_put_2d_bool", "copy_bcast", "fill_diag", "addmv_live", "renorm", "cross", "polar",
                       "cdist_const", "logaddexp", "complex_mul", "put_", "index_fill_dim", "lerp_t", "rot90_write"])
    rv_seed = rng.randrange(1 << 30)

    def step(env):
        t = env[a].reshape(-1)
        g = env[b].reshape(-1)
        n = t.numel()
        r = random.Random(rv_seed)
        if kind == "slice_scatter":
            z = torch.zeros(n + 3, dtype=D)
            return torch.slice_scatter(z, t, 0, 1, n + 1)
        if kind == "select_scatter":
            M = t[: (n // 2) * 2].reshape(2, -1)
            return torch.select_scatter(M, M[1] * 3, 0, 0)
        if kind == "diagonal_scatter":
            k = int(math.isqrt(n))
            M = t[: k * k].reshape(k, k)
            return torch.diagonal_scatter(M, M.diagonal().exp(), 0)
        if kind == "block_diag":
            return torch.block_diag(t[:2].reshape(1, 2), t[-3:].reshape(3, 1))
        if kind == "cartesian":
            return torch.cartesian_prod(t[:3], t[-2:]).prod(-1)
        if kind == "combinations":
            return torch.combinations(t[:4], 2).prod(-1)
        if kind == "tril_indices":
            k = int(math.isqrt(n))
            M = t[: k * k].reshape(k, k)
            i = torch.tril_indices(k, k, -1)
            return M[i[0], i[1]]
        if kind == "bucketize_idx":
            bnd = torch.linspace(-1, 1, 4, dtype=D)
            i = torch.bucketize(t.detach(), bnd)
            return t[i.clamp(max=n - 1)] * t
        if kind == "embedding_maxnorm":
            W = t[: (n // 2) * 2].reshape(-1, 2).clone()
            return F.embedding(torch.tensor([0, 0, W.shape[0] - 1]), W, max_norm=0.5).reshape(-1)
        if kind == "index_reduce":
            out = torch.ones(4, dtype=D)
            return out.index_reduce(0, idx(r, 4, 5, neg=False), t[:5] if n >= 5 else t.repeat(5)[:5], "amax", include_self=False)
        if kind == "take_along_bcast":
            M = t[: (n // 2) * 2].reshape(2, -1)
            i = torch.tensor([[0], [M.shape[1] - 1]])
            return torch.take_along_dim(M, i, dim=1)
        if kind == "as_strided_scatter":
            z = torch.zeros(n + 2, dtype=D)
            m = n // 2
            return torch.as_strided_scatter(z, t[:m].reshape(m), (m,), (2,), 1) if m else z
        if kind == "unfold_write":
            y = t.clone()
            u = y.unfold(0, 2, 2)
            u[:, 0] = u[:, 1] * 2
            return y
        if kind == "masked_select":
            mask = const(random.Random(5), (n,), 0.5) != 0
            return torch.masked_select(t, mask) * 2
        if kind == "nonzero_idx":
            i = (t > 0).nonzero().reshape(-1)
            return t[i].sum() * t
        if kind == "searchsorted_idx":
            s = torch.sort(t).values
            i = torch.searchsorted(s, g[:3])
            return s[i.clamp(max=n - 1)] + g[:3]
        if kind == "flip_write":
            y = t.clone()
            y.flip(0)  # not a view: no-op
            y[1:] = y[:-1].flip(0)
            return y
        if kind == "narrow_copy":
            return t.narrow_copy(0, n // 3, n - n // 3) * 1.0
        if kind == "chunk_write":
            y = t.clone()
            c = y.chunk(3)
            c[-1].copy_(c[0][: c[-1].numel()] * 2)
            return y
        if kind == "unbind_stack":
            M = t[: (n // 2) * 2].reshape(2, -1)
            u0, u1 = M.unbind(0)
            return torch.stack([u1, u0 * u1])
        if kind == "index_copy_dim":
            M = t[: (n // 2) * 2].reshape(2, -1).clone()
            return M.index_copy(1, torch.tensor([0]), M[:, -1:] * 2)
        if kind == "scatter_2d":
            M = torch.zeros(3, 3, dtype=D)
            i = torch.tensor([[0, 1, 2], [2, 2, 0]])
            return M.scatter_add(0, i, t[:6].reshape(2, 3) if n >= 6 else t.repeat(6)[:6].reshape(2, 3))
        if kind == "gather_2d_neg":
            M = t[: (n // 2) * 2].reshape(2, -1)
            return M[:, [-1, 0, -1]]
        if kind == "where_scalar":
            return torch.where(t > 0, t, 0.0)
        if kind == "clamp_tensor":
            return torch.clamp(t, min=g[:1], max=g[:1] + 1)
        if kind == "roll_multi":
            M = t[: (n // 2) * 2].reshape(2, -1)
            return torch.roll(M, (1, -1), (0, 1))
        if kind == "cummax_idx":
            v, i = t.cummax(0)
            return t[i] * v
        if kind == "repeat_interleave_t":
            return t[:3].repeat_interleave(torch.tensor([2, 0, 1]))
        if kind == "tensor_split":
            parts = torch.tensor_split(t, [1, n // 2])
            return torch.cat([parts[2], parts[0] * 2, parts[1]])
        if kind == "hsplit_vstack":
            M = t[: (n // 2) * 2].reshape(2, -1)
            return torch.vstack(torch.hsplit(M, M.shape[1]) if M.shape[1] else [M])
        if kind == "atleast":
            return torch.atleast_3d(t[0]) * t
        if kind == "kron_const":
            return torch.kron(torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=D), t[:4].reshape(2, 2) if n >= 4 else t.repeat(4)[:4].reshape(2, 2))
        if kind == "diag_mat":
            return torch.diag(torch.diag(t[:4]) + 1)
        if kind == "trace":
            k = int(math.isqrt(n))
            return torch.trace(t[: k * k].reshape(k, k)) * t
        if kind == "outer_write":
            M = torch.zeros(3, 3, dtype=D)
            M[1:, :2] = torch.outer(t[:2], t[-2:])
            return M
        if kind == "index_put_2d_bool":
            M = t[: (n // 2) * 2].reshape(2, -1).clone()
            mask = torch.zeros_like(M, dtype=torch.bool)
            mask[0, -1] = True
            M[mask] = M[1, :1] * 5
            return M
        if kind == "copy_bcast":
            M = torch.zeros(3, n, dtype=D)
            M.copy_(t)
            return M
        if kind == "fill_diag":
            k = int(math.isqrt(n))
            M = t[: k * k].reshape(k, k).clone()
            return M.fill_diagonal_(0.5)
        if kind == "addmv_live":
            k = int(math.isqrt(n))
            M = t[: k * k].reshape(k, k)
            return torch.addmv(t[:k], M, g[:k] if g.numel() >= k else t[:k])
        if kind == "renorm":
            return torch.renorm(t[: (n // 2) * 2].reshape(2, -1), 2, 0, 1.0)
        if kind == "cross":
            return torch.linalg.cross(t[:3], t[-3:]) if n >= 3 else t
        if kind == "polar":
            return torch.view_as_real(torch.polar(t.abs() + 1, t)).reshape(-1)
        if kind == "cdist_const":
            return torch.cdist(t[: (n // 2) * 2].reshape(-1, 2), torch.zeros(1, 2, dtype=D)).reshape(-1)
        if kind == "logaddexp":
            return torch.logaddexp(t, match(g, t.shape))
        if kind == "complex_mul":
            z = torch.complex(t, match(g, t.shape))
            return (z * z.conj().roll(1)).real
        if kind == "put_":
            y = torch.zeros(n, dtype=D)
            return y.put(idx(r, n, 4), t[:4] if n >= 4 else t.repeat(4)[:4], accumulate=True)
        if kind == "index_fill_dim":
            M = t[: (n // 2) * 2].reshape(2, -1)
            return M.index_fill(1, torch.tensor([0, -1]), 0.0)
        if kind == "lerp_t":
            return torch.lerp(t, match(g, t.shape), t.sigmoid())
        if kind == "rot90_write":
            k = int(math.isqrt(n))
            M = t[: k * k].reshape(k, k).clone()
            M[0] = torch.rot90(M, 1)[0]
            return M
        raise AssertionError(kind)

    return "exotic_" + kind, step

GENS.append((g_exotic, 10))
