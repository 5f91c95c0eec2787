"""The book's training calls end to end: ``divekit.compat.d2l`` against the book's own package.

Each case is one training call of a section of *Dive into Deep Learning* at a reduced but
representative size, run end to end by the same worker code (written here) with two different
``d2l`` module objects:

* compat: ``from divekit.compat import d2l``;
* book: ``from d2l import torch as d2l`` from the book's package 0.17.6 (installed with
  ``--no-deps`` into ``.venv/peers/d2l-0.17.6``, put first on ``PYTHONPATH``).

The cases (data loading with the side's own ``load_data_*``, the model from the side's classes
where the section uses them, the side's training function):

* ``lenet``: ``load_data_fashion_mnist(256)`` + a LeNet (ReLU, max-pooling) + ``train_ch6``;
* ``softmax`` / ``mlp``: the concise softmax-regression and MLP sections,
  ``load_data_fashion_mnist(256)`` + ``nn.Sequential(Flatten, Linear(784, 10))`` (or with a
  256-unit ReLU layer) + SGD + ``train_ch3`` (whose sanity bounds hold), then the side's
  ``evaluate_accuracy`` on the test loader (``train_ch3`` itself only draws);
* ``gru``: ``load_data_time_machine(32, 35)`` + ``RNNModel(nn.GRU(V, 256))`` + ``train_ch8``;
* ``gru_scratch``: the same data + ``RNNModelScratch`` with GRU functions written here +
  ``train_ch8`` (the learner's ``sgd`` path);
* ``seq2seq``: ``load_data_nmt(64, 10)`` + ``EncoderDecoder(Seq2SeqEncoder, a GRU decoder
  written here on the side's ``Decoder``)`` + ``train_seq2seq``, then ``predict_seq2seq`` and
  ``bleu`` on the section's four sentences;
* ``bahdanau``: the same call with the Bahdanau-attention section's decoder (a GRU fed the
  ``AdditiveAttention`` context of the encoder's outputs at each step) written here on the side's
  ``AttentionDecoder``, at the section's sizes (32 hidden units, 2 layers, dropout 0.1);
* ``transformer``: the same call with the side's ``TransformerEncoder`` and the Transformer
  section's decoder written here from the side's ``MultiHeadAttention``, ``AddNorm``,
  ``PositionWiseFFN`` and ``PositionalEncoding``, at the section's sizes (32 hidden, 64 in the
  feed-forward layers, 4 heads, 2 layers);
* ``resnet18``: ``load_data_fashion_mnist(64, resize=16)`` + ``resnet18(10, 1)`` + Adam +
  ``train_ch13``;
* ``bert``: ``load_data_wiki(64, 64)`` + the section's small ``BERTModel`` + Adam steps through
  ``_get_batch_loss_bert``.

Data. Both sides read the same staged files in a temporary folder that is the working folder's
``../data`` (and ``$DIVEKIT_DATA``): MNIST's IDX files from ``../shared/data`` written (a subset,
uncompressed) as ``FashionMNIST/raw/*-ubyte`` (the full Fashion-MNIST is not on this machine),
``timemachine.txt``, ``fra-eng.zip`` + ``fra-eng/`` (``--smoke``: its first pairs in a zip with
fixed time stamps, so every translation case stages the same bytes, registered by SHA-1), and WikiText-2's validation split as
``wikitext-2/wiki.train.tokens`` in a ``wikitext-2-v1.zip`` (the train split is not here; the
worker registers that zip's SHA-1 as ``d2l.DATA_HUB['wikitext-2']``, on both sides alike).

Timing. Each (side, case, repeat) is its own process, ``MPLBACKEND=Agg``, figures in a temporary
``$DIVEKIT_FIGURES``, the same ``torch.set_num_threads`` and seeds (``--seed`` + repeat, the same
for both sides of a pair). The time is the worker's wall clock around the whole call (data
loading, model building, training, the section's predictions), so interpreter start-up is left
out; the import of ``d2l`` is timed apart. Repeats interleave the sides (compat, book, compat,
book, ...); the table gives medians with their min-max, and the ratio book/compat as the median of
the per-pair ratios with their min-max. The goal (issue 22) is compat >= 1.5x: "met" when every
pair's ratio is at least 1.5, "not met" when none is, else "not settled". The metrics are the
lines each side printed (medians over the repeats, [min-max]).

    python benchmarks/book.py                          # every case, 3 repeats
    python benchmarks/book.py --cases lenet,gru --repeats 5
    python benchmarks/book.py --smoke                  # tiny sizes, one repeat: checks that it runs
    python benchmarks/book.py --install-peer           # pip-installs the book's package first

Without the book's package (and without ``--install-peer``) only the compat side runs and the
output says "peer skipped".
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DIVEKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
PEER_VERSION = "0.17.6"
PEER_DIR = ROOT / ".venv" / "peers" / f"d2l-{PEER_VERSION}"
SIDES = ("compat", "book")
GOAL = 1.5
RESULT = "@@book-benchmark@@ "

# ------------------------------------------------------------------------------------ sizes
# Per case: the staged data and the call's settings. ``standard`` is the table's size (about
# 5-30 s per call on two cores); ``smoke`` runs each call for a few batches.
STANDARD: dict[str, dict[str, Any]] = {
    "lenet": dict(n_train=12000, n_test=2000, batch=256, epochs=2, lr=0.3),
    "softmax": dict(n_train=20000, n_test=2000, batch=256, epochs=4, lr=0.1),
    "mlp": dict(n_train=20000, n_test=2000, batch=256, epochs=4, lr=0.1, hidden=256),
    "gru": dict(epochs=20, lr=1.0, hidden=256),
    "gru_scratch": dict(epochs=20, lr=1.0, hidden=256),
    "seq2seq": dict(epochs=60, lr=0.005, embed=32, hidden=32, layers=2, dropout=0.1, batch=64,
                    num_steps=10),
    "bahdanau": dict(epochs=30, lr=0.005, embed=32, hidden=32, layers=2, dropout=0.1,
                     batch=64, num_steps=10),
    "transformer": dict(epochs=30, lr=0.005, hidden=32, ffn_hiddens=64, heads=4, layers=2,
                        dropout=0.1, batch=64, num_steps=10),
    "resnet18": dict(n_train=1024, n_test=512, batch=64, resize=16, epochs=1, lr=0.001),
    "bert": dict(batch=64, max_len=64, steps=30, lr=0.01, lines=None),
}
SMOKE: dict[str, dict[str, Any]] = {
    "lenet": dict(n_train=320, n_test=64, batch=64, epochs=1, lr=0.3),
    "softmax": dict(n_train=320, n_test=64, batch=64, epochs=1, lr=0.1, smoke=True),
    "mlp": dict(n_train=320, n_test=64, batch=64, epochs=1, lr=0.1, hidden=32, smoke=True),
    "gru": dict(epochs=1, lr=1.0, hidden=32),
    "gru_scratch": dict(epochs=1, lr=1.0, hidden=32),
    "seq2seq": dict(epochs=1, lr=0.005, embed=16, hidden=16, layers=2, dropout=0.1, batch=64,
                    num_steps=10, pairs=2000),
    "bahdanau": dict(epochs=1, lr=0.005, embed=16, hidden=16, layers=2, dropout=0.1,
                     batch=64, num_steps=10, pairs=2000),
    "transformer": dict(epochs=1, lr=0.005, hidden=16, ffn_hiddens=32, heads=4, layers=2,
                        dropout=0.1, batch=64, num_steps=10, pairs=2000),
    "resnet18": dict(n_train=20, n_test=8, batch=4, resize=16, epochs=1, lr=0.001),
    "bert": dict(batch=16, max_len=32, steps=2, lr=0.01, lines=300),
}
CASES = tuple(STANDARD)
TRANSLATION = ("seq2seq", "bahdanau", "transformer")
# the real data each case stages from ../shared/data (a case whose data is absent is skipped)
CASE_DATA = {"lenet": ("MNIST/raw",), "softmax": ("MNIST/raw",), "mlp": ("MNIST/raw",),
             "resnet18": ("MNIST/raw",), "gru": ("timemachine.txt",),
             "gru_scratch": ("timemachine.txt",), "seq2seq": ("fra-eng.zip", "fra-eng"),
             "bahdanau": ("fra-eng.zip", "fra-eng"), "transformer": ("fra-eng.zip", "fra-eng"),
             "bert": ("wikitext-2/valid.txt",)}
WHAT = {
    "lenet": "train_ch6, LeNet, Fashion-MNIST-format 28x28",
    "softmax": "train_ch3, softmax regression (concise), Fashion-MNIST-format 28x28",
    "mlp": "train_ch3, MLP with 256 hidden units (concise), Fashion-MNIST-format 28x28",
    "gru": "train_ch8, RNNModel(nn.GRU), Time Machine",
    "gru_scratch": "train_ch8, RNNModelScratch (GRU), Time Machine",
    "seq2seq": "train_seq2seq + predict_seq2seq + bleu, fra-eng",
    "bahdanau": "the same with Bahdanau attention (AdditiveAttention in a GRU decoder)",
    "transformer": "the same with TransformerEncoder and a Transformer decoder",
    "resnet18": "train_ch13, resnet18(10, 1), Fashion-MNIST-format at 16x16",
    "bert": "load_data_wiki + BERTModel + _get_batch_loss_bert steps",
}


# ================================================================================== worker
# Everything below runs in a worker process with one side's ``d2l``; the same code for both.
def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def case_lenet(d2l: Any, s: dict[str, Any]) -> None:
    from torch import nn

    train_iter, test_iter = d2l.load_data_fashion_mnist(s["batch"])
    net = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    d2l.train_ch6(net, train_iter, test_iter, s["epochs"], s["lr"], d2l.try_gpu())


def _fashion_mnist_ch3(d2l: Any, s: dict[str, Any], net: Any) -> None:
    """The chapter-3 recipe of the softmax-regression and MLP sections (concise versions):
    weights from N(0, 0.01^2), summed cross-entropy per example, SGD, ``train_ch3``; then the
    test accuracy through the side's ``evaluate_accuracy`` (``train_ch3`` itself only draws)."""
    import torch
    from torch import nn

    def init_weights(m: nn.Module) -> None:
        if type(m) is nn.Linear:
            nn.init.normal_(m.weight, std=0.01)

    train_iter, test_iter = d2l.load_data_fashion_mnist(s["batch"])
    net.apply(init_weights)
    loss = nn.CrossEntropyLoss(reduction="none")
    trainer = torch.optim.SGD(net.parameters(), lr=s["lr"])
    try:
        d2l.train_ch3(net, train_iter, test_iter, loss, s["epochs"], trainer)
    except AssertionError:  # the book's sanity bounds (train loss < 0.5, accuracies > 0.7)
        if not s.get("smoke"):  # a few smoke batches cannot reach them
            raise
    print(f"test acc {d2l.evaluate_accuracy(net, test_iter):.3f}")


def case_softmax(d2l: Any, s: dict[str, Any]) -> None:
    from torch import nn

    _fashion_mnist_ch3(d2l, s, nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))


def case_mlp(d2l: Any, s: dict[str, Any]) -> None:
    from torch import nn

    _fashion_mnist_ch3(d2l, s, nn.Sequential(nn.Flatten(), nn.Linear(784, s["hidden"]),
                                             nn.ReLU(), nn.Linear(s["hidden"], 10)))


def case_gru(d2l: Any, s: dict[str, Any]) -> None:
    from torch import nn

    train_iter, vocab = d2l.load_data_time_machine(32, 35)
    device = d2l.try_gpu()
    net = d2l.RNNModel(nn.GRU(len(vocab), s["hidden"]), len(vocab)).to(device)
    d2l.train_ch8(net, train_iter, vocab, s["lr"], s["epochs"], device)


def gru_functions() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """A GRU from scratch for ``RNNModelScratch``: the input projections of the three gates (update,
    reset, candidate) of all steps in one matrix product, the recurrent ones per step."""
    import torch

    def get_params(vocab_size: int, num_hiddens: int, device: Any) -> list[Any]:
        h = num_hiddens
        params = [torch.randn(vocab_size, 3 * h, device=device) * 0.01,  # W_x: z, r, candidate
                  torch.randn(h, 2 * h, device=device) * 0.01,  # W_h of z and r
                  torch.randn(h, h, device=device) * 0.01,  # W_h of the candidate
                  torch.zeros(3 * h, device=device),  # biases of z, r, candidate
                  torch.randn(h, vocab_size, device=device) * 0.01,  # output layer
                  torch.zeros(vocab_size, device=device)]
        return [p.requires_grad_() for p in params]

    def init_state(batch_size: int, num_hiddens: int, device: Any) -> tuple[Any, ...]:
        return (torch.zeros((batch_size, num_hiddens), device=device),)

    def forward(inputs: Any, state: tuple[Any, ...], params: list[Any]) -> tuple[Any, Any]:
        W_x, W_hzr, W_hc, b, W_out, b_out = params
        (H,) = state
        projected = inputs @ W_x + b  # (T, B, 3H)
        outputs = []
        for x in projected:
            x_z, x_r, x_c = x.chunk(3, dim=1)
            h_z, h_r = (H @ W_hzr).chunk(2, dim=1)
            Z, R = torch.sigmoid(x_z + h_z), torch.sigmoid(x_r + h_r)
            H = Z * H + (1 - Z) * torch.tanh(x_c + (R * H) @ W_hc)
            outputs.append(H)
        return torch.cat(outputs) @ W_out + b_out, (H,)

    return get_params, init_state, forward


def case_gru_scratch(d2l: Any, s: dict[str, Any]) -> None:
    train_iter, vocab = d2l.load_data_time_machine(32, 35)
    device = d2l.try_gpu()
    get_params, init_state, forward = gru_functions()
    net = d2l.RNNModelScratch(len(vocab), s["hidden"], device, get_params, init_state, forward)
    d2l.train_ch8(net, train_iter, vocab, s["lr"], s["epochs"], device)


def gru_decoder(d2l: Any) -> type:
    """A GRU decoder on the side's ``d2l.Decoder``: each step reads its token's embedding with
    the encoder's last top-layer state (the context, kept in the decoder state)."""
    import torch
    from torch import nn

    class GRUDecoder(d2l.Decoder):
        def __init__(self, vocab_size: int, embed_size: int, num_hiddens: int, num_layers: int,
                     dropout: float = 0.0):
            super().__init__()
            self.embedding = nn.Embedding(vocab_size, embed_size)
            self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers, dropout=dropout)
            self.dense = nn.Linear(num_hiddens, vocab_size)

        def init_state(self, enc_outputs: Any, *args: Any) -> tuple[Any, Any]:
            hidden = enc_outputs[1]  # (layers, B, H)
            return hidden, hidden[-1]

        def forward(self, X: Any, state: tuple[Any, Any]) -> tuple[Any, Any]:
            hidden, context = state
            emb = self.embedding(X).transpose(0, 1)  # (T, B, E)
            inputs = torch.cat((emb, context.expand(emb.shape[0], -1, -1)), dim=2)
            out, hidden = self.rnn(inputs, hidden)
            return self.dense(out).transpose(0, 1), (hidden, context)  # (B, T, V)

    return GRUDecoder


def attention_gru_decoder(d2l: Any) -> type:
    """The Bahdanau-attention section's decoder, written here on the side's ``AttentionDecoder``
    and ``AdditiveAttention``: at each step the top layer's last hidden state queries the
    encoder's outputs, and the context is fed to the GRU with the token's embedding."""
    import torch
    from torch import nn

    class AttentionGRUDecoder(d2l.AttentionDecoder):
        def __init__(self, vocab_size: int, embed_size: int, num_hiddens: int, num_layers: int,
                     dropout: float = 0.0):
            super().__init__()
            self.attention = d2l.AdditiveAttention(num_hiddens, num_hiddens, num_hiddens, dropout)
            self.embedding = nn.Embedding(vocab_size, embed_size)
            self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers, dropout=dropout)
            self.dense = nn.Linear(num_hiddens, vocab_size)

        def init_state(self, enc_outputs: Any, enc_valid_lens: Any, *args: Any) -> tuple[Any, ...]:
            outputs, hidden = enc_outputs  # (T, B, H), (layers, B, H)
            return outputs.permute(1, 0, 2), hidden, enc_valid_lens

        def forward(self, X: Any, state: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
            keys, hidden, valid_lens = state
            outputs = []
            for x in self.embedding(X).permute(1, 0, 2):  # one (B, E) step at a time
                context = self.attention(hidden[-1].unsqueeze(1), keys, keys, valid_lens)
                step = torch.cat((context, x.unsqueeze(1)), dim=-1).permute(1, 0, 2)
                out, hidden = self.rnn(step, hidden)
                outputs.append(out)
            return self.dense(torch.cat(outputs)).permute(1, 0, 2), (keys, hidden, valid_lens)

    return AttentionGRUDecoder


def transformer_decoder(d2l: Any) -> type:
    """The Transformer section's decoder, written here from the side's ``MultiHeadAttention``,
    ``AddNorm``, ``PositionWiseFFN`` and ``PositionalEncoding``: each block attends causally to
    the target so far (its earlier inputs are kept in the state while decoding token by token),
    then to the encoder's outputs, then applies its feed-forward layer."""
    import math

    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, h: int, ffn_hiddens: int, num_heads: int, dropout: float, i: int):
            super().__init__()
            self.i = i
            self.attention1 = d2l.MultiHeadAttention(h, h, h, h, num_heads, dropout)
            self.addnorm1 = d2l.AddNorm([h], dropout)
            self.attention2 = d2l.MultiHeadAttention(h, h, h, h, num_heads, dropout)
            self.addnorm2 = d2l.AddNorm([h], dropout)
            self.ffn = d2l.PositionWiseFFN(h, ffn_hiddens, h)
            self.addnorm3 = d2l.AddNorm([h], dropout)

        def forward(self, X: Any, state: list[Any]) -> tuple[Any, list[Any]]:
            enc_outputs, enc_valid_lens, seen = state
            kv = X if seen[self.i] is None else torch.cat((seen[self.i], X), dim=1)
            seen[self.i] = kv
            causal = None
            if self.training:  # teacher forcing: position t sees the positions up to t
                causal = torch.arange(1, X.shape[1] + 1, device=X.device).repeat(X.shape[0], 1)
            Y = self.addnorm1(X, self.attention1(X, kv, kv, causal))
            Z = self.addnorm2(Y, self.attention2(Y, enc_outputs, enc_outputs, enc_valid_lens))
            return self.addnorm3(Z, self.ffn(Z)), state

    class TransformerDecoder(d2l.AttentionDecoder):
        def __init__(self, vocab_size: int, num_hiddens: int, ffn_hiddens: int, num_heads: int,
                     num_layers: int, dropout: float):
            super().__init__()
            self.num_hiddens, self.num_layers = num_hiddens, num_layers
            self.embedding = nn.Embedding(vocab_size, num_hiddens)
            self.pos_encoding = d2l.PositionalEncoding(num_hiddens, dropout)
            self.blks = nn.Sequential(*[Block(num_hiddens, ffn_hiddens, num_heads, dropout, i)
                                        for i in range(num_layers)])
            self.dense = nn.Linear(num_hiddens, vocab_size)

        def init_state(self, enc_outputs: Any, enc_valid_lens: Any, *args: Any) -> list[Any]:
            return [enc_outputs, enc_valid_lens, [None] * self.num_layers]

        def forward(self, X: Any, state: list[Any]) -> tuple[Any, list[Any]]:
            X = self.pos_encoding(self.embedding(X) * math.sqrt(self.num_hiddens))
            for blk in self.blks:
                X, state = blk(X, state)
            return self.dense(X), state

    return TransformerDecoder


SENTENCES = (("go .", "va !"), ("i lost .", "j'ai perdu ."), ("he's calm .", "il est calme ."),
             ("i'm home .", "je suis chez moi ."))


def _translation(d2l: Any, s: dict[str, Any],
                 model: Callable[[Any, Any, Any], tuple[Any, Any]]) -> None:
    """The translation sections' run: ``load_data_nmt``, the encoder and decoder ``model``
    builds from the two vocabularies, ``train_seq2seq``, then ``predict_seq2seq`` and ``bleu``
    on the sections' four sentences."""
    if os.environ.get("BOOK_BENCH_FRA_SHA1"):  # --smoke: a short fra-eng.zip, registered alike
        d2l.DATA_HUB["fra-eng"] = (d2l.DATA_HUB["fra-eng"][0], os.environ["BOOK_BENCH_FRA_SHA1"])
    train_iter, src_vocab, tgt_vocab = d2l.load_data_nmt(s["batch"], s["num_steps"])
    device = d2l.try_gpu()
    encoder, decoder = model(d2l, src_vocab, tgt_vocab)
    net = d2l.EncoderDecoder(encoder, decoder)
    d2l.train_seq2seq(net, train_iter, s["lr"], s["epochs"], tgt_vocab, device)
    for eng, fra in SENTENCES:
        translation, _ = d2l.predict_seq2seq(net, eng, src_vocab, tgt_vocab, s["num_steps"],
                                             device)
        try:
            score = f"{d2l.bleu(translation, fra, k=2):.3f}"
        except ZeroDivisionError:  # the book's bleu on a prediction of fewer than k tokens
            score = "nan"
        print(f"{eng} => {translation}, bleu {score}")


def case_seq2seq(d2l: Any, s: dict[str, Any]) -> None:
    def model(d2l: Any, src_vocab: Any, tgt_vocab: Any) -> tuple[Any, Any]:
        return (d2l.Seq2SeqEncoder(len(src_vocab), s["embed"], s["hidden"], s["layers"],
                                   s["dropout"]),
                gru_decoder(d2l)(len(tgt_vocab), s["embed"], s["hidden"], s["layers"],
                                 s["dropout"]))

    _translation(d2l, s, model)


def case_bahdanau(d2l: Any, s: dict[str, Any]) -> None:
    def model(d2l: Any, src_vocab: Any, tgt_vocab: Any) -> tuple[Any, Any]:
        return (d2l.Seq2SeqEncoder(len(src_vocab), s["embed"], s["hidden"], s["layers"],
                                   s["dropout"]),
                attention_gru_decoder(d2l)(len(tgt_vocab), s["embed"], s["hidden"], s["layers"],
                                           s["dropout"]))

    _translation(d2l, s, model)


def case_transformer(d2l: Any, s: dict[str, Any]) -> None:
    def model(d2l: Any, src_vocab: Any, tgt_vocab: Any) -> tuple[Any, Any]:
        h = s["hidden"]
        encoder = d2l.TransformerEncoder(len(src_vocab), h, h, h, h, [h], h, s["ffn_hiddens"],
                                         s["heads"], s["layers"], s["dropout"])
        decoder = transformer_decoder(d2l)(len(tgt_vocab), h, s["ffn_hiddens"], s["heads"],
                                           s["layers"], s["dropout"])
        return encoder, decoder

    _translation(d2l, s, model)


def case_resnet18(d2l: Any, s: dict[str, Any]) -> None:
    import torch
    from torch import nn

    train_iter, test_iter = d2l.load_data_fashion_mnist(s["batch"], resize=s["resize"])
    net = d2l.resnet18(10, 1)
    loss = nn.CrossEntropyLoss(reduction="none")
    trainer = torch.optim.Adam(net.parameters(), lr=s["lr"])
    d2l.train_ch13(net, train_iter, test_iter, loss, trainer, s["epochs"], d2l.try_all_gpus())


def case_bert(d2l: Any, s: dict[str, Any]) -> None:
    import torch
    from torch import nn

    # the staged wikitext-2-v1.zip (the validation split as wiki.train.tokens), registered as a
    # learner registers a local copy: the URL's file name stays, the SHA-1 is the staged zip's
    url = d2l.DATA_HUB["wikitext-2"][0]
    d2l.DATA_HUB["wikitext-2"] = (url, os.environ["BOOK_BENCH_WIKI_SHA1"])
    train_iter, vocab = d2l.load_data_wiki(s["batch"], s["max_len"])
    device = d2l.try_gpu()
    net = d2l.BERTModel(len(vocab), num_hiddens=128, norm_shape=[128], ffn_num_input=128,
                        ffn_num_hiddens=256, num_heads=2, num_layers=2, dropout=0.2,
                        key_size=128, query_size=128, value_size=128, hid_in_features=128,
                        mlm_in_features=128, nsp_in_features=128).to(device)
    loss = nn.CrossEntropyLoss()
    trainer = torch.optim.Adam(net.parameters(), lr=s["lr"])
    step, mlm_sum, nsp_sum, pairs = 0, 0.0, 0.0, 0
    start = time.perf_counter()
    while step < s["steps"]:
        for batch in train_iter:
            batch = [t.to(device) for t in batch]
            trainer.zero_grad()
            mlm_l, nsp_l, total = d2l._get_batch_loss_bert(net, loss, len(vocab), *batch)
            total.backward()
            trainer.step()
            mlm_sum, nsp_sum, pairs = mlm_sum + float(mlm_l), nsp_sum + float(nsp_l), \
                pairs + batch[0].shape[0]
            step += 1
            if step == s["steps"]:
                break
    print(f"MLM loss {mlm_sum / step:.3f}, NSP loss {nsp_sum / step:.3f}")
    print(f"{pairs / (time.perf_counter() - start):.1f} sentence pairs/sec on {str(device)}")


CASE_FUNCTIONS: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "lenet": case_lenet, "softmax": case_softmax, "mlp": case_mlp, "gru": case_gru,
    "gru_scratch": case_gru_scratch,
    "seq2seq": case_seq2seq, "bahdanau": case_bahdanau, "transformer": case_transformer,
    "resnet18": case_resnet18, "bert": case_bert,
}


def worker(side: str, cases: Sequence[str], size: str, seed: int, threads: int) -> None:
    """Import the side's ``d2l``, then run each case, printing one JSON line per case."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    if side == "book":
        from d2l import torch as d2l  # the book's package, first on PYTHONPATH
    else:
        from divekit.compat import d2l
    import_s = time.perf_counter() - start
    origin = getattr(d2l, "__file__", "") or ""
    if side == "book":
        peer = Path(os.environ["BOOK_BENCH_PEER"]).resolve()
        version = getattr(sys.modules["d2l"], "__version__", "?")
        if not Path(origin).resolve().is_relative_to(peer) or version != PEER_VERSION:
            raise SystemExit(f"book side: imported d2l {version} from {origin}, not d2l "
                             f"{PEER_VERSION} from {peer}")
    sizes = SMOKE if size == "smoke" else STANDARD
    roots = json.loads(os.environ.get("BOOK_BENCH_ROOTS", "{}"))
    for case in cases:
        if case in roots:  # several cases in one process: each in its own folder
            os.chdir(Path(roots[case]) / "work")
            os.environ["DIVEKIT_DATA"] = str(Path(roots[case]) / "data")
        _seed(seed)
        out = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(out):
            CASE_FUNCTIONS[case](d2l, sizes[case])
        seconds = time.perf_counter() - start
        print(RESULT + json.dumps({"side": side, "case": case, "seconds": seconds,
                                   "import_s": import_s, "stdout": out.getvalue(),
                                   "d2l": origin}), flush=True)


# ================================================================================== staging
def _idx_subset(src: Path, dest: Path, n: int) -> None:
    """The first ``n`` items of a (gzipped) IDX file, written uncompressed (divekit's IDX I/O)."""
    from divekit.data.idx import read_idx, write_idx

    array = read_idx(src)
    if n > len(array):
        raise SystemExit(f"{src} has {len(array)} items, fewer than the {n} asked for")
    write_idx(dest, array[:n], compress=False)


def _need(path: Path) -> Path:
    if not path.exists():
        raise SystemExit(f"data not found: {path} (set DIVEKIT_SHARED_DATA to the shared data "
                         "folder)")
    return path


def stage(case: str, sizes: dict[str, Any], root: Path) -> dict[str, str]:
    """Write ``case``'s data into ``root/data``; returns extra environment for the workers."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    if case in ("lenet", "softmax", "mlp", "resnet18"):
        raw = data / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        mnist = _need(SHARED_DATA / "MNIST" / "raw")
        for split, n in (("train", sizes["n_train"]), ("t10k", sizes["n_test"])):
            for kind in ("images-idx3", "labels-idx1"):
                name = f"{split}-{kind}-ubyte"
                _idx_subset(_need(mnist / f"{name}.gz"), raw / name, n)
    elif case in ("gru", "gru_scratch"):
        shutil.copyfile(_need(SHARED_DATA / "timemachine.txt"), data / "timemachine.txt")
    elif case in TRANSLATION and sizes.get("pairs"):  # the first pairs only, in their own zip
        text = _need(SHARED_DATA / "fra-eng" / "fra.txt").read_text(encoding="utf-8")
        text = "".join(text.splitlines(keepends=True)[: sizes["pairs"]])
        (data / "fra-eng").mkdir(exist_ok=True)
        (data / "fra-eng" / "fra.txt").write_text(text, encoding="utf-8")
        archive = data / "fra-eng.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            # a fixed time stamp: the same bytes (and SHA-1) for every case that stages it
            info = zipfile.ZipInfo("fra-eng/fra.txt", date_time=(2020, 1, 1, 0, 0, 0))
            z.writestr(info, text, compress_type=zipfile.ZIP_DEFLATED)
        env["BOOK_BENCH_FRA_SHA1"] = hashlib.sha1(archive.read_bytes()).hexdigest()
    elif case in TRANSLATION:
        shutil.copyfile(_need(SHARED_DATA / "fra-eng.zip"), data / "fra-eng.zip")
        shutil.copytree(_need(SHARED_DATA / "fra-eng"), data / "fra-eng", dirs_exist_ok=True)
        for p in (data / "fra-eng").iterdir():
            p.chmod(0o644)  # the book's download_extract writes over the extracted files
    elif case == "bert":
        lines = _need(SHARED_DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
        if sizes.get("lines"):
            lines = "".join(lines.splitlines(keepends=True)[: sizes["lines"]])
        folder = data / "wikitext-2"
        folder.mkdir(exist_ok=True)
        (folder / "wiki.train.tokens").write_text(lines, encoding="utf-8")
        archive = data / "wikitext-2-v1.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("wikitext-2/wiki.train.tokens", lines)
        env["BOOK_BENCH_WIKI_SHA1"] = hashlib.sha1(archive.read_bytes()).hexdigest()
    return env


# ================================================================================== runner
def peer_ready(peer_dir: Path) -> bool:
    return (peer_dir / "d2l" / "torch.py").is_file()


def install_peer(peer_dir: Path) -> None:
    print(f"installing d2l=={PEER_VERSION} (no dependencies) into {peer_dir}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                    str(peer_dir), f"d2l=={PEER_VERSION}"], check=True)


def run_worker(side: str, cases: Sequence[str], size: str, seed: int, threads: int, root: Path,
               peer_dir: Path, extra_env: dict[str, str],
               roots: dict[str, Path] | None = None) -> list[dict[str, Any]]:
    """One worker process in ``root/work`` (so ``../data`` is ``root/data``); with ``roots``,
    each case runs in its own ``roots[case]/work``."""
    for folder in [root, *(roots or {}).values()]:
        (folder / "work").mkdir(parents=True, exist_ok=True)
    work = root / "work"
    figures = root / f"figures-{side}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DIVEKIT_BOOK") and k not in ("PYTHONPATH", "DIVEKIT_DOWNLOAD")}
    env.update(extra_env)
    env.update(MPLBACKEND="Agg", DIVEKIT_FIGURES=str(figures), DIVEKIT_DATA=str(root / "data"),
               PYTHONUNBUFFERED="1")
    if roots:
        env["BOOK_BENCH_ROOTS"] = json.dumps({c: str(r) for c, r in roots.items()})
    if side == "book":
        env["PYTHONPATH"] = env["BOOK_BENCH_PEER"] = str(peer_dir)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, ",".join(cases),
           "--size", size, "--seed", str(seed), "--threads", str(threads)]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    results = [json.loads(line[len(RESULT):]) for line in proc.stdout.splitlines()
               if line.startswith(RESULT)]
    if proc.returncode != 0 or len(results) != len(cases):
        raise SystemExit(f"{side} worker for {','.join(cases)} failed (exit {proc.returncode})\n"
                         f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n"
                         f"{proc.stderr[-3000:]}")
    return results


# ---------------------------------------------------------------------------------- metrics
_METRIC_LINES = (
    re.compile(r"^loss \d.*test acc [\d.]+"),  # train_ch6 / train_ch13
    re.compile(r"^perplexity [\d.]+"),  # train_ch8
    re.compile(r"^loss [\d.]+(?=, [\d.]+ tokens/sec)"),  # train_seq2seq
    re.compile(r"^MLM loss [\d.]+, NSP loss [\d.]+"),  # BERT
    re.compile(r"^test acc [\d.]+"),  # after train_ch3 (which only draws)
)
_BLEU = re.compile(r"=> .*, bleu ([\d.]+|nan)$")
_NUMBER = re.compile(r"-?\d+\.\d+|nan")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # the book's clear_output outside Jupyter


def metric_text(stdout: str) -> str:
    """The metrics a side printed: its final loss/accuracy, perplexity or MLM/NSP line (the
    speed part left out) and, for translations, the mean BLEU of the sentences."""
    stdout = _ANSI.sub("", stdout)
    found = []
    for line in stdout.splitlines():
        for pattern in _METRIC_LINES:
            m = pattern.match(line.strip())
            if m:
                found = [m.group(0)]  # the last one printed wins (the book prints along the way)
    bleus = [float(m.group(1)) for line in stdout.splitlines()
             if (m := _BLEU.search(line.strip()))]
    if bleus:
        found.append(f"mean bleu {statistics.fmean(bleus):.3f}")
    return ", ".join(found) or "(no metric line)"


def summarize_metrics(texts: Sequence[str]) -> tuple[str, list[tuple[float, float]]]:
    """Metric texts of several repeats as one: each number's median [min-max]; also the
    (min, max) of each number."""
    numbers = [[float(x) for x in _NUMBER.findall(t)] for t in texts]
    if not texts or any(len(n) != len(numbers[0]) for n in numbers):
        return " | ".join(texts), []
    columns = list(zip(*numbers))
    ranges = [(min(c), max(c)) for c in columns]
    parts = iter(columns)

    def fmt(m: re.Match[str]) -> str:
        column = next(parts)
        digits = len(m.group(0).split(".")[1]) if "." in m.group(0) else 3
        med = statistics.median(column)
        if len(column) == 1 or min(column) == max(column):
            return f"{med:.{digits}f}"
        return f"{med:.{digits}f} [{min(column):.{digits}f}-{max(column):.{digits}f}]"

    return _NUMBER.sub(fmt, texts[0]), ranges


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]],
            tolerance: float = 0.0) -> bool | None:
    """Whether every metric's range of one side meets the other's (``tolerance`` absolute)."""
    if not a or len(a) != len(b):
        return None
    return all(lo1 <= hi2 + tolerance and lo2 <= hi1 + tolerance
               for (lo1, hi1), (lo2, hi2) in zip(a, b))


# ---------------------------------------------------------------------------------- the table
def spread(values: Sequence[float], digits: int = 2) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def verdict(ratios: Sequence[float], goal: float = GOAL) -> str:
    if min(ratios) >= goal:
        return "met"
    if max(ratios) < goal:
        return "not met"
    return "not settled"


def table(results: dict[str, dict[str, list[dict[str, Any]]]], with_book: bool) -> str:
    header = ("| case | compat s (spread) | book s (spread) | ratio book/compat (spread) | "
              "compat metrics | book metrics | goal 1.5x | metrics ranges meet |")
    rows = [header, "|" + " --- |" * 8]
    for case, sides in results.items():
        compat = sides["compat"]
        c_s = [r["seconds"] for r in compat]
        c_metrics, c_ranges = summarize_metrics([metric_text(r["stdout"]) for r in compat])
        if with_book and sides.get("book"):
            book = sides["book"]
            b_s = [r["seconds"] for r in book]
            b_metrics, b_ranges = summarize_metrics([metric_text(r["stdout"]) for r in book])
            ratios = [b / c for b, c in zip(b_s, c_s)]
            meet = overlap(c_ranges, b_ranges)
            rows.append(f"| {case} | {spread(c_s)} | {spread(b_s)} | {spread(ratios)}x | "
                        f"{c_metrics} | {b_metrics} | {verdict(ratios)} | "
                        f"{'-' if meet is None else 'yes' if meet else 'no'} |")
        else:
            rows.append(f"| {case} | {spread(c_s)} | peer skipped | - | {c_metrics} | - | - | - |")
    return "\n".join(rows)


def import_line(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    parts = []
    for side in SIDES:
        times = [r["import_s"] for sides in results.values() for r in sides.get(side, [])]
        if times:
            parts.append(f"{side} {spread(times)} s")
    return "import of d2l (not in the times above): " + ", ".join(parts)


# ---------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> None:
    # the shared helpers sit beside this file (imported here: tests load this file by path)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import Report, add_markdown_arg

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated cases (default all: {','.join(CASES)})")
    p.add_argument("--repeats", type=int, default=3, help="runs per side and case (default 3)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, all cases in "
                   "one process per side (seconds)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                   help="torch.set_num_threads in both sides (default: half the CPUs, leaving "
                   "the rest to the data loader workers)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first repeat (default 0)")
    p.add_argument("--peer-dir", type=Path, default=PEER_DIR,
                   help=f"the book's package folder (default {PEER_DIR})")
    p.add_argument("--install-peer", action="store_true",
                   help=f"pip-install d2l=={PEER_VERSION} (--no-deps) into --peer-dir if missing")
    p.add_argument("--json", type=Path, help="also write every run's result here")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "CASES"), help=argparse.SUPPRESS)
    p.add_argument("--size", default="standard", help=argparse.SUPPRESS)
    add_markdown_arg(p)
    args = p.parse_args(argv)

    if args.worker:
        side, cases = args.worker
        worker(side, cases.split(","), args.size, args.seed, args.threads)
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if not peer_ready(args.peer_dir) and args.install_peer:
        install_peer(args.peer_dir)
    with_book = peer_ready(args.peer_dir)
    size = "smoke" if args.smoke else "standard"
    sizes = SMOKE if args.smoke else STANDARD
    repeats = 1 if args.smoke else max(1, args.repeats)
    print(f"book benchmark: {size} sizes, {repeats} repeat(s), {args.threads} thread(s), "
          f"cases {', '.join(cases)}")
    if with_book:
        print(f"book side: d2l {PEER_VERSION} from {args.peer_dir}")
    else:
        print(f"peer skipped: the book's package is not in {args.peer_dir} (run with "
              f"--install-peer to pip-install d2l=={PEER_VERSION} --no-deps there); compat only")
    absent = [c for c in cases if not all((SHARED_DATA / f).exists() for f in CASE_DATA[c])]
    if absent:
        print(f"shared data absent: {', '.join(absent)} skipped ({SHARED_DATA} lacks "
              f"{', '.join(sorted({f for c in absent for f in CASE_DATA[c]}))}; set "
              "DIVEKIT_SHARED_DATA to the shared data folder)")
        cases = [c for c in cases if c not in absent]
        if not cases:
            report = Report("The book's calls: `divekit.compat.d2l` against the book's own "
                            "package", threads=args.threads)
            report.text(f"Not measured: the shared data of every case is absent ({SHARED_DATA}).")
            report.write(args.markdown)
            return
    sides = SIDES if with_book else ("compat",)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {c: {s: [] for s in sides}
                                                           for c in cases}
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="book-bench-") as tmp:
        if args.smoke:  # every case in one process per side: one import each
            roots = {case: Path(tmp) / case for case in cases}
            env: dict[str, str] = {}
            for case in cases:
                env.update(stage(case, sizes[case], roots[case]))
            for side in sides:
                for r in run_worker(side, cases, size, args.seed, args.threads, Path(tmp),
                                    args.peer_dir, env, roots):
                    results[r["case"]][side].append(r)
                    print(f"  {r['case']} {side}: {r['seconds']:.2f} s", flush=True)
        else:
            for case in cases:
                root = Path(tmp) / case
                env = stage(case, sizes[case], root)
                for rep in range(repeats):
                    for side in sides:
                        (r,) = run_worker(side, [case], size, args.seed + rep, args.threads,
                                          root, args.peer_dir, env)
                        results[case][side].append(r)
                        print(f"  {case} #{rep + 1} {side}: {r['seconds']:.2f} s, "
                              f"{metric_text(r['stdout'])}", flush=True)
    print()
    if args.smoke:
        print("(--smoke: tiny sizes, one repeat; the times only show that it runs)")
    print(table(results, with_book))
    print()
    print(import_line(results))
    print(f"total wall time {time.perf_counter() - wall:.1f} s")
    report = Report("The book's calls: `divekit.compat.d2l` against the book's own package",
                    threads=args.threads)
    report.text(f"{size} sizes, {repeats} interleaved repeat(s) per case (compat, book, "
                f"compat, ...; seeds {args.seed}–{args.seed + repeats - 1}), "
                f"{args.threads} thread(s); "
                + (f"book side: d2l {PEER_VERSION}." if with_book else "peer skipped: the "
                   "book's package is not installed.")
                + (f" Shared data absent: {', '.join(absent)} skipped." if absent else "")
                + " Ratio: book time ÷ compat time, median of the pairs with their min–max; "
                "metrics: median [min–max] over the seeds.")
    report.text(table(results, with_book))
    report.text(f"{import_line(results)}; total wall time {time.perf_counter() - wall:.0f} s.")
    report.write(args.markdown)
    for case in cases:
        print(f"  {case}: {WHAT[case]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
