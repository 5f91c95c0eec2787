"""Recurrent networks: RNN, GRU and LSTM from the course's equations, the concise ``nn`` versions,
and the language model ``RNNLM`` built on either.

The scratch networks take time-major input ``(T, B, D)`` like ``nn.RNN`` and return
``(outputs (T, B, dirs * H), state)`` with the state shaped as PyTorch's: ``(L * dirs, B, H)``,
and ``(h, c)`` for the LSTM, layer-major with the reverse direction second. Each layer and
direction is one cell holding the course's named parameters (``W_xh``, ``W_hh``, ``b_h``, ...,
with ``X @ W`` so ``W_xh`` is ``(D, H)``). The input projection of all time steps is one matmul;
only the recurrence loops over time.

:meth:`RecurrentScratch.load_from_torch` copies the weights of an ``nn.RNN``/``nn.GRU``/``nn.LSTM``
in, which is how the parity tests check the equations against cuDNN's.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.config import option
from divekit.errors import DivekitError
from divekit.models.registry import register_model
from divekit.models.rnn_fused import GRUResetAfterScan, GRUScan, LSTMScan, RNNScan, fused_allowed

State = Tensor | tuple[Tensor, Tensor]


def _weight(*shape: int, sigma: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * sigma)


def _bias(size: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(size))


def _scan(
    step, xp: Tensor, state: tuple[Tensor, ...], reverse: bool
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run ``H, state = step(xp[t], state)`` over time (backwards when ``reverse``); stack the H's."""
    T = xp.shape[0]
    outputs: list[Tensor] = [xp.new_empty(0)] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        outputs[t], state = step(xp[t], state)
    return torch.stack(outputs), state  # (T, B, H)


def _project(X: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``X W + b`` for every time step in one ``addmm``: ``(T, B, D)`` → ``(T, B, G)``."""
    return torch.addmm(b, X.reshape(-1, X.shape[-1]), W).view(*X.shape[:-1], W.shape[1])


def _time_flip(x: Tensor, reverse: bool) -> Tensor:
    return x.flip(0) if reverse else x


def _use_fused(cell: nn.Module, X: Tensor) -> bool:
    """The fused path (:mod:`divekit.models.rnn_fused`) unless the cell is set to its reference
    (``cell.fused = False``, or :func:`use_reference`) or the input rules it out."""
    return cell.fused and fused_allowed(X)


def use_reference(module: nn.Module, reference: bool = True) -> nn.Module:
    """Make every scratch cell in ``module`` run the course's equations step by step under
    autograd (``reference=True``) or the fused hand-written BPTT (``False``, the default);
    returns ``module``. Both compute the same values and gradients (the parity tests)."""
    for m in module.modules():
        if isinstance(m, RNNCellScratch | GRUCellScratch | LSTMCellScratch):
            m.fused = not reference
    return module


# ----------------------------------------------------------------------------- cells (one layer, one direction)


class RNNCellScratch(nn.Module):
    """``H_t = φ(X_t W_xh + H_{t-1} W_hh + b_h)`` with φ = tanh (or ReLU)."""

    num_gates = 1
    fused = True  # the hand-written BPTT; False: the equations under autograd

    def __init__(
        self, num_inputs: int, num_hiddens: int, sigma: float = 0.01, nonlinearity: str = "tanh"
    ):
        super().__init__()
        if nonlinearity not in ("tanh", "relu"):
            raise DivekitError(f"unknown nonlinearity {nonlinearity!r}; choose tanh or relu")
        self.W_xh = _weight(num_inputs, num_hiddens, sigma=sigma)
        self.W_hh = _weight(num_hiddens, num_hiddens, sigma=sigma)
        self.b_h = _bias(num_hiddens)
        self.nonlinearity = nonlinearity

    def forward(self, X: Tensor, state: tuple[Tensor, ...], reverse: bool = False):
        if not _use_fused(self, X):
            return self.reference(X, state, reverse)
        xp = _time_flip(_project(X, self.W_xh, self.b_h), reverse)
        out, h = RNNScan.apply(xp, self.W_hh, state[0], self.nonlinearity == "relu")
        return _time_flip(out, reverse), (h,)

    def reference(self, X: Tensor, state: tuple[Tensor, ...], reverse: bool = False):
        """The course's equation, step by step under autograd (what the fused path must match)."""
        xp = X @ self.W_xh + self.b_h  # (T, B, H): every step's input term in one matmul
        W_hh, phi = self.W_hh, torch.tanh if self.nonlinearity == "tanh" else torch.relu

        def step(x_t: Tensor, state: tuple[Tensor, ...]):
            H = phi(x_t + state[0] @ W_hh)
            return H, (H,)

        return _scan(step, xp, state, reverse)

    @torch.no_grad()
    def copy_torch(self, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> None:
        self.W_xh.copy_(w_ih.T)
        self.W_hh.copy_(w_hh.T)
        self.b_h.copy_(b_ih + b_hh)


class GRUCellScratch(nn.Module):
    """The course's GRU:

    ``R = σ(X W_xr + H W_hr + b_r)``, ``Z = σ(X W_xz + H W_hz + b_z)``,
    ``H̃ = tanh(X W_xh + (R ⊙ H) W_hh + b_h)``, ``H = Z ⊙ H + (1 − Z) ⊙ H̃``.

    ``reset_after=True`` is the cuDNN/``nn.GRU`` variant, which resets after the matmul and has
    its own hidden bias: ``H̃ = tanh(X W_xh + b_h + R ⊙ (H W_hh + b_hh))``.
    """

    num_gates = 3
    fused = True  # the hand-written BPTT; False: the equations under autograd

    def __init__(
        self, num_inputs: int, num_hiddens: int, sigma: float = 0.01, reset_after: bool = False
    ):
        super().__init__()
        self.reset_after = reset_after
        for gate in "rzh":  # reset, update, candidate
            setattr(self, f"W_x{gate}", _weight(num_inputs, num_hiddens, sigma=sigma))
            setattr(self, f"W_h{gate}", _weight(num_hiddens, num_hiddens, sigma=sigma))
            setattr(self, f"b_{gate}", _bias(num_hiddens))
        if reset_after:
            self.b_hh = _bias(num_hiddens)

    def forward(self, X: Tensor, state: tuple[Tensor, ...], reverse: bool = False):
        if not _use_fused(self, X):
            return self.reference(X, state, reverse)
        W_x = torch.cat([self.W_xr, self.W_xz, self.W_xh], dim=1)
        xp = _time_flip(_project(X, W_x, torch.cat([self.b_r, self.b_z, self.b_h])), reverse)
        if self.reset_after:
            W_h = torch.cat([self.W_hr, self.W_hz, self.W_hh], dim=1)
            out, h = GRUResetAfterScan.apply(xp, W_h, self.b_hh, state[0])
        else:
            W_hrz = torch.cat([self.W_hr, self.W_hz], dim=1)
            out, h = GRUScan.apply(xp, W_hrz, self.W_hh, state[0])
        return _time_flip(out, reverse), (h,)

    def reference(self, X: Tensor, state: tuple[Tensor, ...], reverse: bool = False):
        """The course's equations, step by step under autograd (what the fused path must
        match)."""
        W_x = torch.cat([self.W_xr, self.W_xz, self.W_xh], dim=1)
        xp = X @ W_x + torch.cat([self.b_r, self.b_z, self.b_h])  # (T, B, 3H)
        if self.reset_after:
            W_h = torch.cat([self.W_hr, self.W_hz, self.W_hh], dim=1)
            b_h = torch.cat([torch.zeros_like(self.b_hh), torch.zeros_like(self.b_hh), self.b_hh])

            def step(x_t: Tensor, state: tuple[Tensor, ...]):
                (H,) = state
                xr, xz, xh = x_t.chunk(3, dim=-1)
                hr, hz, hh = torch.addmm(b_h, H, W_h).chunk(3, dim=-1)
                R, Z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                H_tilde = torch.tanh(xh + R * hh)
                H = Z * H + (1 - Z) * H_tilde
                return H, (H,)

        else:
            W_hrz, W_hh = torch.cat([self.W_hr, self.W_hz], dim=1), self.W_hh

            def step(x_t: Tensor, state: tuple[Tensor, ...]):
                (H,) = state
                xr, xz, xh = x_t.chunk(3, dim=-1)
                hr, hz = (H @ W_hrz).chunk(2, dim=-1)
                R, Z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                H_tilde = torch.tanh(xh + (R * H) @ W_hh)
                H = Z * H + (1 - Z) * H_tilde
                return H, (H,)

        return _scan(step, xp, state, reverse)

    @torch.no_grad()
    def copy_torch(self, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> None:
        if not self.reset_after:
            raise DivekitError(
                "nn.GRU resets after the hidden matmul; copy its weights into a scratch GRU built "
                "with reset_after=True (the course's variant computes something else)"
            )
        # PyTorch's gate order is r, z, n; its n is our candidate h.
        for gate, wi, wh, bi, bh in zip(
            "rzh", w_ih.chunk(3), w_hh.chunk(3), b_ih.chunk(3), b_hh.chunk(3)
        ):
            getattr(self, f"W_x{gate}").copy_(wi.T)
            getattr(self, f"W_h{gate}").copy_(wh.T)
            getattr(self, f"b_{gate}").copy_(bi if gate == "h" else bi + bh)
        self.b_hh.copy_(b_hh.chunk(3)[2])


class LSTMCellScratch(nn.Module):
    """The course's LSTM:

    ``I = σ(X W_xi + H W_hi + b_i)``, ``F = σ(X W_xf + H W_hf + b_f)``, ``O = σ(X W_xo + H W_ho + b_o)``,
    ``C̃ = tanh(X W_xc + H W_hc + b_c)``, ``C = F ⊙ C + I ⊙ C̃``, ``H = O ⊙ tanh(C)``.
    """

    num_gates = 4
    fused = True  # the hand-written BPTT; False: the equations under autograd
    _GATES = "ifoc"  # input, forget, output, candidate cell

    def __init__(self, num_inputs: int, num_hiddens: int, sigma: float = 0.01):
        super().__init__()
        for gate in self._GATES:
            setattr(self, f"W_x{gate}", _weight(num_inputs, num_hiddens, sigma=sigma))
            setattr(self, f"W_h{gate}", _weight(num_hiddens, num_hiddens, sigma=sigma))
            setattr(self, f"b_{gate}", _bias(num_hiddens))

    def _fused(self, order: str = _GATES) -> tuple[Tensor, Tensor, Tensor]:
        """The gates' input weights, biases and hidden weights side by side, in ``order``."""
        W_x = torch.cat([getattr(self, f"W_x{g}") for g in order], dim=1)
        b = torch.cat([getattr(self, f"b_{g}") for g in order])
        W_h = torch.cat([getattr(self, f"W_h{g}") for g in order], dim=1)
        return W_x, b, W_h

    def forward(self, X: Tensor, state: tuple[Tensor, ...], reverse: bool = False):
        if not _use_fused(self, X):
            return self.reference(X, state, reverse)
        W_x, b, W_h = self._fused("oifc")  # LSTMScan's order: O first, then what dC reaches
        xp = _time_flip(_project(X, W_x, b), reverse)  # (T, B, 4H)
        out, h, c = LSTMScan.apply(xp, W_h, state[0], state[1])
        return _time_flip(out, reverse), (h, c)

    def reference(self, X: Tensor, state: tuple[Tensor, ...], reverse: bool = False):
        """The course's equations, step by step under autograd (what the fused path must
        match)."""
        W_x, b, W_h = self._fused()
        xp = X @ W_x + b  # (T, B, 4H)

        def step(x_t: Tensor, state: tuple[Tensor, ...]):
            H, C = state
            gates = x_t + H @ W_h
            i, f, o, c = gates.chunk(4, dim=-1)
            # The course's gate names (F_ keeps torch.nn.functional's F visible).
            I, F_, O = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)  # noqa: E741
            C_tilde = torch.tanh(c)
            C = F_ * C + I * C_tilde
            H = O * torch.tanh(C)
            return H, (H, C)

        return _scan(step, xp, state, reverse)

    @torch.no_grad()
    def copy_torch(self, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> None:
        # PyTorch's gate order is i, f, g, o; its g is our candidate c.
        for gate, wi, wh, b in zip("ifco", w_ih.chunk(4), w_hh.chunk(4), (b_ih + b_hh).chunk(4)):
            getattr(self, f"W_x{gate}").copy_(wi.T)
            getattr(self, f"W_h{gate}").copy_(wh.T)
            getattr(self, f"b_{gate}").copy_(b)


# ----------------------------------------------------------------------------- deep, bidirectional networks


class RecurrentScratch(nn.Module):
    """``num_layers`` stacked cells, each optionally with a reverse-time twin (bidirectional).

    Layer ``l > 0`` reads the concatenated forward and backward outputs of layer ``l − 1``.
    Attribute names (``input_size``, ``hidden_size``, ``num_layers``, ``bidirectional``) match
    ``nn.RNN`` so code can treat both alike.

    A subclass names its ``cell_type`` (and the ``nn`` module it copies from); ``sigma`` (the
    weights' initial scale) and the other keywords go to every cell, so a cell's own options
    (the RNN's ``nonlinearity``, the GRU's ``reset_after``) are declared and checked once, there.
    """

    torch_type: type[nn.RNNBase] = nn.RNNBase
    cell_type: type[nn.Module]  # one layer, one direction: the subclass's cell

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        *,
        sigma: float = 0.01,
        **cell_kw: Any,
    ):
        super().__init__()
        if input_size < 1 or hidden_size < 1 or num_layers < 1:
            raise DivekitError(
                f"input_size, hidden_size and num_layers must be >= 1, got {input_size}, {hidden_size}, {num_layers}"
            )
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.bidirectional = num_layers, bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.cells = nn.ModuleList(
            self.cell_type(
                input_size if layer == 0 else hidden_size * self.num_directions,
                hidden_size,
                sigma=sigma,
                **cell_kw,
            )
            for layer in range(num_layers)
            for _ in range(self.num_directions)
        )  # index layer * num_directions + direction, as PyTorch's state

    def begin_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        shape = (self.num_layers * self.num_directions, batch_size, self.hidden_size)
        return torch.zeros(shape, device=device)

    def _split_state(self, state: State) -> list[tuple[Tensor, ...]]:
        return [(h,) for h in state]  # type: ignore[union-attr]

    def _join_state(self, states: list[tuple[Tensor, ...]]) -> State:
        return torch.stack([s[0] for s in states])

    def forward(self, inputs: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        if inputs.dim() != 3 or inputs.shape[-1] != self.input_size:
            raise DivekitError(
                f"expected time-major input (T, B, {self.input_size}), got shape {tuple(inputs.shape)}"
            )
        if state is None:  # zeros in the inputs' dtype (a float64 network starts from float64)
            state = self.begin_state(inputs.shape[1], inputs.device)
            state = (tuple(s.to(inputs.dtype) for s in state) if isinstance(state, tuple)
                     else state.to(inputs.dtype))
        states = self._split_state(state)
        X, final = inputs, []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                out, s = self.cells[k](X, states[k], reverse=direction == 1)
                outs.append(out)
                final.append(s)
            X = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]  # (T, B, dirs * H)
        return X, self._join_state(final)

    def load_from_torch(self, module: nn.RNNBase) -> RecurrentScratch:
        """Copy an ``nn.RNN``/``nn.GRU``/``nn.LSTM``'s weights (``weight_ih_l{k}[_reverse]``, ...) in."""
        if not isinstance(module, self.torch_type):
            raise DivekitError(
                f"{type(self).__name__} copies from {self.torch_type.__name__}, got {type(module).__name__}"
            )
        ours = (self.input_size, self.hidden_size, self.num_layers, self.bidirectional)
        theirs = (module.input_size, module.hidden_size, module.num_layers, module.bidirectional)
        if ours != theirs:
            raise DivekitError(
                f"shape mismatch: (input_size, hidden_size, num_layers, bidirectional) is {ours} here, {theirs} in the module"
            )
        if not module.bias or getattr(module, "proj_size", 0):
            raise DivekitError("only modules with bias=True and proj_size=0 can be copied")
        self._check_torch(module)
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                self.cells[layer * self.num_directions + direction].copy_torch(
                    *(
                        getattr(module, f"{name}{sfx}")
                        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                    )
                )
        return self

    def _check_torch(self, module: nn.RNNBase) -> None:
        pass


class RNNScratch(RecurrentScratch):
    """Deep and bidirectional vanilla RNN from scratch; ``nonlinearity="relu"`` for ReLU cells."""

    torch_type = nn.RNN
    cell_type = RNNCellScratch

    @property
    def nonlinearity(self) -> str:
        """``"tanh"`` (the default) or ``"relu"``, as every cell holds it."""
        return self.cells[0].nonlinearity

    def _check_torch(self, module):
        if module.nonlinearity != self.nonlinearity:
            raise DivekitError(
                f"nonlinearity differs: {self.nonlinearity!r} here, {module.nonlinearity!r} in the module"
            )


class GRUScratch(RecurrentScratch):
    """Deep and bidirectional GRU from scratch; ``reset_after=True`` for ``nn.GRU``'s variant."""

    torch_type = nn.GRU
    cell_type = GRUCellScratch

    @property
    def reset_after(self) -> bool:
        """Whether the cells reset after the hidden matmul (``nn.GRU``) or before (the course)."""
        return self.cells[0].reset_after


class LSTMScratch(RecurrentScratch):
    """Deep and bidirectional LSTM from scratch; the state is ``(h, c)``."""

    torch_type = nn.LSTM
    cell_type = LSTMCellScratch

    def begin_state(self, batch_size, device=None):
        h = super().begin_state(batch_size, device)
        return h, torch.zeros_like(h)

    def _split_state(self, state):
        if not isinstance(state, tuple | list) or len(state) != 2:
            raise DivekitError("an LSTM's state is a pair (h, c)")
        return list(zip(state[0], state[1]))

    def _join_state(self, states):
        return torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states])


def begin_state(
    cell: nn.Module, batch_size: int, device: torch.device | str | None = None
) -> State:
    """Zeros shaped as ``cell``'s state, for scratch and ``nn`` recurrent modules alike."""
    if isinstance(cell, RecurrentScratch):
        return cell.begin_state(batch_size, device)
    # nn.RNN/GRU/LSTM, and their dynamic int8 forms (torch.ao, --quantize int8), which are not
    # nn.RNNBase but carry the same shape attributes and name their kind in ``mode``
    if not all(hasattr(cell, a) for a in ("num_layers", "bidirectional", "hidden_size")):
        raise DivekitError(f"not a recurrent module: {type(cell).__name__}")
    h = torch.zeros(
        cell.num_layers * (2 if cell.bidirectional else 1),
        batch_size,
        cell.hidden_size,
        device=device,
    )
    lstm = isinstance(cell, nn.LSTM) or getattr(cell, "mode", None) == "LSTM"
    return (h, torch.zeros_like(h)) if lstm else h


def detach_state(state: State) -> State:
    """Cut the graph between sequential minibatches (the state's values are kept)."""
    if isinstance(state, tuple | list):
        return tuple(s.detach() for s in state)  # type: ignore[return-value]
    return state.detach()


# ----------------------------------------------------------------------------- language model


class RNNLM(nn.Module):
    """Token ids ``(B, T)`` → one-hot (or an embedding) → recurrent ``cell`` → ``Linear`` → logits ``(B, T, V)``.

    ``cell`` is any time-major module returning ``(outputs, state)``: a scratch network here or an
    ``nn.RNN``/``nn.GRU``/``nn.LSTM``. ``forward(X, state)`` returns ``(logits, state)``.
    """

    def __init__(self, cell: nn.Module, vocab_size: int, *, embed_size: int | None = None):
        super().__init__()
        input_size = embed_size if embed_size else vocab_size
        if cell.input_size != input_size:
            raise DivekitError(
                f"cell input_size {cell.input_size} must equal {'embed_size' if embed_size else 'vocab_size'} {input_size}"
            )
        self.cell, self.vocab_size = cell, vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_size) if embed_size else None
        self.output = nn.Linear(cell.hidden_size * (2 if cell.bidirectional else 1), vocab_size)

    @property
    def bidirectional(self) -> bool:
        """A bidirectional model reads the future, so it cannot generate text."""
        return bool(self.cell.bidirectional)

    def begin_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return begin_state(self.cell, batch_size, device)

    def forward(self, X: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        if X.dim() != 2:
            raise DivekitError(f"expected token ids (B, T), got shape {tuple(X.shape)}")
        X = X.T  # (T, B): the cell is time-major
        if self.embedding is not None:
            inputs = self.embedding(X)  # (T, B, E)
        else:
            weight = self.output.weight  # a method once the layer is int8 (--quantize int8)
            dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
            inputs = F.one_hot(X, self.vocab_size).to(dtype)  # (T, B, V)
        if state is None:
            state = self.begin_state(X.shape[1], X.device)
        outputs, state = self.cell(inputs, state)  # (T, B, dirs * H)
        return self.output(outputs).transpose(0, 1), state  # (B, T, V)


# ----------------------------------------------------------------------------- builders


@dataclass(frozen=True)
class RNNConfig:
    """The recurrent language models' hyper-parameters, named as the builders' arguments; each
    is a ``divekit train`` option (the course's ``--hidden``/``--layers``/``--embed`` too)."""

    num_hiddens: int = option(256, "hidden units per layer", aliases=["--hidden"], metavar="H")
    num_layers: int = option(1, "stacked recurrent layers (a deep RNN)", aliases=["--layers"],
                             metavar="L")
    bidirectional: bool = option(False, "read the text both ways (cannot generate text)")
    embed_size: int | None = option(
        None, "an embedding of this size instead of one-hot inputs (use it for word tokens)",
        aliases=["--embed"], metavar="E",
    )

    def __post_init__(self) -> None:
        sizes = {"--num-hiddens": self.num_hiddens, "--num-layers": self.num_layers}
        if self.embed_size is not None:
            sizes["--embed-size"] = self.embed_size
        for flag, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DivekitError(f"{flag} must be a whole number >= 1, got {value!r}")


@dataclass(frozen=True)
class GRUScratchConfig(RNNConfig):
    """:class:`RNNConfig` and the scratch GRU's choice of reset gate."""

    reset_after: bool = option(
        False, "reset after the hidden matmul (nn.GRU's variant) instead of the course's before"
    )


# The recommended training of the character-level models (the README's GRU on The Time Machine):
# Adam at 0.005 (the course's SGD needs lr 1) and gradient clipping θ = 1,
# g ← min(1, θ/‖g‖) g, which keeps one exploding step from ruining the run.
RECIPES = {"*": {"optimizer": "adam", "lr": 0.005, "momentum": 0.0, "grad_clip": 1.0}}


def _language_model(
    cell_type, *, vocab_size, num_hiddens, num_layers, bidirectional, embed_size, **cell_kw
) -> RNNLM:
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise DivekitError(f"vocab_size must be a positive int, got {vocab_size!r}")
    input_size = embed_size if embed_size else vocab_size
    cell = cell_type(
        input_size, num_hiddens, num_layers=num_layers, bidirectional=bidirectional, **cell_kw
    )
    return RNNLM(cell, vocab_size, embed_size=embed_size)


def _concise(torch_type):
    def make(input_size, hidden_size, *, num_layers, bidirectional):
        return torch_type(
            input_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional
        )

    return make



def _builder(name: str, cell_type: Callable[..., nn.Module], config: type, doc: str):
    """Register the language model ``name`` on ``cell_type``: its keyword arguments are the
    fields of ``config`` (defaults and checks from there) plus the vocabulary size."""

    def build(*, vocab_size: int, **options: Any) -> RNNLM:
        return _language_model(cell_type, vocab_size=vocab_size,
                               **dataclasses.asdict(config(**options)))

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    keyword = inspect.Parameter.KEYWORD_ONLY
    build.__signature__ = inspect.Signature(  # type: ignore[attr-defined]  # what help() shows
        [inspect.Parameter("vocab_size", keyword, annotation=int)]
        + [inspect.Parameter(f.name, keyword, default=f.default, annotation=f.type)
           for f in dataclasses.fields(config)], return_annotation=RNNLM)
    return register_model(name, input_shape=None, task="language_model", config=config,
                          recipes=RECIPES)(build)


rnn_scratch = _builder(
    "rnn_scratch", RNNScratch, RNNConfig,
    "RNN language model from scratch: h_t = tanh(x_t W_xh + h_{t-1} W_hh + b_h).")
gru_scratch = _builder(
    "gru_scratch", GRUScratch, GRUScratchConfig,
    "GRU language model from scratch: reset and update gates, candidate state (the course's "
    "equations).")
lstm_scratch = _builder(
    "lstm_scratch", LSTMScratch, RNNConfig,
    "LSTM language model from scratch: input, forget and output gates and a memory cell.")
rnn = _builder("rnn", _concise(nn.RNN), RNNConfig,
               "RNN language model on nn.RNN (tanh), the concise version.")
gru = _builder("gru", _concise(nn.GRU), RNNConfig, "GRU language model on nn.GRU, the concise version.")
lstm = _builder("lstm", _concise(nn.LSTM), RNNConfig,
                "LSTM language model on nn.LSTM, the concise version.")
