"""The book's pictures (``divekit.compat.d2l._plot``): signatures, what each draws (checked against
NumPy / Matplotlib done by hand), the PNG files written outside a notebook (names, one file per
figure, throttled Animator writes), a quiet headless subprocess, and a real Jupyter kernel."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from divekit.compat.d2l import _plot as P

API_MD = Path(__file__).resolve().parents[2] / "shared" / "book" / "API.md"
SRC = Path(__file__).resolve().parents[1] / "src"
plt = P.plt


@pytest.fixture(autouse=True)
def figures(tmp_path, monkeypatch) -> Path:
    out = tmp_path / "figs"
    monkeypatch.setenv("DIVEKIT_FIGURES", str(out))
    plt.close("all")
    with matplotlib.rc_context():  # set_figsize changes rcParams: undone after the test
        yield out
    plt.close("all")


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png")) if folder.exists() else []


# ------------------------------------------------------------------------------ signatures
BOOK = {
    "use_svg_display": "()",
    "set_figsize": "(figsize=(3.5, 2.5))",
    "set_axes": "(axes, xlabel, ylabel, xlim, ylim, xscale, yscale, legend)",
    "plot": "(X, Y=None, xlabel=None, ylabel=None, legend=None, xlim=None, ylim=None, "
            "xscale='linear', yscale='linear', fmts=('-', 'm--', 'g-.', 'r:'), "
            "figsize=(3.5, 2.5), axes=None)",
    "Animator": "(xlabel=None, ylabel=None, legend=None, xlim=None, ylim=None, xscale='linear', "
                "yscale='linear', fmts=('-', 'm--', 'g-.', 'r:'), nrows=1, ncols=1, "
                "figsize=(3.5, 2.5))",
    "show_images": "(imgs, num_rows, num_cols, titles=None, scale=1.5)",
    "show_heatmaps": "(matrices, xlabel, ylabel, titles=None, figsize=(2.5, 2.5), cmap='Reds')",
    "bbox_to_rect": "(bbox, color)",
    "show_bboxes": "(axes, bboxes, labels=None, colors=None)",
    "show_list_len_pair_hist": "(legend, xlabel, ylabel, xlist, ylist)",
}


def _params(sig: str) -> list[tuple[str, object]]:
    """``(name, default)`` of a signature written as text (defaults are literals)."""
    args = ast.parse(f"def f{sig}: pass").body[0].args
    names = [a.arg for a in args.args]
    defaults = [ast.literal_eval(d) for d in args.defaults]
    missing = [inspect.Parameter.empty] * (len(names) - len(defaults))
    return list(zip(names, missing + defaults))


def _ours(name: str) -> list[tuple[str, object]]:
    sig = inspect.signature(getattr(P, name))
    return [(p.name, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("name", sorted(BOOK))
def test_signature_is_the_books(name):
    assert _ours(name) == _params(BOOK[name])
    assert name in P.__all__


@pytest.mark.skipif(not API_MD.exists(), reason="../shared/book/API.md is not present")
def test_signatures_agree_with_api_md():
    rows = re.findall(r"\|\s*\**`(\w+)`\**\s*\|\s*(?:function|class)\s*\|[^|]*\|\s*`(\([^`]*\))`",
                      API_MD.read_text(encoding="utf-8"))
    book = {name: sig for name, sig in rows if name in BOOK}
    assert set(book) == set(BOOK)
    for name, sig in book.items():
        assert _ours(name) == _params(sig), name


def test_plt_is_pyplot():
    import matplotlib.pyplot

    assert P.plt is matplotlib.pyplot
    assert "plt" in P.__all__ and "save_figures" in P.__all__


# ----------------------------------------------------------------------------------- plot
def test_plot_draws_every_series_and_writes_one_png(figures):
    x = torch.arange(0, 3, 0.25, requires_grad=True)
    ys = [torch.sin(x), torch.cos(x), x * 0.5, x ** 2 / 9, -x]  # 5 curves: fmts cycle
    P.plot(x, ys, 'x', 'f(x)', legend=['a', 'b', 'c', 'd', 'e'], xlim=[0, 3])
    ax = plt.gca()
    xs = x.detach().numpy()
    assert len(ax.lines) == 5
    for line, y in zip(ax.lines, ys):
        np.testing.assert_allclose(line.get_xdata(), xs)
        np.testing.assert_allclose(line.get_ydata(), y.detach().numpy())
    assert [ln.get_linestyle() for ln in ax.lines] == ['-', '--', '-.', ':', '-']
    assert ax.lines[1].get_color() == 'm'
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_xlim()) == ('x', 'f(x)', (0.0, 3.0))
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['a', 'b', 'c', 'd', 'e']
    assert tuple(plt.gcf().get_size_inches()) == (3.5, 2.5)
    assert _pngs(figures) == ["fig-001-plot.png"]
    w, h = Image.open(figures / "fig-001-plot.png").size
    assert 300 < w < 600 and 200 < h < 450  # 3.5 x 2.5 in at 120 dpi, trimmed tight


def test_plot_forms_of_x_and_y():
    freqs = [50, 20, 9, 4, 1]
    P.plot(freqs, xlabel='token: x', xscale='log', yscale='log')  # y only: x is 0..n-1
    ax = plt.gca()
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), np.arange(5))
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), freqs)
    assert (ax.get_xscale(), ax.get_yscale()) == ('log', 'log')

    t = torch.arange(6.0)
    P.plot([t, t[2:]], [t * 2, t[2:] * 3], figsize=(6, 3))  # one x per y
    ax = plt.gca()
    np.testing.assert_array_equal(ax.lines[1].get_xdata(), [2, 3, 4, 5])
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [6, 9, 12, 15])
    assert tuple(plt.gcf().get_size_inches()) == (6, 3)

    P.plot(t, torch.stack([t, t + 1, t + 2]))  # rows of a 2-D tensor are the curves
    assert [list(ln.get_ydata()) for ln in plt.gca().lines] == [
        list(range(k, k + 6)) for k in range(3)]

    w = torch.tensor(2.0, requires_grad=True)
    P.plot([w * k for k in range(4)])  # a list of 0-d tensors (losses) is one curve
    np.testing.assert_array_equal(plt.gca().lines[0].get_ydata(), [0, 2, 4, 6])


def test_plot_on_given_axes_draws_there(figures):
    fig, (a0, a1) = plt.subplots(1, 2)
    P.plot([1, 2, 3], [3, 2, 1], axes=a1)
    assert len(a1.lines) == 1 and len(a0.lines) == 0
    assert _pngs(figures) == []  # the caller's figure: written by save_figures / at exit
    assert P.save_figures() == [figures / "fig-001.png"]


def test_a_changed_figure_keeps_its_one_file(figures):
    P.plot([0, 1, 2], [[0, 1, 2]], xlim=[0, 2], ylim=[-1, 3])
    first = (figures / "fig-001-plot.png").read_bytes()
    assert P.save_figures(close=False) == []  # unchanged: not written again
    plt.plot([0, 1, 2], [2, 1, 0], 'o')  # the book's nadaraya-waston adds points like this
    assert P.save_figures(close=False) == [figures / "fig-001-plot.png"]
    assert (figures / "fig-001-plot.png").read_bytes() != first
    assert P.save_figures() == []
    assert plt.get_fignums() == []  # closed, as a notebook does after a cell
    assert _pngs(figures) == ["fig-001-plot.png"]


def test_plt_figures_are_saved_in_order_when_the_next_picture_starts(figures):
    P.set_figsize()
    fig = plt.imshow(np.zeros((4, 6, 3)))
    fig.axes.add_patch(P.bbox_to_rect([1, 1, 3, 2], 'blue'))
    P.set_figsize((5, 5))  # the next picture: the open one is written and closed
    assert _pngs(figures) == ["fig-001.png"]
    plt.imshow(np.ones((4, 6)))
    assert tuple(plt.gcf().get_size_inches()) == (5, 5)
    P.show_images([np.zeros((3, 3))], 1, 1)
    assert _pngs(figures) == ["fig-001.png", "fig-002.png", "fig-003-images.png"]
    plt.figure()  # an empty figure is no picture
    assert P.save_figures() == []


def test_unwritable_figures_folder_is_one_clear_error(tmp_path, monkeypatch):
    from divekit.errors import DivekitError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("DIVEKIT_FIGURES", str(blocker / "sub"))
    with pytest.raises(DivekitError, match="DIVEKIT_FIGURES"):
        P.plot([1, 2])


# ------------------------------------------------------------------------------- Animator
def _book_view(X, Y, fmts, xlim, ylim, xscale, yscale):
    """The view limits the book gets: clear, plot every series, then set_axes."""
    fig, ax = plt.subplots(figsize=(3.5, 2.5))
    for x, y, fmt in zip(X, Y, fmts):
        ax.plot(x, y, fmt)
    ax.set_xscale(xscale)
    ax.set_yscale(yscale)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)
    view = ax.get_xlim(), ax.get_ylim()
    plt.close(fig)
    return view


def test_animator_lines_hold_the_data_and_the_view_is_the_books(figures):
    rng = np.random.default_rng(0)
    a = P.Animator(xlabel='epoch', ylabel='loss', legend=['train', 'test', 'acc'],
                   xlim=None, yscale='log')
    X, Y = [[], [], []], [[], [], []]
    for e in range(12):
        vals = [float(rng.uniform(0.1, 5)), None if e % 3 else float(rng.uniform(0.1, 5)),
                torch.tensor(rng.uniform(0.1, 5), requires_grad=True)]
        a.add(e + 1, vals)
        for k, v in enumerate(vals):
            if v is not None:
                X[k].append(e + 1)
                Y[k].append(float(v.detach()) if torch.is_tensor(v) else v)
    assert a.X == X
    np.testing.assert_allclose(np.concatenate(a.Y), np.concatenate(Y), rtol=1e-6)
    assert all(type(v) is float for v in a.Y[2])  # 0-d tensors are stored as numbers
    ax = a.axes[0]
    assert isinstance(a.axes, list) and a.fig is ax.figure
    assert len(ax.lines) == 3
    for line, xs, ys in zip(ax.lines, X, Y):
        np.testing.assert_allclose(line.get_xdata(), xs)
        np.testing.assert_allclose(line.get_ydata(), ys, rtol=1e-6)
    want = _book_view(X, Y, a.fmts, None, None, 'linear', 'log')
    np.testing.assert_allclose(ax.get_xlim(), want[0])
    np.testing.assert_allclose(ax.get_ylim(), want[1])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['train', 'test', 'acc']
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_yscale()) == ('epoch', 'loss', 'log')
    P.save_figures()
    assert _pngs(figures) == ["fig-001-animator.png"]


def test_animator_writes_at_most_every_five_seconds_and_at_the_end(figures, monkeypatch):
    import divekit.viz

    writes = []
    clock = [1000.0]
    real = divekit.viz.save_figure
    monkeypatch.setattr(divekit.viz, "save_figure",
                        lambda fig, path, **kw: writes.append((clock[0], path))
                        or real(fig, path, **kw))
    monkeypatch.setattr(P, "_clock", lambda: clock[0])
    n = 230
    a = P.Animator(xlabel='epoch', xlim=[1, n], legend=['loss'])
    for e in range(n):
        clock[0] += 0.1  # 100 ms an epoch: 23 s in all
        a.add(e + 1, 1.0 / (e + 1))
    # the first ~5 s after the first point, then every ~5 s, and the last x of xlim
    times = [t - 1000.0 for t, _ in writes]
    assert len(writes) == 5, times
    assert times[0] >= 5.0 - 1e-9 and all(b - a >= 5.0 - 1e-9 for a, b in zip(times, times[1:-1]))
    assert times[-1] == pytest.approx(n * 0.1)
    assert {path for _, path in writes} == {figures / "fig-001-animator.png"}
    png = np.asarray(Image.open(writes[-1][1]).convert("RGB"))
    assert png.shape[2] == 3 and (png < 250).any()
    assert P.save_figures() == []  # the last add was written already
    np.testing.assert_array_equal(a.axes[0].lines[0].get_xdata(), np.arange(1, n + 1))


def test_animator_points_between_writes_reach_the_file(figures):
    a = P.Animator(xlim=[1, 100])
    for e in range(1, 4):
        a.add(e, float(e))  # quick adds: nothing written yet
    assert _pngs(figures) == []
    assert P.save_figures() == [figures / "fig-001-animator.png"]
    assert P.save_figures() == []  # nothing newer than the file


def test_animator_change_after_close_is_written_to_its_file(figures):
    a = P.Animator(xlim=[1, 10])
    a.add(1, 1.0)
    P.plot([1, 2])  # the next picture writes and closes the Animator's figure
    before = (figures / "fig-001-animator.png").read_bytes()
    for e in range(2, 6):
        a.add(e, float(e))  # throttled: not all written
    P.save_figures()
    assert _pngs(figures) == ["fig-001-animator.png", "fig-002-plot.png"]
    assert (figures / "fig-001-animator.png").read_bytes() != before
    np.testing.assert_array_equal(a.axes[0].lines[0].get_ydata(), [1, 2, 3, 4, 5])


def test_animator_grids_of_axes():
    a = P.Animator(xlabel='epoch', ylabel='loss', xlim=[10, 20], legend=['c', 's', 'tv'],
                   ncols=2, figsize=(7, 2.5))
    a.axes[1].imshow(np.zeros((4, 4, 3)))  # neural-style shows the image beside the curves
    a.add(10, [1.0, 2.0, 3.0])
    assert len(a.axes[0].lines) == 3 and len(a.axes[1].images) == 1
    assert tuple(a.fig.get_size_inches()) == (7, 2.5)
    b = P.Animator(nrows=2, ncols=2)
    b.add(1, 2.0)
    assert b.axes.shape == (2, 2) and len(b.axes[0, 0].lines) == 1


def test_animator_with_a_custom_config_axes_redraws_fully():
    a = P.Animator(xlim=[0, 5])
    calls = []
    a.config_axes = lambda: calls.append(1) or a.axes[0].set_title("mine")
    a.add(1, 1.0)
    a.add(2, 2.0)
    assert len(calls) == 2 and a.axes[0].get_title() == "mine"
    np.testing.assert_array_equal(a.axes[0].lines[0].get_xdata(), [1, 2])


# ---------------------------------------------------------------------------- show_images
def test_show_images_takes_tensors_pil_and_numpy(figures):
    rng = np.random.default_rng(1)
    hwc = rng.random((8, 6, 3)).astype(np.float32)
    gray = rng.random((8, 6)).astype(np.float32)
    pil = Image.fromarray((hwc * 255).astype(np.uint8))
    imgs = [torch.from_numpy(hwc).permute(2, 0, 1), torch.from_numpy(hwc),
            torch.from_numpy(gray), torch.from_numpy(gray)[None], pil, gray]
    want = [hwc, hwc, gray, gray, np.asarray(pil), gray]
    axes = P.show_images(imgs, 2, 4, titles=list("abcdef"), scale=2)
    assert isinstance(axes, np.ndarray) and axes.shape == (8,)
    for ax, w in zip(axes, want):
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), w, rtol=1e-6)
        assert not ax.get_xaxis().get_visible() and not ax.get_yaxis().get_visible()
    assert [ax.get_title() for ax in axes[:6]] == list("abcdef")
    assert len(axes[6].images) == 0
    assert tuple(axes[0].figure.get_size_inches()) == (8, 4)
    assert _pngs(figures) == ["fig-001-images.png"]


def test_show_images_then_boxes_is_one_picture(figures):
    red = torch.zeros(3, 20, 20)
    red[0] = 1
    axes = P.show_images([red], 1, 1)  # the book fails on a 1 x 1 grid
    P.show_bboxes(axes[0], torch.tensor([[2.0, 2.0, 10.0, 12.0]]), colors=['w'])
    assert len(axes[0].patches) == 1
    P.save_figures()
    assert _pngs(figures) == ["fig-001-images.png"]
    png = np.asarray(Image.open(figures / "fig-001-images.png").convert("RGB")).astype(int)
    red_px = (png[..., 0] > 200) & (png[..., 1] < 60) & (png[..., 2] < 60)
    white_px = (png > 230).all(axis=-1)
    assert red_px.mean() > 0.2 and white_px.any()  # the image, and the white box on it


# -------------------------------------------------------------------------- show_heatmaps
@pytest.mark.parametrize("shape", [(1, 1, 10, 10), (2, 3, 4, 5)])
def test_show_heatmaps_grid(figures, shape):
    m = torch.rand(*shape)
    rows, cols = shape[:2]
    titles = [f"Head {j}" for j in range(cols)]
    assert P.show_heatmaps(m, xlabel='Keys', ylabel='Queries', titles=titles) is None
    fig = plt.gcf()
    maps = [ax for ax in fig.axes if ax.images]
    assert len(maps) == rows * cols and len(fig.axes) == rows * cols + 1  # + the colour bar
    for k, ax in enumerate(maps):
        i, j = divmod(k, cols)
        np.testing.assert_allclose(ax.images[0].get_array(), m[i, j].numpy())
        assert ax.images[0].get_cmap().name == 'Reds'
        assert ax.get_title() == titles[j]
        assert ax.get_xlabel() == ('Keys' if i == rows - 1 else '')
        assert ax.get_ylabel() == ('Queries' if j == 0 else '')
    assert tuple(fig.get_size_inches()) == (2.5, 2.5)
    assert _pngs(figures) == ["fig-001-heatmaps.png"]


def test_show_heatmaps_takes_numpy():
    P.show_heatmaps(np.eye(3)[None, None], 'k', 'q', cmap='Blues')
    assert plt.gcf().axes[0].images[0].get_cmap().name == 'Blues'


# ----------------------------------------------------------------------------------- boxes
def test_bbox_to_rect_geometry():
    box = torch.tensor([60.0, 45.0, 378.0, 516.0])
    rect = P.bbox_to_rect(box, 'blue')
    assert rect.get_xy() == (60.0, 45.0)
    assert (rect.get_width(), rect.get_height()) == (318.0, 471.0)
    corners = rect.get_bbox()
    assert (corners.x0, corners.y0, corners.x1, corners.y1) == (60.0, 45.0, 378.0, 516.0)
    assert not rect.get_fill() and rect.get_linewidth() == 2
    assert matplotlib.colors.same_color(rect.get_edgecolor(), 'blue')


def test_show_bboxes_colours_and_labels():
    fig, ax = plt.subplots()
    boxes = torch.rand(7, 4).sort(dim=1).values  # x1 < y1 < x2 < y2 is fine for drawing
    P.show_bboxes(ax, boxes, labels=['a', 'b', 'c'])
    assert len(ax.patches) == 7
    cycle = ['b', 'g', 'r', 'm', 'c']
    for k, (patch, box) in enumerate(zip(ax.patches, boxes.tolist())):
        assert matplotlib.colors.same_color(patch.get_edgecolor(), cycle[k % 5])
        np.testing.assert_allclose(patch.get_xy(), box[:2], rtol=1e-6)
        np.testing.assert_allclose([patch.get_width(), patch.get_height()],
                                   [box[2] - box[0], box[3] - box[1]], rtol=1e-5, atol=1e-7)
    assert [t.get_text() for t in ax.texts] == ['a', 'b', 'c']
    assert all(matplotlib.colors.same_color(t.get_color(), 'w') for t in ax.texts)
    fig2, ax2 = plt.subplots()
    P.show_bboxes(ax2, [torch.tensor([0.0, 0.0, 1.0, 1.0])], '0.93', 'w')  # one label, one colour
    assert ax2.texts[0].get_text() == '0.93'
    assert matplotlib.colors.same_color(ax2.texts[0].get_color(), 'k')  # dark text on white


def test_show_list_len_pair_hist_counts(figures):
    rng = np.random.default_rng(2)
    src = [["w"] * int(n) for n in rng.integers(1, 12, 40)]
    tgt = [["w"] * int(n) for n in rng.integers(1, 15, 40)]
    P.show_list_len_pair_hist(['source', 'target'], '# tokens', 'count', src, tgt)
    ax = plt.gca()
    ls, lt = [len(s) for s in src], [len(t) for t in tgt]
    _, edges = np.histogram(ls + lt, bins=10)
    bars = ax.patches
    np.testing.assert_array_equal([b.get_height() for b in bars[:10]],
                                  np.histogram(ls, bins=edges)[0])
    np.testing.assert_array_equal([b.get_height() for b in bars[10:]],
                                  np.histogram(lt, bins=edges)[0])
    assert all(b.get_hatch() == '/' for b in bars[10:]) and not bars[0].get_hatch()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['source', 'target']
    assert (ax.get_xlabel(), ax.get_ylabel()) == ('# tokens', 'count')
    assert _pngs(figures) == ["fig-001-hist.png"]


# --------------------------------------------------------------------------- the notebook
def test_notebook_mode_shows_live_and_writes_nothing(figures, monkeypatch):
    pytest.importorskip("IPython")
    from IPython import display
    from matplotlib_inline import backend_inline

    shown = []
    monkeypatch.setattr(P, "_notebook", lambda: True)
    monkeypatch.setattr(display, "display", lambda obj: shown.append(("display", obj)))
    monkeypatch.setattr(display, "clear_output",
                        lambda wait=False: shown.append(("clear", wait)))
    monkeypatch.setattr(backend_inline, "set_matplotlib_formats",
                        lambda *fmts: shown.append(("formats", fmts)))
    P.use_svg_display()
    assert shown == [("formats", ("svg",))]
    shown.clear()
    a = P.Animator(xlim=[1, 3])
    for e in range(3):
        a.add(e + 1, float(e))
    events = [s for s in shown if s[0] != "formats"]
    assert events == [("display", a.fig), ("clear", True)] * 3
    P.plot([1, 2, 3])
    P.show_images([np.zeros((2, 2))], 1, 1)
    assert not figures.exists()  # the notebook shows them; no files


# ------------------------------------------------------------------------------ headless
# the file alone (the package's import is slow; these check this module's own start-up)
LOAD_ALONE = (f"import sys, importlib.util as u; sys.path.insert(0, {str(SRC)!r})\n"
              f"s = u.spec_from_file_location('p', {str(SRC / 'divekit/compat/d2l/_plot.py')!r})\n"
              "P = u.module_from_spec(s); s.loader.exec_module(P)\n")

SCRIPT = textwrap.dedent("""
    import matplotlib, numpy as np
    open({backend!r}, "w").write(matplotlib.get_backend())
    P.plot(np.arange(5.0), [np.arange(5.0) ** 2], 'x', 'y')
    a = P.Animator(xlabel='epoch', xlim=[1, 50], legend=['loss', 'acc'])
    for e in range(50):
        a.add(e + 1, (1.0 / (e + 1), e / 50))
    P.set_figsize()
    P.plt.imshow(np.random.rand(8, 8, 3))
    P.plt.show()
""")


def _headless_run(tmp_path, load, env_extra, drop=()):
    out, backend = tmp_path / "out", tmp_path / "backend.txt"
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra, DIVEKIT_FIGURES=str(out))
    code = load + SCRIPT.format(backend=str(backend))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    return r, out, backend.read_text() if backend.exists() else None


def test_headless_script_with_the_whole_package_is_quiet_and_leaves_pngs(tmp_path):
    load = "from divekit.compat import d2l as P\n"
    r, out, backend = _headless_run(tmp_path, load, {"MPLBACKEND": "Agg"})
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert backend.lower() == "agg"
    assert _pngs(out) == ["fig-001-plot.png", "fig-002-animator.png", "fig-003.png"]
    assert not (tmp_path / "figures").exists()
    for name in _pngs(out):
        assert Image.open(out / name).size[0] > 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="display detection is Linux's")
def test_no_display_and_no_choice_selects_agg(tmp_path):
    r, out, backend = _headless_run(tmp_path, LOAD_ALONE, {},
                                    drop=("MPLBACKEND", "DISPLAY", "WAYLAND_DISPLAY"))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert backend.lower() == "agg"
    assert _pngs(out) == ["fig-001-plot.png", "fig-002-animator.png", "fig-003.png"]


def test_explicit_backend_is_respected(tmp_path):
    env = dict(os.environ, MPLBACKEND="svg")
    r = subprocess.run([sys.executable, "-c", LOAD_ALONE + "print(P.matplotlib.get_backend())"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().lower() == "svg"


# ------------------------------------------------------------------------ a real kernel
def _kernel_run(kc, code: str) -> list[tuple[str, dict]]:
    msg_id = kc.execute(code)
    outputs = []
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "status" and content["execution_state"] == "idle":
            return outputs
        if kind in ("stream", "display_data", "execute_result", "error", "clear_output"):
            outputs.append((kind, content))


def test_in_a_jupyter_kernel(tmp_path):
    pytest.importorskip("ipykernel")
    manager = pytest.importorskip("jupyter_client.manager")
    out = tmp_path / "figs"
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env.update(DIVEKIT_FIGURES=str(out), PYTHONPATH=str(SRC))
    km, kc = manager.start_new_kernel(kernel_name="python3", cwd=str(tmp_path), env=env)
    try:
        load = LOAD_ALONE + "print(P._notebook(), 'inline' in P.matplotlib.get_backend())"
        assert _kernel_run(kc, load) == [
            ("stream", {"name": "stdout", "text": "True True\n"})]
        shown = _kernel_run(kc, "P.plot([1, 2, 3], xlabel='x')")
        assert [k for k, _ in shown] == ["display_data"]
        assert "image/svg+xml" in shown[0][1]["data"]  # plot -> set_figsize -> svg
        live = _kernel_run(kc, "a = P.Animator(xlim=[1, 3])\nfor e in range(3): a.add(e + 1, e)")
        kinds = [k for k, _ in live]
        assert kinds[:6] == ["display_data", "clear_output"] * 3
        assert all(c["wait"] for k, c in live if k == "clear_output")
        assert "stream" not in kinds and not out.exists()
        # a kernel whose backend draws nothing on screen: quiet, PNGs
        quiet = _kernel_run(kc, "P.matplotlib.use('agg')\nP.plot([1, 2, 3])\n"
                                "a = P.Animator(xlim=[1, 3])\nfor e in range(3): a.add(e + 1, e)")
        assert quiet == []
        assert _pngs(out) == ["fig-001-plot.png", "fig-002-animator.png"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
