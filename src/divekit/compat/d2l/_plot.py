"""The book's pictures: ``plot``, ``Animator``, ``show_images``, ``show_heatmaps``, boxes, and
``plt`` (the real ``matplotlib.pyplot``).

Two ways of showing a picture, chosen at each call:

- **Notebook** (an IPython kernel whose Matplotlib backend draws into the notebook: inline,
  ipympl): figures show in the cell as the book's do, ``use_svg_display`` switches the inline
  format to SVG, ``Animator.add`` redraws live (display, then ``clear_output(wait=True)``).
- **Anywhere else** (``python script.py``, pytest, a kernel with ``MPLBACKEND=Agg``): nothing
  blocks or prints; every figure becomes a PNG in ``$DIVEKIT_FIGURES`` (default ``./figures``),
  numbered in order (``fig-001-plot.png``, ``fig-002-animator.png``, ``fig-003.png`` for a figure
  drawn with ``d2l.plt`` directly). A figure keeps its one file: when it changes it is written
  again under the same name (atomically), never under a second one. Figures are written when a
  compat picture is made (``plot``, ``show_images``, ...), when the next one starts (which also
  closes the earlier ones, as a notebook cell would), on ``save_figures()`` and at exit.
  ``Animator.add`` writes its PNG at most every ~5 s of wall time (the first time ~5 s after its
  first point, then ~5 s after the last write), and always when a point reaches the last x of
  ``xlim``; ``save_figures()`` and the exit write whatever is newer than the file, so the final
  PNG shows every point while a training loop spends almost no time drawing (a write costs
  ~0.1 s).

The backend: when neither ``MPLBACKEND`` nor ``matplotlib.use`` chose one, pyplot is not yet
imported, no kernel runs and there is no display, Agg is selected before pyplot is imported.

Differences from the book:

- outside a notebook the book's ``Animator`` prints ``<Figure size 350x250 with 1 Axes>`` and
  clear-screen codes at every ``add``; here it writes a PNG instead, quietly.
- ``plot`` and ``Animator`` cycle through ``fmts``; the book drops every curve after the 4th.
- ``Animator(nrows=2, ncols=2)`` draws on the first axes (the book fails on ``axes[0].cla()``);
  ``show_images(imgs, 1, 1)`` works (the book fails on ``axes.flatten()``).
- tensors on any device, with or without gradients, are accepted wherever the book takes an
  array (``plot``, ``Animator.add``, ``show_images``, ``show_heatmaps``, ``show_bboxes``);
  ``show_images`` also takes ``(C, H, W)`` tensors and ``show_heatmaps`` NumPy arrays.
- ``set_axes`` turns the grid on (the book's ``axes.grid()`` toggles it, which is the same in
  every book call since each follows a cleared axes).
"""

from __future__ import annotations

import atexit
import itertools
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

__all__ = ["use_svg_display", "set_figsize", "set_axes", "plot", "Animator", "show_images",
           "show_heatmaps", "bbox_to_rect", "show_bboxes", "show_list_len_pair_hist", "plt",
           "save_figures"]

_NOTEBOOK_BACKENDS = ("inline", "ipympl", "widget", "nbagg")


# ---------------------------------------------------------------------- where pictures go
def _in_kernel() -> bool:
    """Whether an IPython kernel (Jupyter, VS Code, ...) runs this code."""
    ipython = sys.modules.get("IPython")  # a kernel has imported it; never import it here
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - a broken IPython is no kernel
        return False
    if shell is None:
        return False
    return type(shell).__name__ == "ZMQInteractiveShell" or "IPKernelApp" in getattr(
        shell, "config", {})


def _has_display() -> bool:
    if sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd", "sunos")):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True  # macOS and Windows have a window system


def _backend_chosen() -> bool:
    """Whether a backend was chosen (``matplotlib.use``, matplotlibrc), without resolving it."""
    try:
        return matplotlib.rcParams._get_backend_or_none() is not None
    except AttributeError:  # an older or newer Matplotlib: ask the raw dict
        from matplotlib import rcsetup

        raw = dict.__getitem__(matplotlib.rcParams, "backend")
        return raw is not getattr(rcsetup, "_auto_backend_sentinel", None)


def _choose_backend() -> None:
    if os.environ.get("MPLBACKEND") or "matplotlib.pyplot" in sys.modules:
        return  # the user's explicit choice, or pyplot already runs with one
    if _backend_chosen() or _in_kernel() or _has_display():
        return
    matplotlib.use("Agg")


_choose_backend()
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
from matplotlib._pylab_helpers import Gcf  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _notebook() -> bool:
    """Whether figures show in a notebook (an IPython kernel with an inline/widget backend)."""
    if not _in_kernel():
        return False
    backend = str(matplotlib.get_backend()).lower()
    return any(name in backend for name in _NOTEBOOK_BACKENDS)


# ------------------------------------------------------------------------ the PNG files
_MIN_INTERVAL = 5.0  # seconds between two writes of a live (Animator) figure
_clock = time.monotonic
# plt.show() without a screen has nothing to show: the figures become PNG files instead
warnings.filterwarnings("ignore", category=UserWarning,
                        message=r"FigureCanvas\w* is non-interactive, and thus cannot be shown")


class _Tracked:
    """What divekit knows of a figure: its kind, its file once written, whether it changed."""

    __slots__ = ("kind", "path", "dirty", "saved_at", "cost")

    def __init__(self, kind: str | None) -> None:
        self.kind = kind
        self.path: Path | None = None
        self.dirty = True
        self.saved_at: float | None = None
        self.cost = 0.0


_TRACKED: weakref.WeakKeyDictionary[Figure, _Tracked] = weakref.WeakKeyDictionary()
_COUNTERS: dict[Path, int] = {}


def _track(fig: Figure, kind: str | None = None) -> _Tracked:
    """The figure's record; Matplotlib's stale signal marks it changed from now on."""
    tracked = _TRACKED.get(fig)
    if tracked is None:
        tracked = _TRACKED[fig] = _Tracked(kind)
        inner = fig.stale_callback

        def on_stale(artist: Any, stale: bool, _t: _Tracked = tracked,
                     _inner: Callable | None = inner) -> None:
            if stale:
                _t.dirty = True
            if _inner is not None:
                _inner(artist, stale)

        fig.stale_callback = on_stale
    elif kind is not None and tracked.kind is None and tracked.path is None:
        tracked.kind = kind
    return tracked


def _figures_dir() -> Path:
    return Path(os.environ.get("DIVEKIT_FIGURES") or "figures").resolve()


def _allot(kind: str | None) -> Path:
    folder = _figures_dir()
    n = _COUNTERS.get(folder, 0) + 1
    _COUNTERS[folder] = n
    return folder / (f"fig-{n:03d}" + (f"-{kind}" if kind else "") + ".png")


def _save(fig: Figure, tracked: _Tracked) -> Path:
    """Write the figure to its file (named on the first write), atomically."""
    from divekit.errors import DivekitError
    from divekit.viz import save_figure

    fresh = tracked.path is None
    if fresh:
        tracked.path = _allot(tracked.kind)
    start = _clock()
    try:
        save_figure(fig, tracked.path)
    except OSError as e:
        path = tracked.path
        if fresh:  # never written: it has no file of its own yet
            tracked.path = None
        raise DivekitError(f"cannot write the figure {path}: {e.strerror or e} "
                           "(set DIVEKIT_FIGURES to a writable folder)") from e
    tracked.dirty = False  # drawing marks the figure stale; what is on disk is current now
    tracked.saved_at = _clock()
    tracked.cost = tracked.saved_at - start
    return tracked.path


def _is_empty(fig: Figure) -> bool:
    return not fig.axes and len(fig.get_children()) <= 1  # only the background patch


def save_figures(close: bool | None = None) -> list[Path]:
    """Write every open figure that has no PNG yet or changed since its last one, plus changed
    figures already closed (an Animator's); return the files written.

    ``close`` (default: outside a notebook) then closes the open figures, as a notebook does at
    the end of a cell, so that the next ``d2l.plt`` call starts a new figure.
    """
    if close is None:
        close = not _notebook()
    managers = sorted(Gcf.get_all_fig_managers(), key=lambda m: m.num)
    open_figs = [m.canvas.figure for m in managers]
    seen = {id(f) for f in open_figs}
    closed = [f for f, t in list(_TRACKED.items())
              if id(f) not in seen and t.path is not None and t.dirty]
    written = []
    for fig in open_figs + closed:
        tracked = _track(fig)
        if tracked.path is None and _is_empty(fig):
            continue
        if tracked.path is None or tracked.dirty:
            written.append(_save(fig, tracked))
    if close:
        for fig in open_figs:
            plt.close(fig)
    return written


def _at_exit() -> None:
    if _notebook():
        return
    try:
        save_figures(close=False)
    except Exception as e:  # noqa: BLE001 - the one line a failing exit gets
        sys.stderr.write(f"divekit: figures not saved: {e}\n")


atexit.register(_at_exit)


def _new_figure(kind: str, nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Figure, Any]:
    """``plt.subplots``; outside a notebook the earlier figures are written and closed first."""
    notebook = _notebook()
    if not notebook:
        save_figures(close=True)
    fig, axes = plt.subplots(nrows, ncols, **kw)
    if not notebook:
        _track(fig, kind)
    return fig, axes


def _finished(fig: Figure) -> None:
    """A compat picture is drawn: outside a notebook it is written now."""
    if not _notebook():
        _save(fig, _track(fig))


def _array(x: Any) -> Any:
    """A tensor as a NumPy array (any device, gradients or not); anything else unchanged."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return x


def _scalar(v: Any) -> Any:
    if hasattr(v, "detach") and hasattr(v, "numel") and v.numel() == 1:
        return float(v.detach().cpu().item())
    return v


# --------------------------------------------------------------------------- the book's
def use_svg_display() -> None:
    """Show the notebook's figures as SVG (a no-op outside a notebook: PNG files are written)."""
    if _notebook():
        try:
            from matplotlib_inline import backend_inline
        except ImportError:  # a widget backend without the inline one: nothing to switch
            return
        backend_inline.set_matplotlib_formats("svg")


def _rc_figsize(figsize: Sequence[float]) -> None:
    plt.rcParams["figure.figsize"] = figsize


def set_figsize(figsize=(3.5, 2.5)):
    """The size of the next figures; outside a notebook the open figures are written and closed
    first, so that the ``d2l.plt`` drawing which follows gets a figure of its own."""
    use_svg_display()
    if not _notebook():
        save_figures(close=True)
    _rc_figsize(figsize)


def set_axes(axes, xlabel, ylabel, xlim, ylim, xscale, yscale, legend):
    """Labels, scales, limits, legend (when given) and grid of one Matplotlib axes."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_xscale(xscale)
    axes.set_yscale(yscale)
    axes.set_xlim(xlim)
    axes.set_ylim(ylim)
    if legend:
        axes.legend(legend)
    axes.grid(True)


def _one_axis(x: Any) -> bool:
    """A single series: a 1-D array/tensor or a list of numbers (0-d tensors included)."""
    if hasattr(x, "ndim"):
        return x.ndim == 1
    return isinstance(x, list) and (
        not x or not hasattr(x[0], "__len__") or getattr(x[0], "ndim", None) == 0)


def _one_series(x: Any) -> Any:
    return [_scalar(v) for v in x] if isinstance(x, list) else _array(x)


def _series(x: Any) -> list[Any]:
    return [_one_series(x)] if _one_axis(x) else [_one_series(s) for s in x]


def plot(X, Y=None, xlabel=None, ylabel=None, legend=None, xlim=None, ylim=None,
         xscale='linear', yscale='linear', fmts=('-', 'm--', 'g-.', 'r:'), figsize=(3.5, 2.5),
         axes=None):
    """Curves: ``plot(y)``, ``plot(x, y)``, ``plot(x, [y1, y2])``, ``plot([x1, x2], [y1, y2])``;
    on ``axes`` when given, else on a new figure of ``figsize``."""
    made = None
    if _notebook():
        set_figsize(figsize)
        axes = axes if axes else plt.gca()
    else:
        _rc_figsize(figsize)
        if not axes:
            made, axes = _new_figure("plot", figsize=figsize)
    xs = _series(X)
    if Y is None:
        xs, ys = [[] for _ in xs], xs
    else:
        ys = _series(Y)
    if len(xs) != len(ys):
        xs = xs * len(ys)
    axes.cla()
    for x, y, fmt in zip(xs, ys, itertools.cycle(fmts)):
        if len(x):
            axes.plot(x, y, fmt)
        else:
            axes.plot(y, fmt)
    set_axes(axes, xlabel, ylabel, xlim, ylim, xscale, yscale, legend or [])
    if made is not None:
        _finished(made)


class Animator:
    """Curves that grow point by point during training (``add(x, y)``), redrawn live in a
    notebook and written to a PNG elsewhere."""

    def __init__(self, xlabel=None, ylabel=None, legend=None, xlim=None, ylim=None,
                 xscale='linear', yscale='linear', fmts=('-', 'm--', 'g-.', 'r:'), nrows=1,
                 ncols=1, figsize=(3.5, 2.5)):
        legend = [] if legend is None else legend
        use_svg_display()
        self.fig, self.axes = _new_figure("animator", nrows, ncols, figsize=figsize)
        if nrows * ncols == 1:
            self.axes = [self.axes]
        first = self.axes[0] if nrows * ncols == 1 else np.ravel(self.axes)[0]
        self._ax = first
        self._xlim, self._ylim = xlim, ylim
        self.config_axes = lambda: set_axes(first, xlabel, ylabel, xlim, ylim, xscale, yscale,
                                            legend)
        self._default_config = self.config_axes
        self.X: list[list[Any]] | None = None
        self.Y: list[list[Any]] | None = None
        self.fmts = fmts
        self._lines: list[Any] = []
        self._since: float | None = None  # the first point's time: the first write waits

    def add(self, x, y):
        """Append one point per curve (``None`` skips a curve) and redraw."""
        if not hasattr(y, "__len__"):
            y = [y]
        n = len(y)
        if not hasattr(x, "__len__"):
            x = [x] * n
        if not self.X:
            self.X = [[] for _ in range(n)]
        if not self.Y:
            self.Y = [[] for _ in range(n)]
        for i, (a, b) in enumerate(zip(x, y)):
            if a is not None and b is not None:
                self.X[i].append(_scalar(a))
                self.Y[i].append(_scalar(b))
        self._draw()
        if _notebook():
            from IPython import display

            display.display(self.fig)
            display.clear_output(wait=True)
        else:
            self._maybe_save(x)

    def _draw(self) -> None:
        ax = self._ax
        series = list(zip(self.X or [], self.Y or []))
        ax_lines = list(ax.lines)
        incremental = (self.config_axes is self._default_config and self._lines
                       and len(self._lines) == len(series)
                       and all(line in ax_lines for line in self._lines))
        if incremental:  # same picture as the full redraw, without clearing the axes
            for line, (xs, ys) in zip(self._lines, series):
                line.set_data(xs, ys)
            ax.relim()
            if self._xlim is None:
                ax.set_autoscalex_on(True)
            if self._ylim is None:
                ax.set_autoscaley_on(True)
            ax.autoscale_view()
            return
        ax.cla()
        self._lines = [ax.plot(xs, ys, fmt)[0]
                       for (xs, ys), fmt in zip(series, itertools.cycle(self.fmts))]
        self.config_axes()

    def _maybe_save(self, x: Sequence[Any]) -> None:
        tracked = _track(self.fig)
        end = self._xlim[1] if self._xlim is not None and len(self._xlim) == 2 else None
        last = end is not None and any(a is not None and _scalar(a) >= end for a in x)
        now = _clock()
        if self._since is None:
            self._since = now
        since = self._since if tracked.saved_at is None else tracked.saved_at
        due = now - since >= max(_MIN_INTERVAL, 5 * tracked.cost)
        if last or due:
            _save(self.fig, tracked)


def _image(img: Any) -> Any:
    """What ``imshow`` takes: PIL images and arrays as they are, tensors as ``(H, W[, C])``."""
    if not (hasattr(img, "detach") and hasattr(img, "cpu")):
        return img
    arr = img.detach().cpu()
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr.numpy()


def show_images(imgs, num_rows, num_cols, titles=None, scale=1.5):
    """A grid of images (tensors ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``, PIL images, NumPy
    arrays) without ticks; returns the flat array of axes (to draw boxes on)."""
    fig, axes = _new_figure("images", num_rows, num_cols,
                            figsize=(num_cols * scale, num_rows * scale), squeeze=False)
    axes = axes.flatten()
    for i, (ax, img) in enumerate(zip(axes, imgs)):
        ax.imshow(_image(img))
        ax.axes.get_xaxis().set_visible(False)
        ax.axes.get_yaxis().set_visible(False)
        if titles and i < len(titles):
            ax.set_title(titles[i])
    _finished(fig)
    return axes


def show_heatmaps(matrices, xlabel, ylabel, titles=None, figsize=(2.5, 2.5), cmap='Reds'):
    """Heat maps of ``matrices`` (rows, cols, queries, keys), one colour bar; ``titles`` name
    the columns."""
    use_svg_display()
    matrices = _array(matrices)
    num_rows, num_cols = matrices.shape[0], matrices.shape[1]
    fig, axes = _new_figure("heatmaps", num_rows, num_cols, figsize=figsize, sharex=True,
                            sharey=True, squeeze=False)
    image = None
    for i in range(num_rows):
        for j in range(num_cols):
            ax = axes[i, j]
            image = ax.imshow(np.asarray(matrices[i][j]), cmap=cmap)
            if i == num_rows - 1:
                ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel(ylabel)
            if titles:
                ax.set_title(titles[j])
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6)
    _finished(fig)


def bbox_to_rect(bbox, color):
    """A corner box ``(x1, y1, x2, y2)`` as an unfilled Matplotlib rectangle."""
    x1, y1, x2, y2 = (float(v) for v in _array(bbox)[:4])
    return plt.Rectangle(xy=(x1, y1), width=x2 - x1, height=y2 - y1, fill=False,
                         edgecolor=color, linewidth=2)


def _as_list(obj: Any, default: list[Any] | None = None) -> list[Any] | None:
    if obj is None:
        return default
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def show_bboxes(axes, bboxes, labels=None, colors=None):
    """Draw corner boxes (and their labels) on ``axes``, colours cycling through ``colors``."""
    labels = _as_list(labels)
    colors = _as_list(colors, ['b', 'g', 'r', 'm', 'c'])
    for i, bbox in enumerate(bboxes):
        color = colors[i % len(colors)]
        rect = bbox_to_rect(bbox, color)
        axes.add_patch(rect)
        if labels and len(labels) > i:
            axes.text(rect.xy[0], rect.xy[1], labels[i], va='center', ha='center', fontsize=9,
                      color='k' if color == 'w' else 'w', bbox={'facecolor': color, 'lw': 0})


def show_list_len_pair_hist(legend, xlabel, ylabel, xlist, ylist):
    """Histogram of the lengths of two lists of sequences (source and target), side by side."""
    use_svg_display()
    if _notebook():
        _rc_figsize((3.5, 2.5))
        fig, ax = None, plt.gca()
    else:
        _rc_figsize((3.5, 2.5))
        fig, ax = _new_figure("hist")
    _, _, patches = ax.hist([[len(seq) for seq in xlist], [len(seq) for seq in ylist]])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for patch in patches[1].patches:
        patch.set_hatch('/')
    ax.legend(legend)
    if fig is not None:
        _finished(fig)
