"""The book's ``d2l.torch`` API over divekit: ``from divekit.compat import d2l``.

Each name keeps the book's signature and behaviour (see ``../shared/book/API.md``) and is a thin
adapter over divekit's own implementation. It never imports the book's ``d2l`` package.

Pictures: in Jupyter they show inline as the book's do; elsewhere nothing blocks or prints, and
each figure is saved as a PNG into ``$DIVEKIT_FIGURES`` (default ``./figures``).
Data: the book's files are found offline in ``../data``, ``$DIVEKIT_DATA`` or divekit's cache.
"""

# the modules and objects the book's module re-exports (in this order: _plot chooses the
# Matplotlib backend before anything imports pyplot)
import collections  # noqa: F401,I001
import hashlib  # noqa: F401
import math  # noqa: F401
import os  # noqa: F401
import random  # noqa: F401
import re  # noqa: F401
import shutil  # noqa: F401
import sys  # noqa: F401
import tarfile  # noqa: F401
import time  # noqa: F401
import zipfile  # noqa: F401
from collections import defaultdict  # noqa: F401

import numpy as np  # noqa: F401
import torch  # noqa: F401
import torchvision  # noqa: F401
from PIL import Image  # noqa: F401
from torch import nn  # noqa: F401
from torch.nn import functional as F  # noqa: F401
from torch.utils import data  # noqa: F401
from torchvision import transforms  # noqa: F401

from divekit.compat.d2l._plot import *  # noqa: F401,F403
from divekit.compat.d2l._util import *  # noqa: F401,F403
from divekit.compat.d2l._data import *  # noqa: F401,F403
from divekit.compat.d2l._text import *  # noqa: F401,F403
from divekit.compat.d2l._detection import *  # noqa: F401,F403
from divekit.compat.d2l._models import *  # noqa: F401,F403
from divekit.compat.d2l._train import *  # noqa: F401,F403
from divekit.compat.d2l._plot import plt  # noqa: F401  (real pyplot, after the backend choice)

# the tensor aliases of the book's config.ini
nn_Module = nn.Module
ones = torch.ones
zeros = torch.zeros
zeros_like = torch.zeros_like
ones_like = torch.ones_like
tensor = torch.tensor
arange = torch.arange
meshgrid = torch.meshgrid
sin = torch.sin
sinh = torch.sinh
cos = torch.cos
cosh = torch.cosh
tanh = torch.tanh
linspace = torch.linspace
exp = torch.exp
log = torch.log
normal = torch.normal
rand = torch.rand
randn = torch.randn
matmul = torch.matmul
int32 = torch.int32
int64 = torch.int64
float32 = torch.float32
concat = torch.cat
stack = torch.stack
abs = torch.abs  # noqa: A001
eye = torch.eye


def _method_alias(
    alias: str, method: str, *, detach: bool = False
) -> "collections.abc.Callable[..., object]":
    """config.ini's ``lambda x, *args, **kwargs: x.METHOD(*args, **kwargs)``, named ``alias``
    (``detach``: on ``x.detach()``, as the book's ``numpy``)."""

    def call(x: torch.Tensor, *args: object, **kwargs: object) -> object:
        return getattr(x.detach() if detach else x, method)(*args, **kwargs)

    call.__name__ = call.__qualname__ = alias
    return call


# the method aliases of the book's config.ini
numpy = _method_alias("numpy", "numpy", detach=True)
size = _method_alias("size", "numel")
reshape = _method_alias("reshape", "reshape")
to = _method_alias("to", "to")
reduce_sum = _method_alias("reduce_sum", "sum")
argmax = _method_alias("argmax", "argmax")
astype = _method_alias("astype", "type")
transpose = _method_alias("transpose", "t")
reduce_mean = _method_alias("reduce_mean", "mean")

from divekit.compat.d2l import _bert_small  # noqa: F401,E402  (registers the bert.small stand-in)
