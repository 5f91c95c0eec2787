"""The book's training and evaluation loops (divekit.compat.d2l._train): tiny runs on the CPU,
checked against brute-force definitions and torch's own modules."""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections import Counter

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from divekit.compat.d2l import _train as T
from divekit.compat.d2l._util import BoundedLoader, try_all_gpus
from divekit.data.text import SeqDataLoader, Vocab

CPU = torch.device("cpu")

BOOK_SIGNATURES = {
    "synthetic_data": "(w, b, num_examples)",
    "linreg": "(X, w, b)",
    "squared_loss": "(y_hat, y)",
    "sgd": "(params, lr, batch_size)",
    "accuracy": "(y_hat, y)",
    "evaluate_accuracy": "(net, data_iter)",
    "evaluate_accuracy_gpu": "(net, data_iter, device=None)",
    "evaluate_loss": "(net, data_iter, loss)",
    "train_epoch_ch3": "(net, train_iter, loss, updater)",
    "train_ch3": "(net, train_iter, test_iter, loss, num_epochs, updater)",
    "predict_ch3": "(net, test_iter, n=6)",
    "train_ch6": "(net, train_iter, test_iter, num_epochs, lr, device)",
    "train_batch_ch13": "(net, X, y, loss, trainer, devices)",
    "train_ch13": "(net, train_iter, test_iter, loss, trainer, num_epochs, devices=DEVICES)",
    "grad_clipping": "(net, theta)",
    "predict_ch8": "(prefix, num_preds, net, vocab, device)",
    "train_epoch_ch8": "(net, train_iter, loss, updater, device, use_random_iter)",
    "train_ch8": "(net, train_iter, vocab, lr, num_epochs, device, use_random_iter=False)",
    "train_seq2seq": "(net, data_iter, lr, num_epochs, tgt_vocab, device)",
    "predict_seq2seq": "(net, src_sentence, src_vocab, tgt_vocab, num_steps, device, "
                       "save_attention_weights=False)",
    "bleu": "(pred_seq, label_seq, k)",
    "split_batch": "(X, y, devices)",
    "_get_batch_loss_bert": "(net, loss, vocab_size, tokens_X, segments_X, valid_lens_x, "
                            "pred_positions_X, mlm_weights_X, mlm_Y, nsp_y)",
}


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: one thread runs them fastest (and on a busy machine, several
    threads wait for each other on every small op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder:
    """Stands in for the Animator: keeps every ``add``."""

    def __init__(self, **kwargs):
        self.kwargs, self.points = kwargs, []

    def add(self, x, y):
        self.points.append((x, list(y) if hasattr(y, "__len__") else [y]))


@pytest.fixture
def animators(monkeypatch):
    made: list[Recorder] = []

    def make(**kwargs):
        made.append(Recorder(**kwargs))
        return made[-1]

    monkeypatch.setattr(T, "_animator", make)
    monkeypatch.delenv("DIVEKIT_BOOK_QUICK", raising=False)
    return made


def _plain(sig: inspect.Signature) -> str:
    parts = []
    for p in sig.parameters.values():
        if p.default is inspect.Parameter.empty:
            parts.append(p.name)
        elif p.name == "devices":
            parts.append("devices=DEVICES")
        else:
            parts.append(f"{p.name}={p.default!r}")
    return "(" + ", ".join(parts) + ")"


def test_signatures_are_the_books():
    assert set(BOOK_SIGNATURES) == set(T.__all__)
    for name, expected in BOOK_SIGNATURES.items():
        assert _plain(inspect.signature(getattr(T, name))) == expected, name
    default = inspect.signature(T.train_ch13).parameters["devices"].default
    assert list(default) == try_all_gpus()


# ----------------------------------------------------------------------------- data helpers
def _images(n=64, seed=0):
    """Two classes of 1x28x28 images told apart by a bright or dark left half."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    X = torch.randn(n, 1, 28, 28, generator=g) * 0.5
    X[:, :, :, :14] += (y.float() * 2 - 1).reshape(-1, 1, 1, 1)
    return X, y


def _loader(X, y, batch_size, shuffle=False):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y),
                                       batch_size=batch_size, shuffle=shuffle)


def _small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, kernel_size=5), nn.ReLU(), nn.AvgPool2d(4),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


LOSS_LINE = re.compile(r"^loss (\d+\.\d{3}), train acc (\d\.\d{3}), test acc (\d\.\d{3})$")


# ----------------------------------------------------------------------------- train_ch6 / ch13
def test_train_ch6_trains_in_place_and_prints_the_books_lines(animators, capsys):
    torch.manual_seed(0)
    X, y = _images(64)
    Xt, yt = _images(32, seed=1)
    net = _small_cnn()
    before = [p.detach().clone() for p in net.parameters()]
    result = T.train_ch6(net, _loader(X, y, 8, shuffle=True), _loader(Xt, yt, 16), 3, 0.1, CPU)
    assert result is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "training on cpu"
    m = LOSS_LINE.match(lines[1])
    assert m, lines[1]
    assert re.fullmatch(r"\d+\.\d examples/sec on cpu", lines[2]), lines[2]
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    (anim,) = animators
    assert anim.kwargs["legend"] == ["train loss", "train acc", "test acc"]
    train_losses = [ys[0] for _, ys in anim.points if ys[0] is not None]
    # 8 batches: a point every 8 // 5 = 1 batch, plus the test accuracy after each epoch
    assert len(anim.points) == 3 * (8 + 1)
    assert train_losses[-1] < train_losses[0]
    assert float(m.group(1)) == pytest.approx(train_losses[-1], abs=6e-4)
    # the printed test accuracy is the network's accuracy on the test data, by brute force
    with torch.no_grad():
        brute = (net(Xt).argmax(1) == yt).float().mean().item()
    assert float(m.group(3)) == pytest.approx(brute, abs=6e-4)
    assert float(m.group(3)) > 0.8


@pytest.mark.parametrize("batch_size, expected", [(32, 2), (64, 1), (16, 4)])
def test_train_ch6_with_fewer_than_five_batches(animators, capsys, batch_size, expected):
    X, y = _images(64)
    T.train_ch6(_small_cnn(), _loader(X, y, batch_size), _loader(X, y, 64), 2, 0.05, CPU)
    (anim,) = animators
    # every batch is drawn (the book divides by zero here), then the test accuracy
    xs = [x for x, ys in anim.points if ys[0] is not None]
    assert xs == [e + (i + 1) / expected for e in range(2) for i in range(expected)]
    assert LOSS_LINE.match(capsys.readouterr().out.splitlines()[1])


def test_train_ch6_loss_matches_a_brute_force_epoch(animators, capsys):
    """One epoch of lr 0 leaves the net as initialised: the printed loss and train accuracy
    are then the plain mean loss and accuracy of the training data."""
    X, y = _images(48)
    net = _small_cnn()
    T.train_ch6(net, _loader(X, y, 16), _loader(X, y, 16), 1, 0.0, CPU)
    m = LOSS_LINE.match(capsys.readouterr().out.splitlines()[1])
    with torch.no_grad():
        out = net(X)
    assert float(m.group(1)) == pytest.approx(F.cross_entropy(out, y).item(), abs=6e-4)
    assert float(m.group(2)) == pytest.approx((out.argmax(1) == y).float().mean().item(),
                                              abs=6e-4)


def _bn_cnn():
    # no bias before the batch norm: its gradient is zero up to rounding, which Adam would
    # scale up to full steps of either sign
    return nn.Sequential(nn.Conv2d(1, 4, kernel_size=5, bias=False), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_train_ch6_channels_last_on_cpu_matches_the_contiguous_steps(animators, capsys):
    """On the CPU a CNN trains in channels_last: the same object and parameters, converted in
    place, with the book's SGD steps (Xavier init, mean cross-entropy) up to float rounding."""
    X, y = _images(48)
    net = _small_cnn()
    ref = copy.deepcopy(net)
    params = list(net.parameters())
    torch.manual_seed(3)
    T.train_ch6(net, _loader(X, y, 16), _loader(X, y, 16), 2, 0.1, CPU)
    assert list(net.parameters()) == params  # the same Parameter objects
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)  # the same Xavier draws, then the plain contiguous steps
    for m in ref.modules():
        if type(m) in (nn.Linear, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        for Xb, yb in _loader(X, y, 16):
            opt.zero_grad()
            F.cross_entropy(ref(Xb), yb).backward()
            opt.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    m = LOSS_LINE.match(capsys.readouterr().out.splitlines()[1])
    with torch.no_grad():
        acc = (ref.eval()(X).argmax(1) == y).float().mean().item()
    assert float(m.group(3)) == pytest.approx(acc, abs=6e-4)


def test_train_ch13_channels_last_keeps_the_optimizer_and_its_state(animators, capsys):
    torch.manual_seed(0)
    X, y = _images(32)
    net = _bn_cnn()
    ref = copy.deepcopy(net)
    loss = nn.CrossEntropyLoss(reduction="none")
    trainer = torch.optim.Adam(net.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for model, opt in ((net, trainer), (ref, ref_opt)):  # a step before: Adam has state
        opt.zero_grad()
        loss(model(X[:8]), y[:8]).sum().backward()
        opt.step()
    T.train_ch13(net, _loader(X, y, 8), _loader(X, y, 16), loss, trainer, 2, [CPU])
    assert all(trainer.state[p]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
               for p in net.parameters() if p.dim() == 4)
    assert trainer.param_groups[0]["params"] == list(net.parameters())
    for _ in range(2):
        ref.train()
        for Xb, yb in _loader(X, y, 8):
            ref_opt.zero_grad()
            loss(ref(Xb), yb).sum().backward()
            ref_opt.step()
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_train_ch13_leaves_the_layout_off_the_cpu_alone():
    net = _small_cnn()
    assert not T._to_channels_last(net, torch.device("meta"))
    assert net[0].weight.is_contiguous()
    assert not T._to_channels_last(nn.Linear(3, 2), CPU)  # no convolutions: nothing to do


class ListInputNet(nn.Module):
    """Takes its input as a list of tensors, as the BERT classifier of the book does."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, inputs):
        x1, x2 = inputs
        return self.a(x1) + self.b(x2)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, n=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x1, self.x2 = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
        self.y = (self.x1[:, 0] + self.x2[:, 1] > 0).long() + (self.x1[:, 2] > 1).long()

    def __getitem__(self, i):
        return (self.x1[i], self.x2[i]), self.y[i]

    def __len__(self):
        return len(self.y)


def test_train_ch13_list_inputs_in_place(animators, capsys):
    torch.manual_seed(0)
    net = ListInputNet()
    before = [p.detach().clone() for p in net.parameters()]
    train = torch.utils.data.DataLoader(ListDataset(40), batch_size=4, shuffle=True)
    test = torch.utils.data.DataLoader(ListDataset(20, seed=1), batch_size=8)
    trainer = torch.optim.Adam(net.parameters(), lr=0.05)
    loss = nn.CrossEntropyLoss(reduction="none")
    T.train_ch13(net, train, test, loss, trainer, 3, [CPU])
    lines = capsys.readouterr().out.strip().splitlines()
    assert LOSS_LINE.match(lines[0]), lines[0]
    assert re.fullmatch(r"\d+\.\d examples/sec on \[device\(type='cpu'\)\]", lines[1])
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    (anim,) = animators
    losses = [ys[0] for _, ys in anim.points if ys[0] is not None]
    assert len(losses) == 3 * 5  # 10 batches: a point every 2
    assert losses[-1] < losses[0]
    # the last test accuracy drawn is evaluate_accuracy_gpu's, which is the brute force one
    ds = ListDataset(20, seed=1)
    with torch.no_grad():
        brute = (net([ds.x1, ds.x2]).argmax(1) == ds.y).float().mean().item()
    assert anim.points[-1][1][2] == pytest.approx(brute)


def test_train_batch_ch13_matches_a_manual_step():
    torch.manual_seed(0)
    net, ref = nn.Linear(5, 3), nn.Linear(5, 3)
    ref.load_state_dict(net.state_dict())
    X, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    loss = nn.CrossEntropyLoss(reduction="none")
    l_sum, correct = T.train_batch_ch13(net, X, y, loss, torch.optim.SGD(net.parameters(), 0.1),
                                        [CPU])
    opt = torch.optim.SGD(ref.parameters(), 0.1)
    out = ref(X)
    losses = loss(out, y)
    losses.sum().backward()
    opt.step()
    assert l_sum.item() == pytest.approx(losses.sum().item())
    assert correct.item() == (out.argmax(1) == y).sum().item()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


# ----------------------------------------------------------------------------- quick mode
def test_quick_mode_caps_epochs_and_batches(animators, capsys, monkeypatch):
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_EPOCHS", "1")
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_BATCHES", "2")
    X, y = _images(64)
    net = _small_cnn()
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(m.training))
    T.train_ch6(net, _loader(X, y, 8), BoundedLoader(_loader(X, y, 8)), 5, 0.1, CPU)
    out = capsys.readouterr().out
    assert "(quick: 1 of 5 epochs, at most 2 batches each)" in out
    assert calls.count(True) == 2 and calls.count(False) == 2  # 2 train, 2 test batches
    assert LOSS_LINE.match(out.splitlines()[2])


def test_quick_mode_is_silent_when_nothing_is_cut(animators, capsys, monkeypatch):
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")
    X, y = _images(16)
    T.train_ch6(_small_cnn(), _loader(X, y, 8), _loader(X, y, 8), 2, 0.1, CPU)
    assert "quick" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- evaluation
def test_accuracy_and_evaluation_match_brute_force():
    g = torch.Generator().manual_seed(0)
    y_hat, y = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    brute = sum(int(max(range(4), key=lambda j: y_hat[i, j]) == y[i]) for i in range(50))
    assert T.accuracy(y_hat, y) == float(brute)
    assert T.accuracy(torch.tensor([1, 0, 2]), torch.tensor([1, 1, 2])) == 2.0

    net = nn.Linear(4, 4)
    X = torch.randn(50, 4, generator=g)
    with torch.no_grad():
        brute = (net(X).argmax(1) == y).float().mean().item()
    data = _loader(X, y, 7)
    assert T.evaluate_accuracy(net, data) == pytest.approx(brute)
    assert T.evaluate_accuracy_gpu(net, data) == pytest.approx(brute)
    assert not net.training  # left in eval mode, as in the book
    # a plain function (the multiple-GPU section's lambda) with an explicit device
    W = net.weight.detach().T.clone()
    fn = lambda x: x @ W + net.bias.detach()  # noqa: E731
    assert T.evaluate_accuracy_gpu(fn, data, CPU) == pytest.approx(brute)
    assert T.evaluate_accuracy(fn, data) == pytest.approx(brute)

    loss = nn.MSELoss(reduction="none")
    target = torch.randn(50, generator=g)
    reg = nn.Linear(4, 1)
    with torch.no_grad():
        brute_loss = ((reg(X).reshape(-1) - target) ** 2).mean().item()
    assert T.evaluate_loss(reg, _loader(X, target, 9), loss) == pytest.approx(brute_loss)


def test_evaluate_accuracy_refuses_empty_data():
    from divekit.errors import DivekitError

    with pytest.raises(DivekitError, match="no batches"):
        T.evaluate_accuracy(nn.Linear(2, 2), [])


# ----------------------------------------------------------------------------- linear models
def test_sgd_is_one_step_of_torch_sgd():
    torch.manual_seed(0)
    params = [torch.randn(3, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    X = torch.randn(10, 3)
    for ps in (params, ref):
        ((X @ ps[0] + ps[1]) ** 2).sum().backward()
    torch.optim.SGD(ref, lr=0.03 / 10).step()
    T.sgd(params, 0.03, 10)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q)
        assert torch.count_nonzero(p.grad) == 0  # zeroed for the next step, as in the book


def test_linear_regression_pieces():
    torch.manual_seed(0)
    w, b = torch.tensor([2.0, -3.4]), 4.2
    X, y = T.synthetic_data(w, b, 1000)
    assert X.shape == (1000, 2) and y.shape == (1000, 1)
    residual = y - T.linreg(X, w, b).reshape(-1, 1)
    assert residual.std().item() == pytest.approx(0.01, rel=0.1)
    torch.testing.assert_close(T.squared_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 0.0])),
                               torch.tensor([[0.5], [4.5]]))


def test_train_epoch_ch3_with_both_kinds_of_updater(animators, monkeypatch):
    torch.manual_seed(0)
    X, y = _images(64)
    X = X.reshape(64, -1)
    data = _loader(X, y, 16)
    W = torch.zeros(784, 2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)

    def net(x):
        return x @ W + b

    def loss(y_hat, y):
        return F.cross_entropy(y_hat, y, reduction="none")

    with torch.no_grad():
        W += torch.randn(784, 2, generator=torch.Generator().manual_seed(1)) * 0.01
        out = net(X)
    # lr 0: the epoch's numbers are the plain mean loss and accuracy
    still = T.train_epoch_ch3(net, data, loss, lambda batch_size: T.sgd([W, b], 0.0, batch_size))
    assert still[0] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
    assert still[1] == pytest.approx((out.argmax(1) == y).float().mean().item())
    first = T.train_epoch_ch3(net, data, loss, lambda batch_size: T.sgd([W, b], 0.1, batch_size))
    second = T.train_epoch_ch3(net, data, loss, lambda batch_size: T.sgd([W, b], 0.1, batch_size))
    assert second[0] < first[0] < still[0] and second[1] > 0.9
    module = nn.Linear(784, 2)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    ce = nn.CrossEntropyLoss(reduction="none")
    losses = [T.train_epoch_ch3(module, data, ce, opt)[0] for _ in range(3)]
    assert losses[-1] < losses[0]
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")  # no sanity asserts in quick mode
    T.train_ch3(module, data, data, ce, 3, opt)
    assert len(animators[0].points) == 2


# ----------------------------------------------------------------------------- clipping, split
def test_grad_clipping_module_and_scratch_params():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    (net(torch.randn(5, 4)) * 10).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    norm = math.sqrt(sum((g ** 2).sum().item() for g in grads))
    assert norm > 1
    T.grad_clipping(net, 1)
    for p, g in zip(net.parameters(), grads):
        torch.testing.assert_close(p.grad, g / norm, rtol=1e-5, atol=1e-6)

    class Scratch:
        params = [torch.ones(3, requires_grad=True)]

    Scratch.params[0].grad = torch.full((3,), 0.1)
    T.grad_clipping(Scratch(), 1)  # norm 0.17 < 1: unchanged
    torch.testing.assert_close(Scratch.params[0].grad, torch.full((3,), 0.1))


def test_split_batch():
    X, y = torch.arange(20).reshape(10, 2), torch.arange(10)
    Xs, ys = T.split_batch(X, y, [CPU, CPU, CPU])
    assert [len(x) for x in Xs] == [4, 4, 2] and [len(t) for t in ys] == [4, 4, 2]
    torch.testing.assert_close(torch.cat(Xs), X)
    from divekit.errors import DivekitError

    with pytest.raises(DivekitError):
        T.split_batch(X, y[:5], [CPU])


# ----------------------------------------------------------------------------- language models
class BookRNNModel(nn.Module):
    """The book's RNNModel contract: ids (B, T) -> (T*B, V) time-major scores and a state."""

    def __init__(self, rnn_layer, vocab_size):
        super().__init__()
        self.rnn, self.vocab_size = rnn_layer, vocab_size
        self.linear = nn.Linear(rnn_layer.hidden_size, vocab_size)

    def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size).float()
        Y, state = self.rnn(X, state)
        return self.linear(Y.reshape(-1, Y.shape[-1])), state

    def begin_state(self, device, batch_size=1):
        return torch.zeros(self.rnn.num_layers, batch_size, self.rnn.hidden_size, device=device)


class ScratchRNN:
    """The book's RNNModelScratch contract: a callable with ``params`` and
    ``begin_state(batch_size, device)``."""

    def __init__(self, vocab_size, num_hiddens, device):
        g = torch.Generator().manual_seed(0)
        self.vocab_size, self.num_hiddens = vocab_size, num_hiddens
        self.params = [t.requires_grad_() for t in (
            torch.randn(vocab_size, num_hiddens, generator=g) * 0.1,
            torch.randn(num_hiddens, num_hiddens, generator=g) * 0.1, torch.zeros(num_hiddens),
            torch.randn(num_hiddens, vocab_size, generator=g) * 0.1, torch.zeros(vocab_size))]

    def __call__(self, X, state):
        W_xh, W_hh, b_h, W_hq, b_q = self.params
        (H,) = state
        outputs = []
        for x in F.one_hot(X.T, self.vocab_size).float():
            H = torch.tanh(x @ W_xh + H @ W_hh + b_h)
            outputs.append(H @ W_hq + b_q)
        return torch.cat(outputs, dim=0), (H,)

    def begin_state(self, batch_size, device):
        return (torch.zeros((batch_size, self.num_hiddens), device=device),)


TEXT = "the time traveller for so it will be convenient to speak of him " * 6


def _char_data(batch_size=4, num_steps=8):
    vocab = Vocab(list(TEXT))
    corpus = torch.tensor([vocab[c] for c in TEXT])
    return SeqDataLoader(corpus, batch_size, num_steps, "sequential", seed=0), vocab


PPL_LINE = re.compile(r"^perplexity (\d+\.\d), (\d+\.\d) tokens/sec on cpu$")


@pytest.mark.parametrize("kind", ["module", "scratch"])
def test_train_ch8_lowers_perplexity(animators, capsys, kind):
    torch.manual_seed(0)
    loader, vocab = _char_data()
    if kind == "module":
        net = BookRNNModel(nn.RNN(len(vocab), 32), len(vocab))
        before = [p.detach().clone() for p in net.parameters()]
    else:
        net = ScratchRNN(len(vocab), 32, CPU)
        before = [p.detach().clone() for p in net.params]
    T.train_ch8(net, loader, vocab, 1, 8, CPU)
    lines = capsys.readouterr().out.strip().splitlines()
    m = PPL_LINE.match(lines[0])
    assert m, lines[0]
    assert lines[1].startswith("time traveller") and len(lines[1]) == len("time traveller") + 50
    assert lines[2].startswith("traveller") and len(lines[2]) == len("traveller") + 50
    (anim,) = animators
    ppls = [ys[0] for _, ys in anim.points]
    assert len(ppls) == 8  # fewer than 10 epochs: a point every epoch
    assert ppls[-1] < ppls[0] < len(vocab) * 1.5
    assert float(m.group(1)) == pytest.approx(ppls[-1], abs=0.06)
    after = list(net.parameters()) if kind == "module" else net.params
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_train_epoch_ch8_perplexity_is_exp_of_the_mean_loss():
    """With lr 0, the epoch's perplexity is exp of the mean token loss of a hand-written pass
    that carries the state from batch to batch."""
    loader, vocab = _char_data()
    torch.manual_seed(0)
    net = BookRNNModel(nn.GRU(len(vocab), 16), len(vocab))
    loader.set_epoch(3)
    ppl, speed = T.train_epoch_ch8(net, loader, nn.CrossEntropyLoss(),
                                   torch.optim.SGD(net.parameters(), lr=0.0), CPU, False)
    loader.set_epoch(3)
    total = count = 0
    state = None
    with torch.no_grad():
        for X, Y in loader:
            state = net.begin_state(CPU, X.shape[0]) if state is None else state
            out, state = net(X, state)
            total += F.cross_entropy(out, Y.T.reshape(-1), reduction="sum").item()
            count += Y.numel()
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert speed > 0


def test_predict_ch8_matches_a_token_by_token_loop():
    loader, vocab = _char_data()
    torch.manual_seed(1)
    net = BookRNNModel(nn.LSTM(len(vocab), 16), len(vocab))
    net.begin_state = lambda device, batch_size=1: tuple(
        torch.zeros(1, batch_size, 16, device=device) for _ in range(2))
    got = T.predict_ch8("time tr", 12, net, vocab, CPU)
    # the book's loop, one token per call
    state = net.begin_state(batch_size=1, device=CPU)
    outputs = [vocab["time tr"[0]]]
    with torch.no_grad():
        for ch in "time tr"[1:]:
            _, state = net(torch.tensor([[outputs[-1]]]), state)
            outputs.append(vocab[ch])
        for _ in range(12):
            y, state = net(torch.tensor([[outputs[-1]]]), state)
            outputs.append(int(y.argmax(dim=1).reshape(1)))
    assert got == "".join(vocab.idx_to_token[i] for i in outputs)
    assert T.predict_ch8("t", 0, net, vocab, CPU) == "t"


# ----------------------------------------------------------------------------- seq2seq
WORDS = ["a", "b", "c", "d", "e"]


def _copy_data(n=48, num_steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = Vocab([WORDS], reserved_tokens=["<pad>", "<bos>", "<eos>"])
    sentences, rows, lens = [], [], []
    for _ in range(n):
        k = int(torch.randint(2, 5, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, 5, (k,), generator=g)]
        sentences.append(" ".join(words))
        ids = vocab[words] + [vocab["<eos>"]]
        lens.append(len(ids))
        rows.append(ids + [vocab["<pad>"]] * (num_steps - len(ids)))
    X, L = torch.tensor(rows), torch.tensor(lens)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, L, X, L),
                                         batch_size=8, shuffle=True)
    return loader, vocab, sentences


class Encoder(nn.Module):
    def __init__(self, vocab_size, embed=8, hidden=32):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)

    def forward(self, X, valid_lens):
        return self.rnn(self.embedding(X))  # (outputs (B, T, H), state (1, B, H))


class AttnDecoder(nn.Module):
    """Shaped like the book's Bahdanau decoder: dot-product attention over the encoder outputs
    and ``attention_weights`` as one (B, 1, T) tensor per time step of the last call."""

    def __init__(self, vocab_size, embed=8, hidden=32):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed)
        self.rnn = nn.GRU(embed + hidden, hidden, batch_first=True)
        self.dense = nn.Linear(hidden, vocab_size)
        self._attention_weights = []

    def init_state(self, enc_outputs, enc_valid_lens):
        outputs, hidden = enc_outputs
        return outputs, hidden, enc_valid_lens

    def forward(self, X, state):
        enc_outputs, hidden, valid_lens = state
        T_ = enc_outputs.shape[1]
        mask = torch.arange(T_, device=X.device)[None, :] < valid_lens[:, None]
        outs, self._attention_weights = [], []
        for x in self.embedding(X).unbind(1):  # (B, E) per step
            scores = torch.bmm(enc_outputs, hidden[-1].unsqueeze(2)).squeeze(2)
            weights = scores.masked_fill(~mask, -1e6).softmax(-1).unsqueeze(1)  # (B, 1, T)
            context = torch.bmm(weights, enc_outputs)  # (B, 1, H)
            out, hidden = self.rnn(torch.cat([x.unsqueeze(1), context], -1), hidden)
            outs.append(out)
            self._attention_weights.append(weights)
        return self.dense(torch.cat(outs, 1)), (enc_outputs, hidden, valid_lens)

    @property
    def attention_weights(self):
        return self._attention_weights


class EncoderDecoder(nn.Module):
    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, enc_X, dec_X, *args):
        enc_outputs = self.encoder(enc_X, *args)
        return self.decoder(dec_X, self.decoder.init_state(enc_outputs, *args))


def _book_predict(net, sentence, src_vocab, tgt_vocab, num_steps):
    """The book's greedy loop, step by step, for comparison."""
    net.eval()
    src = src_vocab[sentence.lower().split(" ")] + [src_vocab["<eos>"]]
    valid = torch.tensor([len(src)])
    src = src[:num_steps] + [src_vocab["<pad>"]] * (num_steps - len(src))
    with torch.no_grad():
        state = net.decoder.init_state(net.encoder(torch.tensor([src]), valid), valid)
        dec_X, out = torch.tensor([[tgt_vocab["<bos>"]]]), []
        for _ in range(num_steps):
            Y, state = net.decoder(dec_X, state)
            dec_X = Y.argmax(dim=2)
            pred = dec_X.item()
            if pred == tgt_vocab["<eos>"]:
                break
            out.append(pred)
    return " ".join(tgt_vocab.to_tokens(out))


def test_train_seq2seq_and_predict_seq2seq_on_a_copy_task(animators, capsys):
    torch.manual_seed(0)
    loader, vocab, sentences = _copy_data()
    net = EncoderDecoder(Encoder(len(vocab)), AttnDecoder(len(vocab)))
    T.train_seq2seq(net, loader, 0.02, 30, vocab, CPU)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"loss (\d+\.\d{3}), (\d+\.\d) tokens/sec on cpu", line)
    assert m, line
    (anim,) = animators
    losses = [ys[0] for _, ys in anim.points]
    assert [x for x, _ in anim.points] == [10, 20, 30]
    assert losses[-1] < losses[0] / 2
    assert float(m.group(1)) == pytest.approx(losses[-1], abs=6e-4)

    scores = []
    for sentence in sentences[:8]:
        got, attn = T.predict_seq2seq(net, sentence, vocab, vocab, 6, CPU)
        assert attn == []
        assert got == _book_predict(net, sentence, vocab, vocab, 6)
        scores.append(T.bleu(got, sentence, k=2))
    assert sum(scores) / len(scores) > 0.5  # it learned to copy, mostly

    got, attn = T.predict_seq2seq(net, sentences[0], vocab, vocab, 6, CPU,
                                  save_attention_weights=True)
    n_out = len(got.split()) if got else 0
    assert len(attn) in (n_out, n_out + 1)  # one entry per step, the <eos> step included
    # the bahdanau section's reshaping
    weights = torch.cat([step[0][0][0] for step in attn], 0).reshape((1, 1, -1, 6))
    assert weights.shape == (1, 1, len(attn), 6)
    valid = len(sentences[0].split()) + 1
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 1, len(attn)))
    assert weights[..., valid:].abs().max() < 1e-6  # padding gets no attention


def test_bleu_against_the_formula():
    def brute(pred, label, k):
        p, t = pred.split(" "), label.split(" ")
        score = math.exp(min(0, 1 - len(t) / len(p)))
        for n in range(1, k + 1):
            pg = Counter(tuple(p[i:i + n]) for i in range(len(p) - n + 1))
            tg = Counter(tuple(t[i:i + n]) for i in range(len(t) - n + 1))
            matches = sum(min(c, tg[g]) for g, c in pg.items())
            score *= (matches / (len(p) - n + 1)) ** (0.5 ** n)
        return score

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        lp, lt = (int(v) for v in torch.randint(2, 8, (2,), generator=g))
        pred = " ".join(WORDS[int(i)] for i in torch.randint(0, 4, (lp,), generator=g))
        label = " ".join(WORDS[int(i)] for i in torch.randint(0, 4, (lt,), generator=g))
        assert T.bleu(pred, label, 2) == pytest.approx(brute(pred, label, 2))
    assert T.bleu("va !", "va !", 2) == 1.0
    # shorter than k: the book divides by zero; here a finite 0
    short = T.bleu("va", "va !", 2)
    assert math.isfinite(short) and short == 0.0


# ----------------------------------------------------------------------------- BERT
def test_get_batch_loss_bert_weights_each_position():
    V, B, P = 11, 3, 4
    g = torch.Generator().manual_seed(0)
    mlm_scores, nsp_scores = torch.randn(B, P, V, generator=g), torch.randn(B, 2, generator=g)
    calls = []

    def net(tokens, segments, valid_lens, positions):
        calls.append(valid_lens.shape)
        return None, mlm_scores, nsp_scores

    weights = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    mlm_Y, nsp_y = torch.randint(0, V, (B, P), generator=g), torch.tensor([0, 1, 1])
    mlm_l, nsp_l, total = T._get_batch_loss_bert(
        net, nn.CrossEntropyLoss(), V, None, None, torch.tensor([[5], [6], [7]]), None, weights,
        mlm_Y, nsp_y)
    assert calls == [torch.Size([3])]
    real = [(b, p) for b in range(B) for p in range(P) if weights[b, p] > 0]
    brute = sum(F.cross_entropy(mlm_scores[b, p][None], mlm_Y[b, p][None]).item()
                for b, p in real) / len(real)
    assert mlm_l.item() == pytest.approx(brute, rel=1e-5)
    assert nsp_l.item() == pytest.approx(F.cross_entropy(nsp_scores, nsp_y).item())
    assert total.item() == pytest.approx(mlm_l.item() + nsp_l.item())
    _, nsp_none, _ = T._get_batch_loss_bert(
        net, nn.CrossEntropyLoss(reduction="none"), V, None, None, torch.tensor([5, 6, 7]), None,
        weights, mlm_Y, nsp_y)
    assert nsp_none.item() == pytest.approx(nsp_l.item())


class InPlaceDecoder(nn.Module):
    """Transformer-shaped attention weights ``[[self-attention per layer], [cross-attention per
    layer]]``, each ``(batch * heads, 1, keys)``, kept in one list that every call refills."""

    def __init__(self, vocab_size, layers=2, heads=2, num_steps=5):
        super().__init__()
        self.vocab_size, self.layers, self.heads, self.num_steps = vocab_size, layers, heads, num_steps
        self._attention_weights = [[None] * layers for _ in range(2)]

    def init_state(self, enc_outputs, enc_valid_lens):
        return 0

    def forward(self, X, state):
        step = state + 1
        for i in range(self.layers):
            self._attention_weights[0][i] = torch.full((self.heads, 1, step), 1.0 / step)
            self._attention_weights[1][i] = torch.full((self.heads, 1, self.num_steps), float(step))
        scores = torch.zeros(1, 1, self.vocab_size)
        scores[..., 4 + step % 2] = 1.0  # never <eos> (3): decoding runs num_steps steps
        return scores, step

    @property
    def attention_weights(self):
        return self._attention_weights


def test_predict_seq2seq_keeps_each_steps_attention_weights():
    vocab = Vocab([WORDS], reserved_tokens=["<pad>", "<bos>", "<eos>"])
    net = EncoderDecoder(lambda X, valid_lens: None, InPlaceDecoder(len(vocab)))
    translation, seq = T.predict_seq2seq(net, "a b", vocab, vocab, 5, CPU,
                                         save_attention_weights=True)
    assert len(translation.split()) == 5 and len(seq) == 5
    # each step keeps its own weights although the decoder refills one list
    assert [float(step[1][0][0, 0, 0]) for step in seq] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [step[0][1].shape[-1] for step in seq] == [1, 2, 3, 4, 5]
    # the transformer section's walk over steps, attention kinds, layers and heads
    rows = [head[0].tolist() for step in seq for attn in step for blk in attn for head in blk]
    assert len(rows) == 5 * 2 * 2 * 2


def test_predict_ch3_titles_and_images(monkeypatch):
    from divekit.compat.d2l import _plot

    shown = {}
    monkeypatch.setattr(_plot, "show_images",
                        lambda imgs, rows, cols, titles=None, scale=1.5: shown.update(
                            imgs=imgs, rows=rows, cols=cols, titles=titles))
    X, y = torch.rand(8, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    T.predict_ch3(net, _loader(X, y, 8), n=4)
    assert shown["imgs"].shape == (4, 28, 28) and (shown["rows"], shown["cols"]) == (1, 4)
    preds = net(X).argmax(1).tolist()
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
             "bag", "ankle boot"]
    assert shown["titles"] == [f"{names[t]}\n{names[p]}" for t, p in zip(y[:4].tolist(), preds)]


def test_train_ch6_draws_with_the_real_animator(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIVEKIT_FIGURES", str(tmp_path))
    monkeypatch.delenv("DIVEKIT_BOOK_QUICK", raising=False)
    X, y = _images(32)
    T.train_ch6(_small_cnn(), _loader(X, y, 8), _loader(X, y, 16), 2, 0.1, CPU)
    assert LOSS_LINE.match(capsys.readouterr().out.splitlines()[1])
    assert list(tmp_path.glob("*.png"))  # the curves were written as a PNG


# ----------------------------------------------------------------------------- with d2l's models
def _scratch_rnn_functions(num_hiddens):
    def get_params(vocab_size, num_hiddens, device):
        g = torch.Generator().manual_seed(0)
        shapes = [(vocab_size, num_hiddens), (num_hiddens, num_hiddens), (num_hiddens,),
                  (num_hiddens, vocab_size), (vocab_size,)]
        return [(torch.randn(s, generator=g) * 0.1 if len(s) == 2 else torch.zeros(s))
                .to(device).requires_grad_() for s in shapes]

    def init_state(batch_size, num_hiddens, device):
        return (torch.zeros((batch_size, num_hiddens), device=device),)

    def forward_fn(inputs, state, params):
        W_xh, W_hh, b_h, W_hq, b_q = params
        (H,) = state
        outs = []
        for x in inputs:
            H = torch.tanh(x @ W_xh + H @ W_hh + b_h)
            outs.append(H @ W_hq + b_q)
        return torch.cat(outs, dim=0), (H,)

    return get_params, init_state, forward_fn


@pytest.mark.parametrize("kind", ["RNNModel-lstm", "RNNModelScratch"])
def test_train_ch8_with_the_compat_models(animators, capsys, kind):
    from divekit.compat.d2l import _models

    torch.manual_seed(0)
    loader, vocab = _char_data()
    if kind == "RNNModelScratch":
        net = _models.RNNModelScratch(len(vocab), 24, CPU, *_scratch_rnn_functions(24))
    else:
        net = _models.RNNModel(nn.LSTM(len(vocab), 24), len(vocab))
    T.train_ch8(net, loader, vocab, 1, 4, CPU, use_random_iter=True)
    lines = capsys.readouterr().out.strip().splitlines()
    assert PPL_LINE.match(lines[0]), lines[0]
    ppls = [ys[0] for _, ys in animators[0].points]
    assert ppls[-1] < ppls[0]
    assert lines[1].startswith("time traveller") and len(lines[1]) == 64


def _additive_decoder(vocab_size, embed=8, hidden=24):
    from divekit.compat.d2l import _models

    class Dec(_models.AttentionDecoder):
        def __init__(self):
            super().__init__()
            self.attention = _models.AdditiveAttention(hidden, hidden, hidden, 0.0)
            self.embedding = nn.Embedding(vocab_size, embed)
            self.rnn = nn.GRU(embed + hidden, hidden, batch_first=True)
            self.dense = nn.Linear(hidden, vocab_size)
            self._weights = []

        def init_state(self, enc_outputs, enc_valid_lens, *args):
            outputs, hidden_state = enc_outputs  # (T, B, H), (L, B, H)
            return outputs.transpose(0, 1), hidden_state, enc_valid_lens

        def forward(self, X, state):
            keys, h, valid_lens = state
            outs, self._weights = [], []
            for x in self.embedding(X).split(1, dim=1):  # (B, 1, E) per step
                context = self.attention(h[-1].unsqueeze(1), keys, keys, valid_lens)
                out, h = self.rnn(torch.cat([x, context], dim=-1), h)
                outs.append(out)
                self._weights.append(self.attention.attention_weights)
            return self.dense(torch.cat(outs, dim=1)), (keys, h, valid_lens)

        @property
        def attention_weights(self):
            return self._weights

    return Dec()


def test_train_seq2seq_with_the_compat_encoder_and_attention(animators, capsys):
    from divekit.compat.d2l import _models

    torch.manual_seed(0)
    loader, vocab, sentences = _copy_data(n=32)
    net = _models.EncoderDecoder(_models.Seq2SeqEncoder(len(vocab), 8, 24, 1),
                                 _additive_decoder(len(vocab)))
    T.train_seq2seq(net, loader, 0.02, 12, vocab, CPU)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"loss \d+\.\d{3}, \d+\.\d tokens/sec on cpu", line), line
    losses = [ys[0] for _, ys in animators[0].points]
    assert [x for x, _ in animators[0].points] == [10, 12] and losses[-1] < losses[0]
    translation, seq = T.predict_seq2seq(net, sentences[0], vocab, vocab, 6, CPU, True)
    assert translation == _book_predict(net, sentences[0], vocab, vocab, 6)
    # the bahdanau section's reshaping of the saved weights
    weights = torch.cat([step[0][0][0] for step in seq], 0).reshape((1, 1, -1, 6))
    assert weights.shape == (1, 1, len(seq), 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 1, len(seq)))


def test_cpu_training_configures_the_allocator_once(monkeypatch):
    calls = []
    monkeypatch.setattr(T, "configure_allocator", lambda: calls.append(1) or True)
    monkeypatch.setattr(T, "_ALLOCATOR_CONFIGURED", False)
    T._cpu_allocator(torch.device("meta"))  # not the CPU: left alone
    assert calls == []
    T._cpu_allocator(CPU)
    T._cpu_allocator("cpu")
    assert calls == [1]
