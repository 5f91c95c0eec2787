"""BERT (Devlin et al. 2019) as the course builds it (d2l 15.8), sized by a :class:`BertConfig`.

BERT is a Transformer *encoder* only. Every input is one sentence or a pair, written
``[CLS] a₁ … aₘ [SEP] b₁ … bₙ [SEP]`` (:func:`get_tokens_and_segments`), and the input of the
first block is the sum of three embeddings followed by a layer norm:

    X = LayerNorm(E_token[x_t] + E_segment[s_t] + P[t])        t = 0 … T-1

where ``P`` is a *learnable* position embedding (a parameter that trains, unlike the course's,
which adds ``pos_embedding.data`` and so never receives a gradient). The course's BERT has no
embedding LayerNorm: ``BertConfig(embed_norm=False)`` builds that one. Each block is post-norm::

    Y = LayerNorm(X + Dropout(MultiHeadAttention(X, X, X, valid_lens)))
    Z = LayerNorm(Y + Dropout(W₂ act(W₁ Y + b₁) + b₂))

Attention runs through :class:`~divekit.models.attention.MultiHeadAttention`, whose fast path is
PyTorch's fused ``scaled_dot_product_attention``; ``valid_lens`` (``(B,)``) hides the padding
keys of each row.

**Unpadding.** A padded batch spends matrix products on its padding: with lengths drawn
between ``T/2`` and ``T`` a quarter of the positions are padding. Every operation of a block
but the attention itself is *position-wise* (the Q/K/V projections, ``W_o``, both AddNorms with
their dropouts, the FFN, and any LoRA or adapter wrapped around them), so when ``valid_lens``
is given and at least :data:`UNPAD_MIN_PADDING` of the batch is padding, the encoder gathers the
``N = Σ_b valid_lens[b]`` real positions once into a packed ``(N, H)`` tensor and runs the
blocks on it. Only the attention needs the sequences apart: on the CPU (for ``T·H`` of at least
:data:`UNPAD_PER_SEQUENCE_MIN`) the fused kernel runs once per sequence on its own rows,
unmasked; otherwise q, k, v are scattered into the padded ``(B, heads, T, d)`` layout (zeros
at the padding) for one masked call whose output is gathered back. The result is scattered into
``(B, T, H)`` at the end. The encoder's output at padding positions is **zero** on both paths
(the padded path zeroes it too), so the two agree everywhere, and no caller can mistake padding
for a token's features. Tracing (``torch.compile``, ``torch.export``, ``torch.jit.trace``), the
meta device, ``record_weights`` and tensor parallelism (DTensor weights) keep the padded path:
see :meth:`BertEncoder.packable`.

Two pretraining heads sit on top:

* :class:`MaskLM` — the masked language model: at the positions ``pred_positions`` it predicts
  the original token, ``softmax(W_d LayerNorm(act(W_t h)) + b)``.
* :class:`NextSentencePred` — next-sentence prediction, a 2-way classifier on the pooled
  ``[CLS]`` vector ``tanh(W_p h_0 + b_p)`` (the model's ``hidden``).

The parameter names follow the course (``token_embedding``, ``blks.0.attention.W_q``,
``addnorm1``, ``ffn.dense1``, ``mlm.mlp``, ``nsp.output``, ``hidden``); one table in
:mod:`divekit.models.bert_checkpoint` maps a standard BERT checkpoint onto them, so
:func:`load_pretrained` reads Hugging Face directories (``bert-base-uncased``,
``all-MiniLM-L6-v2``) without a conversion script.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from divekit.errors import DivekitError
from divekit.models.attention import MultiHeadAttention
from divekit.models.registry import register_model
from divekit.ops.masking import key_padding_mask, length_mask

# The least fraction of padding positions for which the encoder packs the valid positions
# (see "Unpadding" above). Gathering and scattering the rows costs memory traffic that does not
# shrink with the padding, so a batch with less padding runs padded. Measured on one loaded CPU
# core (MiniLM inference, 32 x 128): packed 5-7% slower at 0-2% padding, even at 4%, 12% faster
# at 7%, 20% faster at 12%; 10% leaves margin for the noise of that measurement and for the
# GPU's padded-layout attention (a scatter and a gather per block; not measured on a GPU).
UNPAD_MIN_PADDING = 0.10

# On the CPU the packed attention runs one sequence at a time when the padded length times the
# width, T·H, is at least this, and on the padded layout below it: a call per sequence costs a
# fixed overhead (more in training: dropout's math path, autograd nodes), the padded layout
# costs memory traffic and wasted products that grow with T·H. Measured (one thread): bert_small
# pretraining, 512 x 61, H 128 (T·H 7,808): the padded layout ~4% faster; MiniLM (H 384)
# inference at 128 x 32 (12,288) up to 8 x 512 and fine-tuning at 32 x 128: per sequence 4-17%
# faster.
UNPAD_PER_SEQUENCE_MIN = 10_000

ACTIVATIONS = {
    "gelu": nn.GELU,  # exact erf GELU: BERT's "gelu"
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}


@dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT. Defaults are BERT-base's (12 layers, 768 hidden, 12 heads)."""

    vocab_size: int = 30522
    num_layers: int = 12
    num_hiddens: int = 768
    num_heads: int = 12
    ffn_num_hiddens: int = 3072
    max_len: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    activation: str = "gelu"
    # False: the summed embeddings enter the first block without a LayerNorm (the course's BERT,
    # whose pretrained checkpoints have no embedding norm); True: BERT's embedding LayerNorm
    embed_norm: bool = True

    def __post_init__(self) -> None:
        ints = ("vocab_size", "num_layers", "num_hiddens", "num_heads", "ffn_num_hiddens",
                "max_len", "type_vocab_size")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DivekitError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        if self.num_hiddens % self.num_heads:
            raise DivekitError(f"BertConfig.num_hiddens {self.num_hiddens} must be a multiple of "
                               f"num_heads {self.num_heads}")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise DivekitError(f"BertConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.layer_norm_eps, int | float) and 0 < self.layer_norm_eps < 1):
            raise DivekitError(f"BertConfig.layer_norm_eps must be in (0, 1), got {self.layer_norm_eps!r}")
        if not isinstance(self.embed_norm, bool):
            raise DivekitError(f"BertConfig.embed_norm must be True or False, got {self.embed_norm!r}")
        if self.activation not in ACTIVATIONS:
            raise DivekitError(f"BertConfig.activation {self.activation!r} is not one of "
                               f"{', '.join(ACTIVATIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def get_tokens_and_segments(tokens_a: list[Any], tokens_b: list[Any] | None = None,
                            cls: Any = "<cls>", sep: Any = "<sep>") -> tuple[list[Any], list[int]]:
    """``[cls] a [sep]`` (segment 0) and ``b [sep]`` (segment 1): the course's BERT input.

    ``cls`` and ``sep`` default to the course's token strings; pass ids (``tokenizer.cls_id``)
    to build id sequences the same way."""
    tokens = [cls, *tokens_a, sep]
    segments = [0] * len(tokens)
    if tokens_b is not None:
        tokens += [*tokens_b, sep]
        segments += [1] * (len(tokens_b) + 1)
    return tokens, segments


class PositionWiseFFN(nn.Module):
    """``dense2(act(dense1(X)))`` at every position: ``(B, T, d) → (B, T, d)``."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, activation: str = "gelu"):
        super().__init__()
        self.dense1 = nn.Linear(num_hiddens, ffn_num_hiddens)
        self.act = ACTIVATIONS[activation]()
        self.dense2 = nn.Linear(ffn_num_hiddens, num_hiddens)

    def forward(self, X: Tensor) -> Tensor:
        return self.dense2(self.act(self.dense1(X)))


class AddNorm(nn.Module):
    """``LayerNorm(X + dropout(Y))``: the residual connection, then layer normalisation."""

    def __init__(self, num_hiddens: int, dropout: float, eps: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(num_hiddens, eps=eps)

    def forward(self, X: Tensor, Y: Tensor) -> Tensor:
        return self.ln(X + self.dropout(Y))


class _ScatterRows(torch.autograd.Function):
    """``(N, F)`` rows → ``(M, F)`` zeros with row ``rows[i]`` set to ``x[i]``.

    ``rows`` holds distinct indices, so the adjoint is a plain gather: the backward is
    ``g[rows]`` (and :class:`_GatherRows`'s backward is this scatter), where autograd's
    ``index_select`` backward would zero-fill and then scatter-*add* into the whole ``(M, F)``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: Tensor, size: int) -> Tensor:
        ctx.save_for_backward(rows)
        return x.new_zeros(size, x.shape[1]).index_copy_(0, rows, x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (rows,) = ctx.saved_tensors
        return _GatherRows.apply(grad, rows), None, None


class _GatherRows(torch.autograd.Function):
    """``(M, F)`` → ``(N, F)``: the rows ``x[rows]`` (distinct indices; see :class:`_ScatterRows`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rows: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.size = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (rows,) = ctx.saved_tensors
        return _ScatterRows.apply(grad, rows, ctx.size), None


class Packing:
    """Where the ``N`` valid positions of a ``(B, T)`` batch sit: ``rows`` ``(N,)``, the flat
    indices ``b·T + t`` of the positions with ``t < valid_lens[b]``, in row-major order, so
    each sequence's positions are one contiguous run of the packed rows.

    :meth:`pack` turns ``(B, T, F)`` into the packed ``(N, F)``; :meth:`unpack` is its inverse
    with zeros at the padding. Both are differentiable, and each one's backward is the other.

    ``lengths`` (the ``B`` run lengths as Python ints, or None) chooses how the attention runs:
    given, one fused attention call per sequence on its own run of rows, with no mask and no
    padding at all (the CPU's choice for long enough sequences: a call's overhead is small next
    to its work, and neither the padding's queries nor its keys are computed); None, one call
    on the padded layout (a GPU's choice: one kernel launch for the batch instead of ``B``)."""

    def __init__(self, rows: Tensor, batch: int, length: int, lengths: list[int] | None = None):
        self.rows, self.batch, self.length, self.lengths = rows, batch, length, lengths

    @property
    def size(self) -> int:
        """``N``, the number of valid positions."""
        return int(self.rows.shape[0])

    def pack(self, X: Tensor) -> Tensor:
        """``(B, T, F) → (N, F)``."""
        return _GatherRows.apply(X.reshape(self.batch * self.length, X.shape[-1]), self.rows)

    def unpack(self, x: Tensor) -> Tensor:
        """``(N, F) → (B, T, F)``, zeros at the padding positions."""
        out = _ScatterRows.apply(x, self.rows, self.batch * self.length)
        return out.reshape(self.batch, self.length, x.shape[-1])


class BertSelfAttention(MultiHeadAttention):
    """Multi-head self-attention with the mask as one ``(B, 1, 1, T)`` row per sequence.

    The projections are :class:`MultiHeadAttention`'s (``W_q``, ``W_k``, ``W_v``, ``W_o``: the
    checkpoint table and adapters see the same modules); the fused
    ``scaled_dot_product_attention`` call gets the broadcast mask. With ``record_weights`` on, it
    falls back to the explicit path that keeps the weights."""

    def _plain_projections(self) -> bool:
        """True while W_q, W_k, W_v are plain biased ``nn.Linear`` layers (not wrapped by an
        adapter such as LoRA, nor split over ranks by ``--strategy tensor``, whose weights are
        DTensors), so their weights can be stacked."""
        return all(type(m) is nn.Linear and m.bias is not None and type(m.weight) is nn.Parameter
                   for m in (self.W_q, self.W_k, self.W_v))

    def forward(self, queries: Tensor, keys: Tensor, values: Tensor,  # type: ignore[override]
                valid_lens: Tensor | None = None, mask: Tensor | None = None, *,
                packing: Packing | None = None) -> Tensor:
        """``(B, T, H)`` → ``(B, T, H)``; with ``packing``, self-attention of packed ``(N, H)``
        rows → ``(N, H)`` (``mask`` is then required: the padded batch's key mask)."""
        if packing is not None:
            return self._packed(queries, mask, packing)
        if self.attention.record_weights:
            return super().forward(queries, keys, values, valid_lens)
        if mask is None and valid_lens is not None:
            mask = key_padding_mask(valid_lens, keys.shape[1], queries.dtype)
        if queries is keys is values and self._plain_projections():
            # self-attention: one (H → 3H) matrix product instead of three
            weight = torch.cat([self.W_q.weight, self.W_k.weight, self.W_v.weight])  # (3H, H)
            bias = torch.cat([self.W_q.bias, self.W_k.bias, self.W_v.bias])
            q, k, v = (self.transpose_qkv(x) for x in F.linear(queries, weight, bias).chunk(3, -1))
        else:
            q = self.transpose_qkv(self.W_q(queries))  # (B, heads, T, d)
            k = self.transpose_qkv(self.W_k(keys))
            v = self.transpose_qkv(self.W_v(values))
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)  # autocast: the projections ran in lower precision
        p = self.attention.dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, heads, T, d)
        return self.W_o(self.transpose_output(out))

    def _packed(self, x: Tensor, mask: Tensor | None, packing: Packing) -> Tensor:
        """Self-attention of the packed rows ``x`` ``(N, H)`` → ``(N, H)``. The projections
        run on the ``N`` rows (as modules, so a LoRA wrapper is called too), then either

        * per sequence (``packing.lengths``): each sequence's run of rows is its own
          ``(1, heads, L_b, d)`` problem for the fused kernel, unmasked; or
        * padded: q/k/v are scattered into the ``(B, heads, T, d)`` layout (zeros at the
          padding) for one masked call, whose output is gathered back. Padding queries' outputs
          are dropped and padding keys are masked out, as on the padded path.

        Either way ``W_o`` runs on the ``N`` rows."""
        if self._plain_projections():
            weight = torch.cat([self.W_q.weight, self.W_k.weight, self.W_v.weight])  # (3H, H)
            bias = torch.cat([self.W_q.bias, self.W_k.bias, self.W_v.bias])
            qkv = F.linear(x, weight, bias)  # (N, 3H)
        else:
            qkv = torch.cat([self.W_q(x), self.W_k(x), self.W_v(x)], dim=-1)
        p = self.attention.dropout.p if self.training else 0.0
        if packing.lengths is not None:
            outs = []
            for run in qkv[None].split(packing.lengths, dim=1):  # (1, L_b, 3H) each
                if run.shape[1]:
                    q, k, v = (self.transpose_qkv(z) for z in run.chunk(3, -1))
                    o = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (1, heads, L_b, d)
                    outs.append(self.transpose_output(o))  # (1, L_b, H)
            return self.W_o(torch.cat(outs, dim=1)[0])  # (N, H)
        if mask is None:
            raise DivekitError("packed attention on the padded layout needs the key padding mask")
        grid = packing.unpack(qkv)  # (B, T, 3H), zeros at the padding
        q, k, v = (self.transpose_qkv(z) for z in grid.chunk(3, -1))  # (B, heads, T, d) each
        if mask.dtype != q.dtype:
            mask = mask.to(q.dtype)  # autocast: the projections ran in lower precision
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.W_o(packing.pack(self.transpose_output(out)))  # (N, H)


class TransformerEncoderBlock(nn.Module):
    """One post-norm encoder block: self-attention, then the position-wise FFN."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = config
        self.attention = BertSelfAttention(c.num_hiddens, c.num_heads, c.dropout, bias=True,
                                           query_size=c.num_hiddens, key_size=c.num_hiddens,
                                           value_size=c.num_hiddens)
        self.addnorm1 = AddNorm(c.num_hiddens, c.dropout, c.layer_norm_eps)
        self.ffn = PositionWiseFFN(c.num_hiddens, c.ffn_num_hiddens, c.activation)
        self.addnorm2 = AddNorm(c.num_hiddens, c.dropout, c.layer_norm_eps)

    def forward(self, X: Tensor, valid_lens: Tensor | None, mask: Tensor | None = None,
                packing: Packing | None = None) -> Tensor:
        """``(B, T, H) → (B, T, H)``, or with ``packing`` the packed ``(N, H) → (N, H)``: every
        step but the attention is position-wise, so it runs on the ``N`` rows as they are."""
        if packing is None:
            Y = self.addnorm1(X, self.attention(X, X, X, valid_lens, mask))  # (B, T, H)
        else:  # a keyword, so an adapter wrapped around the attention passes it on
            Y = self.addnorm1(X, self.attention(X, X, X, valid_lens, mask, packing=packing))
        return self.addnorm2(Y, self.ffn(Y))


def _tracing() -> bool:
    """True inside ``torch.compile``/``torch.export`` (dynamo), ``torch.jit`` or FX tracing:
    the packed path's ``nonzero`` has a data-dependent size, which those cannot follow."""
    compiler = getattr(torch, "compiler", None)
    for name in ("is_compiling", "is_exporting"):
        check = getattr(compiler, name, None)
        if check is not None and check():
            return True
    fx = torch.fx._symbolic_trace  # is_fx_tracing (torch < 2.10) warns in newer releases
    fx_tracing = getattr(fx, "is_fx_symbolic_tracing", None) or getattr(fx, "is_fx_tracing", None)
    return (torch.jit.is_tracing() or torch.jit.is_scripting()
            or (fx_tracing is not None and fx_tracing()))


def _fsdp2_module(module: nn.Module) -> bool:
    """True for a module ``fully_shard`` (FSDP2) manages: its DTensor shards are gathered into
    plain parameters by its own forward pre-hook, so it runs the packed path like any other."""
    for where in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            cls = getattr(__import__(where, fromlist=["FSDPModule"]), "FSDPModule", None)
        except ImportError:
            continue
        if cls is not None and isinstance(module, cls):
            return True
    return False


class BertEncoder(nn.Module):
    """Token, segment and position embeddings, then ``num_layers`` encoder blocks.

    ``forward(tokens (B, T), segments (B, T), valid_lens (B,) or None) → (B, T, H)``, the last
    hidden states. Positions at and after ``valid_lens[b]`` are padding: no key attends to them,
    and their output is zero (with ``valid_lens`` given; without, every position is a token).

    With enough padding the blocks run on the packed valid positions (see "Unpadding" in the
    module docstring): ``unpad_min_padding`` (default :data:`UNPAD_MIN_PADDING`) is the least
    padding fraction that packs; ``0`` packs every batch with lengths, ``None`` never packs.
    ``unpad_per_sequence`` picks the packed attention's layout (see :class:`Packing`). All
    paths compute the same function (float rounding apart).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        c = self.config = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.num_hiddens)
        self.segment_embedding = nn.Embedding(c.type_vocab_size, c.num_hiddens)
        self.pos_embedding = nn.Parameter(torch.empty(c.max_len, c.num_hiddens))  # P, (L, H)
        self.embed_norm = (nn.LayerNorm(c.num_hiddens, eps=c.layer_norm_eps) if c.embed_norm
                           else nn.Identity())
        self.dropout = nn.Dropout(c.dropout)
        self.blks = nn.ModuleList(TransformerEncoderBlock(c) for _ in range(c.num_layers))
        self.unpad_min_padding: float | None = UNPAD_MIN_PADDING
        # packed attention one sequence at a time (True), on the padded layout (False), or by
        # the device (None: per sequence on the CPU); see Packing
        self.unpad_per_sequence: bool | None = None

    def packable(self, tokens: Tensor) -> bool:
        """Whether the packed path may run: real tensors (not the meta device, a fake or a
        distributed tensor) outside tracing, and blocks that are this module's own, with one
        :class:`BertSelfAttention` each, not recording weights, and no distributed (tensor
        parallel) weights except the shards FSDP2 gathers before the block runs."""
        if type(tokens) is not torch.Tensor or tokens.device.type == "meta" or _tracing():
            return False
        for blk in self.blks:
            if not isinstance(blk, TransformerEncoderBlock):
                return False
            attention = [m for m in blk.modules() if isinstance(m, BertSelfAttention)]
            if len(attention) != 1 or attention[0].attention.record_weights:
                return False
            if (any(type(p) is not nn.Parameter for p in blk.parameters())
                    and not _fsdp2_module(blk)):
                return False
        return True

    def packing(self, tokens: Tensor, keep: Tensor,
                per_sequence: bool | None = None) -> Packing | None:
        """The :class:`Packing` of a batch whose valid positions are ``keep`` ``(B, T)``, or
        None where the padded path runs (too little padding, or not :meth:`packable`). Finding
        the rows is one ``nonzero``: one device sync on a GPU. ``per_sequence``: attention one
        sequence at a time or on the padded layout; by default per sequence on the CPU when
        ``T · H`` is at least :data:`UNPAD_PER_SEQUENCE_MIN`, padded layout otherwise."""
        threshold = self.unpad_min_padding
        if threshold is None or not self.packable(tokens) or keep.numel() == 0:
            return None
        rows = keep.reshape(-1).nonzero().squeeze(1).to(tokens.device)  # (N,)
        if rows.shape[0] > (1.0 - threshold) * keep.numel() or rows.shape[0] == 0:
            return None  # padding fraction 1 - N / (B·T) below the threshold, or no token
        if per_sequence is None:
            per_sequence = (tokens.device.type == "cpu"
                            and keep.shape[1] * self.config.num_hiddens >= UNPAD_PER_SEQUENCE_MIN)
        lengths = keep.sum(1).tolist() if per_sequence else None
        return Packing(rows, keep.shape[0], keep.shape[1], lengths)

    def forward(self, tokens: Tensor, segments: Tensor | None = None,
                valid_lens: Tensor | None = None) -> Tensor:
        if tokens.dim() != 2:
            raise DivekitError(f"tokens must be (batch, seq) token ids, got shape {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.config.max_len:
            raise DivekitError(f"sequence of {t} tokens is longer than max_len {self.config.max_len}")
        if segments is None:
            segments = torch.zeros_like(tokens)
        keep = None if valid_lens is None else length_mask(valid_lens, t)  # (B, T) bool
        packing = None if keep is None else self.packing(tokens, keep, self.unpad_per_sequence)
        if packing is None:
            X = self.token_embedding(tokens) + self.segment_embedding(segments)  # (B, T, H)
            X = self.dropout(self.embed_norm(X + self.pos_embedding[:t]))  # P broadcasts over B
        else:  # the embeddings of the N valid positions only: (N, H)
            rows = packing.rows
            X = (self.token_embedding(tokens.reshape(-1).index_select(0, rows))
                 + self.segment_embedding(segments.reshape(-1).index_select(0, rows)))
            X = self.dropout(self.embed_norm(X + F.embedding(rows % t, self.pos_embedding)))
        # built once for every block; None without lengths: the unmasked attention kernel
        mask = None if valid_lens is None else key_padding_mask(valid_lens, t, X.dtype)
        if packing is not None:
            for blk in self.blks:
                X = blk(X, valid_lens, mask, packing)  # (N, H)
            return packing.unpack(X)  # (B, T, H), zeros at the padding
        for blk in self.blks:
            X = blk(X, valid_lens, mask)
        if keep is not None:  # the padding's states mean nothing: zero, as the packed path's
            X = X.masked_fill(~keep[..., None].to(X.device), 0.0)
        return X


class MaskLM(nn.Module):
    """The masked-language-model head: ``(B, T, H), (B, P) positions → (B, P, vocab)`` logits.

    ``mlp`` is ``Linear → act → LayerNorm → Linear(vocab)``, BERT's ``cls.predictions``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = config
        self.mlp = nn.Sequential(
            nn.Linear(c.num_hiddens, c.num_hiddens), ACTIVATIONS[c.activation](),
            nn.LayerNorm(c.num_hiddens, eps=c.layer_norm_eps), nn.Linear(c.num_hiddens, c.vocab_size),
        )

    def forward(self, X: Tensor, pred_positions: Tensor, keep: Tensor | None = None) -> Tensor:
        """``keep`` (``(B, P)`` bool) selects the prediction slots to score: the result is then
        ``(N, V)`` for the ``N`` kept slots in row-major order, and the vocabulary projection
        (the costliest product of pretraining) skips the padding slots."""
        B, T, H = X.shape
        flat = pred_positions + T * torch.arange(B, device=X.device)[:, None]  # (B, P) row ids
        # Gather h[b, pred_positions[b, p]] as an embedding lookup into the (B·T, H) rows: its
        # backward (embedding_dense_backward) is several times faster than index_select's or
        # gather's scatter-add on CPU, and it is the same sum of row gradients.
        rows = X.reshape(B * T, H)
        if keep is not None:
            return self.mlp(F.embedding(flat[keep], rows))  # (N, H) → (N, V)
        return self.mlp(F.embedding(flat, rows))  # (B, P, H) → (B, P, V)


class NextSentencePred(nn.Module):
    """The next-sentence head: pooled ``[CLS]`` features ``(B, H) → (B, 2)`` logits
    (class 1: b follows a; class 0: b is a random sentence)."""

    def __init__(self, num_hiddens: int):
        super().__init__()
        self.output = nn.Linear(num_hiddens, 2)

    def forward(self, X: Tensor) -> Tensor:
        return self.output(X)


class BertModel(nn.Module):
    """The encoder with both pretraining heads.

    ``forward(tokens, segments, valid_lens=None, pred_positions=None)`` returns
    ``(encoded (B, T, H), mlm_logits (B, P, V) or None, nsp_logits (B, 2))`` as the course's;
    with ``mlm_keep`` (``(B, P)`` bool, e.g. ``mlm_weights > 0``) ``mlm_logits`` is ``(N, V)``
    at the kept slots only (see :meth:`MaskLM.forward`).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.encoder = BertEncoder(config)
        self.hidden = nn.Sequential(nn.Linear(config.num_hiddens, config.num_hiddens), nn.Tanh())
        self.mlm = MaskLM(config)
        self.nsp = NextSentencePred(config.num_hiddens)
        self.apply(_init_weights)
        nn.init.normal_(self.encoder.pos_embedding, std=0.02)

    def forward(self, tokens: Tensor, segments: Tensor | None = None,
                valid_lens: Tensor | None = None, pred_positions: Tensor | None = None,
                mlm_keep: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
        encoded = self.encoder(tokens, segments, valid_lens)  # (B, T, H)
        mlm_logits = (self.mlm(encoded, pred_positions, mlm_keep) if pred_positions is not None
                      else None)
        nsp_logits = self.nsp(self.hidden(encoded[:, 0, :]))  # from the [CLS] position
        return encoded, mlm_logits, nsp_logits


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit layer norms."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """``CE_i = -log softmax(z_i)[y_i]`` per row, with the backward written out:
    ``∂CE_i/∂z_i = softmax(z_i) - onehot(y_i)``.

    The same math as ``F.cross_entropy(reduction="none")``, in fewer passes over the ``(N, V)``
    logits: the backward turns the saved log-probabilities into ``g · softmax`` in place and
    subtracts ``g`` at the labels, where autograd's ``nll_loss`` → ``log_softmax`` backward
    first fills an ``(N, V)`` zero gradient and then reads it back."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor) -> Tensor:
        logp = torch.log_softmax(logits, dim=-1)  # (N, V)
        ctx.save_for_backward(logp, labels)
        return -logp.gather(1, labels[:, None]).squeeze(1)  # (N,)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        logp, labels = ctx.saved_tensors
        g = grad[:, None]  # (N, 1)
        d = torch.exp(logp).mul_(g)  # g · softmax(z), (N, V)
        return d.scatter_add_(1, labels[:, None], -g), None


def mlm_loss(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """The masked-LM loss ``Σ w_i CE(logits_i, y_i) / Σ w_i``.

    The weights multiply the per-position losses *before* any mean, so a weight-0 (padding)
    prediction adds nothing to the loss or its gradient. (The course averages first and then
    multiplies, which leaves the mask without effect.) Labels must be class ids in
    ``[0, V)``; a padding slot's label is ignored through its weight 0."""
    z = logits.reshape(-1, logits.shape[-1]).float()  # (B·P, V); fp32 under autocast
    per_token = _SoftmaxCrossEntropy.apply(z, labels.reshape(-1))  # (B·P,)
    w = weights.reshape(-1).to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1e-8)


def _build(config: BertConfig, overrides: dict[str, Any]) -> BertModel:
    from dataclasses import replace

    return BertModel(replace(config, **overrides))


@register_model("bert_small", input_shape=None, task="bert_pretrain")
def bert_small(**overrides: Any) -> BertModel:
    """BERT as the course pretrains it: 2 layers, 128 hidden, 2 heads, FFN 256."""
    small = BertConfig(num_layers=2, num_hiddens=128, num_heads=2, ffn_num_hiddens=256,
                       max_len=512, dropout=0.2)
    return _build(small, overrides)


@register_model("bert_base", input_shape=None, task="bert_pretrain")
def bert_base(**overrides: Any) -> BertModel:
    """BERT-base: 12 layers, 768 hidden, 12 heads, FFN 3072 (110M parameters)."""
    return _build(BertConfig(), overrides)


def load_pretrained(directory: Any) -> tuple[BertModel, Any]:
    """``(model, tokenizer)`` from a BERT checkpoint directory, a divekit pretraining run or
    ``'minilm'``; see :func:`divekit.models.bert_checkpoint.load_pretrained`."""
    from divekit.models.bert_checkpoint import load_pretrained as _load

    return _load(directory)


__all__ = [
    "BertEncoder", "BertModel", "BertConfig", "MaskLM", "NextSentencePred", "Packing",
    "UNPAD_MIN_PADDING", "UNPAD_PER_SEQUENCE_MIN",
    "get_tokens_and_segments", "load_pretrained", "mlm_loss",
]
