"""``divekit hw``: tables, files, and bad input as one line with a non-zero exit."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

from divekit.cli import OneLineParser, _parent, main
from divekit.cli import hw as hw_cli
from divekit.errors import DivekitError

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"


@functools.cache
def _registered() -> bool:
    from divekit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return "hw" in sub.choices


def hw(capsys, *argv: str) -> tuple[int, str, str]:
    """``divekit hw ARGV``: through the real CLI once it registers hw, else through the module's
    own parser with the CLI's error handling."""
    if _registered():
        code = main(["hw", *argv])
    else:
        parent = _parent()
        parser = OneLineParser(prog="divekit", parents=[parent])
        hw_cli.add_commands(parser.add_subparsers(dest="command"), parent)
        try:
            args = parser.parse_args(["hw", *argv])
            args.handler(args)
            code = 0
        except DivekitError as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
        except SystemExit as e:
            code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_prints_the_table_and_writes_csv_and_plot(capsys, tmp_path):
    code, out, err = hw(capsys, "simulate", "lenet", "--input-shape", "1,28,28", "--array",
                        "16x16", "--batch", "4", "--clock-ghz", "0.7", "--bandwidth-gbs", "30",
                        "--csv", str(tmp_path / "l.csv"), "--plot", str(tmp_path / "b.png"))
    assert code == 0, err
    assert "GEMM (MxK·KxN)" in out and "map eff %" in out and "total: 5 layers" in out
    assert "3136x25·25x6" in out  # conv1 of lenet at batch 4: 4·28·28 pixels, 5x5 window
    assert "vector unit (not on the array):" in out and "Sigmoid" in out
    lines = (tmp_path / "l.csv").read_text().splitlines()
    assert lines[0].startswith("layer,kind,M,K,N,groups,folds,cycles") and len(lines) == 6
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_cycle_mode_prints_the_same_cycles_as_analytic(capsys):
    args = ("simulate", "lenet", "--input-shape", "1,28,28", "--array", "8x8", "--dataflow", "os")
    _, analytic, _ = hw(capsys, *args)
    code, cycle, err = hw(capsys, *args, "--mode", "cycle")
    assert code == 0, err
    assert analytic.splitlines()[1:] == cycle.splitlines()[1:]


def test_topology_run_writes_scalesim_compute_report(capsys, tmp_path):
    out_csv = tmp_path / "COMPUTE_REPORT.csv"
    code, out, err = hw(capsys, "simulate", "--topology", str(FIXTURES / "alexnet_part.csv"),
                        "--config", str(FIXTURES / "scale_32x32_ws.cfg"), "--csv", str(out_csv))
    assert code == 0, err
    assert "Conv1" in out and "112,283" in out and "55x55" in out
    assert out_csv.read_text().splitlines()[1].startswith("0, 112283, 0, 91.683096506149")


def test_sweep_compares_arrays_and_dataflows(capsys, tmp_path):
    png = tmp_path / "s.png"
    code, out, err = hw(capsys, "sweep", "lenet", "--arrays", "8x8,16x32", "--dataflows", "ws,os",
                        "--plot", str(png))
    assert code == 0, err
    body = [line for line in out.splitlines() if line.startswith(("8x8", "16x32"))]
    assert len(body) == 4 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,message", [
    (("simulate", "lenet", "--array", "0x0"), "--array must be at least 1x1"),
    (("simulate", "lenet", "--array", "12x"), "--array must be ROWSxCOLS"),
    (("sweep", "lenet", "--arrays", "8x8,12x"), "--array must be ROWSxCOLS"),
    (("simulate", "lenet", "--input-shape", "1,4,4"), "rejected at layer"),
    (("simulate", "gru"), "hw works on image models"),
    (("simulate", "nosuchmodel"), "unknown model"),
    (("simulate",), "needs a MODEL or --topology"),
    (("simulate", "lenet", "--batch", "0"), "--batch must be positive"),
    (("sweep", "lenet", "--dataflows", "ws,xs"), "--dataflows must list"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    code, _, err = hw(capsys, *argv)
    assert code != 0 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_topology_names_the_row(capsys, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("Layer Name, M, N, K,\nfc1, 8, 16, 32,\nfc2, 8, 16,\n")
    code, _, err = hw(capsys, "simulate", "--topology", str(bad), "--array", "8x8")
    assert code == 2 and "row 3 ('fc2'): missing column 'K'" in err
    code, _, err = hw(capsys, "simulate", "--topology", str(bad), "--csv", str(bad))
    assert code == 2 and "refusing to overwrite the input file" in err
