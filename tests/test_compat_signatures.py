"""The book's API on ``divekit.compat.d2l``: every name of the course set of
``../shared/book/API.md`` (the 90 names the course calls as ``d2l.NAME`` and the 42 its sections
define), with the book's parameter names, kinds and defaults checked through
``inspect.signature`` against the table below; the re-exported modules; and that importing the
layer never imports the book's own ``d2l`` package.

The table was written once from API.md (d2l-zh 2.0.0's ``d2l/torch.py``); this test does not read
API.md. A parameter is a name (no default), ``(name, default)``, ``"*args"`` or ``"**kwargs"``.
Defaults compare by value (ints and floats alike, bools as bools, tuples as tuples); the book's
``os.path.join('..', 'data')`` is its value and ``d2l.try_all_gpus()`` (evaluated when the book's
module is imported) is ``ALL_GPUS``: a list equal to ``try_all_gpus()``. An implementation may add
keyword-only parameters with defaults after the book's (they change no call of the book); any
other difference fails.
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

ALL_GPUS = object()  # the book's ``devices=d2l.try_all_gpus()``

# --------------------------------------------------------------------------- the book's table
# functions: name -> parameters
FUNCTIONS: dict[str, tuple] = {
    "use_svg_display": (),
    "set_figsize": (("figsize", (3.5, 2.5)),),
    "plot": ("X", ("Y", None), ("xlabel", None), ("ylabel", None), ("legend", None), ("xlim", None),
        ("ylim", None), ("xscale", "linear"), ("yscale", "linear"),
        ("fmts", ("-", "m--", "g-.", "r:")), ("figsize", (3.5, 2.5)), ("axes", None)),
    "sgd": ("params", "lr", "batch_size"),
    "load_array": ("data_arrays", "batch_size", ("is_train", True)),
    "show_images": ("imgs", "num_rows", "num_cols", ("titles", None), ("scale", 1.5)),
    "get_dataloader_workers": (),
    "load_data_fashion_mnist": ("batch_size", ("resize", None)),
    "accuracy": ("y_hat", "y"),
    "evaluate_loss": ("net", "data_iter", "loss"),
    "download": ("name", ("cache_dir", os.path.join("..", "data"))),
    "download_extract": ("name", ("folder", None)),
    "try_gpu": (("i", 0),),
    "try_all_gpus": (),
    "corr2d": ("X", "K"),
    "evaluate_accuracy_gpu": ("net", "data_iter", ("device", None)),
    "train_ch6": ("net", "train_iter", "test_iter", "num_epochs", "lr", "device"),
    "read_time_machine": (),
    "tokenize": ("lines", ("token", "word")),
    "count_corpus": ("tokens",),
    "load_corpus_time_machine": (("max_tokens", -1),),
    "seq_data_iter_random": ("corpus", "batch_size", "num_steps"),
    "seq_data_iter_sequential": ("corpus", "batch_size", "num_steps"),
    "load_data_time_machine": ("batch_size", "num_steps", ("use_random_iter", False),
        ("max_tokens", 10000)),
    "predict_ch8": ("prefix", "num_preds", "net", "vocab", "device"),
    "grad_clipping": ("net", "theta"),
    "train_epoch_ch8": ("net", "train_iter", "loss", "updater", "device", "use_random_iter"),
    "train_ch8": ("net", "train_iter", "vocab", "lr", "num_epochs", "device",
        ("use_random_iter", False)),
    "read_data_nmt": (),
    "preprocess_nmt": ("text",),
    "tokenize_nmt": ("text", ("num_examples", None)),
    "show_list_len_pair_hist": ("legend", "xlabel", "ylabel", "xlist", "ylist"),
    "truncate_pad": ("line", "num_steps", "padding_token"),
    "build_array_nmt": ("lines", "vocab", "num_steps"),
    "load_data_nmt": ("batch_size", "num_steps", ("num_examples", 600)),
    "sequence_mask": ("X", "valid_len", ("value", 0)),
    "train_seq2seq": ("net", "data_iter", "lr", "num_epochs", "tgt_vocab", "device"),
    "predict_seq2seq": ("net", "src_sentence", "src_vocab", "tgt_vocab", "num_steps", "device",
        ("save_attention_weights", False)),
    "bleu": ("pred_seq", "label_seq", "k"),
    "show_heatmaps": ("matrices", "xlabel", "ylabel", ("titles", None), ("figsize", (2.5, 2.5)),
        ("cmap", "Reds")),
    "masked_softmax": ("X", "valid_lens"),
    "transpose_qkv": ("X", "num_heads"),
    "transpose_output": ("X", "num_heads"),
    "split_batch": ("X", "y", "devices"),
    "resnet18": ("num_classes", ("in_channels", 1)),
    "train_batch_ch13": ("net", "X", "y", "loss", "trainer", "devices"),
    "train_ch13": ("net", "train_iter", "test_iter", "loss", "trainer", "num_epochs",
        ("devices", ALL_GPUS)),
    "box_corner_to_center": ("boxes",),
    "box_center_to_corner": ("boxes",),
    "bbox_to_rect": ("bbox", "color"),
    "multibox_prior": ("data", "sizes", "ratios"),
    "show_bboxes": ("axes", "bboxes", ("labels", None), ("colors", None)),
    "box_iou": ("boxes1", "boxes2"),
    "assign_anchor_to_bbox": ("ground_truth", "anchors", "device", ("iou_threshold", 0.5)),
    "offset_boxes": ("anchors", "assigned_bb", ("eps", 1e-06)),
    "multibox_target": ("anchors", "labels"),
    "offset_inverse": ("anchors", "offset_preds"),
    "nms": ("boxes", "scores", "iou_threshold"),
    "multibox_detection": ("cls_probs", "offset_preds", "anchors", ("nms_threshold", 0.5),
        ("pos_threshold", 0.009999999)),
    "read_data_bananas": (("is_train", True),),
    "load_data_bananas": ("batch_size",),
    "read_voc_images": ("voc_dir", ("is_train", True)),
    "voc_colormap2label": (),
    "voc_label_indices": ("colormap", "colormap2label"),
    "voc_rand_crop": ("feature", "label", "height", "width"),
    "load_data_voc": ("batch_size", "crop_size"),
    "get_tokens_and_segments": ("tokens_a", ("tokens_b", None)),
    "_read_wiki": ("data_dir",),
    "_get_next_sentence": ("sentence", "next_sentence", "paragraphs"),
    "_get_nsp_data_from_paragraph": ("paragraph", "paragraphs", "vocab", "max_len"),
    "_replace_mlm_tokens": ("tokens", "candidate_pred_positions", "num_mlm_preds", "vocab"),
    "_get_mlm_data_from_tokens": ("tokens", "vocab"),
    "_pad_bert_inputs": ("examples", "max_len", "vocab"),
    "load_data_wiki": ("batch_size", "max_len"),
    "_get_batch_loss_bert": ("net", "loss", "vocab_size", "tokens_X", "segments_X", "valid_lens_x",
        "pred_positions_X", "mlm_weights_X", "mlm_Y", "nsp_y"),
    "read_snli": ("data_dir", "is_train"),
    "load_data_snli": ("batch_size", ("num_steps", 50)),
}
# classes: name -> base class, __init__'s parameters (without self), and each method's (without
# self; None for a property or instance attribute)
CLASSES: dict[str, dict] = {
    "Timer": {
        "base": None,
        "__init__": (),
        "start": (),
        "stop": (),
        "avg": (),
        "sum": (),
        "cumsum": (),
    },
    "Accumulator": {
        "base": None,
        "__init__": ("n",),
        "add": ("*args",),
        "reset": (),
        "__getitem__": ("idx",),
    },
    "Animator": {
        "base": None,
        "__init__": (("xlabel", None), ("ylabel", None), ("legend", None), ("xlim", None),
            ("ylim", None), ("xscale", "linear"), ("yscale", "linear"),
            ("fmts", ("-", "m--", "g-.", "r:")), ("nrows", 1), ("ncols", 1),
            ("figsize", (3.5, 2.5))),
        "add": ("x", "y"),
    },
    "Residual": {
        "base": "nn.Module",
        "__init__": ("input_channels", "num_channels", ("use_1x1conv", False), ("strides", 1)),
        "forward": ("X",),
    },
    "Vocab": {
        "base": None,
        "__init__": (("tokens", None), ("min_freq", 0), ("reserved_tokens", None)),
        "__len__": (),
        "__getitem__": ("tokens",),
        "to_tokens": ("indices",),
        "unk": None,
        "token_freqs": None,
    },
    "SeqDataLoader": {
        "base": None,
        "__init__": ("batch_size", "num_steps", "use_random_iter", "max_tokens"),
        "__iter__": (),
    },
    "RNNModelScratch": {
        "base": None,
        "__init__": ("vocab_size", "num_hiddens", "device", "get_params", "init_state",
            "forward_fn"),
        "__call__": ("X", "state"),
        "begin_state": ("batch_size", "device"),
    },
    "RNNModel": {
        "base": "nn.Module",
        "__init__": ("rnn_layer", "vocab_size", "**kwargs"),
        "forward": ("inputs", "state"),
        "begin_state": ("device", ("batch_size", 1)),
    },
    "Encoder": {
        "base": "nn.Module",
        "__init__": ("**kwargs",),
        "forward": ("X", "*args"),
    },
    "Decoder": {
        "base": "nn.Module",
        "__init__": ("**kwargs",),
        "init_state": ("enc_outputs", "*args"),
        "forward": ("X", "state"),
    },
    "EncoderDecoder": {
        "base": "nn.Module",
        "__init__": ("encoder", "decoder", "**kwargs"),
        "forward": ("enc_X", "dec_X", "*args"),
    },
    "Seq2SeqEncoder": {
        "base": "d2l.Encoder",
        "__init__": ("vocab_size", "embed_size", "num_hiddens", "num_layers", ("dropout", 0),
            "**kwargs"),
        "forward": ("X", "*args"),
    },
    "MaskedSoftmaxCELoss": {
        "base": "nn.CrossEntropyLoss",
        "__init__": (),  # see INHERITED_INIT
        "forward": ("pred", "label", "valid_len"),
    },
    "AdditiveAttention": {
        "base": "nn.Module",
        "__init__": ("key_size", "query_size", "num_hiddens", "dropout", "**kwargs"),
        "forward": ("queries", "keys", "values", "valid_lens"),
    },
    "DotProductAttention": {
        "base": "nn.Module",
        "__init__": ("dropout", "**kwargs"),
        "forward": ("queries", "keys", "values", ("valid_lens", None)),
    },
    "AttentionDecoder": {
        "base": "d2l.Decoder",
        "__init__": ("**kwargs",),
        "attention_weights": None,
    },
    "MultiHeadAttention": {
        "base": "nn.Module",
        "__init__": ("key_size", "query_size", "value_size", "num_hiddens", "num_heads", "dropout",
            ("bias", False), "**kwargs"),
        "forward": ("queries", "keys", "values", "valid_lens"),
    },
    "PositionalEncoding": {
        "base": "nn.Module",
        "__init__": ("num_hiddens", "dropout", ("max_len", 1000)),
        "forward": ("X",),
    },
    "PositionWiseFFN": {
        "base": "nn.Module",
        "__init__": ("ffn_num_input", "ffn_num_hiddens", "ffn_num_outputs", "**kwargs"),
        "forward": ("X",),
    },
    "AddNorm": {
        "base": "nn.Module",
        "__init__": ("normalized_shape", "dropout", "**kwargs"),
        "forward": ("X", "Y"),
    },
    "EncoderBlock": {
        "base": "nn.Module",
        "__init__": ("key_size", "query_size", "value_size", "num_hiddens", "norm_shape",
            "ffn_num_input", "ffn_num_hiddens", "num_heads", "dropout", ("use_bias", False),
            "**kwargs"),
        "forward": ("X", "valid_lens"),
    },
    "TransformerEncoder": {
        "base": "d2l.Encoder",
        "__init__": ("vocab_size", "key_size", "query_size", "value_size", "num_hiddens",
            "norm_shape", "ffn_num_input", "ffn_num_hiddens", "num_heads", "num_layers", "dropout",
            ("use_bias", False), "**kwargs"),
        "forward": ("X", "valid_lens", "*args"),
    },
    "BananasDataset": {
        "base": "torch.utils.data.Dataset",
        "__init__": ("is_train",),
        "__getitem__": ("idx",),
        "__len__": (),
    },
    "VOCSegDataset": {
        "base": "torch.utils.data.Dataset",
        "__init__": ("is_train", "crop_size", "voc_dir"),
        "normalize_image": ("img",),
        "filter": ("imgs",),
        "__getitem__": ("idx",),
        "__len__": (),
    },
    "BERTEncoder": {
        "base": "nn.Module",
        "__init__": ("vocab_size", "num_hiddens", "norm_shape", "ffn_num_input", "ffn_num_hiddens",
            "num_heads", "num_layers", "dropout", ("max_len", 1000), ("key_size", 768),
            ("query_size", 768), ("value_size", 768), "**kwargs"),
        "forward": ("tokens", "segments", "valid_lens"),
    },
    "MaskLM": {
        "base": "nn.Module",
        "__init__": ("vocab_size", "num_hiddens", ("num_inputs", 768), "**kwargs"),
        "forward": ("X", "pred_positions"),
    },
    "NextSentencePred": {
        "base": "nn.Module",
        "__init__": ("num_inputs", "**kwargs"),
        "forward": ("X",),
    },
    "BERTModel": {
        "base": "nn.Module",
        "__init__": ("vocab_size", "num_hiddens", "norm_shape", "ffn_num_input", "ffn_num_hiddens",
            "num_heads", "num_layers", "dropout", ("max_len", 1000), ("key_size", 768),
            ("query_size", 768), ("value_size", 768), ("hid_in_features", 768),
            ("mlm_in_features", 768), ("nsp_in_features", 768)),
        "forward": ("tokens", "segments", ("valid_lens", None), ("pred_positions", None)),
    },
    "_WikiTextDataset": {
        "base": "torch.utils.data.Dataset",
        "__init__": ("paragraphs", "max_len"),
        "__getitem__": ("idx",),
        "__len__": (),
    },
    "SNLIDataset": {
        "base": "torch.utils.data.Dataset",
        "__init__": ("dataset", "num_steps", ("vocab", None)),
        "_pad": ("lines",),
        "__getitem__": ("idx",),
        "__len__": (),
    },
}

# constants: name -> check of the value
CONSTANTS = ("DATA_HUB", "DATA_URL", "VOC_COLORMAP", "VOC_CLASSES")

# config.ini's tensor aliases the course uses: the torch object itself ...
TORCH_ALIASES = {
    "ones": torch.ones, "zeros": torch.zeros, "tensor": torch.tensor, "arange": torch.arange,
    "sin": torch.sin, "exp": torch.exp, "log": torch.log, "normal": torch.normal,
    "rand": torch.rand, "matmul": torch.matmul, "int32": torch.int32, "float32": torch.float32,
    "concat": torch.cat, "stack": torch.stack, "abs": torch.abs, "eye": torch.eye,
}
# ... and ``lambda x, *args, **kwargs: x.METHOD(*args, **kwargs)`` (numpy: on ``x.detach()``),
# with arguments to try
METHOD_ALIASES = {
    "numpy": ("numpy", ()), "size": ("numel", ()), "reshape": ("reshape", ((3, 2),)),
    "reduce_sum": ("sum", (0,)), "astype": ("type", (torch.int32,)),
}

# the modules and objects the book's module re-exports (those the course can use offline)
REEXPORTS = {
    "torch": torch, "torchvision": torchvision, "nn": nn, "F": torch.nn.functional,
    "np": np, "data": torch.utils.data, "transforms": torchvision.transforms,
    "collections": collections, "hashlib": hashlib, "math": math, "os": os,
    "random": random, "re": re, "shutil": shutil, "sys": sys, "tarfile": tarfile,
    "time": time, "zipfile": zipfile, "defaultdict": collections.defaultdict,
}

# MaskedSoftmaxCELoss defines no __init__ in the book: it is nn.CrossEntropyLoss's, called as
# MaskedSoftmaxCELoss(); an explicit ``__init__(self)`` is accepted as well.
INHERITED_INIT = {"MaskedSoftmaxCELoss": nn.CrossEntropyLoss}

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "potted plant",
    "sheep", "sofa", "train", "tv/monitor",
]

P = inspect.Parameter
EMPTY = P.empty


# ------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def d2l():
    from divekit.compat import d2l as module

    return module


def _expected(params: tuple) -> list[tuple[str, Any, Any]]:
    """The table's parameters as ``(name, kind, default)``."""
    out = []
    for p in params:
        if isinstance(p, tuple):
            out.append((p[0], P.POSITIONAL_OR_KEYWORD, p[1]))
        elif p.startswith("**"):
            out.append((p[2:], P.VAR_KEYWORD, EMPTY))
        elif p.startswith("*"):
            out.append((p[1:], P.VAR_POSITIONAL, EMPTY))
        else:
            out.append((p, P.POSITIONAL_OR_KEYWORD, EMPTY))
    return out


def _render(params: list[tuple[str, Any, Any]]) -> str:
    parts = []
    for name, kind, default in params:
        prefix = {P.VAR_POSITIONAL: "*", P.VAR_KEYWORD: "**"}.get(kind, "")
        if default is EMPTY:
            parts.append(prefix + name)
        else:
            parts.append(f"{name}={'d2l.try_all_gpus()' if default is ALL_GPUS else default!r}")
    return "(" + ", ".join(parts) + ")"


def _same_default(got: Any, want: Any, d2l: Any) -> bool:
    if want is ALL_GPUS:
        return isinstance(got, list) and got == d2l.try_all_gpus()
    if want is EMPTY or want is None or isinstance(want, bool):
        return got is want
    if isinstance(want, int | float):  # 0 and 0.0 alike, but not a bool
        return isinstance(got, int | float) and not isinstance(got, bool) and got == want
    return type(got) is type(want) and got == want


def _check(sig: inspect.Signature, params: tuple, d2l: Any, what: str) -> None:
    """``sig`` has the book's ``params`` (and, besides, only keyword-only ones with defaults)."""
    want = _expected(params)
    names = {name for name, _, _ in want}
    core = [p for p in sig.parameters.values()
            if not (p.kind is P.KEYWORD_ONLY and p.default is not EMPTY and p.name not in names)]
    ok = len(core) == len(want) and all(
        p.kind == kind
        and (p.name == name or kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD))
        and _same_default(p.default, default, d2l)
        for p, (name, kind, default) in zip(core, want)
    )
    assert ok, f"{what}: the book has {_render(want)}, d2l has {sig}"


def _resolve(base: str, d2l: Any) -> type:
    return {"nn.Module": nn.Module, "nn.CrossEntropyLoss": nn.CrossEntropyLoss,
            "torch.utils.data.Dataset": torch.utils.data.Dataset}.get(base) or getattr(
        d2l, base.removeprefix("d2l."))


def _pascal_colormap(n: int) -> list[list[int]]:
    """The PASCAL VOC palette: the bits of a class index spread over the top bits of r, g, b."""
    colours = []
    for index in range(n):
        rgb, c = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << shift
            c >>= 3
        colours.append(rgb)
    return colours


# --------------------------------------------------------------------------------- tests
def test_the_table_is_the_course_set():
    assert len(FUNCTIONS) + len(CLASSES) + len(CONSTANTS) + len(TORCH_ALIASES) + len(
        METHOD_ALIASES) == 90 + 42


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_function(d2l, name):
    fn = getattr(d2l, name, None)
    assert callable(fn), f"d2l.{name} is missing"
    _check(inspect.signature(fn), FUNCTIONS[name], d2l, f"d2l.{name}")


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_class(d2l, name):
    cls = getattr(d2l, name, None)
    assert isinstance(cls, type), f"d2l.{name} is missing or not a class"
    base = CLASSES[name]["base"]
    if base is not None:
        assert issubclass(cls, _resolve(base, d2l)), f"d2l.{name} is not a subclass of {base}"
    sig = inspect.signature(cls)
    inherited = INHERITED_INIT.get(name)
    if inherited is not None and sig == inspect.signature(inherited):
        return
    _check(sig, CLASSES[name]["__init__"], d2l, f"d2l.{name}")


METHODS = [(c, m) for c in sorted(CLASSES) for m in CLASSES[c] if m not in ("base", "__init__")]


@pytest.mark.parametrize("name,method", METHODS, ids=[f"{c}.{m}" for c, m in METHODS])
def test_method(d2l, name, method):
    cls = getattr(d2l, name, None)
    assert isinstance(cls, type), f"d2l.{name} is missing or not a class"
    params = CLASSES[name][method]
    if params is None:  # a property or attribute of the instances
        if method not in dir(cls):
            assert hasattr(cls(), method), f"d2l.{name} has no attribute {method}"
        return
    assert method in dir(cls), f"d2l.{name} has no method {method}"
    sig = inspect.signature(getattr(cls, method))
    if not isinstance(inspect.getattr_static(cls, method), staticmethod | classmethod):
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])  # self
    _check(sig, params, d2l, f"d2l.{name}.{method}")


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant(d2l, name):
    assert hasattr(d2l, name), f"d2l.{name} is missing"
    value = getattr(d2l, name)
    if name == "DATA_HUB":
        assert isinstance(value, dict)
    elif name == "DATA_URL":
        assert value == "http://d2l-data.s3-accelerate.amazonaws.com/"
    elif name == "VOC_COLORMAP":
        assert [list(c) for c in value] == _pascal_colormap(21)
    else:
        assert list(value) == VOC_CLASSES


@pytest.mark.parametrize("name", sorted(TORCH_ALIASES))
def test_torch_alias(d2l, name):
    assert getattr(d2l, name, None) is TORCH_ALIASES[name]


@pytest.mark.parametrize("name", sorted(METHOD_ALIASES))
def test_method_alias(d2l, name):
    fn = getattr(d2l, name, None)
    assert callable(fn), f"d2l.{name} is missing"
    _check(inspect.signature(fn), ("x", "*args", "**kwargs"), d2l, f"d2l.{name}")
    method, args = METHOD_ALIASES[name]
    x = torch.arange(6.0, requires_grad=True)
    got, want = fn(x, *args), getattr(x.detach(), method)(*args)
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
        assert torch.equal(got.detach(), want)
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and np.array_equal(got, want)
    else:
        assert got == want


@pytest.mark.parametrize("name", sorted(REEXPORTS) + ["plt", "Image"])
def test_reexport(d2l, name):
    if name == "plt":
        import matplotlib.pyplot as want
    elif name == "Image":
        from PIL import Image as want
    else:
        want = REEXPORTS[name]
    assert getattr(d2l, name, None) is want


def test_import_never_imports_the_books_package(tmp_path):
    # a stand-in for the book's package, first on the path: importing it leaves a mark
    site = tmp_path / "site"
    mark = tmp_path / "the-books-d2l-was-imported"
    for module in ("__init__.py", "torch.py"):
        path = site / "d2l" / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"open({str(mark)!r}, 'w').close()\n")
    code = textwrap.dedent("""
        import sys
        from divekit.compat import d2l
        import divekit.compat.d2l
        print([m for m in sys.modules
               if "d2l" in m and not m.startswith("divekit.compat.d2l")])
    """)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert not mark.exists()
