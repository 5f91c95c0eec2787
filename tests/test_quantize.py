"""``--quantize int8``: dynamic int8 quantization of a run for CPU inference (issue 26, item 5).

The quantized model's outputs are compared with the float32 model's on the same inputs (a BERT
classify head, an LSTM language model), the metrics of ``evaluate`` change by little, and the
refusals are one line. Speed is measured in ``benchmarks/quantize.py``, not here."""

from __future__ import annotations

import pytest
import torch

from divekit.cli import main
from divekit.engine.quantize import quantize_dynamic_int8, quantized_layers
from divekit.engine.run import evaluate, load_run, make_config, predict, train
from divekit.tasks.language_model import LanguageModelTask, LMConfig

pytestmark = pytest.mark.skipif(not torch.backends.quantized.supported_engines
                                or torch.backends.quantized.supported_engines == ["none"],
                                reason="no quantized CPU engine in this PyTorch build")


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    values = dict(model="lstm", data="pydoc", max_tokens=6000, num_steps=16, batch_size=8,
                  num_hiddens=64, lr=0.01, device="cpu", quiet=True, seed=0, threads=1,
                  epochs=2, out=str(tmp_path_factory.mktemp("q") / "lstm"))
    return train(LanguageModelTask(make_config(LMConfig, values))).run_dir


def test_the_lstm_and_its_linear_layers_are_int8_and_outputs_stay_close(lstm_run):
    run = load_run(lstm_run, "cpu")
    quantized = quantize_dynamic_int8(run.model, "language_model")
    assert quantized_layers(quantized) >= 2  # the LSTM and the output layer
    assert quantized_layers(run.model) == 0  # the float model is left as it was
    tokens = torch.randint(0, len(run.task.vocab), (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, _ = run.model(tokens, None)
        out, _ = quantized(tokens, None)
    probs_ref, probs = ref.softmax(-1), out.softmax(-1)
    assert (probs - probs_ref).abs().max() < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_evaluate_int8_changes_the_perplexity_by_little(lstm_run):
    fp32 = evaluate(lstm_run, device="cpu")
    int8 = evaluate(lstm_run, device="cpu", quantize="int8")
    assert int8["ppl"] == pytest.approx(fp32["ppl"], rel=0.02)


def test_bert_classify_head_int8_predicts_as_float32(bert_run):
    texts = ["a wonderful film, I loved every minute", "dull and far too long",
             "the plot was fine", "I would not watch it again"]
    fp32 = predict(bert_run, texts, device="cpu")
    int8 = predict(bert_run, texts, device="auto", quantize="int8")  # auto: the CPU
    for a, b in zip(fp32, int8):
        assert a["label"] == b["label"]
        probs_a, probs_b = dict(a["top"]), dict(b["top"])
        assert probs_a.keys() == probs_b.keys()
        assert all(abs(probs_a[k] - probs_b[k]) < 0.05 for k in probs_a)


def test_cli_refuses_a_convolutional_run_and_a_bad_choice(trained_lenet_run, tmp_path, capsys):
    assert main(["evaluate", str(trained_lenet_run), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --quantize int8 applies to") and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(trained_lenet_run), str(tmp_path / "x.png"), "--quantize", "int4"])
    assert exit_info.value.code == 2


def test_cli_evaluate_int8_prints_the_metrics(lstm_run, capsys):
    assert main(["evaluate", str(lstm_run), "--quantize", "int8", "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out
