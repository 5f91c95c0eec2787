"""The fast path of the scratch recurrent cells: one time loop forward and one backward, with the
backpropagation through time written out by hand.

Why by hand. The course's equations, run step by step under autograd, record a dozen small
operators per time step (two matmuls, sigmoids, products, sums, chunks), and the backward pass
replays a node for each of them, each with its Python and dispatcher overhead and a fresh
tensor. With a batch of 32 and 256 hidden units the arithmetic per operator is tiny, so that
overhead, not the FLOPs, sets the speed. Here each network is a ``torch.autograd.Function``:

* forward: every gate of a step comes from *one* ``addmm`` of the previous hidden state with the
  gates' fused hidden weights (``[W_hi|W_hf|W_ho|W_hc]`` for the LSTM), written straight into a
  preallocated ``(T, B, G·H)`` buffer; the nonlinearities run in place on slices of it
  (the sigmoid gates sit side by side, so one ``sigmoid_`` covers them all);
* backward: the textbook BPTT recurrences, per step only the elementwise gate derivatives and
  one matmul ``dA_t W_h^T`` for the gradient flowing to ``H_{t-1}``; the weight gradient
  ``Σ_t H_{t-1}^T dA_t`` is *one* matmul over all steps at the end, as is the input projection's
  (which stays outside, under autograd: ``xp = X W_x + b`` for all steps at once).

The inputs are the pre-computed input terms ``xp`` (``(T, B, G·H)``), the fused hidden weights
and the initial state; the reverse direction of a bidirectional layer flips ``xp`` in time before
and the outputs after. The parity tests compare these against the course's equations (the
cells' ``reference`` methods) and against ``nn.RNN``/``nn.GRU``/``nn.LSTM``, values and
gradients, on random inputs.

The gate derivatives used below, with ``s = σ(a)`` and ``u = tanh(a)``:
``ds/da = s (1 − s)`` and ``du/da = 1 − u²``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _prev(h0: Tensor, out: Tensor) -> Tensor:
    """``H_{t-1}`` for every step: ``(T, B, H)``, the initial state first."""
    return torch.cat([h0.unsqueeze(0), out[:-1]])


def _weight_grad(prev: Tensor, dA: Tensor) -> Tensor:
    """``Σ_t H_{t-1}^T dA_t`` in one matmul: the hidden weights' gradient over all steps."""
    return prev.reshape(-1, prev.shape[-1]).t() @ dA.reshape(-1, dA.shape[-1])


def _hidden_grads(dout: Tensor | None, dhT: Tensor | None, out: Tensor) -> Tensor:
    """A ``(T, B, H)`` buffer holding what reaches each ``H_t`` from outside the recurrence (the
    outputs' gradient, plus the final state's at ``T − 1``). The backward loop adds the
    recurrent part into ``dH[t − 1]`` (an in-place ``addmm_``) before it reads it."""
    dH = torch.zeros_like(out) if dout is None else dout.clone()
    if dhT is not None:
        dH[-1].add_(dhT)
    return dH


def _carry(dH: Tensor, t: int, h0: Tensor) -> Tensor:
    """Where step ``t``'s gradient to ``H_{t-1}`` goes: ``dH[t − 1]``, or a fresh buffer for
    the initial state."""
    return dH[t - 1] if t else torch.zeros_like(h0)


class RNNScan(torch.autograd.Function):
    """``H_t = φ(xp_t + H_{t-1} W_hh)`` for all ``t``; returns ``(outputs (T, B, H), H_T)``."""

    @staticmethod
    def forward(ctx: Any, xp: Tensor, W_hh: Tensor, h0: Tensor, relu: bool) -> Any:
        out = torch.empty_like(xp)
        h = h0
        for t in range(xp.shape[0]):
            ht = out[t]
            torch.addmm(xp[t], h, W_hh, out=ht)
            ht.relu_() if relu else ht.tanh_()
            h = ht
        ctx.save_for_backward(W_hh, h0, out)
        ctx.relu = relu
        return out, out[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor | None, dhT: Tensor | None) -> Any:
        W_hh, h0, out = ctx.saved_tensors
        W_t = W_hh.t().contiguous()
        dA = _hidden_grads(dout, dhT, out)  # becomes dL/dxp in place, step by step
        slope = (out > 0).to(out.dtype) if ctx.relu else 1 - out * out  # dφ/da, all steps
        dh0 = h0
        for t in range(out.shape[0] - 1, -1, -1):
            da = dA[t].mul_(slope[t])  # dL/dH_t (complete now) → dL/d(pre-activation)
            dh0 = _carry(dA, t, h0).addmm_(da, W_t)
        return dA, _weight_grad(_prev(h0, out), dA), dh0, None


class LSTMScan(torch.autograd.Function):
    """The LSTM over all steps, gates ordered ``[O | I | F | C̃]`` in ``xp`` and ``W_h`` (the
    three that share ``dL/dC`` side by side); returns ``(outputs (T, B, H), H_T, C_T)``.

    When a gradient is wanted, the forward pass also stores each step's gradient-independent
    factors while the step's tensors are still in cache (``k``, ``(T, B, 4H)``):
    ``dL/da_O = dL/dH ⊙ k_O`` and ``dL/da_{I,F,C̃} = dL/dC ⊙ k_{I,F,C̃}`` with
    ``k_O = tanh(C) σ'_O``, ``k_I = C̃ σ'_I``, ``k_F = C_{t-1} σ'_F``, ``k_C̃ = I (1 − C̃²)``,
    and ``k_c = O (1 − tanh²C)`` for the path ``dL/dC += dL/dH ⊙ k_c``. Computing them over all
    steps at once in the backward pass instead makes a dozen passes over megabytes of memory,
    which on a CPU costs several times more.
    """

    @staticmethod
    def forward(ctx: Any, xp: Tensor, W_h: Tensor, h0: Tensor, c0: Tensor) -> Any:
        T, B, G = xp.shape
        n = G // 4
        train = any(ctx.needs_input_grad)
        gates = torch.empty_like(xp)  # activated: O, I, F, C̃
        out = xp.new_empty(T, B, n)  # H_t
        cells = xp.new_empty(T, B, n)  # C_t
        tanh_c = xp.new_empty(B, n)
        k = torch.empty_like(xp) if train else None
        k_c = xp.new_empty(T, B, n) if train else None
        h, c = h0, c0
        for t in range(T):
            g = gates[t]
            torch.addmm(xp[t], h, W_h, out=g)
            sig = g[:, : 3 * n].sigmoid_()
            o, i, f, cand = g.split(n, dim=1)
            cand.tanh_()
            ct = cells[t]
            torch.mul(f, c, out=ct).addcmul_(i, cand)  # C = F ⊙ C + I ⊙ C̃
            torch.tanh(ct, out=tanh_c)
            torch.mul(o, tanh_c, out=out[t])  # H = O ⊙ tanh(C)
            if k is not None and k_c is not None:
                kt = k[t]
                torch.addcmul(sig, sig, sig, value=-1, out=kt[:, : 3 * n])  # σ' = σ − σ²
                k_o, k_i, k_f, k_cand = kt.split(n, dim=1)
                k_o.mul_(tanh_c)
                k_i.mul_(cand)
                k_f.mul_(c)
                torch.addcmul(i, i, cand * cand, value=-1, out=k_cand)
                torch.addcmul(o, out[t], tanh_c, value=-1, out=k_c[t])  # O − H ⊙ tanh(C)
            h, c = out[t], ct
        if train:
            ctx.save_for_backward(W_h, h0, gates, out, k, k_c)
        return out, out[-1].clone(), cells[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor | None, dhT: Tensor | None, dcT: Tensor | None) -> Any:
        W_h, h0, gates, out, k, k_c = ctx.saved_tensors
        T, B, G = gates.shape
        n = G // 4
        W_t = W_h.t().contiguous()
        f = gates[..., 2 * n : 3 * n]
        k4 = k.view(T, B, 4, n)
        dA = torch.empty_like(gates)  # dL/d(pre-activation gates) = dL/dxp
        dA4 = dA.view(T, B, 4, n)
        dH = _hidden_grads(dout, dhT, out)
        dc = torch.zeros_like(h0) if dcT is None else dcT.clone()
        dh0 = h0
        for t in range(T - 1, -1, -1):
            dh = dH[t]
            torch.mul(dh, k4[t, :, 0], out=dA4[t, :, 0])
            dc.addcmul_(dh, k_c[t])
            torch.mul(dc.unsqueeze(1), k4[t, :, 1:], out=dA4[t, :, 1:])
            dc.mul_(f[t])  # dL/dC_{t-1}
            dh0 = _carry(dH, t, h0).addmm_(dA[t], W_t)  # dL/dH_{t-1}
        return dA, _weight_grad(_prev(h0, out), dA), dh0, dc


class GRUScan(torch.autograd.Function):
    """The course's GRU (reset before the hidden matmul) over all steps, ``xp`` ordered
    ``[R | Z | H̃]``; ``W_hrz = [W_hr | W_hz]``. Two matmuls a step, as the equations need:
    ``H W_hrz`` gives both gates, then ``(R ⊙ H) W_hh`` the candidate. Returns
    ``(outputs (T, B, H), H_T)``.

    For the backward pass the forward stores, per step, ``k = [k_R | k_Z | k_H̃]`` with
    ``dL/da_Z = dL/dH ⊙ k_Z``, ``dL/da_H̃ = dL/dH ⊙ k_H̃``, ``dL/da_R = dL/d(R ⊙ H) ⊙ k_R``:
    ``k_R = H_{t-1} σ'_R``, ``k_Z = (H_{t-1} − H̃) σ'_Z``, ``k_H̃ = (1 − Z)(1 − H̃²)``.
    """

    @staticmethod
    def forward(ctx: Any, xp: Tensor, W_hrz: Tensor, W_hh: Tensor, h0: Tensor) -> Any:
        T, B, G = xp.shape
        n = G // 3
        train = any(ctx.needs_input_grad)
        rz = xp.new_empty(T, B, 2 * n)  # activated R, Z
        cand = xp.new_empty(B, n)  # H̃
        rh = xp.new_empty(T, B, n)  # R ⊙ H_{t-1}
        out = xp.new_empty(T, B, n)
        k = torch.empty_like(xp) if train else None
        h = h0
        for t in range(T):
            x, g = xp[t], rz[t]
            torch.addmm(x[:, : 2 * n], h, W_hrz, out=g).sigmoid_()
            r, z = g[:, :n], g[:, n:]
            torch.mul(r, h, out=rh[t])
            torch.addmm(x[:, 2 * n :], rh[t], W_hh, out=cand).tanh_()
            torch.lerp(cand, h, z, out=out[t])  # Z ⊙ H + (1 − Z) ⊙ H̃
            if k is not None:
                kt = k[t]
                torch.addcmul(g, g, g, value=-1, out=kt[:, : 2 * n])  # σ' = σ − σ²
                k_r, k_z, k_c = kt.split(n, dim=1)
                k_r.mul_(h)
                k_z.mul_(h - cand)
                torch.mul(cand, cand, out=k_c).mul_(z).sub_(z).sub_(cand * cand).add_(1)
            h = out[t]
        if train:
            ctx.save_for_backward(W_hrz, W_hh, h0, rz, rh, out, k)
        return out, out[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor | None, dhT: Tensor | None) -> Any:
        W_hrz, W_hh, h0, rz, rh, out, k = ctx.saved_tensors
        T, B, n = out.shape
        W_hrz_t, W_hh_t = W_hrz.t().contiguous(), W_hh.t().contiguous()
        dA = torch.empty_like(k)  # dL/dxp: [R | Z | H̃] pre-activations
        dH = _hidden_grads(dout, dhT, out)
        dh0 = h0
        for t in range(T - 1, -1, -1):
            dh, da, kt, g = dH[t], dA[t], k[t], rz[t]
            torch.mul(dh.unsqueeze(1), kt[:, n:].unflatten(1, (2, n)),
                      out=da[:, n:].unflatten(1, (2, n)))  # Z and H̃ together
            d_rh = da[:, 2 * n :] @ W_hh_t  # dL/d(R ⊙ H_{t-1})
            torch.mul(d_rh, kt[:, :n], out=da[:, :n])
            carry = _carry(dH, t, h0).addcmul_(dh, g[:, n:]).addcmul_(d_rh, g[:, :n])
            dh0 = carry.addmm_(da[:, : 2 * n], W_hrz_t)
        d_hrz = _weight_grad(_prev(h0, out), dA[..., : 2 * n])
        d_hh = _weight_grad(rh, dA[..., 2 * n :])
        return dA, d_hrz, d_hh, dh0


class GRUResetAfterScan(torch.autograd.Function):
    """``nn.GRU``'s variant, which resets after the matmul: one fused ``addmm`` a step,
    ``hp = H W_h + [0 | 0 | b_hh]``, then ``R, Z = σ(x_rz + hp_rz)``,
    ``H̃ = tanh(x_h + R ⊙ hp_h)``. Returns ``(outputs (T, B, H), H_T)``. The stored factors
    ``k = [k_R | k_Z | k_H̃]`` are :class:`GRUScan`'s, except ``k_R = hp_h σ'_R``, which
    multiplies ``dL/da_H̃``."""

    @staticmethod
    def forward(ctx: Any, xp: Tensor, W_h: Tensor, b_hh: Tensor, h0: Tensor) -> Any:
        T, B, G = xp.shape
        n = G // 3
        train = any(ctx.needs_input_grad)
        bias = torch.cat([torch.zeros_like(b_hh), torch.zeros_like(b_hh), b_hh])
        hp = xp.new_empty(B, G)  # H_{t-1} W_h + bias
        rz = xp.new_empty(T, B, 2 * n)
        cand = xp.new_empty(B, n)
        out = xp.new_empty(T, B, n)
        k = torch.empty_like(xp) if train else None
        h = h0
        for t in range(T):
            x = xp[t]
            torch.addmm(bias, h, W_h, out=hp)
            g = torch.add(x[:, : 2 * n], hp[:, : 2 * n], out=rz[t]).sigmoid_()
            r, z = g[:, :n], g[:, n:]
            torch.mul(r, hp[:, 2 * n :], out=cand).add_(x[:, 2 * n :]).tanh_()
            torch.lerp(cand, h, z, out=out[t])
            if k is not None:
                kt = k[t]
                torch.addcmul(g, g, g, value=-1, out=kt[:, : 2 * n])
                k_r, k_z, k_c = kt.split(n, dim=1)
                k_r.mul_(hp[:, 2 * n :])
                k_z.mul_(h - cand)
                torch.mul(cand, cand, out=k_c).mul_(z).sub_(z).sub_(cand * cand).add_(1)
            h = out[t]
        if train:
            ctx.save_for_backward(W_h, h0, rz, out, k)
        return out, out[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor | None, dhT: Tensor | None) -> Any:
        W_h, h0, rz, out, k = ctx.saved_tensors
        T, B, n = out.shape
        W_t = W_h.t().contiguous()
        dP = torch.empty_like(k)  # dL/d(H W_h + bias); its R, Z part is also dL/dxp's
        dA = torch.empty_like(k)  # dL/dxp's candidate part, filled below
        dH = _hidden_grads(dout, dhT, out)
        dh0 = h0
        for t in range(T - 1, -1, -1):
            dh, dp, kt, g = dH[t], dP[t], k[t], rz[t]
            d_c = torch.mul(dh, kt[:, 2 * n :], out=dA[t, :, 2 * n :])
            torch.mul(d_c, g[:, :n], out=dp[:, 2 * n :])
            torch.mul(d_c, kt[:, :n], out=dp[:, :n])
            torch.mul(dh, kt[:, n : 2 * n], out=dp[:, n : 2 * n])
            dh0 = _carry(dH, t, h0).addcmul_(dh, g[:, n:]).addmm_(dp, W_t)
        dA[..., : 2 * n] = dP[..., : 2 * n]
        return dA, _weight_grad(_prev(h0, out), dP), dP[..., 2 * n :].sum((0, 1)), dh0


def fused_allowed(x: Tensor) -> bool:
    """Whether the fused path may run: not while ``torch.compile`` traces (the compiler fuses
    the reference equations itself) and not under autocast (the fused buffers keep one dtype)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    try:
        if torch.is_autocast_enabled(x.device.type):
            return False
    except TypeError:  # torch before 2.4 takes no device type
        if torch.is_autocast_enabled():
            return False
    return x.is_floating_point()
