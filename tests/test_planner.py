"""The planner (``divekit dist plan``) against brute force: a ring all-reduce simulated chunk by
chunk with every message counted, a parameter server's link counted message by message, a GPipe
schedule simulated slot by slot (bubble and step time), stage splits against every split, the
smallest efficient batch against a scan, the wait for the slowest device against sampled steps,
LeNet's FLOPs and what tensor parallelism splits in it by hand; then the command itself."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from divekit.cli import main
from divekit.engine import planner
from divekit.engine.planner import ModelCost, Network, Split, Unit


# ---------------------------------------------------------------------- brute-force models
def simulate_ring_allreduce(values: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int],
                                                                  list[float], int]:
    """A ring all-reduce executed step by step: each of N devices splits its vector into N
    chunks; N-1 reduce-scatter rounds (send chunk (r - t) mod N to the right neighbour, which
    adds it), then N-1 all-gather rounds (forward the completed chunk). Returns the result on
    every device, the messages and bytes (float32) each device sent, and the rounds."""
    n = len(values)
    chunks = [list(torch.tensor_split(v.clone(), n)) for v in values]
    messages, sent, rounds = [0] * n, [0.0] * n, 0
    for t in range(n - 1):  # reduce-scatter
        outgoing = [(r, (r - t) % n, chunks[r][(r - t) % n].clone()) for r in range(n)]
        for r, c, data in outgoing:
            chunks[(r + 1) % n][c] += data
            messages[r] += 1
            sent[r] += 4 * data.numel()
        rounds += 1
    for t in range(n - 1):  # all-gather: device r owns the complete chunk (r + 1) mod n
        outgoing = [(r, (r + 1 - t) % n, chunks[r][(r + 1 - t) % n].clone()) for r in range(n)]
        for r, c, data in outgoing:
            chunks[(r + 1) % n][c] = data
            messages[r] += 1
            sent[r] += 4 * data.numel()
        rounds += 1
    return [torch.cat(c) for c in chunks], messages, sent, rounds


def simulate_pipeline(stages: int, micro: int, t_fwd: float, t_bwd: float, send: float
                      ) -> tuple[float, float]:
    """GPipe with blocking sends, event by event: stage s starts micro-batch m when it is free
    and the activation has arrived; a stage that sends is busy for its compute plus the send.
    All forwards, then all backwards (last stage first). Returns ``(step time, idle fraction
    1 - compute time / (stages x step time))``."""
    free = [0.0] * stages
    arrive = [[0.0] * micro for _ in range(stages + 1)]
    busy = 0.0
    for m in range(micro):
        for s in range(stages):
            start = max(free[s], arrive[s][m])
            done = start + t_fwd
            busy += t_fwd
            if s < stages - 1:
                done += send
            free[s] = done
            arrive[s + 1][m] = done
    back = [[0.0] * micro for _ in range(stages + 1)]
    end_fwd = max(free)
    for m in range(micro):
        back[stages - 1][m] = max(end_fwd, 0.0)
    free = [end_fwd] * stages
    for m in range(micro):
        for s in range(stages - 1, -1, -1):
            start = max(free[s], back[s][m])
            done = start + t_bwd
            busy += t_bwd
            if s > 0:
                done += send
                back[s - 1][m] = done
            free[s] = done
    step = max(free)
    return step, 1 - busy / (stages * step)


def uniform_cost(units: int = 8, flops: float = 1e9, params: int = 1_000_000,
                 out: int = 1000, width: int = 64) -> ModelCost:
    """``units`` equal blocks, each one split pair (all its FLOPs) that refuses other widths."""
    u = tuple(Unit(f"u{i}", flops, out, (Split(width, flops, out, out),)) for i in range(units))
    return ModelCost("toy", params, units * flops, u, "toy")


NET = Network(flops_per_s=1e12, bandwidth=1e9, latency=2e-5)


# --------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_ring_allreduce_counts_messages_and_bytes(n):
    g = torch.Generator().manual_seed(n)
    values = [torch.randn(40 * n, generator=g) for _ in range(n)]
    results, messages, sent, rounds = simulate_ring_allreduce(values)
    total = torch.stack(values).sum(0)
    for r in results:  # the simulation is a real all-reduce
        torch.testing.assert_close(r, total)
    nbytes = 4 * values[0].numel()
    assert messages == [2 * (n - 1)] * n and rounds == 2 * (n - 1)
    assert max(sent) == pytest.approx(2 * (n - 1) / n * nbytes)
    # each round every device sends one chunk at once: the critical path is one chunk per round
    brute = sum(NET.latency + (nbytes / n) / NET.bandwidth for _ in range(rounds))
    assert planner.ring_allreduce_time(nbytes, n, NET) == pytest.approx(brute)
    # all-gather / reduce-scatter: half of it
    assert planner.ring_gather_time(nbytes, n, NET) == pytest.approx(brute / 2)


def test_parameter_server_hot_spot_counts_the_server_link():
    cost = uniform_cost()
    pbytes = 4 * cost.params
    for n in (2, 3, 8):
        # the server's link: N-1 gradient messages in, N-1 weight messages out, one at a time
        link = [pbytes] * (n - 1) + [pbytes] * (n - 1)
        brute = sum(NET.latency + b / NET.bandwidth for b in link)
        step = planner.step_time("ps", cost, n, 64, NET)
        assert step.comm == pytest.approx(brute)
        assert step.compute == pytest.approx(math.ceil(64 / n) * cost.train_flops / 1e12)
        # async overlaps: a round is the longer of a worker's compute + push + pull and the link
        a = planner.step_time("async", cost, n, 64, NET)
        worker = step.compute + 2 * (NET.latency + pbytes / NET.bandwidth)
        assert a.total == pytest.approx(max(worker, brute))
        assert a.total <= step.total + 1e-12


def test_fsdp_is_three_ring_passes_of_the_parameters():
    cost = uniform_cost()
    for n in (2, 4, 16):
        step = planner.step_time("fsdp", cost, n, 256, NET)
        per_pass = (n - 1) * (NET.latency + 4 * cost.params / n / NET.bandwidth)
        assert step.comm == pytest.approx(3 * per_pass)


@pytest.mark.parametrize("stages,micro", [(1, 1), (1, 4), (2, 1), (2, 3), (4, 4), (4, 16),
                                          (8, 2)])
def test_bubble_matches_a_simulated_schedule(stages, micro):
    _, idle = simulate_pipeline(stages, micro, 1.0, 2.0, 0.0)
    assert planner.pipeline_bubble(stages, micro) == pytest.approx(idle)
    assert planner.pipeline_bubble(stages, micro) == pytest.approx(
        (stages - 1) / (micro + stages - 1))


@pytest.mark.parametrize("stages,micro,batch", [(1, 4, 32), (2, 4, 32), (4, 8, 64),
                                                (8, 8, 16)])
def test_pipeline_step_matches_the_simulation(stages, micro, batch):
    cost = uniform_cost(units=8)
    step = planner.step_time("pipeline", cost, stages, batch, NET, microbatches=micro)
    per_micro = batch / micro
    t_stage = per_micro * cost.forward_flops / stages / NET.flops_per_s  # forward, one stage
    send = NET.latency + per_micro * 1000 * 4 / NET.bandwidth
    sim, _ = simulate_pipeline(stages, micro, t_stage, 2 * t_stage, send if stages > 1 else 0)
    assert step.total == pytest.approx(sim)


def _worst(flops: list[float], cuts) -> float:
    """The largest stage total when ``flops`` are cut before each index of ``cuts``."""
    bounds = [0, *cuts, len(flops)]
    return max(sum(flops[a:b]) for a, b in zip(bounds, bounds[1:]))


def test_balanced_stages_against_every_split():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 7)
        flops = [rng.choice([0.0, 1.0, 2.0, 5.0, 3.5]) for _ in range(n)]
        for s in range(1, n + 1):
            ends = planner.balanced_stages(flops, s)
            assert len(ends) == s and ends[-1] == n - 1 and ends == sorted(set(ends))

            best = min(_worst(flops, c) for c in itertools.combinations(range(1, n), s - 1))
            assert _worst(flops, [e + 1 for e in ends[:-1]]) == pytest.approx(best)


def test_one_device_is_pure_compute_for_every_strategy():
    cost = uniform_cost()
    pure = 48 * cost.train_flops / NET.flops_per_s
    for s in planner.STRATEGIES:
        step = planner.step_time(s, cost, 1, 48, NET)
        assert step.comm == 0 and step.total == pytest.approx(pure), s
        assert planner.efficiency(step, cost, 48, NET) == pytest.approx(1.0)


def test_monotone_in_devices_and_batch():
    cost = uniform_cost()
    for s in ("allreduce", "ps", "fsdp", "async"):
        effs, comms, computes = [], [], []
        for n in planner.device_counts(64):
            step = planner.step_time(s, cost, n, 1024, NET)
            effs.append(planner.efficiency(step, cost, 1024, NET))
            comms.append(step.comm)
            computes.append(step.compute)
        assert effs == sorted(effs, reverse=True) and effs[0] == 1.0, s
        assert all(b >= a - 1e-12 for a, b in zip(comms, comms[1:])), s
        assert computes == sorted(computes, reverse=True), s
        by_batch = [planner.efficiency(planner.step_time(s, cost, 8, g, NET), cost, g, NET)
                    for g in (8, 16, 64, 256, 4096)]
        assert by_batch == sorted(by_batch), s
    # bubble shrinks with more micro-batches, grows with more stages
    assert planner.pipeline_bubble(4, 8) < planner.pipeline_bubble(4, 4)
    assert planner.pipeline_bubble(8, 8) > planner.pipeline_bubble(4, 8)


def test_cannot_run_cases():
    cost = uniform_cost(units=4, width=4)
    assert planner.step_time("allreduce", cost, 16, 8, NET) is None  # fewer samples than devices
    assert planner.step_time("pipeline", cost, 8, 64, NET) is None  # more stages than units
    assert planner.step_time("tensor", cost, 8, 64, NET) is None  # 8 does not divide 4
    assert planner.step_time("tensor", cost, 3, 64, NET) is None  # nor does 3
    assert planner.step_time("tensor", cost, 4, 64, NET) is not None
    nothing = ModelCost("convs", 1000, 1e6, (Unit("c", 1e6, 10),), "toy")  # no pair to split
    assert planner.step_time("tensor", nothing, 2, 64, NET) is None
    assert planner.step_time("tensor", nothing, 1, 64, NET).total == pytest.approx(
        64 * 3e6 / NET.flops_per_s)


def test_batch_for_efficiency_is_the_smallest_by_scan():
    cost = uniform_cost(params=200_000, flops=1e7)
    for n in (2, 4, 8):
        g = planner.batch_for_efficiency("allreduce", cost, n, NET)
        scan = next(b for b in range(n, 100_000)
                    if planner.efficiency(planner.step_time("allreduce", cost, n, b, NET),
                                          cost, b, NET) >= 0.8 - 1e-12)
        assert g == scan
    # in closed form (no ceil when n divides it): compute >= 4 x communication
    comm = planner.ring_allreduce_time(4 * cost.params, 8, NET)
    exact = 4 * comm * 8 * NET.flops_per_s / cost.train_flops
    assert abs(planner.batch_for_efficiency("allreduce", cost, 8, NET) - exact) <= 8


def test_fit_alpha_beta_recovers_the_line():
    alpha, bandwidth = 3e-5, 2.5e9
    sizes = [1 << 12, 1 << 16, 1 << 20, 1 << 22]
    for world in (2, 4):
        times = [2 * (world - 1) * alpha + 2 * (world - 1) / world * b / bandwidth
                 for b in sizes]
        a, b = planner.fit_alpha_beta(world, sizes, times)
        assert a == pytest.approx(alpha) and b == pytest.approx(bandwidth)


def test_batch_for_efficiency_with_overhead_and_jitter_is_the_smallest_by_scan():
    cost = uniform_cost(params=200_000, flops=1e7)
    net = Network(1e12, 1e9, 2e-5, step_overhead=3e-4, jitter=2e-4)
    for n in (2, 4, 8):
        g = planner.batch_for_efficiency("allreduce", cost, n, net)
        scan = next(b for b in range(n, 1_000_000)
                    if planner.efficiency(planner.step_time("allreduce", cost, n, b, net),
                                          cost, b, net) >= 0.8 - 1e-12)
        assert g == scan


def test_expected_max_normal_against_closed_forms_and_sampling():
    assert planner.expected_max_normal(1) == 0
    assert planner.expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-9)
    assert planner.expected_max_normal(3) == pytest.approx(1.5 / math.sqrt(math.pi), abs=1e-9)
    g = torch.Generator().manual_seed(0)
    for n, tol in ((2, 0.05), (5, 0.04), (32, 0.03), (1024, 0.03)):
        sampled = torch.randn(4000, n, generator=g, dtype=torch.float64).max(1).values.mean()
        assert planner.expected_max_normal(n) == pytest.approx(float(sampled), abs=tol), n
    values = [planner.expected_max_normal(n) for n in (2, 4, 16, 256, 1 << 20)]
    assert values == sorted(values)
    assert all(v < math.sqrt(2 * math.log(n)) for v, n in zip(values, (2, 4, 16, 256, 1 << 20)))


def test_wait_for_the_slowest_device_against_sampled_steps():
    """Each device's step is t0 + its compute + sigma Z; a synchronous step ends with the
    slowest device, then exchanges: the mean of many such steps is the planner's step."""
    cost = uniform_cost(params=100_000, flops=1e8)
    net = Network(1e12, 1e9, 2e-5, step_overhead=1e-3, jitter=5e-4)
    g = torch.Generator().manual_seed(1)
    for n in (2, 4, 16):
        for strategy in ("allreduce", "ps", "fsdp"):
            step = planner.step_time(strategy, cost, n, 256, net)
            devices = step.compute + net.jitter * torch.randn(20_000, n, generator=g,
                                                              dtype=torch.float64)
            sampled = float(devices.max(1).values.mean()) + step.comm
            assert step.total == pytest.approx(sampled, rel=2e-3), (strategy, n)
            assert step.wait == pytest.approx(net.jitter * planner.expected_max_normal(n))
        # no barrier, no wait; and one device waits for nobody
        a = planner.step_time("async", cost, n, 256, net)
        assert a.wait == 0 and a.total == pytest.approx(a.compute + a.comm)
    one = planner.step_time("allreduce", cost, 1, 256, net)
    assert one.wait == 0 and one.total == pytest.approx(planner.single_device_time(cost, 256,
                                                                                     net))
    assert one.total == pytest.approx(1e-3 + 256 * cost.train_flops / 1e12)


def test_tensor_step_of_lenet_by_hand():
    """--strategy tensor on LeNet: the convolutions and the last layer run whole on every rank,
    the 400-120-84 pair 1/N; the pair's output (84 per sample) is all-reduced forward, its
    input's gradient (400 per sample) backward."""
    cost = planner.profile_model("lenet", (1, 28, 28), num_classes=10)
    net = Network(1e9, 1e8, 1e-4, step_overhead=2e-3, jitter=1e-3)
    convs = 2 * (6 * 28 * 28 * 25 + 16 * 10 * 10 * 150)
    pair, last = 2 * (400 * 120 + 120 * 84), 2 * 84 * 10
    for n in (2, 4, 8):
        step = planner.step_time("tensor", cost, n, 64, net)
        flops = 3 * 64 * (convs + pair / n + last)
        assert step.compute == pytest.approx(2e-3 + flops / 1e9)
        ring = [2 * (n - 1) * (1e-4 + 64 * e * 4 / n / 1e8) for e in (84, 400)]
        assert step.comm == pytest.approx(sum(ring))
        assert step.total == pytest.approx(step.compute + step.comm
                                           + 1e-3 * planner.expected_max_normal(n))
    assert planner.step_time("tensor", cost, 7, 64, net) is None  # 7 does not divide 120


def test_batchnorm_buffers_are_broadcast_down_a_tree_every_step():
    """A replicated strategy sends rank 0's BatchNorm statistics to every device before each
    forward pass: down a binary tree, where each informed device tells one more per round."""
    cost = planner.profile_model("lenet_bn", (1, 28, 28), num_classes=10)
    channels = 6 + 16 + 120 + 84  # two BatchNorm2d, two BatchNorm1d
    assert cost.buffers == 2 * channels  # running mean and variance (the counts are integers)
    plain = ModelCost(cost.name, cost.params, cost.forward_flops, cost.units, cost.shape)
    for n in (2, 3, 4, 5, 8, 100):
        informed, rounds = 1, 0
        while informed < n:
            informed, rounds = min(2 * informed, n), rounds + 1
        brute = rounds * (NET.latency + 4 * cost.buffers / NET.bandwidth)
        for strategy in ("allreduce", "ps"):
            extra = (planner.step_time(strategy, cost, n, 256, NET).comm
                     - planner.step_time(strategy, plain, n, 256, NET).comm)
            assert extra == pytest.approx(brute), (strategy, n)
        for strategy in ("fsdp", "async"):  # FSDP keeps no replicas; async has no barrier
            assert planner.step_time(strategy, cost, n, 256, NET) == planner.step_time(
                strategy, plain, n, 256, NET)


def test_lenet_profile_by_hand():
    cost = planner.profile_model("lenet", (1, 28, 28), num_classes=10)
    # conv1 6x28x28 outputs of 5x5x1, conv2 16x10x10 of 5x5x6, dense 400-120-84-10; 2 per MAC
    macs = 6 * 28 * 28 * 25 + 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    assert cost.forward_flops == 2 * macs
    assert cost.train_flops == 6 * macs
    from divekit.models import create_model

    real = create_model("lenet", num_classes=10, in_channels=1)
    assert cost.params == sum(p.numel() for p in real.parameters())
    assert sum(u.flops for u in cost.units) == pytest.approx(cost.forward_flops)
    # --strategy tensor splits the 400-120-84 pair of the head (column-wise, then row-wise)
    # and replicates the convolutions and the last 84-10 layer
    assert cost.splits == (Split(120, 2 * (400 * 120 + 120 * 84), 400, 84, required=False),)
    assert [n for n in range(1, 17) if cost.tensor_splits(n)] == [1, 2, 3, 4, 5, 6, 8, 10, 12,
                                                                    15]


def test_bert_profile_units_are_its_blocks():
    cost = planner.profile_model("bert_small", seq_len=16)
    blocks = [u for u in cost.units if ".blks." in u.name]
    assert len(blocks) == 2 and len(cost.splits) == 4  # attention and FFN in each block
    assert all(u.out_elems == 16 * 128 for u in blocks)
    for u in blocks:  # attention splits by its 2 heads, the FFN by its 256 hidden units
        assert [(sp.width, sp.in_elems, sp.out_elems, sp.required) for sp in u.splits] == [
            (2, 16 * 128, 16 * 128, True), (256, 16 * 128, 16 * 128, True)]
        # the FFN pair: two 128x256 products per token
        assert u.splits[1].flops == 2 * 2 * 16 * 128 * 256
    assert cost.tensor_splits(2) and cost.tensor_splits(4) is None  # 4 does not divide 2 heads
    assert sum(u.flops for u in cost.units) == pytest.approx(cost.forward_flops)


# ------------------------------------------------------------------------------- the command
BASE = ["dist", "plan", "lenet", "--flops-per-s", "10G", "--bandwidth", "1G", "--latency", "20us",
        "--batch-size", "64", "--devices", "16"]


def test_cli_prints_the_table(capsys):
    assert main(BASE) == 0
    out = capsys.readouterr().out
    for title in ("step time (ms)", "samples/s", "scaling efficiency"):
        assert title in out
    assert "allreduce G for 80%" in out and "data parallelism (allreduce)" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["16"]]
    assert len(rows) == 3  # N = 16 in each of the three tables
    # the first table's allreduce cell is the planner's own number
    cost = planner.profile_model("lenet", num_classes=1000)
    step = planner.step_time("allreduce", cost, 16, 64, Network(1e10, 1e9, 2e-5))
    assert float(rows[0][1]) == pytest.approx(step.total * 1e3, rel=1e-3)


def test_cli_step_overhead_and_jitter(capsys):
    assert main([*BASE, "--step-overhead", "1.5ms", "--jitter", "400us"]) == 0
    out = capsys.readouterr().out
    assert "t0 = 1.5 ms, sigma = 400 us" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["16"]]
    cost = planner.profile_model("lenet", num_classes=1000)
    net = Network(1e10, 1e9, 2e-5, step_overhead=1.5e-3, jitter=4e-4)
    for column, strategy in enumerate(planner.STRATEGIES, start=1):
        step = planner.step_time(strategy, cost, 16, 64, net)
        assert rows[0][column] == "-" if step is None else \
            float(rows[0][column]) == pytest.approx(step.total * 1e3, rel=1e-3)


@pytest.mark.parametrize("change", [
    ["--flops-per-s", "fast"], ["--bandwidth=-1G"], ["--latency", "soon"],
    ["--batch-size", "0"], ["--devices", "0"], ["--microbatches", "0"],
    ["--input-shape", "1,2"], ["--seq-len", "9999"], ["--step-overhead=-1ms"],
    ["--jitter", "often"],
])
def test_cli_bad_inputs_are_one_line(capsys, change):
    argv = BASE + change
    if change[0] == "--seq-len":
        argv = [a if a != "lenet" else "bert_small" for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


def test_cli_unknown_model_and_wrong_task(capsys):
    assert main([*BASE[:2], "nosuch", *BASE[3:]]) == 2
    assert main([*BASE[:2], "transformer", *BASE[3:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error:") for e in err)


def test_cli_plot_and_csv_and_overwrite(tmp_path, capsys):
    png, csv = tmp_path / "plan.png", tmp_path / "plan.csv"
    assert main([*BASE, "--plot", str(png), "--csv", str(csv)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("devices,strategy,step_s")
    assert len(lines) == 1 + 5 * len(planner.STRATEGIES)  # N = 1, 2, 4, 8, 16
    capsys.readouterr()
    before = png.stat().st_mtime_ns
    assert main([*BASE, "--plot", str(png)]) == 2
    assert "--overwrite" in capsys.readouterr().err and png.stat().st_mtime_ns == before
    assert main([*BASE, "--plot", str(png), "--overwrite"]) == 0
    assert main([*BASE, "--plot", str(tmp_path / "no" / "x.png")]) == 2


def test_cli_measures_the_rate(capsys):
    argv = [a if a != "10G" else "measure" for a in BASE]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rate = float(out.split("matrix product at ")[1].split(" GFLOP/s")[0])
    shown = out.split("R = ")[1].split(",")[0]  # the plan's inputs: the measured rate
    assert rate > 0 and planner._si(rate * 1e9, "FLOP/s").split()[0][:2] == shown[:2]
