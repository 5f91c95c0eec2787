"""Recurrent networks: the course's equations against PyTorch's cuDNN-style modules, and the LM wrapper."""

from __future__ import annotations

import argparse
import copy
import inspect

import pytest
import torch
from torch import nn

from divekit.config import add_config_options
from divekit.errors import DivekitError
from divekit.models.registry import create_model, list_models, model_info
from divekit.models.rnn import (
    RNNLM,
    GRUScratch,
    GRUScratchConfig,
    LSTMScratch,
    RNNConfig,
    RNNScratch,
    begin_state,
    detach_state,
    use_reference,
)
from divekit.ops.clip import clip_grad_norm

T, B, D, H = 5, 3, 4, 6
ATOL = 1e-5

PAIRS = {
    "rnn": (nn.RNN, lambda *a, **kw: RNNScratch(*a, **kw)),
    "gru": (nn.GRU, lambda *a, **kw: GRUScratch(*a, reset_after=True, **kw)),
    "lstm": (nn.LSTM, lambda *a, **kw: LSTMScratch(*a, **kw)),
}
SHAPES = [(1, False), (2, False), (1, True), (2, True)]


def _random_state(kind: str, num_layers: int, dirs: int):
    h = torch.randn(num_layers * dirs, B, H, requires_grad=True)
    return (h, torch.randn(num_layers * dirs, B, H, requires_grad=True)) if kind == "lstm" else h


def _as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def _grads_as_torch_weights(torch_net: nn.RNNBase, kind: str) -> nn.RNNBase:
    """A copy of ``torch_net`` whose parameters hold its gradients, ready for ``load_from_torch``.

    Our bias ``b = b_ih + b_hh`` gets the gradient of each summand (they are equal), so the
    copy's ``bias_hh`` is zeroed where it was summed; GRU's own ``b_hn`` keeps its gradient.
    """
    grads = copy.deepcopy(torch_net)
    with torch.no_grad():
        for name, p in torch_net.named_parameters():
            g = getattr(grads, name)
            g.copy_(p.grad)
            if name.startswith("bias_hh"):
                if kind == "gru":
                    g[: 2 * H] = 0
                else:
                    g.zero_()
    return grads


@pytest.mark.parametrize("num_layers,bidirectional", SHAPES)
@pytest.mark.parametrize("kind", list(PAIRS))
def test_scratch_matches_torch_with_copied_weights(kind, num_layers, bidirectional):
    torch.manual_seed(0)
    torch_type, scratch_type = PAIRS[kind]
    ref = torch_type(D, H, num_layers=num_layers, bidirectional=bidirectional)
    ours = scratch_type(D, H, num_layers=num_layers, bidirectional=bidirectional).load_from_torch(
        ref
    )
    dirs = 2 if bidirectional else 1

    X = torch.randn(T, B, D, requires_grad=True)
    state = _random_state(kind, num_layers, dirs)
    out_ref, state_ref = ref(X, state)
    out, state_ours = ours(X, state)
    assert out.shape == (T, B, dirs * H)
    torch.testing.assert_close(out, out_ref, atol=ATOL, rtol=0)
    for s, r in zip(_as_tuple(state_ours), _as_tuple(state_ref), strict=True):
        assert s.shape == (num_layers * dirs, B, H)
        torch.testing.assert_close(s, r, atol=ATOL, rtol=0)

    # Gradients: inputs, initial state, and every weight.
    weights = torch.randn_like(out)
    leaves = [X, *_as_tuple(state)]
    loss_ref = (out_ref * weights).sum() + sum(s.sum() for s in _as_tuple(state_ref))
    grads_ref = torch.autograd.grad(loss_ref, leaves, retain_graph=True)
    loss_ref.backward(inputs=list(ref.parameters()))
    loss = (out * weights).sum() + sum(s.sum() for s in _as_tuple(state_ours))
    grads = torch.autograd.grad(loss, leaves, retain_graph=True)
    loss.backward(inputs=list(ours.parameters()))
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, atol=ATOL, rtol=0)
    expected = scratch_type(D, H, num_layers=num_layers, bidirectional=bidirectional)
    expected.load_from_torch(_grads_as_torch_weights(ref, kind))
    for (name, p), e in zip(ours.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p.grad, e, atol=ATOL, rtol=0, msg=f"grad of {name}")


def test_course_gru_is_the_textbook_loop():
    torch.manual_seed(1)
    gru = GRUScratch(D, H, sigma=0.5)  # the course's variant: R applied to H before W_hh
    cell = gru.cells[0]
    X, Hs = torch.randn(T, B, D), torch.randn(1, B, H)
    out, state = gru(X, Hs)

    h, expected = Hs[0], []
    for x in X:
        R = torch.sigmoid(x @ cell.W_xr + h @ cell.W_hr + cell.b_r)
        Z = torch.sigmoid(x @ cell.W_xz + h @ cell.W_hz + cell.b_z)
        H_tilde = torch.tanh(x @ cell.W_xh + (R * h) @ cell.W_hh + cell.b_h)
        h = Z * h + (1 - Z) * H_tilde
        expected.append(h)
    torch.testing.assert_close(out, torch.stack(expected), atol=ATOL, rtol=0)
    torch.testing.assert_close(state[0], h, atol=ATOL, rtol=0)
    with pytest.raises(DivekitError, match="reset_after=True"):
        gru.load_from_torch(nn.GRU(D, H))


def test_copy_refuses_a_mismatched_module():
    with pytest.raises(DivekitError, match="shape mismatch"):
        RNNScratch(D, H, num_layers=2).load_from_torch(nn.RNN(D, H))
    with pytest.raises(DivekitError, match="nn.LSTM|LSTM"):
        LSTMScratch(D, H).load_from_torch(nn.GRU(D, H))
    with pytest.raises(DivekitError, match="nonlinearity"):
        RNNScratch(D, H).load_from_torch(nn.RNN(D, H, nonlinearity="relu"))


LM_NAMES = ["rnn_scratch", "gru_scratch", "lstm_scratch", "rnn", "gru", "lstm"]


def test_language_models_are_registered():
    assert set(LM_NAMES) <= set(list_models(task="language_model"))
    for name in LM_NAMES:
        info = model_info(name)
        assert info.input_shape is None and info.description
        assert info.recipe("pydoc")["grad_clip"] == 1.0  # clipping θ = 1 by default
        # the family config's fields are the builder's keyword arguments, defaults included
        options = info.model_options()
        params = inspect.signature(info.builder).parameters
        assert set(options) == set(params) - {"vocab_size"}
        assert all(params[k].default == v for k, v in options.items())


def test_family_options_keep_the_course_flags_and_are_checked():
    parser = argparse.ArgumentParser()
    add_config_options(parser, GRUScratchConfig)
    typed = vars(parser.parse_args(["--hidden", "16", "--layers", "2", "--embed", "4",
                                    "--bidirectional", "--reset-after"]))
    assert typed == {"num_hiddens": 16, "num_layers": 2, "embed_size": 4, "bidirectional": True,
                     "reset_after": True}
    model = create_model("gru_scratch", vocab_size=9, **model_info("gru_scratch").model_options(typed))
    assert model.cell.reset_after and model.cell.num_layers == 2 and model.embedding.embedding_dim == 4
    for bad, flag in [({"num_hiddens": 0}, "--num-hiddens"), ({"num_layers": 1.5}, "--num-layers"),
                      ({"embed_size": 0}, "--embed-size")]:
        with pytest.raises(DivekitError, match=flag):
            RNNConfig(**bad)
    with pytest.raises(TypeError):  # an option another family has
        model_info("gru").model_options({"reset_after": True})


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("name", LM_NAMES)
def test_language_model_maps_token_ids_to_logits(name, bidirectional):
    V = 11
    model = create_model(
        name, vocab_size=V, num_hiddens=8, num_layers=2, bidirectional=bidirectional
    )
    assert isinstance(model, RNNLM) and model.bidirectional is bidirectional
    X = torch.randint(0, V, (B, T))
    logits, state = model(X, model.begin_state(B))
    assert logits.shape == (B, T, V)
    dirs = 2 if bidirectional else 1
    for s in _as_tuple(state):
        assert s.shape == (2 * dirs, B, 8)
    # The state carries on: feeding the sequence in two halves equals feeding it whole (one direction).
    if not bidirectional:
        first, mid = model(X[:, :2])
        second, _ = model(X[:, 2:], detach_state(mid))
        torch.testing.assert_close(torch.cat([first, second], 1), logits, atol=ATOL, rtol=0)


def test_embedding_option_and_bad_inputs():
    model = create_model("lstm_scratch", vocab_size=7, num_hiddens=5, embed_size=3)
    logits, (h, c) = model(torch.randint(0, 7, (2, 4)))
    assert logits.shape == (2, 4, 7) and h.shape == c.shape == (1, 2, 5)
    assert begin_state(nn.LSTM(3, 5, num_layers=2), 4)[1].shape == (2, 4, 5)
    with pytest.raises(DivekitError, match="vocab_size"):
        create_model("gru", vocab_size=0)
    with pytest.raises(DivekitError, match=r"\(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    torch.manual_seed(2)
    params = [nn.Parameter(torch.randn(s)) for s in [(3, 4), (5,), (2, 2, 2)]]
    params.append(nn.Parameter(torch.randn(2)))  # no gradient: skipped, as by torch
    for p in params[:3]:
        p.grad = torch.randn_like(p) * 3
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    for p, r in zip(params, ref):
        r.grad = None if p.grad is None else p.grad.clone()

    total = clip_grad_norm(params, max_norm)
    total_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    torch.testing.assert_close(total, total_ref)
    for p, r in zip(params[:3], ref[:3]):
        torch.testing.assert_close(p.grad, r.grad)
    if max_norm < total_ref:
        new_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params[:3]]))
        assert new_norm == pytest.approx(max_norm, rel=1e-5)
    with pytest.raises(DivekitError, match="max_norm"):
        clip_grad_norm(params, -1.0)


# ----------------------------------------------------------------------------- the fused path

FUSED_KINDS = {
    "rnn": lambda: RNNScratch(D, H, num_layers=2, bidirectional=True, sigma=0.5),
    "rnn_relu": lambda: RNNScratch(D, H, num_layers=2, bidirectional=True, sigma=0.5,
                                   nonlinearity="relu"),
    "gru": lambda: GRUScratch(D, H, num_layers=2, bidirectional=True, sigma=0.5),
    "gru_reset_after": lambda: GRUScratch(D, H, num_layers=2, bidirectional=True, sigma=0.5,
                                          reset_after=True),
    "lstm": lambda: LSTMScratch(D, H, num_layers=2, bidirectional=True, sigma=0.5),
}


@pytest.mark.parametrize("loss_on", ["both", "outputs", "state"])
@pytest.mark.parametrize("kind", list(FUSED_KINDS))
def test_fused_path_matches_the_course_equations(kind, loss_on):
    """The hand-written BPTT (rnn_fused) against the cells' ``reference`` (the course's
    equations step by step under autograd): outputs, final state and every gradient, in double
    precision, with a random initial state; losses on the outputs only or the state only leave
    the other's incoming gradient None, which the backward passes must handle."""
    torch.manual_seed(3)
    fast = FUSED_KINDS[kind]().double()
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_(0, 0.5)  # b_hh too (zeros at creation), so every term is exercised
    ref = use_reference(copy.deepcopy(fast))
    assert all(c.fused for c in fast.cells) and not any(c.fused for c in ref.cells)
    X = torch.randn(T, B, D, dtype=torch.double, requires_grad=True)
    dirs = 2
    state = _random_state("lstm" if kind == "lstm" else kind, 2, dirs)
    state = tuple(s.detach().double().requires_grad_() for s in _as_tuple(state))
    weights = torch.randn(T, B, dirs * H, dtype=torch.double)
    results = []
    for net in (fast, ref):
        out, final = net(X, state if kind == "lstm" else state[0])
        loss = torch.zeros((), dtype=torch.double)
        if loss_on in ("both", "outputs"):
            loss = loss + (out * weights).sum()
        if loss_on in ("both", "state"):
            loss = loss + sum((s * s).sum() for s in _as_tuple(final))
        leaves = [X, *state, *net.parameters()]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append((out, _as_tuple(final), grads))
    (out, final, grads), (out_r, final_r, grads_r) = results
    torch.testing.assert_close(out, out_r, atol=1e-12, rtol=0)
    for s, r in zip(final, final_r, strict=True):
        torch.testing.assert_close(s, r, atol=1e-12, rtol=0)
    for g, r in zip(grads, grads_r, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", list(FUSED_KINDS))
def test_fused_path_gradcheck_and_no_grad(kind):
    """Finite differences agree with the fused backward; under no_grad the fused forward (which
    then stores nothing for a backward pass) gives the same outputs."""
    torch.manual_seed(4)
    net = FUSED_KINDS[kind]().double()
    X = torch.randn(3, 2, D, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: net(x)[0], (X,))
    with torch.no_grad():
        plain, _ = net(X)
    torch.testing.assert_close(plain, net(X)[0].detach(), atol=0, rtol=0)
