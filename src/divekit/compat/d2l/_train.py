"""The book's training and evaluation functions over divekit's pieces.

Each function keeps the book's signature, prints the book's lines (English edition) and trains
the ``net`` it is given in place, so the chapters can use it afterwards. The per-step pieces are
divekit's: optimizers (:func:`divekit.engine.optim.build_optimizer`), device moves
(:func:`divekit.engine.device.to_device`), the evaluation loop
(:func:`divekit.engine.trainer.run_validation` with a small :class:`~divekit.engine.task.Task`),
gradient clipping (:func:`divekit.ops.clip.clip_grad_norm`), greedy decoding
(:func:`divekit.ops.decoding.greedy_search`), BLEU (:func:`divekit.ops.bleu.bleu`), the masked-LM
loss (:func:`divekit.models.bert.mlm_loss`), teacher forcing
(:func:`divekit.data.translation.decoder_inputs`) and state detaching
(:func:`divekit.models.rnn.detach_state`).

The loops themselves are written here, following the book: divekit's ``Trainer`` runs a
:class:`~divekit.engine.task.Task` that builds its own model, optimizer and data, while the
book's functions receive a ready network, an optimizer (``train_ch13``), loaders and a device,
and plot and print as the chapters expect.

Speed: metrics are summed as tensors on the training device and read back (one
synchronisation) only where the book draws or prints them; evaluation runs under
``inference_mode``; gradients are reset with ``set_to_none``. On the CPU, ``train_ch6`` and
``train_ch13`` train a network with 2-D convolutions in the channels_last (NHWC) memory format,
as divekit's ``Trainer`` does: the network's parameters are converted in place (the same
``Parameter`` objects, so an optimizer made beforehand still holds them, its state converted
alike) and stay so afterwards, and each batch of images is converted on the way in; oneDNN's
NHWC convolutions make LeNet's steps ~1.5x faster on a 2-core CPU, with the same results up to
float rounding. A training function on the CPU also configures glibc's allocator once per process
as the ``divekit`` command does (:func:`divekit.engine.device.configure_allocator`: freed tensor
memory is reused instead of page-faulted back each step; ``DIVEKIT_MALLOC=default`` opts out). The printed numbers keep the book's
definitions. Timing: examples/sec counts the time spent in the training steps (as the book's
timer does); with no per-batch synchronisation, queued GPU work is counted where the next
synchronisation waits for it.

Quick mode (``divekit book run --quick``): every training function caps its epochs with
``quick_epochs`` and reads at most ``quick_batches()`` batches per pass of each loader, and says
so in one line, e.g. ``(quick: 2 of 10 epochs, at most 4 batches each)``.

Differences from the book:

* ``train_ch6`` and ``train_ch13`` draw every ``max(1, n // 5)`` batches; the book's
  ``(i + 1) % (n // 5)`` divides by zero with fewer than 5 batches per epoch.
* ``bleu`` is 0.0 when the prediction has fewer than ``k`` tokens (divekit's ``bleu``); the
  book divides by zero when ``len(pred) == k - 1`` (e.g. a one-word translation with ``k=2``).
* ``_get_batch_loss_bert`` weighs each masked-LM position's loss by ``mlm_weights_X`` before
  averaging (divekit's ``mlm_loss``): the book multiplies the already averaged loss by the
  weights, so its mask has no effect and padding slots count. ``loss`` gives the next-sentence
  loss (averaged if it returns one value per pair).
* ``grad_clipping`` scales by ``theta / (norm + 1e-6)`` without reading the norm back to the
  CPU (``torch.nn.utils.clip_grad_norm_``'s rule); the book scales by ``theta / norm``.
* ``train_ch8`` prints the two predictions only after training: the book also prints one every
  10 epochs, which its animation erases at once in Jupyter. Its curve gets a point every 10
  epochs and at the last epoch (so a run shorter than 10 epochs draws one).
* ``train_ch3`` checks the book's accuracy bounds (``assert``) only outside quick mode.
* ``evaluate_loss`` runs the network in eval mode (and restores its mode after); the book
  evaluates in whatever mode the network is in.
* ``train_batch_ch13`` returns the batch's loss sum and its number of correct predictions as
  0-dim tensors (the book: a tensor and a float), so no step waits for the device.
* ``predict_ch8`` feeds the prefix to the network in one call instead of one token per call
  (the same state). ``predict_ch8`` and ``predict_seq2seq`` decode without autograd.
* ``split_batch`` splits on any devices (``torch.chunk`` along the batch, like
  ``nn.parallel.scatter``, which needs CUDA) and raises :class:`~divekit.errors.DivekitError`
  instead of ``AssertionError`` when X and y disagree.
* An epoch without a single batch raises :class:`~divekit.errors.DivekitError` (the book fails
  on an unbound name).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from divekit.compat.d2l._util import (
    BoundedLoader,
    Timer,
    bounded,
    quick,
    quick_batches,
    quick_epochs,
    try_all_gpus,
)
from divekit.data.translation import decoder_inputs, truncate_pad
from divekit.engine.device import configure_allocator, to_device
from divekit.engine.optim import build_optimizer
from divekit.engine.task import Task
from divekit.engine.trainer import run_validation
from divekit.errors import DivekitError
from divekit.models.bert import mlm_loss
from divekit.models.rnn import detach_state
from divekit.ops.bleu import bleu as _divekit_bleu
from divekit.ops.clip import clip_grad_norm
from divekit.ops.decoding import greedy_search

__all__ = [
    "synthetic_data", "linreg", "squared_loss", "sgd", "accuracy", "evaluate_accuracy",
    "evaluate_accuracy_gpu", "evaluate_loss", "train_epoch_ch3", "train_ch3", "predict_ch3",
    "train_ch6", "train_batch_ch13", "train_ch13", "grad_clipping", "predict_ch8",
    "train_epoch_ch8", "train_ch8", "train_seq2seq", "predict_seq2seq", "bleu", "split_batch",
    "_get_batch_loss_bert",
]


# ----------------------------------------------------------------------------- helpers
def _animator(**kwargs: Any) -> Any:
    """The book's ``Animator`` (imported here so that ``_plot`` loads only when drawing)."""
    from divekit.compat.d2l._plot import Animator

    return Animator(**kwargs)


def _batches(loader: Iterable[Any]) -> Iterable[Any]:
    """One pass over ``loader``, bounded in quick mode (a ``BoundedLoader`` bounds itself)."""
    return loader if isinstance(loader, BoundedLoader) else bounded(loader)


def _full_len(loader: Any) -> int | None:
    inner = loader.loader if isinstance(loader, BoundedLoader) else loader
    try:
        return len(inner)
    except TypeError:
        return None


def _num_batches(loader: Any) -> int | None:
    """Batches one pass yields (quick mode included), or None for a loader without ``len``."""
    n = _full_len(loader)
    q = quick_batches()
    return n if n is None or q is None else min(n, q)


def _quick_note(num_epochs: int, epochs: int, *loaders: Any) -> None:
    """One line when quick mode shortened the run."""
    q = quick_batches()
    if q is None:
        return
    cut = any(n is None or n > q for n in map(_full_len, loaders))
    if epochs < num_epochs or cut:
        print(f"(quick: {epochs} of {num_epochs} epochs, at most {q} batches each)")


def _no_batches(what: str) -> DivekitError:
    return DivekitError(f"{what} yields no batches (an empty dataset or data loader?)")


def _correct(y_hat: Tensor, y: Tensor) -> Tensor:
    """The number of correct predictions as a 0-dim tensor (no device synchronisation)."""
    if y_hat.dim() > 1 and y_hat.shape[1] > 1:
        y_hat = y_hat.argmax(dim=1)
    return (y_hat.type(y.dtype) == y).sum()


def _params(net: Any) -> list[Tensor]:
    """The trainable parameters of an ``nn.Module`` or of a scratch model's ``.params``."""
    params = net.parameters() if isinstance(net, nn.Module) else net.params
    return [p for p in params if p.requires_grad]


def _read(*values: Tensor | float) -> list[float]:
    """Several on-device sums as floats with one synchronisation."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in values]
    device = tensors[0].device
    read = iter(torch.stack([t.detach().to(device, torch.float64).reshape(())
                             for t in tensors]).tolist())
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]


class _Fn(nn.Module):
    """A plain function (``lambda x: lenet(x, params)``) as a module, for the evaluation loop."""

    def __init__(self, fn: Callable[..., Any]):
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


class _Accuracy(Task):
    """Correct predictions and labels of a batch, for :func:`run_validation`."""

    def __init__(self) -> None:
        super().__init__(None)

    def validation_step(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        X, y = batch
        return {"correct": _correct(model(X), y), "count": y.numel()}

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        if not sums.get("count"):
            raise _no_batches("the evaluation data")
        return {"accuracy": float(sums["correct"]) / sums["count"]}


class _Loss(Task):
    """Summed loss and its number of terms, for :func:`run_validation`."""

    def __init__(self, loss: Callable[[Any, Any], Tensor]):
        super().__init__(None)
        self.loss = loss

    def validation_step(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        X, y = batch
        out = model(X)
        l = self.loss(out, y.reshape(out.shape))  # noqa: E741 (the book's name)
        return {"loss": l.sum(), "count": l.numel()}

    def validation_end(self, sums: dict[str, Any]) -> dict[str, Any]:
        if not sums.get("count"):
            raise _no_batches("the evaluation data")
        return {"loss": float(sums["loss"]) / sums["count"]}


def _as_module(net: Any) -> nn.Module:
    return net if isinstance(net, nn.Module) else _Fn(net)


# ----------------------------------------------------------------------------- linear models
def synthetic_data(w: Tensor, b: Any, num_examples: int) -> tuple[Tensor, Tensor]:
    """``y = Xw + b + noise``: X standard normal, noise with standard deviation 0.01."""
    X = torch.normal(0, 1, (num_examples, len(w)))
    y = torch.matmul(X, w) + b
    y += torch.normal(0, 0.01, y.shape)
    return X, y.reshape((-1, 1))


def linreg(X: Tensor, w: Tensor, b: Any) -> Tensor:
    """The linear regression model ``Xw + b``."""
    return torch.matmul(X, w) + b


def squared_loss(y_hat: Tensor, y: Tensor) -> Tensor:
    """Half the squared error, per example."""
    return (y_hat - y.reshape(y_hat.shape)) ** 2 / 2


@torch.no_grad()
def sgd(params: Iterable[Tensor], lr: float, batch_size: int) -> None:
    """Minibatch SGD on raw tensors: ``p -= lr * p.grad / batch_size``, then zero the gradients
    (one fused ``_foreach`` update per device and dtype)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for p in params:
        if p.grad is not None:
            ps, gs = groups.setdefault((p.device, p.dtype), ([], []))
            ps.append(p)
            gs.append(p.grad)
    alpha = -float(lr) / batch_size
    for ps, gs in groups.values():
        torch._foreach_add_(ps, gs, alpha=alpha)
        torch._foreach_zero_(gs)


# ----------------------------------------------------------------------------- evaluation
def accuracy(y_hat: Tensor, y: Tensor) -> float:
    """The number of correct predictions (class scores are reduced by argmax over dim 1)."""
    return float(_correct(y_hat, y))


def evaluate_accuracy(net: Any, data_iter: Iterable[Any]) -> float:
    """Accuracy of ``net`` on ``data_iter`` (batches stay where they are)."""
    if isinstance(net, nn.Module):
        net.eval()  # left in eval mode, as in the book
    return run_validation(_Accuracy(), _as_module(net), _batches(data_iter), None)["accuracy"]


def evaluate_accuracy_gpu(net: Any, data_iter: Iterable[Any], device: Any = None) -> float:
    """Accuracy of ``net`` on ``data_iter``, each batch moved to ``device`` (default: where the
    network's parameters are). ``X`` may be a list of tensors (BERT's inputs)."""
    if isinstance(net, nn.Module):
        net.eval()  # left in eval mode, as in the book
        if device is None:
            device = next(iter(net.parameters()), torch.empty(0)).device
    return run_validation(_Accuracy(), _as_module(net), _batches(data_iter),
                          device)["accuracy"]


def evaluate_loss(net: Any, data_iter: Iterable[Any], loss: Callable[[Any, Any], Tensor]) -> float:
    """The mean of ``loss`` over every term of every batch of ``data_iter``."""
    return run_validation(_Loss(loss), _as_module(net), _batches(data_iter), None)["loss"]


# ----------------------------------------------------------------------------- chapter 3
def train_epoch_ch3(net: Any, train_iter: Iterable[Any], loss: Callable[[Any, Any], Tensor],
                    updater: Any) -> tuple[float, float]:
    """One epoch; ``updater`` is a ``torch.optim.Optimizer`` (mean loss) or a function of the
    batch size (summed loss, as ``sgd``). Returns the mean training loss and accuracy."""
    if isinstance(net, nn.Module):
        net.train()
    loss_sum: Tensor | None = None
    correct: Tensor | None = None
    count = 0
    for X, y in _batches(train_iter):
        y_hat = net(X)
        l = loss(y_hat, y)  # noqa: E741
        if isinstance(updater, torch.optim.Optimizer):
            updater.zero_grad(set_to_none=True)
            l.mean().backward()
            updater.step()
        else:
            l.sum().backward()
            updater(X.shape[0])
        with torch.no_grad():
            s, c = l.detach().sum(), _correct(y_hat.detach(), y)
            loss_sum = s if loss_sum is None else loss_sum + s
            correct = c if correct is None else correct + c
        count += y.numel()
    if loss_sum is None or correct is None:
        raise _no_batches("the training data")
    total_loss, total_correct = _read(loss_sum, correct)
    return total_loss / count, total_correct / count


def train_ch3(net: Any, train_iter: Iterable[Any], test_iter: Iterable[Any],
              loss: Callable[[Any, Any], Tensor], num_epochs: int, updater: Any) -> None:
    """Train for ``num_epochs``, drawing train loss, train accuracy and test accuracy."""
    epochs = quick_epochs(num_epochs)
    _quick_note(num_epochs, epochs, train_iter, test_iter)
    animator = _animator(xlabel="epoch", xlim=[1, epochs], ylim=[0.3, 0.9],
                         legend=["train loss", "train acc", "test acc"])
    train_metrics: tuple[float, float] = (math.nan, math.nan)
    test_acc = math.nan
    for epoch in range(epochs):
        train_metrics = train_epoch_ch3(net, train_iter, loss, updater)
        test_acc = evaluate_accuracy(net, test_iter)
        animator.add(epoch + 1, train_metrics + (test_acc,))
    if not quick():  # the book's sanity bounds, meaningless for a shortened run
        train_loss, train_acc = train_metrics
        assert train_loss < 0.5, train_loss
        assert 0.7 < train_acc <= 1, train_acc
        assert 0.7 < test_acc <= 1, test_acc


def predict_ch3(net: Any, test_iter: Iterable[Any], n: int = 6) -> None:
    """Show the first ``n`` test images with their true and predicted Fashion-MNIST labels."""
    from divekit.compat.d2l._data import get_fashion_mnist_labels
    from divekit.compat.d2l._plot import show_images

    first = next(iter(test_iter), None)
    if first is None:
        raise _no_batches("the test data")
    X, y = first
    with torch.no_grad():
        preds = get_fashion_mnist_labels(net(X).argmax(dim=1))
    trues = get_fashion_mnist_labels(y)
    titles = [true + "\n" + pred for true, pred in zip(trues, preds)]
    show_images(X[0:n].reshape((n, 28, 28)), 1, n, titles=titles[0:n])


# ----------------------------------------------------------------------------- classifiers
_ALLOCATOR_CONFIGURED = False


def _cpu_allocator(device: Any) -> None:
    """Once per process, for training on the CPU: glibc keeps freed tensor memory for reuse."""
    global _ALLOCATOR_CONFIGURED
    if not _ALLOCATOR_CONFIGURED and torch.device(device).type == "cpu":
        _ALLOCATOR_CONFIGURED = True
        configure_allocator()


def _to_channels_last(net: nn.Module, device: Any,
                       optimizer: torch.optim.Optimizer | None = None) -> bool:
    """Switch a network with 2-D convolutions to channels_last for training on the CPU (in
    place; the optimizer's existing state tensors alike); returns whether it did."""
    if torch.device(device).type != "cpu" or not any(isinstance(m, nn.Conv2d)
                                                     for m in net.modules()):
        return False
    net.to(memory_format=torch.channels_last)
    if optimizer is not None:
        # each state tensor laid out as its parameter now is (a layer may keep NCHW, as
        # divekit's FCN upsampling does on the CPU): the fused optimizers walk a parameter and
        # its state as one buffer, so mismatched layouts would be read in the wrong order
        for p, state in optimizer.state.items():
            for k, v in state.items():
                if isinstance(v, Tensor) and v.dim() == 4 and v.shape == p.shape:
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
    return True


def _xavier_linear_conv(m: nn.Module) -> None:
    if type(m) in (nn.Linear, nn.Conv2d):
        nn.init.xavier_uniform_(m.weight)


def _fit_classifier(train_net: Any, train_iter: Iterable[Any], test_iter: Iterable[Any],
                    epochs: int, step: Callable[[Any, Tensor], tuple[Tensor, Tensor]],
                    device: Any, per_label: bool,
                    channels_last: bool = False) -> tuple[float, float, float, float]:
    """The epochs of ``train_ch6`` and ``train_ch13``: ``step(X, y)`` trains on one batch and
    returns its loss sum and correct predictions (0-dim tensors); the curves get a point every
    ``max(1, n // 5)`` batches and the test accuracy after each epoch. Returns the last
    epoch's train loss, train accuracy, test accuracy, and examples per second."""
    animator = _animator(xlabel="epoch", xlim=[1, epochs], ylim=[0, 1],
                         legend=["train loss", "train acc", "test acc"])
    timer, num_batches = Timer(), _num_batches(train_iter)
    every = max(1, (num_batches or 0) // 5)
    train_l = train_acc = test_acc = math.nan
    examples = 0
    for epoch in range(epochs):
        loss_sum: Tensor | None = None
        correct: Tensor | None = None
        examples = labels = 0
        train_net.train()
        for i, (X, y) in enumerate(_batches(train_iter)):
            timer.start()
            s, c = step(X, y)
            loss_sum = s if loss_sum is None else loss_sum + s
            correct = c if correct is None else correct + c
            examples += y.shape[0]
            labels += y.numel()
            if num_batches is not None and ((i + 1) % every == 0 or i == num_batches - 1):
                total_loss, total_correct = _read(loss_sum, correct)
                train_l = total_loss / examples
                train_acc = total_correct / (labels if per_label else examples)
                animator.add(epoch + (i + 1) / num_batches, (train_l, train_acc, None))
            timer.stop()
        if loss_sum is None or correct is None:
            raise _no_batches("the training data")
        if num_batches is None:  # a loader without len: one point at the end of the epoch
            timer.start()
            total_loss, total_correct = _read(loss_sum, correct)
            timer.stop()
            train_l = total_loss / examples
            train_acc = total_correct / (labels if per_label else examples)
            animator.add(epoch + 1, (train_l, train_acc, None))
        train_net.eval()
        test_acc = run_validation(_Accuracy(), train_net, _batches(test_iter), device,
                                  channels_last=channels_last)["accuracy"]
        animator.add(epoch + 1, (None, None, test_acc))
    return train_l, train_acc, test_acc, examples * epochs / max(timer.sum(), 1e-12)


def train_ch6(net: nn.Module, train_iter: Iterable[Any], test_iter: Iterable[Any],
              num_epochs: int, lr: float, device: Any) -> None:
    """Train a classifier with SGD (``lr``) and cross-entropy on ``device``, after Xavier-uniform
    initialisation of its ``Linear`` and ``Conv2d`` weights; ``net`` is trained in place."""
    net.apply(_xavier_linear_conv)
    print("training on", device)
    net.to(device)
    _cpu_allocator(device)
    channels_last = _to_channels_last(net, device)
    optimizer = build_optimizer(net.parameters(), "sgd", lr, momentum=0.0)
    loss = nn.CrossEntropyLoss()
    epochs = quick_epochs(num_epochs)
    _quick_note(num_epochs, epochs, train_iter, test_iter)

    def step(X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        X, y = to_device((X, y), device, channels_last)
        y_hat = net(X)
        l = loss(y_hat, y)  # noqa: E741
        optimizer.zero_grad(set_to_none=True)
        l.backward()
        optimizer.step()
        with torch.no_grad():
            return l.detach() * X.shape[0], _correct(y_hat.detach(), y)

    train_l, train_acc, test_acc, speed = _fit_classifier(net, train_iter, test_iter, epochs,
                                                          step, device, per_label=False,
                                                          channels_last=channels_last)
    print(f"loss {train_l:.3f}, train acc {train_acc:.3f}, test acc {test_acc:.3f}")
    print(f"{speed:.1f} examples/sec on {str(device)}")


def train_batch_ch13(net: Any, X: Any, y: Tensor, loss: Callable[[Any, Any], Tensor],
                     trainer: torch.optim.Optimizer,
                     devices: Sequence[Any]) -> tuple[Tensor, Tensor]:
    """One optimizer step on a batch moved to ``devices[0]`` (``X`` may be a list of tensors);
    returns the summed loss and the number of correct predictions (0-dim tensors)."""
    return _train_batch(net, X, y, loss, trainer, devices[0], False)


def _train_batch(net: Any, X: Any, y: Tensor, loss: Callable[[Any, Any], Tensor],
                 trainer: torch.optim.Optimizer, device: Any,
                 channels_last: bool) -> tuple[Tensor, Tensor]:
    X, y = to_device((X, y), device, channels_last)
    net.train()
    trainer.zero_grad(set_to_none=True)
    pred = net(X)
    l = loss(pred, y)  # noqa: E741
    l.sum().backward()
    trainer.step()
    with torch.no_grad():
        return l.detach().sum(), _correct(pred.detach(), y)


def train_ch13(net: nn.Module, train_iter: Iterable[Any], test_iter: Iterable[Any],
               loss: Callable[[Any, Any], Tensor], trainer: torch.optim.Optimizer,
               num_epochs: int, devices: Sequence[Any] = try_all_gpus()) -> None:  # noqa: B008
    """Train with the given optimizer; ``loss`` gives one value per example (its sum is
    minimised). Several CUDA devices: ``nn.DataParallel`` over them, as in the book; one device
    (or the CPU): the network runs there. ``net`` is trained in place."""
    devices = list(devices)
    if len(devices) > 1 and all(torch.device(d).type == "cuda" for d in devices):
        train_net: nn.Module = nn.DataParallel(net, device_ids=devices).to(devices[0])
    else:
        train_net = net.to(devices[0])
    _cpu_allocator(devices[0])
    channels_last = _to_channels_last(train_net, devices[0], trainer)
    epochs = quick_epochs(num_epochs)
    _quick_note(num_epochs, epochs, train_iter, test_iter)

    def step(X: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        return _train_batch(train_net, X, y, loss, trainer, devices[0], channels_last)

    train_l, train_acc, test_acc, speed = _fit_classifier(train_net, train_iter, test_iter,
                                                          epochs, step, devices[0],
                                                          per_label=True,
                                                          channels_last=channels_last)
    print(f"loss {train_l:.3f}, train acc {train_acc:.3f}, test acc {test_acc:.3f}")
    print(f"{speed:.1f} examples/sec on {str(devices)}")


def split_batch(X: Tensor, y: Tensor, devices: Sequence[Any]) -> tuple[tuple[Tensor, ...],
                                                                        tuple[Tensor, ...]]:
    """Split ``X`` and ``y`` along the batch into one shard per device (``torch.chunk``'s
    sizes, as ``nn.parallel.scatter``), each moved to its device."""
    if X.shape[0] != y.shape[0]:
        raise DivekitError(f"X and y must have the same batch size, got {X.shape[0]} and "
                           f"{y.shape[0]}")
    n = len(devices)
    return (tuple(x.to(d) for x, d in zip(X.chunk(n), devices)),
            tuple(t.to(d) for t, d in zip(y.chunk(n), devices)))


# ----------------------------------------------------------------------------- language models
def grad_clipping(net: Any, theta: float) -> None:
    """Scale the gradients of ``net`` (a module, or a scratch model's ``.params``) so that their
    global L2 norm is at most ``theta``."""
    clip_grad_norm(_params(net), theta)


def predict_ch8(prefix: str, num_preds: int, net: Any, vocab: Any, device: Any) -> str:
    """``prefix`` followed by ``num_preds`` characters, each the network's most likely next one."""
    if not prefix:
        raise DivekitError("predict_ch8 needs a non-empty prefix to start from")
    ids = [vocab[c] for c in prefix]
    with torch.no_grad():
        state = net.begin_state(batch_size=1, device=device)
        if len(ids) > 1:  # warm-up: the state after the prefix but its last token
            _, state = net(torch.tensor([ids[:-1]], device=device), state)
    out: list[int] = []
    if num_preds > 0:
        def step(tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
            logits, state = net(tokens.reshape(1, 1), state)
            return logits.reshape(1, -1), state

        # no <eos> for a character model: an index outside the vocabulary never ends a row
        found = greedy_search(step, state, torch.tensor([ids[-1]], device=device),
                              eos=len(vocab), max_len=num_preds)
        out = found.tokens[0]
    return "".join(vocab.idx_to_token[i] for i in ids + out)


def train_epoch_ch8(net: Any, train_iter: Iterable[Any], loss: Callable[[Any, Any], Tensor],
                    updater: Any, device: Any, use_random_iter: bool) -> tuple[float, float]:
    """One epoch of truncated backpropagation through time; returns the perplexity and the
    tokens per second. The state starts at zero for the first batch (and for every batch with
    ``use_random_iter``) and is otherwise carried over, detached."""
    state: Any = None
    timer = Timer()
    loss_sum: Tensor | None = None
    tokens = 0
    for X, Y in _batches(train_iter):
        if state is None or use_random_iter:
            state = net.begin_state(batch_size=X.shape[0], device=device)
        else:
            state = detach_state(state)
        y = Y.T.reshape(-1)  # time-major, as the network's outputs
        X, y = to_device((X, y), device)
        y_hat, state = net(X, state)
        l = loss(y_hat, y.long()).mean()  # noqa: E741
        if isinstance(updater, torch.optim.Optimizer):
            updater.zero_grad(set_to_none=True)
            l.backward()
            grad_clipping(net, 1)
            updater.step()
        else:
            l.backward()
            grad_clipping(net, 1)
            updater(batch_size=1)  # the loss is already a mean
        s = l.detach() * y.numel()
        loss_sum = s if loss_sum is None else loss_sum + s
        tokens += y.numel()
    if loss_sum is None:
        raise _no_batches("the training data")
    (total,) = _read(loss_sum)
    return math.exp(total / tokens), tokens / max(timer.stop(), 1e-12)


def train_ch8(net: Any, train_iter: Iterable[Any], vocab: Any, lr: float, num_epochs: int,
              device: Any, use_random_iter: bool = False) -> None:
    """Train a character language model (``nn.Module`` with ``torch.optim.SGD``, or a scratch
    model with ``sgd`` on its ``.params``), clipping gradients at norm 1, then print the
    perplexity, the speed and two predictions. ``net`` is trained in place."""
    loss = nn.CrossEntropyLoss()
    _cpu_allocator(device)
    epochs = quick_epochs(num_epochs)
    _quick_note(num_epochs, epochs, train_iter)
    every = 10 if epochs >= 10 else 1
    animator = _animator(xlabel="epoch", ylabel="perplexity", legend=["train"],
                         xlim=[every, epochs])
    if isinstance(net, nn.Module):
        updater: Any = build_optimizer(net.parameters(), "sgd", lr, momentum=0.0)
    else:
        def updater(batch_size: int) -> None:
            sgd(net.params, lr, batch_size)

    ppl = speed = math.nan
    for epoch in range(epochs):
        ppl, speed = train_epoch_ch8(net, train_iter, loss, updater, device, use_random_iter)
        if (epoch + 1) % every == 0 or epoch == epochs - 1:
            animator.add(epoch + 1, [ppl])
    print(f"perplexity {ppl:.1f}, {speed:.1f} tokens/sec on {str(device)}")
    print(predict_ch8("time traveller", 50, net, vocab, device))
    print(predict_ch8("traveller", 50, net, vocab, device))


# ----------------------------------------------------------------------------- seq2seq
def _xavier_seq2seq(m: nn.Module) -> None:
    if type(m) is nn.Linear:
        nn.init.xavier_uniform_(m.weight)
    if type(m) is nn.GRU:
        for name, p in m.named_parameters(recurse=False):
            if "weight" in name:
                nn.init.xavier_uniform_(p)


def train_seq2seq(net: nn.Module, data_iter: Iterable[Any], lr: float, num_epochs: int,
                  tgt_vocab: Any, device: Any) -> None:
    """Train an encoder-decoder by teacher forcing: Xavier-uniform initialisation (``Linear``
    and ``GRU`` weights), Adam, the masked softmax cross-entropy, gradients clipped at norm 1.
    Prints the loss per token and the tokens per second of the last epoch."""
    from divekit.compat.d2l._models import MaskedSoftmaxCELoss

    net.apply(_xavier_seq2seq)
    net.to(device)
    _cpu_allocator(device)
    optimizer = build_optimizer(net.parameters(), "adam", lr)
    loss = MaskedSoftmaxCELoss()
    net.train()
    epochs = quick_epochs(num_epochs)
    _quick_note(num_epochs, epochs, data_iter)
    every = 10 if epochs >= 10 else 1
    animator = _animator(xlabel="epoch", ylabel="loss", xlim=[every, epochs])
    bos = tgt_vocab["<bos>"]
    mean_loss = speed = math.nan
    for epoch in range(epochs):
        timer = Timer()
        loss_sum: Tensor | None = None
        num_tokens: Tensor | None = None
        for batch in _batches(data_iter):
            X, X_valid_len, Y, Y_valid_len = to_device(tuple(batch), device)
            Y_hat, _ = net(X, decoder_inputs(Y, bos), X_valid_len)
            l = loss(Y_hat, Y, Y_valid_len)  # noqa: E741
            optimizer.zero_grad(set_to_none=True)
            l.sum().backward()
            grad_clipping(net, 1)
            optimizer.step()
            with torch.no_grad():
                s, t = l.detach().sum(), Y_valid_len.sum()
                loss_sum = s if loss_sum is None else loss_sum + s
                num_tokens = t if num_tokens is None else num_tokens + t
        if loss_sum is None or num_tokens is None:
            raise _no_batches("the training data")
        last = epoch == epochs - 1
        if (epoch + 1) % every == 0 or last:
            total, tokens = _read(loss_sum, num_tokens)
            mean_loss = total / tokens
            speed = tokens / max(timer.stop(), 1e-12)
            animator.add(epoch + 1, (mean_loss,))
    print(f"loss {mean_loss:.3f}, {speed:.1f} tokens/sec on {str(device)}")


def _snapshot(weights: Any) -> Any:
    """The nested lists of a decoder's attention weights copied (the tensors shared), so a
    decoder that refills its lists in place cannot change the steps already saved."""
    if isinstance(weights, list):
        return [_snapshot(w) for w in weights]
    if isinstance(weights, tuple):
        return tuple(_snapshot(w) for w in weights)
    return weights


def predict_seq2seq(net: nn.Module, src_sentence: str, src_vocab: Any, tgt_vocab: Any,
                    num_steps: int, device: Any,
                    save_attention_weights: bool = False) -> tuple[str, list[Any]]:
    """Greedy translation of ``src_sentence`` (lower-cased, split on spaces) in at most
    ``num_steps`` tokens. Returns the translation and, with ``save_attention_weights``, the
    decoder's ``attention_weights`` after each decoding step (the ``<eos>`` step included)."""
    net.eval()
    src_tokens = src_vocab[src_sentence.lower().split(" ")] + [src_vocab["<eos>"]]
    enc_valid_len = torch.tensor([len(src_tokens)], device=device)
    src_tokens = truncate_pad(src_tokens, num_steps, src_vocab["<pad>"])
    enc_X = torch.tensor([src_tokens], dtype=torch.long, device=device)
    attention_weight_seq: list[Any] = []
    with torch.no_grad():
        enc_outputs = net.encoder(enc_X, enc_valid_len)
        dec_state = net.decoder.init_state(enc_outputs, enc_valid_len)

    def step(tokens: Tensor, state: Any) -> tuple[Tensor, Any]:
        Y, state = net.decoder(tokens.reshape(-1, 1), state)
        if save_attention_weights:
            attention_weight_seq.append(_snapshot(net.decoder.attention_weights))
        return Y[:, -1], state

    eos = tgt_vocab["<eos>"]
    found = greedy_search(step, dec_state, torch.tensor([tgt_vocab["<bos>"]], device=device),
                          eos=eos, max_len=num_steps)
    output_seq = [t for t in found.tokens[0] if t != eos]
    return " ".join(tgt_vocab.to_tokens(output_seq)), attention_weight_seq


def bleu(pred_seq: str, label_seq: str, k: int) -> float:
    """The book's BLEU of one prediction against one label (divekit's ``bleu``): 0.0 for a
    prediction shorter than ``k`` tokens, where the book divides by zero."""
    return _divekit_bleu(pred_seq, label_seq, k)


# ----------------------------------------------------------------------------- BERT
def _get_batch_loss_bert(net: nn.Module, loss: Callable[[Tensor, Tensor], Tensor],
                         vocab_size: int, tokens_X: Tensor, segments_X: Tensor,
                         valid_lens_x: Tensor, pred_positions_X: Tensor, mlm_weights_X: Tensor,
                         mlm_Y: Tensor, nsp_y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The masked-LM loss (each position weighted by ``mlm_weights_X``, divekit's
    ``mlm_loss``), the next-sentence loss (``loss``) and their sum, for one BERT batch."""
    _, mlm_Y_hat, nsp_Y_hat = net(tokens_X, segments_X, valid_lens_x.reshape(-1),
                                  pred_positions_X)
    mlm_l = mlm_loss(mlm_Y_hat.reshape(-1, vocab_size), mlm_Y.reshape(-1),
                     mlm_weights_X.reshape(-1))
    nsp_l = loss(nsp_Y_hat, nsp_y)
    if nsp_l.dim() > 0:
        nsp_l = nsp_l.mean()
    return mlm_l, nsp_l, mlm_l + nsp_l
