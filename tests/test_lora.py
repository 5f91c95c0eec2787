"""LoRA and adapters: parity with peft, zero-init identity, merge, which parameters learn."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from divekit.errors import DivekitError
from divekit.models.bert import BertConfig, BertModel
from divekit.models.bert_heads import BertWithHead, ClassifierHead
from divekit.models.lora import (
    Adapter,
    LoRALinear,
    add_adapters,
    apply_lora,
    count_parameters,
    find_linear,
    freeze_except,
    is_adapter_param,
    merge,
    report,
)

TINY = BertConfig(vocab_size=50, num_layers=2, num_hiddens=32, num_heads=4, ffn_num_hiddens=64,
                  max_len=16, dropout=0.0)


def _model(seed: int = 0) -> BertWithHead:
    torch.manual_seed(seed)
    return BertWithHead(BertModel(TINY).encoder, ClassifierHead(32, 3, dropout=0.0)).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (4, 10), generator=g)
    return tokens, torch.zeros_like(tokens), torch.tensor([10, 7, 5, 10])


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.query(x)) * self.key(x) + self.value(x))


def test_lora_equals_peft_with_the_same_A_and_B():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _Block()
    ours = _Block()
    ours.load_state_dict(base.state_dict())
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["query", "value"]))
    names = apply_lora(ours, ["query", "value"], r=4, alpha=8)
    assert sorted(names) == ["query", "value"]
    for name in names:
        mine = ours.get_submodule(name)
        peer = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():  # B is zero at init in both: give both the same random A and B
            mine.lora_A.weight.normal_()
            mine.lora_B.weight.normal_()
            peer.lora_A["default"].weight.copy_(mine.lora_A.weight)
            peer.lora_B["default"].weight.copy_(mine.lora_B.weight)
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_zero_initialised_lora_and_adapters_leave_the_outputs_unchanged():
    model = _model()
    batch = _batch()
    before = model(*batch)
    apply_lora(model, ["query", "value"], r=4, alpha=8)
    add_adapters(model.encoder, size=6, dim=32)
    torch.testing.assert_close(model(*batch), before, atol=1e-6, rtol=0)


def test_merge_equals_the_unmerged_model_after_training():
    model = _model()
    apply_lora(model, ["query", "key", "value", "output"], r=4, alpha=16)
    freeze_except(model, keep=("head.",))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens, segments, valid = _batch()
    y = torch.tensor([0, 1, 2, 1])
    model.train()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens, segments, valid), y).backward()
        opt.step()
    model.eval()
    unmerged = model(tokens, segments, valid)
    merge(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(tokens, segments, valid), unmerged, atol=1e-5, rtol=0)


def test_only_lora_and_adapter_parameters_receive_gradients():
    model = _model()
    apply_lora(model, ["query", "value"], r=2)
    add_adapters(model.encoder, size=4, dim=32)
    freeze_except(model)
    out = model(*_batch())
    # nudge B and the adapters' up-projections off zero so that A and down get gradients too
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight)
        if isinstance(m, Adapter):
            nn.init.normal_(m.up.weight)
    model(*_batch()).sum().backward()
    assert out.shape == (4, 3)
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_targets_matching_nothing_list_the_layers():
    with pytest.raises(DivekitError, match="W_q.*dense1|dense1.*W_q"):
        find_linear(_model(), ["nonexistent"])
    assert find_linear(_model(), ["encoder.blks.0.*"])  # globs on the full name


def test_report_logs_trainable_and_total(caplog):
    model = _model()
    apply_lora(model, ["query"], r=2)
    freeze_except(model, keep=("head.",))
    with caplog.at_level(logging.INFO, logger="divekit"):
        line = report(model)
    trainable, total = count_parameters(model)
    assert f"{trainable:,} of {total:,}" in line and line in caplog.text


def test_adapter_only_state_dict_round_trip():
    model = _model()
    apply_lora(model, ["query", "value"], r=2)
    freeze_except(model, keep=("head.",))
    model.save_only(n for n, p in model.named_parameters() if p.requires_grad)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight)
    state = model.state_dict()
    assert state and all(is_adapter_param(k) or k.startswith("head.") for k in state)
    fresh = _model()
    apply_lora(fresh, ["query", "value"], r=2)
    fresh.save_only(state)
    fresh.load_state_dict(state)  # strict: nothing of the saved set missing
    torch.testing.assert_close(fresh(*_batch()), model(*_batch()))
