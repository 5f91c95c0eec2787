"""Language models end to end: training, perplexity, resume, generation, bad input."""

from __future__ import annotations

import argparse
import csv
import math

import pytest
import torch

from divekit.cli import main
from divekit.data.text import Vocab
from divekit.engine import Trainer
from divekit.engine.checkpoint import CheckpointDir
from divekit.engine.run import evaluate, load_run, make_config, train
from divekit.errors import DivekitError
from divekit.models import create_model
from divekit.tasks import language_model as lm
from divekit.tasks.language_model import LanguageModelTask, LMConfig

TINY = dict(data="pydoc", max_tokens=6000, num_steps=16, batch_size=8, num_hiddens=32,
            lr=0.01, device="cpu", quiet=True, seed=0, threads=1)


def _config(**values) -> LMConfig:
    """A config as `divekit train` makes it: the model's recipe (Adam, clipping 1) under it."""
    return make_config(LMConfig, values)


def _train(**values):
    return train(LanguageModelTask(_config(**values)))


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """Runs here use --threads 1 (tiny ops); give the rest of the suite its threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "gru-pydoc"
    return _train(model="gru", epochs=3, out=str(out), **TINY)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_run):
    return load_run(tiny_run.run_dir, "cpu")


def test_perplexity_falls_and_is_exp_of_the_loss(tiny_run):
    rows = _rows(tiny_run.run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    ppl = [float(r["train_ppl"]) for r in rows]
    assert ppl[-1] < ppl[0] * 0.8, ppl  # learning, not noise
    for r in rows:
        assert float(r["train_ppl"]) == pytest.approx(math.exp(float(r["train_loss"])), rel=1e-4)
        assert float(r["val_ppl"]) == pytest.approx(math.exp(float(r["val_loss"])), rel=1e-4)
    assert float(rows[0]["train_ppl"]) < 28  # below uniform over the 28 characters after epoch 1


def test_run_keeps_vocab_and_evaluate_matches_the_log(tiny_run):
    run_dir = tiny_run.run_dir
    vocab = Vocab.load(run_dir / "vocab.json")
    assert vocab.idx_to_token[0] == "<unk>" and " " in vocab and "e" in vocab
    metrics = evaluate(run_dir, device="cpu")
    assert metrics["loss"] == pytest.approx(tiny_run.final["val_loss"], rel=1e-5)
    assert metrics["tokens"] == 600  # the held-out 10% of 6000 tokens


def test_generation_continues_the_prefix(tiny_loaded):
    text = lm.generate(tiny_loaded, "The Function", 40)
    assert text.startswith("the function") and len(text) == len("the function") + 40
    assert "<unk>" not in text
    assert text == lm.generate(tiny_loaded, "The Function", 40)  # seeded
    greedy = lm.generate(tiny_loaded, "the ", 30, greedy=True, seed=1)
    assert greedy == lm.generate(tiny_loaded, "the ", 30, greedy=True, seed=2)


def test_greedy_generation_is_the_argmax_of_a_manual_rollout(tiny_loaded):
    model, vocab = tiny_loaded.model, tiny_loaded.task.vocab
    ids = [vocab[c] for c in "the "]
    with torch.no_grad():  # recompute from scratch: the whole sequence each time, no carried state
        for _ in range(10):
            logits, _ = model(torch.tensor([ids]))
            scores = logits[0, -1].clone()
            scores[0] = -math.inf
            ids.append(int(scores.argmax()))
    expected = "".join(vocab.to_tokens(ids))
    assert lm.generate(tiny_loaded, "the ", 10, greedy=True) == expected


def test_prefix_of_unknown_characters_is_refused(tiny_loaded):
    with pytest.raises(DivekitError, match="no token the model knows"):
        lm.generate(tiny_loaded, "123 !?", 5)
    with pytest.raises(DivekitError, match="empty"):
        lm.generate(tiny_loaded, "", 5)
    with pytest.raises(DivekitError, match="temperature"):
        lm.generate(tiny_loaded, "the", 5, temperature=0)


def test_sequential_state_carry_equals_reading_the_stream_at_once():
    torch.manual_seed(0)
    task = LanguageModelTask(_config(model="gru", **{**TINY, "num_hiddens": 8}))
    model = task.build_model()
    stream = task.data.train[: 2 * 16 + 1].view(1, -1)
    x1, y1 = stream[:, :16], stream[:, 1:17]
    x2, y2 = stream[:, 16:32], stream[:, 17:33]
    task.on_epoch_start(model, 1)
    task.training_step(model, (x1, y1))
    loss2, _ = task.training_step(model, (x2, y2))  # with the detached state of the first half
    logits, _ = model(stream[:, :32])
    whole = torch.nn.functional.cross_entropy(logits[0, 16:], stream[0, 17:33])
    assert loss2.item() == pytest.approx(whole.item(), rel=1e-5)
    task.on_epoch_start(model, 2)
    assert task.state is None
    random_task = LanguageModelTask(_config(model="gru", **{**TINY, "sampling": "random"}))
    random_task.training_step(model, (x1, y1))
    assert random_task.state is None


def test_validation_carries_its_own_state_from_zero_over_the_same_batches():
    task = LanguageModelTask(_config(model="gru", **{**TINY, "num_hiddens": 8}))
    model = task.build_model().eval()
    loader = task.val_data()
    first, again = list(loader), list(loader)  # every pass reads the same partition
    assert len(first) > 1 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not hasattr(loader, "shard")  # rank 0 validates alone: any process count agrees
    task.training_step(model, first[0])
    train_state = task.state
    task.on_validation_start(model)
    with torch.inference_mode():
        sums = [task.validation_step(model, b) for b in first]
    assert task.state is train_state  # validation leaves the training carry alone
    X = torch.cat([x for x, _ in first], 1)  # the rows read straight through, state from zero
    Y = torch.cat([y for _, y in first], 1)
    with torch.no_grad():
        logits, _ = model(X)
    whole = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1),
                                              reduction="sum")
    total = sum(float(s["loss"]) for s in sums)
    assert total == pytest.approx(whole.item(), rel=1e-5)
    assert sum(s["count"] for s in sums) == Y.numel()
    metrics = task.validation_end({"loss": total, "count": Y.numel()})
    assert metrics["ppl"] == pytest.approx(math.exp(metrics["loss"]))


def test_resume_is_bit_identical(tmp_path):
    small = {**TINY, "max_tokens": 3000, "num_hiddens": 16}
    straight = _train(model="gru", epochs=3, out=str(tmp_path / "a"), **small)
    _train(model="gru", epochs=2, out=str(tmp_path / "b"), **small)
    resumed = _train(model="gru", epochs=3, out=str(tmp_path / "b"), resume=True, **small)
    for (name, p), q in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert straight.final["train_loss"] == resumed.final["train_loss"]
    assert CheckpointDir(tmp_path / "b").latest().name == "epoch-0003"


class _InterruptedLM(LanguageModelTask):
    """Fails at its ``fail_at``-th step (a crash mid-epoch); records whether each step started
    from a carried state."""

    def __init__(self, cfg, fail_at=None):
        super().__init__(cfg)
        self.fail_at, self.carried = fail_at, []

    def training_step(self, model, batch):
        if len(self.carried) + 1 == self.fail_at:
            raise RuntimeError("simulated crash")
        self.carried.append(self.state is not None)
        return super().training_step(model, batch)


MID = {**TINY, "max_tokens": 3000, "num_hiddens": 16, "epochs": 2, "checkpoint_every": 5}


def _interrupt_mid_epoch(tmp_path, model: str):
    """A straight 2-epoch run, and one that crashes at epoch 2's step 8, after a mid-epoch
    checkpoint: (the straight trainer, the crashed run's directory, its latest checkpoint)."""
    cfg = _config(model=model, **MID)
    straight = Trainer(_InterruptedLM(cfg), cfg, tmp_path / "a")
    straight.fit()
    per_epoch = straight.steps_per_epoch
    assert per_epoch > 10  # checkpoint_every 5: one at epoch 2's step 1..5, before the crash
    crashed = Trainer(_InterruptedLM(cfg, fail_at=per_epoch + 8), cfg, tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    latest = CheckpointDir(tmp_path / "b").latest()
    assert latest.name.startswith("epoch-0001-step-")
    return straight, tmp_path / "b", latest


def _assert_same_weights(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("model", ["gru", "lstm"])
def test_mid_epoch_resume_continues_the_carried_state_bit_identically(tmp_path, model):
    straight, run_dir, latest = _interrupt_mid_epoch(tmp_path, model)
    saved = torch.load(latest / "state.pt", weights_only=True)["task_state"]
    assert len(saved) == 1  # one entry per rank
    hidden = saved[0]["hidden"]
    shapes = [h.shape for h in (hidden if model == "lstm" else (hidden,))]
    assert isinstance(hidden, tuple if model == "lstm" else torch.Tensor)
    assert shapes == [torch.Size([1, 8, 16])] * len(shapes)  # (layers, batch, hidden), on the CPU
    cfg = _config(model=model, **MID)
    task = _InterruptedLM(cfg)
    resumed = Trainer(task, cfg, run_dir)
    resumed.fit(resume=True)
    assert task.carried[0]  # the first resumed step starts from the saved state, not zeros
    _assert_same_weights(straight.model, resumed.model)
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]


def test_checkpoint_without_task_state_still_resumes_from_zero(tmp_path):
    straight, run_dir, latest = _interrupt_mid_epoch(tmp_path, "gru")
    state = torch.load(latest / "state.pt", weights_only=True)
    del state["task_state"]  # as written before checkpoints kept the hidden state
    torch.save(state, latest / "state.pt")
    cfg = _config(model="gru", **MID)
    task = _InterruptedLM(cfg)
    resumed = Trainer(task, cfg, run_dir)
    resumed.fit(resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert task.carried[0] is False and all(task.carried[1:])  # zeros once, then carried again
    assert not all(torch.equal(p, q) for p, q in zip(straight.model.state_dict().values(),
                                                      resumed.model.state_dict().values()))


def test_nothing_carried_means_no_checkpoint_state():
    for extra in ({"sampling": "random"}, {"bidirectional": True}):
        task = LanguageModelTask(_config(model="gru", **{**TINY, "max_tokens": 2000,
                                                          "num_hiddens": 8, **extra}))
        model = task.build_model()
        x = task.data.train[:33].view(1, -1)
        task.training_step(model, (x[:, :16], x[:, 1:17]))
        assert task.checkpoint_state() is None
        task.restore_checkpoint_state(model, {"hidden": torch.ones(1, 1, 8)})
        assert task.state is None


def test_bidirectional_model_refuses_to_generate(tmp_path, capsys):
    out = tmp_path / "bi"
    _train(model="lstm", epochs=1, bidirectional=True, out=str(out),
           **{**TINY, "max_tokens": 2000, "num_hiddens": 8})
    with pytest.raises(DivekitError, match="bidirectional.*no text after"):
        lm.generate(load_run(out), "the time", 10)
    assert main(["generate", str(out), "--prefix", "the"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "bidirectional" in err and len(err.splitlines()) == 1


def test_bad_input_gives_clear_errors(tmp_path):
    (tmp_path / "timemachine.txt").write_text("1984 -- 2001\n\n")  # no letters: nothing left
    with pytest.raises(DivekitError, match="corpus 'timemachine' is empty"):
        _train(model="gru", data="timemachine", data_dir=str(tmp_path), out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # the corpus is read before the run directory is made
    with pytest.raises(DivekitError, match="--num-steps 6000 is longer than the training text"):
        _train(model="gru", **{**TINY, "num_steps": 6000}, out=str(tmp_path / "r"))
    with pytest.raises(DivekitError, match="unknown token mode 'byte'"):
        _config(model="gru", token="byte")
    with pytest.raises(DivekitError, match="not a language model"):
        LMConfig(model="lenet").validate()
    with pytest.raises(DivekitError, match="not a text corpus"):
        _config(model="gru", data="digits")
    for bad, flag in [({"val_fraction": math.nan}, "--val-fraction"), ({"num_steps": 0}, "--num-steps"),
                      ({"max_tokens": 1}, "--max-tokens"), ({"limit": 5}, "--max-tokens"),
                      ({"num_hiddens": 0}, "--num-hiddens"), ({"embed_size": -1}, "--embed-size")]:
        with pytest.raises(DivekitError, match=flag):
            _config(model="gru", **bad)


def test_clip_is_grad_clip_with_the_recipe_default_and_0_turns_it_off():
    from divekit.config import add_config_options

    assert _config(model="gru").grad_clip == 1.0  # the recurrent models' recipe
    assert _config(model="gru", grad_clip=0.25).grad_clip == 0.25  # a given value wins
    parser = argparse.ArgumentParser()
    add_config_options(parser, LMConfig)
    assert parser.parse_args(["--clip", "0.5"]).grad_clip == 0.5
    assert parser.parse_args(["--grad-clip", "0"]).grad_clip is None  # 0 = off
    assert _config(model="gru", **vars(parser.parse_args(["--clip", "0"]))).grad_clip is None


def test_cli_trains_evaluates_and_generates(tmp_path, capsys):
    out = tmp_path / "rnn"
    args = ["train", "rnn_scratch", "--data", "pydoc", "--max-tokens", "3000", "--num-steps", "10",
            "--hidden", "16", "--layers", "2", "--sampling", "random", "--clip", "0.5",
            "--epochs", "1", "--device", "cpu", "--threads", "1", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert "train_ppl" in capsys.readouterr().out
    cfg = load_run(out).config
    assert (cfg.model_options, cfg.sampling, cfg.grad_clip) == (
        {"num_hiddens": 16, "num_layers": 2}, "random", 0.5)
    assert main(["evaluate", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", str(out), "--prefix", "time traveller", "--length", "12"]) == 0
    assert capsys.readouterr().out.startswith("time traveller")
    assert main(["predict", str(out), "x.png"]) == 2
    assert "divekit generate" in capsys.readouterr().err


def test_word_tokens_with_an_embedding(tmp_path):
    out = tmp_path / "words"
    _train(model="gru", token="word", embed_size=16, epochs=1, out=str(out),
           **{**TINY, "max_tokens": 3000, "num_steps": 8})
    text = lm.generate(load_run(out), "the function returns", 5)
    assert text.startswith("the function returns ") and len(text.split()) == 3 + 5


def test_sentencepiece_tokenizer_trains_and_drives_a_language_model(tmp_path, capsys):
    pytest.importorskip("sentencepiece")
    tok_path = tmp_path / "tok.model"
    assert main(["tokenizer", "train", "--data", "pydoc", "--vocab-size", "300", "-o", str(tok_path)]) == 0
    assert "300 pieces" in capsys.readouterr().out
    out = tmp_path / "sp"
    _train(model="gru", tokenizer=str(tok_path), epochs=1, out=str(out),
           **{**TINY, "max_tokens": 3000, "num_steps": 8})
    assert (out / "tokenizer.model").read_bytes() == tok_path.read_bytes()
    tok_path.unlink()  # the run keeps its own copy
    text = lm.generate(load_run(out), "the time", 10)
    assert text.startswith("the time") and "▁" not in text
    assert main(["tokenizer", "train", "--vocab-size", "2"]) == 2


def test_create_model_vocab_matches_run(tiny_run):
    model = create_model("gru", vocab_size=len(Vocab.load(tiny_run.run_dir / "vocab.json")), num_hiddens=32)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_run.model.parameters())


@pytest.mark.slow
def test_gru_on_timemachine_reaches_perplexity_1_5(shared_data, tmp_path):
    """The course's character-level GRU (num_steps 35, batch 32, 256 hidden units, clipping
    θ = 1) on the whole text, with Adam and a cosine schedule: about 15 minutes on one CPU thread."""
    result = _train(model="gru", data="timemachine", data_dir=str(shared_data), lr=0.005,
                    scheduler="cosine", epochs=100, val_fraction=0.0, out=str(tmp_path / "tm"),
                    device="cpu", quiet=True)
    assert result.final["train_ppl"] <= 1.5
    text = lm.generate(load_run(result.run_dir), "time traveller", 20, greedy=True)
    assert text.startswith("time traveller")
