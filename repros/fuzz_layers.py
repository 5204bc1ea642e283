"""Fuzz param_jacobian / ntk / gramian / JacobianOperator on less-common layers.

Run: PYTHONPATH=src:tests python repros/fuzz_layers.py [n_seeds] [first_seed]
"""

from __future__ import annotations

import copy
import random
import sys
import traceback
import warnings

import torch
import torch.nn.functional as F
from fuzz_invariants import Snapshot
from torch import Tensor, nn
from torch.func import functional_call

import torchjac as tj
from torchjac._engine.core.fast import fast_paths

torch.set_num_threads(1)
warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------- models
class Twice(nn.Module):  # weight sharing: same Linear called twice
    def __init__(self, d, bias):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=bias)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class Tied(nn.Module):  # tied weights: the decoder uses the encoder's weight transposed
    def __init__(self, d, h):
        super().__init__()
        self.enc = nn.Linear(d, h)
        self.b2 = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.b2)


class TiedEmb(nn.Module):
    def __init__(self, v, d, pad):
        super().__init__()
        self.emb = nn.Embedding(v, d, padding_idx=pad)
        self.head = nn.Linear(d, v, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx))).sum(1)


class Matmul(nn.Module):  # parameters used through `@` in a functional forward
    def __init__(self, d, h, frozen):
        super().__init__()
        self.W = nn.Parameter(torch.randn(d, h) / d**0.5)
        self.b = nn.Parameter(torch.randn(h))
        self.V = nn.Parameter(torch.randn(h, 3) / h**0.5)
        if frozen:
            self.b.requires_grad_(False)

    def forward(self, x):
        return torch.sin(x @ self.W + self.b) @ self.V


class MHA(nn.Module):
    def __init__(self, e, heads, batch_first, bias, kdim):
        super().__init__()
        self.bf = batch_first
        self.att = nn.MultiheadAttention(
            e, heads, batch_first=batch_first, bias=bias, kdim=kdim, vdim=kdim
        )
        self.kproj = nn.Linear(e, kdim) if kdim is not None else None
        self.out = nn.Linear(e, 2)

    def forward(self, x):  # x [B, T, E]
        q = x if self.bf else x.transpose(0, 1)
        k = q if self.kproj is None else self.kproj(q)
        y, _ = self.att(q, k, k, need_weights=False)
        if not self.bf:
            y = y.transpose(0, 1)
        return self.out(y).mean(1)


class SDPA(nn.Module):
    def __init__(self, e, causal):
        super().__init__()
        self.qkv = nn.Linear(e, 3 * e)
        self.causal = causal
        self.o = nn.Linear(e, 2, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(y).flatten(1)


class Fc(nn.Module):
    """functional_call-style forward: explicit F.conv / F.linear on own params."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, c, 3) * 0.3)
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        h = F.conv1d(x, self.w, padding=1).relu().mean(-1)
        return functional_call(self.lin, {"weight": self.lin.weight * 1.0}, (h,))


def build(rng: random.Random):
    """(name, model, make_input(B) -> Tensor, float input?)"""
    kind = rng.choice(
        [
            "conv1d",
            "conv3d",
            "convT1d",
            "convT2d",
            "embed",
            "norm",
            "mha",
            "sdpa",
            "flat",
            "twice",
            "tied",
            "tiedemb",
            "matmul",
            "fc",
            "width1",
            "conv2d_cl",
            "seqfirst",
            "transformer",
            "convT_groups",
            "table",
            "norm2d",
        ]
    )
    r = rng.randint
    bias = rng.random() < 0.7
    if kind == "conv1d":
        g = rng.choice([1, 2])
        c = 2 * r(1, 2)
        o = g * r(1, 2)
        L = r(4, 7)
        conv = nn.Conv1d(
            c, o, r(1, 3), stride=r(1, 2), padding=r(0, 2), dilation=r(1, 2), groups=g, bias=bias
        )
        try:
            out_len = conv(torch.zeros(1, c, L)).shape[-1]
        except RuntimeError:
            return build(rng)
        m = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(o * out_len, 2))
        return kind, m, lambda B: torch.randn(B, c, L), True
    if kind == "conv3d":
        c = r(1, 2)
        conv = nn.Conv3d(c, 2, r(1, 2), stride=r(1, 2), padding=r(0, 1), bias=bias)
        S = 3
        n = conv(torch.zeros(1, c, S, S, S)).numel()
        m = nn.Sequential(conv, nn.Sigmoid(), nn.Flatten(), nn.Linear(n, 2))
        return kind, m, lambda B: torch.randn(B, c, S, S, S), True
    if kind in ("convT1d", "convT2d"):
        g = rng.choice([1, 2])
        c = g * r(1, 2)
        o = g * r(1, 2)
        stride = r(1, 3)
        dil = r(1, 2)
        op = r(0, max(stride, dil) - 1)
        cls = nn.ConvTranspose1d if kind == "convT1d" else nn.ConvTranspose2d
        conv = cls(
            c,
            o,
            r(1, 3),
            stride=stride,
            padding=r(0, 1),
            output_padding=op,
            groups=g,
            dilation=dil,
            bias=bias,
        )
        shape = (c, 3) if kind == "convT1d" else (c, 2, 3)
        try:
            n = conv(torch.zeros(1, *shape)).numel()
        except RuntimeError:
            return build(rng)
        if n == 0:
            return build(rng)
        m = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n, 2))
        return kind, m, lambda B: torch.randn(B, *shape), True
    if kind == "embed":
        v = r(3, 6)
        d = r(1, 3)
        pad = rng.choice([None, 0, v - 1])
        T = r(1, 4)
        emb = nn.Embedding(v, d, padding_idx=pad, scale_grad_by_freq=rng.random() < 0.3)
        m = nn.Sequential(emb, nn.Flatten(), nn.Tanh(), nn.Linear(T * d, 2))
        return kind, m, lambda B: torch.randint(0, v, (B, T)), False
    if kind == "norm":
        which = rng.choice(["ln", "gn", "bn_eval", "bn1d_eval", "ln_noaffine", "bn_train"])
        C, L = 4, 3
        if which == "ln":
            nrm = nn.LayerNorm([C, L], elementwise_affine=True, bias=bias)
        elif which == "ln_noaffine":
            nrm = nn.LayerNorm(L, elementwise_affine=False)
        elif which == "gn":
            nrm = nn.GroupNorm(rng.choice([1, 2, 4]), C, affine=True)
        elif which == "bn_eval":
            nrm = nn.BatchNorm1d(C).eval()
            nrm.running_mean.normal_()
            nrm.running_var.uniform_(0.5, 2)
            nrm.weight.data.normal_()
            nrm.bias.data.normal_()
        elif which == "bn1d_eval":
            nrm = nn.BatchNorm1d(C, affine=bias).eval()
            nrm.running_mean.normal_()
        else:
            nrm = nn.BatchNorm1d(C)
        m = nn.Sequential(nn.Conv1d(2, C, 1), nrm, nn.Tanh(), nn.Flatten(), nn.Linear(C * L, 2))
        return kind + ":" + which, m, lambda B: torch.randn(B, 2, L), True
    if kind == "mha":
        e = rng.choice([2, 4])
        h = rng.choice([1, 2])
        kdim = rng.choice([None, 3])
        m = MHA(e, h, rng.random() < 0.5, bias, kdim)
        T = r(1, 3)
        return kind, m, lambda B: torch.randn(B, T, e), True
    if kind == "sdpa":
        e = rng.choice([2, 3])
        m = SDPA(e, rng.random() < 0.5)
        T = r(1, 3)
        return kind, m, lambda B: torch.randn(B, T, e), True
    if kind == "flat":
        m = nn.Sequential(
            nn.Linear(6, 6, bias=bias),
            nn.Unflatten(1, (2, 3)),
            nn.Conv1d(2, 2, 2),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(4, 3),
        )
        return kind, m, lambda B: torch.randn(B, 6), True
    if kind == "twice":
        d = r(1, 3)
        return kind, Twice(d, bias), lambda B: torch.randn(B, d), True
    if kind == "tied":
        d, h = r(1, 3), r(1, 3)
        m = Tied(d, h)
        return kind, m, lambda B: torch.randn(B, d), True
    if kind == "tiedemb":
        v, d = r(3, 5), r(1, 3)
        m = TiedEmb(v, d, rng.choice([None, 1]))
        T = r(1, 4)
        return kind, m, lambda B: torch.randint(0, v, (B, T)), False
    if kind == "matmul":
        d, h = r(1, 3), r(1, 4)
        return kind, Matmul(d, h, rng.random() < 0.5), lambda B: torch.randn(B, d), True
    if kind == "fc":
        c = r(1, 2)
        return kind, Fc(c), lambda B: torch.randn(B, c, 4), True
    if kind == "width1":
        m = nn.Sequential(
            nn.Linear(r(1, 2), 1, bias=bias), nn.Tanh(), nn.Linear(1, 1), nn.SiLU(), nn.Linear(1, 2)
        )
        d = m[0].in_features
        return kind, m, lambda B: torch.randn(B, d), True
    if kind == "conv2d_cl":
        g = rng.choice([1, 2])
        conv = nn.Conv2d(2, 2 * r(1, 2), r(1, 2), padding=r(0, 1), groups=g, bias=bias)
        n = conv(torch.zeros(1, 2, 3, 3)).numel()
        m = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n, 2))
        if rng.random() < 0.5:
            m = m.to(memory_format=torch.channels_last)
        return kind, m, lambda B: torch.randn(B, 2, 3, 3), True
    if kind == "seqfirst":
        T = rng.choice([1, 2, 3])
        pre = rng.choice(["none", "sort", "cumsum"])

        class SeqFirst(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(3, 2, bias=bias)
                self.c = nn.Conv1d(2, 2, 1)

            def forward(self, x):  # [B, T, 3]
                if pre == "sort":
                    x = x.sort(-1)[0]
                elif pre == "cumsum":
                    x = x.cumsum(-1)
                h = self.lin(x.transpose(0, 1))  # [T, B, 2]
                h = self.c(h.permute(1, 2, 0))  # [B, 2, T]
                return h.flatten(1)

        return f"{kind}:{pre}:T={T}", SeqFirst(), lambda B: torch.randn(B, T, 3), True
    if kind == "transformer":
        T = rng.choice([1, 2, 3])
        bf = rng.random() < 0.5
        layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=bf).eval()

        class Tr(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer = layer
                self.head = nn.Linear(4, 1)

            def forward(self, x):
                h = x if bf else x.transpose(0, 1)
                h = self.layer(h)
                h = h if bf else h.transpose(0, 1)
                return self.head(h).flatten(1)

        return f"{kind}:bf={bf}:T={T}", Tr(), lambda B: torch.randn(B, T, 4), True
    if kind == "convT_groups":
        conv = nn.ConvTranspose2d(4, 2, (2, 3), stride=(2, 1), padding=(0, 1), groups=2, bias=bias)
        n = conv(torch.zeros(1, 4, 2, 2)).numel()
        m = nn.Sequential(conv, nn.ELU(), nn.Flatten(), nn.Linear(n, 2))
        return kind, m, lambda B: torch.randn(B, 4, 2, 2), True
    if kind == "norm2d":
        which = rng.choice(["ln", "gn", "bn", "in"])
        if which == "ln":
            nrm = nn.LayerNorm([4, 3, 3])
        elif which == "gn":
            nrm = nn.GroupNorm(rng.choice([1, 2, 4]), 4, affine=rng.random() < 0.8)
        elif which == "bn":
            nrm = nn.BatchNorm2d(4).eval()
            nrm.running_mean.normal_()
        else:
            nrm = nn.InstanceNorm2d(4, affine=True)
        m = nn.Sequential(
            nn.Conv2d(2, 4, rng.choice([1, 3]), padding="same", bias=bias),
            nrm,
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(36, 2),
        )
        if rng.random() < 0.6:
            m = m.to(memory_format=torch.channels_last)
        return f"{kind}:{which}", m, lambda B: torch.randn(B, 2, 3, 3), True
    if kind == "table":
        how = rng.choice(["rows", "sum", "flip", "mean_emb"])

        class Table(nn.Module):
            def __init__(self, rows):
                super().__init__()
                self.lin = nn.Linear(3, 3, bias=bias)
                self.emb = nn.Embedding(4, 3)
                self.out = nn.Linear(3, 2)
                self.register_buffer("table", torch.randn(rows, 3))
                self.register_buffer("ids", torch.randint(0, 4, (rows,)))

            def forward(self, x):
                z = self.lin(self.table)
                if how == "sum":
                    z = z.sum(0)
                elif how == "flip":
                    z = z.flip(0)
                elif how == "mean_emb":
                    z = z + self.emb(self.ids).mean(0)
                return self.out(torch.tanh(z + x))

        # one table row per sample: the batch is always 3 (run_case)
        return f"{kind}:{how}", Table(3), lambda B: torch.randn(3, 3), True
    raise AssertionError(kind)


def layout(x: Tensor, how: str) -> Tensor:
    if how == "plain":
        return x
    if how == "noncontig":
        if x.dim() < 2:
            return x
        big = torch.empty(*x.shape[:-1], x.shape[-1] * 2, dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if how == "transposed":
        if x.dim() < 2:
            return x
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        return x
    if how == "expanded":
        return x[:1].expand_as(x)
    if how == "view":
        big = torch.cat([x, x.flip(0) + 1], 0)
        return big[: x.shape[0]] if x.shape[0] else x
    if how == "offset":
        big = torch.cat([x[:1] * 3, x], 0)
        return big[1:]
    raise AssertionError(how)


# ----------------------------------------------------------------------------- oracles
def trainable(model, params):
    if params is not None:
        return params
    return [n for n, p in model.named_parameters() if p.requires_grad]


def oracle_jac(model64, x64, names):
    """Row by row: autograd.grad of each output element (float64, buffers cloned)."""
    ps = dict(model64.named_parameters())
    bufs = {n: b.clone() for n, b in model64.named_buffers()}
    P = {n: ps[n].detach().clone().requires_grad_(True) for n in names}
    out = functional_call(model64, {**P, **bufs}, (x64,), strict=False)
    flat = out.reshape(-1)
    rows = {n: [] for n in names}
    for i in range(flat.numel()):
        gs = torch.autograd.grad(flat[i], list(P.values()), retain_graph=True, allow_unused=True)
        for n, g in zip(names, gs):
            rows[n].append(torch.zeros_like(P[n]) if g is None else g)
    return {n: torch.stack(rows[n]).reshape(*out.shape, *P[n].shape) for n in names}


def ntk_oracle(j1, j2, out1, out2):
    k = 0
    for n in j1:
        a = j1[n].reshape(out1.numel(), -1)
        b = j2[n].reshape(out2.numel(), -1)
        k = k + a @ b.T
    return k.reshape(*out1.shape, *out2.shape)


def close(got, want, dtype, what):
    rtol, atol = (1e-7, 1e-8) if dtype == torch.float64 else (2e-3, 2e-4)
    g = got.detach().to(torch.float64)
    if g.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(g.shape)} != {tuple(want.shape)}")
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    err = float((g - want).abs().max()) if want.numel() else 0.0
    if not err <= atol * scale + rtol * float(want.abs().max() if want.numel() else 0):
        raise AssertionError(f"{what}: max err {err:.3e} (scale {scale:.3e})")


def checked(model, owned, call):
    snap = Snapshot.take(model, owned)
    state = torch.get_rng_state()
    res = call()
    ch = snap.changes()
    al = snap.aliases(res)
    if ch:
        raise AssertionError("state changes: " + "; ".join(ch))
    if al:
        raise AssertionError("aliases: " + "; ".join(al))
    assert torch.equal(state, torch.get_rng_state())
    return res


DONE: dict[str, int] = {}


def run_case(seed: int, fast: bool) -> list[str]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    name, model, make_x, float_in = build(rng)
    dtype = rng.choice([torch.float32, torch.float64])
    model = model.to(dtype)
    train_bn = name.endswith("bn_train")
    if rng.random() < 0.2 and not name.startswith("norm"):
        # freeze a random parameter
        ps = list(model.named_parameters())
        ps[rng.randrange(len(ps))][1].requires_grad_(False)
    if rng.random() < 0.3:
        # non-contiguous parameters (same values, transposed or padded storage)
        for p in model.parameters():
            if p.dim() >= 2 and rng.random() < 0.5:
                p.data = p.data.transpose(0, -1).contiguous().transpose(0, -1)
            elif p.dim() == 1 and rng.random() < 0.5:
                big = torch.zeros(p.numel() * 2, dtype=p.dtype)
                big[::2] = p.data
                p.data = big[::2]
    if rng.random() < 0.3:
        # give some params a .grad
        for p in model.parameters():
            p.grad = torch.randn_like(p)
    B = 3 if name.startswith("table") else rng.choice([1, 1, 2, 3])
    x = make_x(B)
    if float_in:
        x = x.to(dtype)
    how = rng.choice(
        ["plain", "noncontig", "transposed", "channels_last", "expanded", "view", "offset"]
    )
    x = layout(x, how)
    names = trainable(model, None)
    if not names:
        return []
    if rng.random() < 0.25 and len(names) > 1:
        sub = rng.sample(names, rng.randint(1, len(names)))
        sub = [n for n in names if n in sub]
        params = sub
        if rng.random() < 0.5:
            named = dict(model.named_parameters())
            params_obj = [named[n] for n in sub]
        else:
            params_obj = None
    else:
        params = None
        params_obj = None
    use = params if params is not None else names
    model64 = copy.deepcopy(model).double()
    x64 = x.double() if float_in else x.clone()
    errors = []
    tag = f"seed={seed} {name} {dtype} B={B} x={how} fast={fast} params={params}"
    owned = {"x": x}
    with fast_paths(fast):
        want = oracle_jac(model64, x64, use)
        out = functional_call(
            model64, {n: b.clone() for n, b in model64.named_buffers()}, (x64,), strict=False
        )

        def attempt(what, fn):
            try:
                fn()
                DONE[what.split(" ")[0]] = DONE.get(what.split(" ")[0], 0) + 1
            except AssertionError as e:
                errors.append(f"{tag} [{what}] {e}")
            except Exception as e:
                if train_bn and isinstance(e, tj.BatchCouplingError):
                    return
                if name.startswith("table") and "does not follow the batch" in str(e):
                    return  # a refusal: one sample alone cannot read its row of the table
                errors.append(f"{tag} [{what}] EXC {type(e).__name__}: {str(e)[:300]}")

        def pj(batch_dim):
            def go():
                if train_bn and batch_dim is not None and B > 1:
                    try:
                        checked(
                            model,
                            owned,
                            lambda: tj.param_jacobian(model, x, params=params, batch_dim=batch_dim),
                        )
                    except tj.BatchCouplingError:
                        return
                    raise AssertionError("train BN: no BatchCouplingError")
                res = checked(
                    model,
                    owned,
                    lambda: tj.param_jacobian(
                        model, x, params=params_obj or params, batch_dim=batch_dim
                    ),
                )
                assert list(res) == list(want), f"keys {list(res)} != {list(want)}"
                for n in want:
                    close(res[n], want[n], dtype, f"param_jacobian bd={batch_dim} {n}")
                # write into the result, recheck the model
                snap = Snapshot.take(model, owned)
                for t in res.values():
                    t.add_(1.0)
                assert not snap.changes(), "writing into the result changed the model"

            attempt(f"param_jacobian bd={batch_dim}", go)

        pj(None)
        pj(0)

        def ntk_go():
            if train_bn and B > 1:
                return
            k = checked(model, owned, lambda: tj.ntk(model, x, params=params))
            close(k, ntk_oracle(want, want, out, out), dtype, "ntk(x)")
            x2 = make_x(2)
            if float_in:
                x2 = x2.to(dtype)
            x2 = layout(x2, rng.choice(["plain", "noncontig", "expanded"]))
            want2 = oracle_jac(model64, x2.double() if float_in else x2, use)
            out2 = functional_call(
                model64,
                {n: b.clone() for n, b in model64.named_buffers()},
                (x2.double() if float_in else x2,),
                strict=False,
            )
            k2 = checked(
                model, {"x": x, "x2": x2}, lambda: tj.ntk(model, x, x2, params=params_obj or params)
            )
            close(k2, ntk_oracle(want, want2, out, out2), dtype, "ntk(x, x2)")

        attempt("ntk", ntk_go)

        def gram_go():
            ps = dict(model.named_parameters())
            plist = [ps[n] for n in use]
            y = model(x)
            losses = y.pow(2).flatten(1).sum(1) if y.dim() > 1 else y.pow(2)
            g = checked(model, owned, lambda: tj.gramian(losses, plist, allow_unused=True))
            Jl = torch.cat(
                [
                    torch.einsum(
                        "bo,bop->bp", 2 * out.reshape(B, -1), want[n].reshape(B, out[0].numel(), -1)
                    )
                    for n in use
                ],
                1,
            )
            close(g, Jl @ Jl.T, dtype, "gramian(losses)")
            y = model(x)
            g2 = checked(model, owned, lambda: tj.gramian(y, plist, allow_unused=True))
            Jf = torch.cat([want[n].reshape(out.numel(), -1) for n in use], 1)
            close(g2, (Jf @ Jf.T).reshape(*out.shape, *out.shape), dtype, "gramian(y)")

        if not train_bn:
            attempt("gramian", gram_go)

        def op_go():
            Jop = checked(
                model, owned, lambda: tj.JacobianOperator.from_module(model, x, params=params)
            )
            Jf = torch.cat([want[n].reshape(out.numel(), -1) for n in use], 1)
            m, n_ = Jf.shape
            assert Jop.shape == (m, n_), f"shape {Jop.shape} != {(m, n_)}"
            D = checked(model, owned, Jop.to_dense)
            close(D, Jf, dtype, "op.to_dense")
            v = torch.randn(n_, dtype=dtype)
            close(checked(model, owned, lambda: Jop @ v), Jf @ v.double(), dtype, "op @ v")
            V = torch.randn(3, n_, dtype=dtype).T
            close(checked(model, owned, lambda: Jop @ V), Jf @ V.double(), dtype, "op @ V")
            u = torch.randn(m, dtype=dtype)
            close(checked(model, owned, lambda: Jop.T @ u), Jf.T @ u.double(), dtype, "op.T @ u")
            U = torch.randn(m, 2, dtype=dtype)
            close(checked(model, owned, lambda: Jop.T @ U), Jf.T @ U.double(), dtype, "op.T @ U")
            close(
                checked(model, owned, lambda: Jop.gram() @ u),
                Jf @ (Jf.T @ u.double()),
                dtype,
                "gram @ u",
            )
            # data=
            by_freq = any(getattr(q, "scale_grad_by_freq", False) for q in model.modules())
            per_item = B >= 2 and not train_bn and not by_freq  # by_freq: counts are per item
            if per_item and not name.startswith("table"):  # a table needs the whole batch
                data = [x[:1], x[1:]]
                Jd = checked(
                    model,
                    owned,
                    lambda: tj.JacobianOperator.from_module(model, params=params, data=data),
                )
                close(checked(model, owned, Jd.to_dense), Jf, dtype, "op(data).to_dense")
                close(
                    checked(model, owned, lambda: Jd.T @ u),
                    Jf.T @ u.double(),
                    dtype,
                    "op(data).T @ u",
                )

        attempt("operator", op_go)

        def input_go():
            m64 = copy.deepcopy(model64)
            bufs = {n: b.clone() for n, b in m64.named_buffers()}

            def f64(z):
                return functional_call(m64, bufs, (z,), strict=False)

            full = torch.func.jacrev(f64)(x64)  # [*out, *x]
            nb = out.shape[0]
            o_rest, x_rest = out.shape[1:], x.shape[1:]
            fm = full.reshape(nb, out[0].numel(), nb, x[0].numel())
            diag = torch.stack([fm[i, :, i] for i in range(nb)]).reshape(nb, *o_rest, *x_rest)
            flat = full.reshape(out.numel(), x.numel())

            def fwd(z):
                return model(z)

            got = checked(model, owned, lambda: tj.jacobian(fwd, x, batch_dim=0))
            close(got, diag, dtype, "jacobian(model, x, batch_dim=0)")
            got = checked(model, owned, lambda: tj.jacobian(fwd, x))
            close(got, full, dtype, "jacobian(model, x)")
            xl = x.detach().clone().requires_grad_(True)
            y = model(xl)
            own2 = {"x": x, "xl": xl, "y": y}
            got = checked(model, own2, lambda: tj.jac(y, xl, batch_dim=0, retain_graph=True))
            close(got, diag, dtype, "jac(y, x, batch_dim=0)")
            d = diag.reshape(nb, out[0].numel(), x[0].numel())
            g = checked(model, own2, lambda: tj.gramian(y, xl, batch_dim=0, retain_graph=True))
            want_g = (d @ d.transpose(1, 2)).reshape(nb, *o_rest, *o_rest)
            close(g, want_g, dtype, "gramian(y, x, batch_dim=0)")
            g = checked(model, own2, lambda: tj.gramian(y, xl))
            close(g, (flat @ flat.T).reshape(*out.shape, *out.shape), dtype, "gramian(y, x)")
            J = checked(model, owned, lambda: tj.JacobianOperator(fwd, x))
            v = torch.randn(x.numel(), dtype=dtype)
            u = torch.randn(out.numel(), dtype=dtype)
            close(checked(model, owned, lambda: J @ v), flat @ v.double(), dtype, "Jx @ v")
            close(checked(model, owned, lambda: J.T @ u), flat.T @ u.double(), dtype, "Jx.T @ u")
            close(checked(model, owned, J.to_dense), flat, dtype, "Jx.to_dense")
            Jb = checked(model, owned, lambda: tj.JacobianOperator(fwd, x, batch_dim=0))
            close(checked(model, owned, Jb.to_dense), flat, dtype, "Jx(batch_dim).to_dense")

        if float_in and not train_bn:
            attempt("input", input_go)

        def unbatched_go():
            x1 = x[0]
            try:
                with torch.no_grad():
                    copy.deepcopy(model)(x1)
            except Exception:
                return
            want1 = oracle_jac(model64, x64[0], use)
            res = checked(model, {"x1": x1}, lambda: tj.param_jacobian(model, x1, params=params))
            for n in want1:
                close(res[n], want1[n], dtype, f"param_jacobian(unbatched) {n}")
            Jop = tj.JacobianOperator.from_module(model, x1, params=params)
            rows = want1[use[0]].reshape(-1, want1[use[0]][...].numel()).shape[0]
            m1 = int(functional_call(model64, {}, (x64[0],), strict=False).numel())
            Jf = torch.cat([want1[n].reshape(m1, -1) for n in use], 1)
            del rows
            close(checked(model, {"x1": x1}, Jop.to_dense), Jf, dtype, "op(unbatched).to_dense")
            v = torch.randn(Jf.shape[1], dtype=dtype)
            close(checked(model, {"x1": x1}, lambda: Jop @ v), Jf @ v.double(), dtype, "op1 @ v")

        if not train_bn:
            attempt("unbatched", unbatched_go)
    return errors


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    count = 0
    fails = 0
    for seed in range(first, first + n):
        for fast in (True, False):
            try:
                errs = run_case(seed, fast)
            except Exception:
                errs = [f"seed={seed} fast={fast} HARNESS " + traceback.format_exc()[-600:]]
            count += 1
            for e in errs:
                fails += 1
                print(e, flush=True)
    print(f"cases={count} failures={fails} passed checks per front door: {DONE}")


if __name__ == "__main__":
    main()
