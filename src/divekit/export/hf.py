"""``divekit export RUN --format hf``: a BERT run in Hugging Face's layout.

The folder holds ``config.json``, ``model.safetensors`` and the tokenizer (``vocab.txt``,
``tokenizer_config.json``), as ``transformers`` writes them, so that::

    AutoModelForSequenceClassification.from_pretrained(DIR)   # a classify or pair run
    AutoModelForQuestionAnswering.from_pretrained(DIR)        # a qa run
    BertForPreTraining.from_pretrained(DIR)                   # a pretraining run

give divekit's outputs. The encoder's parameters take BERT's checkpoint names
(:data:`divekit.models.bert_checkpoint.NAME_TABLE`, under ``bert.``). The heads map one to one:

* classify / pair: :class:`~divekit.models.bert_heads.ClassifierHead` is BERT's pooler
  (``bert.pooler.dense``, ``tanh``) then dropout and one linear layer, which is
  ``BertForSequenceClassification`` (``classifier``); ``id2label`` holds the run's labels.
* qa: :class:`~divekit.models.bert_heads.SpanHead` is one ``(H, 2)`` linear layer,
  ``BertForQuestionAnswering``'s ``qa_outputs`` (start logits = column 0, end = column 1).
* tag: divekit's tagging head has a hidden layer (linear, GELU, linear) where
  ``BertForTokenClassification`` has one linear layer: not the same network, refused.

A domain vocabulary (``--add-tokens``) becomes rows of the word embedding and lines of
``vocab.txt``; a LoRA run is merged first (``W + (α/r) BA``); bottleneck adapters have no
place in BERT's layout and are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from divekit.errors import DivekitError
from divekit.io import atomic_write_bytes, atomic_write_json

ARCHITECTURES = {"classify": "BertForSequenceClassification",
                 "pair": "BertForSequenceClassification",
                 "qa": "BertForQuestionAnswering"}
HEAD_NAMES = {"head.hidden.0.weight": "bert.pooler.dense.weight",
              "head.hidden.0.bias": "bert.pooler.dense.bias",
              "head.output.weight": "classifier.weight", "head.output.bias": "classifier.bias"}
QA_NAMES = {"head.output.weight": "qa_outputs.weight", "head.output.bias": "qa_outputs.bias"}


def finetuned_state(model: Any, head: str) -> dict[str, Tensor]:
    """A fine-tuned :class:`~divekit.models.bert_heads.BertWithHead`'s tensors under Hugging
    Face's names (LoRA merged, added token rows appended to the word embedding)."""
    from divekit.models import lora
    from divekit.models.bert_checkpoint import checkpoint_name

    if head not in ARCHITECTURES:
        raise DivekitError(f"a {head} run has no Hugging Face form: divekit's tagging head is "
                           "linear-GELU-linear, BertForTokenClassification's is one linear layer")
    if any(lora.is_adapter_param(n) for n, _ in model.named_parameters()):
        lora.merge(model)
    left = [n for n, _ in model.named_parameters() if lora.is_adapter_param(n)]
    if left:
        raise DivekitError(f"bottleneck adapters ({left[0]}, ...) have no place in a Hugging Face "
                           "BERT checkpoint; export this run with --format onnx instead")
    names = HEAD_NAMES if head != "qa" else QA_NAMES
    state: dict[str, Tensor] = {}
    embedding = model.encoder.token_embedding
    for name, p in model.named_parameters():
        if name.startswith("encoder.token_embedding."):
            continue
        key = names.get(name) or checkpoint_name(name)
        state[key] = p.detach()
    if hasattr(embedding, "added"):  # ExtendedEmbedding: the new rows follow the old ones
        weight = torch.cat([embedding.base.weight, embedding.added]).detach()
    else:
        weight = embedding.weight.detach()
    state[checkpoint_name("encoder.token_embedding.weight")] = weight
    return {k: v.to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


def export_hf(run: Any, directory: Path) -> Any:
    """Write the run's model as a Hugging Face checkpoint folder (see the module's docstring)."""
    from safetensors.torch import save

    from divekit.export import ExportResult
    from divekit.models.bert_checkpoint import config_to_checkpoint, save_pretrained

    task = str(run.record.get("task"))
    if task == "bert_pretrain":
        directory.mkdir(parents=True, exist_ok=True)
        save_pretrained(run.model, run.task.tokenizer, directory)
        return ExportResult(directory, None, "BertForPreTraining", {"task": task})
    if task != "bert_finetune":
        raise DivekitError(f"{run.dir} is a {task} run; --format hf writes BERT runs "
                           "(bert_pretrain, and finetune --task classify|pair|qa)")
    head = run.config.task
    state = finetuned_state(run.model, head)
    config = config_to_checkpoint(run.model.encoder.config)
    labels = list(run.task.labels) if head != "qa" else []
    config.update({"architectures": [ARCHITECTURES[head]],
                   "vocab_size": int(state["bert.embeddings.word_embeddings.weight"].shape[0]),
                   "classifier_dropout": float(run.config.head_dropout)})
    if head != "qa":
        config.update({"num_labels": len(labels),
                       "id2label": {str(i): lab for i, lab in enumerate(labels)},
                       "label2id": {lab: i for i, lab in enumerate(labels)},
                       "problem_type": "single_label_classification"})
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / "model.safetensors", save(state, metadata={"format": "pt"}))
    atomic_write_json(directory / "config.json", config)
    run.task.tokenizer.save(directory)
    return ExportResult(directory, None, ARCHITECTURES[head], {"task": task, "head": head,
                                                                "labels": labels})
