"""README's headline figures come from BENCHMARKS.md (benchmarks/_headline.py, issue 26)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "_headline.py"


def load():
    spec = importlib.util.spec_from_file_location("dk_headline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["dk_headline"] = module
    spec.loader.exec_module(module)
    return module


# The shapes the benchmarks write: a verdict column, the goal in the header with the verdict
# under it, a label column before the ratio, the book's "2.34 (1.64-2.74)x", rows without goals.
SAMPLE = """# Benchmarks
<!-- bench:header -->
| run |  |
| --- | --- |
| generated | 2026-01-02 03:04 UTC by `python benchmarks/run_all.py`, standard settings |
<!-- /bench:header -->

Hand-written text with a table that is not generated:

| case | ratio | goal | verdict |
| --- | ---: | --- | --- |
| outside the markers | **9.0×** (1–2) | ≥ 1× | met |

<!-- bench:detection_ops -->
| case | divekit | d2l | speed-up (min–max) | goal | verdict |
| --- | ---: | ---: | ---: | --- | --- |
| nms (random) | 30.44 ms | 2457.70 ms | **80.8×** (76.4–82.4) | ≥ 50× | met |
| multibox_prior | 3.45 ms | 5.71 ms | **1.9×** (1.6–2.1) | — | — |
| = images/s | 15.4 | 11.1 |  |  |  |
<!-- /bench:detection_ops -->
<!-- bench:rnn -->
| implementation | tokens/s |
| --- | ---: |
| divekit rnn | 3,792 |

| divekit | against | ratio (min–max) | goal | verdict |
| --- | --- | ---: | --- | --- |
| divekit gru_scratch | divekit gru | **0.85×** (0.80–0.93) | ≥ 0.9× | not settled |
<!-- /bench:rnn -->
<!-- bench:decoding -->
| length | batch | kv cache tok/s | vs no cache (min–max) | goal | verdict |
| ---: | ---: | ---: | ---: | --- | --- |
| 50 | 64 | 12772 | **15.2×** (15.0–19.6) | ≥ 3× | met |

| model | ratio | × (min–max) | goal | verdict |
| --- | --- | ---: | --- | --- |
| resnet18 | divekit / d2l loop | **1.09×** (1.01–1.24) | ≥ 1.5× | not met |
<!-- /bench:decoding -->
<!-- bench:hardware -->
| layer | cycle-accurate speed-up over `scalesim run` (min–max) | goal ≥ 20× |
| --- | ---: | --- |
| all layers | **101.3×** (85.2–153.1) | met |
<!-- /bench:hardware -->
<!-- bench:book -->
| case | compat s (spread) | ratio book/compat (spread) | goal 1.5x | metrics ranges meet |
| --- | --- | --- | --- | --- |
| lenet | 12.52 (9.67-27.63) | 2.34 (1.64-2.74)x | not met | yes |
<!-- /bench:book -->
"""


def test_goal_rows_are_read_from_every_table_shape_and_only_inside_the_markers():
    h = load()
    goals = h.collect(SAMPLE)
    assert [(g.benchmark, g.what, g.ratio, g.goal, g.verdict) for g in goals] == [
        ("detection_ops", "nms (random)", "80.8× (76.4–82.4)", "≥ 50×", "met"),
        ("rnn", "divekit gru_scratch vs divekit gru", "0.85× (0.80–0.93)", "≥ 0.9×",
         "not settled"),
        ("decoding", "length 50, batch 64", "15.2× (15.0–19.6)", "≥ 3×", "met"),
        ("decoding", "resnet18, divekit / d2l loop", "1.09× (1.01–1.24)", "≥ 1.5×", "not met"),
        ("hardware", "all layers", "101.3× (85.2–153.1)", "≥ 20×", "met"),
        ("book", "lenet", "2.34× (1.64–2.74)", "≥ 1.5×", "not met"),
    ]
    text = h.headline(SAMPLE)
    assert "2026-01-02 03:04 UTC" in text
    assert "3 met, 1 not settled, 2 not met" in text
    assert "outside the markers" not in text


def test_update_rewrites_only_the_block_and_check_catches_a_hand_edit(tmp_path):
    h = load()
    bench, readme = tmp_path / "BENCHMARKS.md", tmp_path / "README.md"
    bench.write_text(SAMPLE, encoding="utf-8")
    readme.write_text("# x\nbefore\n<!-- bench:headline -->\nold\n<!-- /bench:headline -->\n"
                      "after\n", encoding="utf-8")
    assert h.update_readme(bench, readme) is True
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# x\nbefore\n") and text.endswith("after\n")
    assert "| detection_ops | nms (random) | 80.8× (76.4–82.4) | ≥ 50× | met |" in text
    assert h.update_readme(bench, readme) is False  # already current
    assert h.main(["--check", "--benchmarks", str(bench), "--readme", str(readme)]) == 0
    readme.write_text(text.replace("80.8×", "90.0×"), encoding="utf-8")  # typed by hand
    assert h.main(["--check", "--benchmarks", str(bench), "--readme", str(readme)]) == 1


def test_the_readme_headline_is_current_with_benchmarks_md():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_readme_without_the_markers_is_refused_not_appended_to(tmp_path):
    h = load()
    bench, readme = tmp_path / "BENCHMARKS.md", tmp_path / "README.md"
    bench.write_text(SAMPLE, encoding="utf-8")
    readme.write_text("# x\nno markers here\n", encoding="utf-8")
    try:
        h.update_readme(bench, readme)
    except SystemExit as e:
        assert "<!-- bench:headline -->" in str(e) and str(e).startswith("error: README.md has no")
    else:
        raise AssertionError("a README without markers was accepted")
    assert readme.read_text(encoding="utf-8") == "# x\nno markers here\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
