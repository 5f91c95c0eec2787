"""Parameter-efficient fine-tuning: LoRA (Hu et al. 2021) and bottleneck adapters (Houlsby et al.
2019), as wrappers that never edit the layer they wrap (``peft``'s ``LoraLayer`` design).

**LoRA.** A frozen linear layer ``h = W x + b`` (``W`` is ``d_out × d_in``) learns a low-rank
update ``ΔW = B A`` with ``A ∈ ℝ^{r × d_in}``, ``B ∈ ℝ^{d_out × r}`` and ``r ≪ min(d_in, d_out)``:

    h = W x + b + (α / r) · B A dropout(x)

``A`` starts Kaiming-uniform and ``B`` at zero, so training starts from the pretrained function.
:func:`merge` folds the update in, ``W ← W + (α/r) B A``, which costs nothing at inference.

**Adapters.** After a sub-layer (attention, FFN) with output ``y ∈ ℝ^d``, a bottleneck of
``m ≪ d`` units adds a residual ``y + W_up GELU(W_down y + b_down) + b_up``; ``W_up`` starts at zero
so the adapter begins as the identity.

    apply_lora(model, ["query", "value"], r=8, alpha=16)   # the attention's W_q, W_v
    add_adapters(model, size=64, dim=384)                    # after every attention and FFN
    freeze_except(model, keep=("head.",))                    # only LoRA/adapters/head learn
    merge(model)                                             # W ← W + (α/r) B A
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from divekit.errors import DivekitError

log = logging.getLogger("divekit")

# the (and Hugging Face's) words for the attention projections of divekit's BERT
ALIASES = {"query": "W_q", "key": "W_k", "value": "W_v", "output": "W_o",
           "intermediate": "dense1", "ffn_output": "dense2"}
DEFAULT_TARGETS = ("query", "value")
MARKERS = ("lora_A", "lora_B", "adapter")  # names of the parameters these wrappers add


class LoRALinear(nn.Module):
    """``h = base(x) + (α/r) · B(A(dropout(x)))`` around a linear layer ``base``."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise DivekitError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise DivekitError(f"LoRA alpha must be positive, got {alpha!r}")
        if not 0 <= dropout < 1:
            raise DivekitError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear (and peft)
        nn.init.zeros_(self.lora_B.weight)  # ΔW = 0 at the start

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> Tensor:
        """``(α/r) B A``, shaped like ``base.weight`` ``(d_out, d_in)``."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the update folded in: ``W + (α/r) B A``."""
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


class Adapter(nn.Module):
    """The bottleneck ``y + up(GELU(down(y)))``: ``(…, d) → (…, d)``, the identity at the start."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        if not isinstance(size, int) or size < 1:
            raise DivekitError(f"--adapters SIZE must be a positive integer, got {size!r}")
        self.down = nn.Linear(dim, size)
        self.act = nn.GELU()
        self.up = nn.Linear(size, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: Tensor) -> Tensor:
        return y + self.up(self.act(self.down(y)))


class WithAdapter(nn.Module):
    """A sub-layer followed by an :class:`Adapter` on its output (same call signature)."""

    def __init__(self, layer: nn.Module, dim: int, size: int):
        super().__init__()
        self.layer = layer
        self.adapter = Adapter(dim, size)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.adapter(self.layer(*args, **kwargs))


# ----------------------------------------------------------------------------- finding layers
def _resolve(target: str) -> str:
    return ALIASES.get(target, target)


def parse_targets(spec: str | Sequence[str]) -> list[str]:
    """``"query,value"`` → ``["query", "value"]`` (empty entries dropped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [t.strip() for t in items if t.strip()]
    if not out:
        raise DivekitError(f"--lora-targets {spec!r} names no layer")
    return out


def find_linear(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The qualified names of the ``nn.Linear`` layers that ``targets`` match: a target matches a
    layer whose last name part equals it (aliases: query/key/value/output), or whose full name
    matches it as a glob (``encoder.blks.0.*``). None matching is an error listing the layers."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    wanted = {*targets, *(_resolve(t) for t in targets)}
    hits = [n for n in linear
            if any(n.rsplit(".", 1)[-1] == t or fnmatch.fnmatchcase(n, t) for t in wanted)]
    if not hits:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear})
        aliases = ", ".join(f"{k}={v}" for k, v in ALIASES.items())
        raise DivekitError(f"--lora-targets {','.join(targets)} match no linear layer; the "
                           f"layers are named {', '.join(short)} (aliases: {aliases})")
    return hits


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, r: int = 8,
               alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Wrap every linear layer ``targets`` match in a :class:`LoRALinear`; returns their names."""
    names = find_linear(model, targets)
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return names


def add_adapters(model: nn.Module, size: int, dim: int,
                 targets: Sequence[str] = ("attention", "ffn")) -> list[str]:
    """Put an :class:`Adapter` of ``size`` units after every outermost sub-module named as in
    ``targets`` (the last name part); their outputs have ``dim`` features."""
    names: list[str] = []
    for n, _ in model.named_modules():  # the outermost ones (attention holds an `attention`)
        if n.rsplit(".", 1)[-1] in targets and not any(n.startswith(o + ".") for o in names):
            names.append(n)
    if not names:
        raise DivekitError(f"no sub-layer named {', '.join(targets)} to put adapters after")
    for name in names:
        _replace(model, name, WithAdapter(model.get_submodule(name), dim, size))
    return names


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and drop the wrapper (in place): the
    outputs stay the same and inference costs what the base model costs."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merged())
    return model


# ----------------------------------------------------------------------------- what trains
def is_adapter_param(name: str) -> bool:
    return any(part in MARKERS for part in name.split("."))


def freeze_except(model: nn.Module, keep: Iterable[str] = ()) -> None:
    """Only LoRA and adapter parameters, and those whose names start with a prefix in
    ``keep`` (a task head), receive gradients."""
    keep = tuple(keep)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name) or name.startswith(keep))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def report(model: nn.Module) -> str:
    """``trainable params: 147,456 of 22,713,216 (0.65%)``, also logged on ``divekit``."""
    trainable, total = count_parameters(model)
    line = f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
    log.info(line)
    return line


__all__ = [
    "ALIASES", "Adapter", "DEFAULT_TARGETS", "LoRALinear", "WithAdapter", "add_adapters",
    "apply_lora", "count_parameters", "find_linear", "freeze_except", "is_adapter_param", "merge",
    "parse_targets", "report",
]
