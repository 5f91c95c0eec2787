"""Greedy and beam search against loops and exhaustive search over every sequence."""

from __future__ import annotations

import itertools

import pytest
import torch

from divekit.errors import DivekitError
from divekit.ops.decoding import beam_search, greedy_search, index_state


class ToyDecoder:
    """A tiny recurrent scorer: s' = tanh(W s + E[token]), logits = U s'. ``layout`` puts the
    state at (N, H) ("rows"), (1, N, H) ("rnn", batch_dim 1) or a dict with a tuple inside."""

    def __init__(self, vocab=4, hidden=5, seed=0, layout="rows", scale=2.0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(hidden, hidden, generator=g) * 0.8
        self.E = torch.randn(vocab, hidden, generator=g) * scale
        self.U = torch.randn(hidden, vocab, generator=g) * scale
        self.s0 = torch.randn(hidden, generator=g)
        self.layout, self.calls = layout, 0

    def init(self, n):
        s = self.s0.expand(n, -1).clone()
        return {"rows": s, "rnn": s[None], "nested": {"h": (s, None), "tag": "x"}}[self.layout]

    def _get(self, state):
        return {"rows": lambda: state, "rnn": lambda: state[0], "nested": lambda: state["h"][0]}[self.layout]()

    def _put(self, s):
        return {"rows": s, "rnn": s[None], "nested": {"h": (s, None), "tag": "x"}}[self.layout]

    def step(self, tokens, state):
        self.calls += 1
        s = torch.tanh(self._get(state) @ self.W.T + self.E[tokens])
        return s @ self.U, self._put(s)

    def log_prob(self, seq, first):
        """Summed log-probability of ``seq`` after ``first``, one row, by hand."""
        state, tok, total = self.init(1), torch.tensor([first]), 0.0
        for y in seq:
            logits, state = self.step(tok, state)
            total += torch.log_softmax(logits, -1)[0, y].item()
            tok = torch.tensor([y])
        return total


def exhaustive(model, first, eos, max_len, vocab, alpha):
    best = None
    others = [v for v in range(vocab) if v != eos]
    for length in range(1, max_len + 1):
        for body in itertools.product(others, repeat=length - 1):
            endings = [eos] + (others if length == max_len else [])
            for last in endings:
                seq = [*body, last]
                lp = model.log_prob(seq, first)
                key = lp / length ** alpha
                if best is None or key > best[0]:
                    best = (key, lp, seq)
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.75, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_wide_beam_is_exhaustive_search(alpha, seed):
    vocab, eos, max_len = 4, 3, 4
    model = ToyDecoder(vocab, seed=seed)
    firsts = torch.tensor([0, 1, 2])
    out = beam_search(model.step, model.init(3), firsts, eos, max_len, beam_size=64, length_penalty=alpha)
    for i, first in enumerate(firsts.tolist()):
        key, lp, seq = exhaustive(model, first, eos, max_len, vocab, alpha)
        assert out.tokens[i] == seq
        assert out.scores[i] == pytest.approx(lp, abs=1e-5)
        assert out.normalized[i] == pytest.approx(key, abs=1e-5)


def test_beam_of_one_is_greedy_and_greedy_matches_a_loop():
    vocab, eos, max_len = 6, 0, 7
    model = ToyDecoder(vocab, seed=3)
    firsts = torch.tensor([1, 2, 3, 4, 5])
    greedy = greedy_search(model.step, model.init(5), firsts, eos, max_len)
    for i, first in enumerate(firsts.tolist()):
        state, tok, seq = model.init(1), torch.tensor([first]), []
        for _ in range(max_len):
            logits, state = model.step(tok, state)
            y = int(logits.argmax())
            seq.append(y)
            if y == eos:
                break
            tok = torch.tensor([y])
        assert greedy.tokens[i] == seq
        assert greedy.scores[i] == pytest.approx(model.log_prob(seq, first), abs=1e-5)
    beam = beam_search(model.step, model.init(5), firsts, eos, max_len, beam_size=1, length_penalty=0.0)
    assert beam.tokens == greedy.tokens


@pytest.mark.parametrize("layout", ["rnn", "nested"])
def test_state_layouts_rnn_batch_dim_and_nested(layout):
    vocab, eos, max_len = 4, 3, 3
    ref = ToyDecoder(vocab, seed=4, layout="rows")
    model = ToyDecoder(vocab, seed=4, layout=layout)
    firsts = torch.tensor([0, 2])
    kw = {"batch_dim": 1} if layout == "rnn" else {}
    a = beam_search(ref.step, ref.init(2), firsts, eos, max_len, beam_size=3)
    b = beam_search(model.step, model.init(2), firsts, eos, max_len, beam_size=3, **kw)
    assert a.tokens == b.tokens and a.scores == pytest.approx(b.scores)


def test_integer_bos_and_errors():
    model = ToyDecoder()
    out = greedy_search(model.step, model.init(2), 1, eos=3, max_len=3, batch_size=2)
    assert len(out.tokens) == 2
    with pytest.raises(DivekitError, match="batch_size"):
        greedy_search(model.step, model.init(2), 1, eos=3, max_len=3)
    with pytest.raises(DivekitError, match="max_len"):
        beam_search(model.step, model.init(1), torch.tensor([0]), 3, 0)
    with pytest.raises(DivekitError, match="beam_size"):
        beam_search(model.step, model.init(1), torch.tensor([0]), 3, 2, beam_size=0)
    with pytest.raises(DivekitError, match="outside the vocabulary"):
        beam_search(model.step, model.init(1), torch.tensor([0]), 9, 2)


def test_index_state_keeps_structure():
    state = {"a": torch.arange(6).reshape(3, 2), "b": (torch.arange(3), None), "n": 5}
    out = index_state(state, torch.tensor([2, 0]))
    assert out["a"].tolist() == [[4, 5], [0, 1]] and out["b"][0].tolist() == [2, 0]
    assert out["b"][1] is None and out["n"] == 5


def test_n_best_lists_the_best_finished_hypotheses_in_order():
    model = ToyDecoder(vocab=4, seed=3)
    out = beam_search(model.step, model.init(2), 1, 0, 4, beam_size=3, batch_size=2, n_best=3)
    for row in range(2):
        hyps = out.nbest[row]
        assert 1 <= len(hyps) <= 3 and hyps[0] == (out.tokens[row], out.scores[row], out.normalized[row])
        norms = [h[2] for h in hyps]
        assert norms == sorted(norms, reverse=True)
        for seq, total, norm in hyps:  # each score is the sequence's own log-probability
            assert total == pytest.approx(model.log_prob(seq, 1), abs=1e-5)
            assert norm == pytest.approx(total / len(seq) ** 0.75)
    with pytest.raises(DivekitError, match="n_best"):
        beam_search(model.step, model.init(2), 1, 0, 4, beam_size=2, batch_size=2, n_best=3)


def test_index_state_follows_dataclass_states():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class State:
        h: torch.Tensor
        lens: torch.Tensor | None
        offset: int

    s = State(torch.arange(6.0).reshape(3, 2), None, 4)
    picked = index_state(s, torch.tensor([2, 0]))
    assert picked.h.tolist() == [[4, 5], [0, 1]] and picked.lens is None and picked.offset == 4
