"""The book's data: ``DATA_HUB`` and downloads (offline first), and the vision data sets.

Finding files. ``download(name)`` takes the file name from the last part of ``DATA_HUB[name]``'s
URL and looks for it in ``cache_dir`` (the book's ``../data``), then in ``$DIVEKIT_DATA``, then
in divekit's cache (``divekit.hub.data_home()``, ``~/.cache/divekit``), checks its SHA-1
against ``DATA_HUB`` and returns its path. ``download_extract`` does the same for an archive and
also accepts its extracted folder on its own (``fra-eng/`` without ``fra-eng.zip``).

The network. Nothing is fetched unless ``DIVEKIT_DOWNLOAD=1`` is set; then a missing file is
downloaded (hash-checked, through :func:`divekit.hub.download`) into divekit's cache, or
into ``cache_dir`` when a caller names one other than ``../data``. Without it a missing file is
one :class:`~divekit.errors.DataNotFoundError` line naming the file, its SHA-1, the folders
searched and the URL; a file with the wrong SHA-1 is one line too.

Substitutes. Where the book's data is not here, the nearest data that is stands in, with one
note on stderr per data set and process (``d2l: ... not found ...; using ... instead``):
Fashion-MNIST → MNIST (same format) → scikit-learn's digits upscaled to 28×28;
``banana-detection`` → divekit's generated shapes written in the banana format (256×256, one
box per image); ``voc2012`` → divekit's generated segmentation scenes written as a
``VOCdevkit/VOC2012`` folder (JPEGs, palette PNG labels, split lists), so the section's own
code reads it unchanged; ``hotdog`` → generated scenes in two ``ImageFolder`` classes (a disc
is a "hotdog"); ``cifar10_tiny`` → the 1,000-image Kaggle CIFAR-10 sample when it is found.
Quick mode (``DIVEKIT_BOOK_QUICK=1``) writes smaller stand-ins (enough for the sections'
batches). Stand-ins are written once into ``~/.cache/divekit/d2l-substitutes/`` (never into a
``$DIVEKIT_DATA`` folder of real data unless nothing else can be written).
``DIVEKIT_BOOK_STRICT=1`` turns every substitute into the one-line not-found error.

Helpers for the other modules (private, import them by name): :func:`_search_roots`,
:func:`_find_file`, :func:`_find_folder`, :func:`_not_found`, :func:`_note`, :func:`_strict`,
:func:`_download_enabled`, :func:`_register_substitute`.

Differences from the book:

- ``download``/``download_extract`` never touch the network unless ``DIVEKIT_DOWNLOAD=1``; a
  missing or damaged file is a one-line error instead of a traceback from a dead address.
  Downloads land in divekit's cache (the book writes into ``../data`` of the working folder).
  WikiText-2's dead S3 address is fetched from its current mirror (same SHA-1).
- ``download_extract`` unpacks once (the book unpacks on every call), into a temporary folder
  moved into place (an interrupted unpack never looks complete), refusing members that would
  land outside the folder; a ``.tar.gz`` archive's folder is its name without ``.tar.gz``.
- ``download_all`` tries every entry and raises one line naming all that are missing.
- ``load_data_fashion_mnist(resize=...)`` resizes each batch (bilinear, antialiased, as PIL's
  ``Resize``) instead of each PIL image.
- ``load_data_fashion_mnist`` keeps the images as tensors and gathers each batch with one
  indexing (its loaders' ``batch_size`` attribute is None; the batches are the same), with
  no worker processes unless it resizes. ``load_array`` gathers its batches alike.
- ``read_data_bananas`` reads through divekit's banana reader (the book needs pandas).
- ``voc_colormap2label()`` returns a small lookup object instead of a 256³ int64 table
  (128 MiB); ``voc_label_indices`` gives the same classes with it (VOC's border colour is class
  0, as in the book), and a colour that is neither a class colour nor the border is a one-line
  error instead of silently class 0. A real tensor table is indexed as the book does.
- ``VOCSegDataset`` keeps images as uint8 and normalises each crop (the book keeps every image
  as normalised float32, four times the memory) and maps label colours to classes once; the
  items are the same (the crops consume the random stream as the book's).
- ``read_csv_labels`` skips blank lines (the book fails on a trailing empty line).
- ``reorg_train_valid`` walks the training files in sorted order (the book's ``os.listdir``
  order differs between machines, and with it the validation split), and sizes the per-class
  validation share by the files present rather than by every row of the CSV.
"""

from __future__ import annotations

import collections
import csv
import functools
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils import data

from divekit import hub
from divekit.compat.d2l._util import BoundedLoader, get_dataloader_workers, quick
from divekit.errors import DataNotFoundError, DivekitError, UnknownNameError

__all__ = [
    "DATA_HUB", "DATA_URL", "download", "download_extract", "download_all",
    "load_array", "get_fashion_mnist_labels", "load_data_fashion_mnist",
    "read_data_bananas", "BananasDataset", "load_data_bananas",
    "read_voc_images", "VOC_COLORMAP", "VOC_CLASSES", "voc_colormap2label", "voc_label_indices",
    "voc_rand_crop", "VOCSegDataset", "load_data_voc",
    "read_csv_labels", "copyfile", "reorg_train_valid", "reorg_test",
]

DATA_URL = hub.DATA_URL

# The book's files that divekit's own hub serves too: their (url, sha1) live there, once.
_IN_DIVEKIT_HUB = ("kaggle_house_train", "kaggle_house_test", "time_machine", "fra-eng", "airfoil",
                   "hotdog", "banana-detection", "voc2012")

DATA_HUB: dict[str, tuple[str, str]] = {
    **{name: hub.DATA_HUB[name] for name in _IN_DIVEKIT_HUB},
    "cifar10_tiny": (DATA_URL + "kaggle_cifar10_tiny.zip",
                     "2068874e4b9a9f0fb07ebe0ad2b29754449ccacd"),
    "dog_tiny": (DATA_URL + "kaggle_dog_tiny.zip", "0cb91d09b814ecdc07b50f31f8dcad3e81d6a86d"),
    "ptb": hub.DATA_HUB["ptb"],
    "glove.6b.50d": (DATA_URL + "glove.6B.50d.zip", "0b8703943ccdb6eb788e6f091b8946e82231bc4d"),
    "glove.6b.100d": (DATA_URL + "glove.6B.100d.zip", "cd43bfb07e44e6f27cbcc7bc9ae3d80284fdaf5a"),
    "glove.42b.300d": (DATA_URL + "glove.42B.300d.zip",
                       "b5116e234e9eb9076672cfeabf5469f3eec904fa"),
    "wiki.en": (DATA_URL + "wiki.en.zip", "c1816da3821ae9f43899be655002f6c723e91b88"),
    # the book's address (gone; _MIRRORS fetches the same zip from divekit's), divekit's sha1
    "wikitext-2": ("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
                   hub.DATA_HUB["wikitext-2"][1]),
    "aclImdb": ("http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
                "01ada507287d82875905620988597833ad4e0903"),
    "SNLI": ("https://nlp.stanford.edu/projects/snli/snli_1.0.zip",
             "9fcde07509c7e87ec61c640c1b2753d9041758e4"),
}

# Book addresses that are gone, and where the same bytes (same SHA-1) live now.
_MIRRORS = {
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip":
        hub.DATA_HUB["wikitext-2"][0],
}
# Where divekit's own loaders keep a hub download inside its cache (data_home()/<folder>).
_DIVEKIT_SUBDIRS = {"banana-detection": "banana", "voc2012": "voc2012", "wikitext-2": "wikitext-2"}
_BOOK_CACHE_DIR = os.path.join("..", "data")


# ------------------------------------------------------------------------------ environment
def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def _download_enabled() -> bool:
    """Whether ``DIVEKIT_DOWNLOAD=1`` allows fetching missing files from the network."""
    return _flag("DIVEKIT_DOWNLOAD")


def _strict() -> bool:
    """Whether ``DIVEKIT_BOOK_STRICT=1`` refuses substitutes for missing data."""
    return _flag("DIVEKIT_BOOK_STRICT")


_NOTED: set[str] = set()


def _note(key: str, message: str) -> None:
    """Print ``d2l: message`` to stderr, once per ``key`` and process."""
    if key not in _NOTED:
        _NOTED.add(key)
        print(f"d2l: {message}", file=sys.stderr, flush=True)


def _default_cache() -> Path:
    return Path.home() / ".cache" / "divekit"


def _search_roots(cache_dir: str | os.PathLike[str] | None = _BOOK_CACHE_DIR,
                  name: str | None = None) -> list[tuple[Path, str]]:
    """The folders searched for the book's files, nearest first, as ``(path, label)``:
    ``cache_dir`` (the book's ``../data``), ``$DIVEKIT_DATA``, divekit's cache; for a hub name
    that divekit's own loaders keep in a subfolder of the cache, that subfolder too."""
    roots: list[tuple[Path, str]] = []
    if cache_dir is not None:
        label = str(cache_dir)
        if not os.path.isabs(cache_dir):
            label += f" ({os.path.abspath(cache_dir)})"
        roots.append((Path(cache_dir), label))
    env = os.environ.get("DIVEKIT_DATA")
    if env:
        roots.append((Path(env).expanduser(), f"$DIVEKIT_DATA ({env})"))
    roots.append((_default_cache(), "~/.cache/divekit"))
    if name in _DIVEKIT_SUBDIRS:
        roots.append((hub.data_home() / _DIVEKIT_SUBDIRS[name],
                      f"{hub.data_home() / _DIVEKIT_SUBDIRS[name]}"))
    seen: set[str] = set()
    unique = []
    for path, label in roots:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            unique.append((path, label))
    return unique


def _where(roots: Sequence[tuple[Path, str]]) -> str:
    labels = [label for _, label in roots]
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} or {labels[-1]}"


def _writable_home(generated: bool = False) -> Path:
    """divekit's cache (``data_home()``), or the first fallback that can be written.

    ``generated`` stand-ins go to ``~/.cache/divekit`` first: ``$DIVEKIT_DATA`` may be a
    shared folder of real data sets, which generated files should not be mixed into."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    first = (_default_cache(), hub.data_home()) if generated else (hub.data_home(), _default_cache())
    for folder in (*first, Path(tempfile.gettempdir()) / f"divekit-{uid}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise DivekitError(f"no writable folder for data: {hub.data_home()} cannot be created or written")


# ------------------------------------------------------------------------------ hashes
_DIGESTS: dict[tuple[str, int, int, str], str] = {}


def _digest(path: Path, algorithm: str) -> str:
    """A file's digest, computed once per (file, size, mtime) and process."""
    st = path.stat()
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, algorithm)
    if key not in _DIGESTS:
        _DIGESTS[key] = hub.file_digest(path, algorithm)
    return _DIGESTS[key]


def _hash_ok(path: Path, spec: str | None) -> bool:
    if not spec:
        return True
    algorithm, expected = hub.parse_hash(spec)
    return hub.digest_matches(_digest(path, algorithm), expected)


# ------------------------------------------------------------------------------ the hub
def _entry(name: str) -> tuple[str, str, str]:
    """(url, hash spec, file name) of a ``DATA_HUB`` name."""
    if name not in DATA_HUB:
        raise UnknownNameError("DATA_HUB entry", name, DATA_HUB)
    url, spec = DATA_HUB[name]
    return url, spec, url.split("?", 1)[0].rstrip("/").split("/")[-1]


def _stem(fname: str) -> str:
    for ext in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"):
        if fname.endswith(ext):
            return fname[: -len(ext)]
    return os.path.splitext(fname)[0]


@dataclass
class _Found:
    path: Path | None  # a file whose hash matches
    bad: Path | None  # the first file of the right name whose hash does not


def _find_file(name: str, cache_dir: str | os.PathLike[str] | None = _BOOK_CACHE_DIR) -> Path | None:
    """The verified file of ``DATA_HUB[name]`` in the search folders, or None (no network)."""
    return _search_file(name, cache_dir).path


def _search_file(name: str, cache_dir: str | os.PathLike[str] | None) -> _Found:
    _, spec, fname = _entry(name)
    bad = None
    for root, _ in _search_roots(cache_dir, name):
        path = root / fname
        if path.is_file():
            if _hash_ok(path, spec):
                return _Found(path, bad)
            bad = bad or path
    return _Found(None, bad)


def _find_folder(relpath: str | os.PathLike[str], name: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = _BOOK_CACHE_DIR) -> Path | None:
    """The first search folder's ``relpath`` that is a directory (an extracted archive), or None."""
    for root, _ in _search_roots(cache_dir, name):
        if (root / relpath).is_dir():
            return root / relpath
    return None


def _not_found(name: str, cache_dir: str | os.PathLike[str] | None = _BOOK_CACHE_DIR, *,
               folder: str | None = None, bad: Path | None = None) -> DivekitError:
    """The one-line error for a hub file that is missing (or only there with a wrong hash)."""
    url, spec, fname = _entry(name)
    roots = _search_roots(cache_dir, name)
    fetch = f"set DIVEKIT_DOWNLOAD=1 to fetch it from {_MIRRORS.get(url, url)}"
    if bad is not None:
        algorithm, expected = hub.parse_hash(spec)
        return DivekitError(
            f"{fname} at {bad} has {algorithm} {_digest(bad, algorithm)}, expected {expected} "
            f"(DATA_HUB[{name!r}]): a damaged or different file; replace it with a good copy, "
            f"or {fetch}")
    also = f" (or its extracted folder {folder}/)" if folder else ""
    hashed = f" ({hub.parse_hash(spec)[0]} {hub.parse_hash(spec)[1]})" if spec else ""
    return DataNotFoundError(
        f"{fname}{hashed} not found in {_where(roots)}; put the file{also} there, or {fetch}")


def _fetch(name: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Download ``DATA_HUB[name]`` (``DIVEKIT_DOWNLOAD=1`` only) into divekit's cache, or into
    ``cache_dir`` when the caller named one other than the book's ``../data``."""
    url, spec, fname = _entry(name)
    default = cache_dir is None or os.path.normpath(cache_dir) == os.path.normpath(_BOOK_CACHE_DIR)
    target = _writable_home() if default else Path(cache_dir)  # type: ignore[arg-type]
    source = _MIRRORS.get(url, url)
    print(f"Downloading {fname} from {source}...")
    return hub.download(source, target, sha1=spec or None, filename=fname)


def download(name: str, cache_dir: str = os.path.join("..", "data")) -> str:
    """The path of ``DATA_HUB[name]``'s file, found offline (see the module doc); fetched only
    with ``DIVEKIT_DOWNLOAD=1``."""
    found = _search_file(name, cache_dir)
    if found.path is not None:
        return str(found.path)
    if _download_enabled():
        return str(_fetch(name, cache_dir))
    raise _not_found(name, cache_dir, bad=found.bad)


def download_extract(name: str, folder: str | None = None) -> str:
    """The folder of ``DATA_HUB[name]``'s archive unpacked beside it: ``base/folder`` or
    ``base/<archive name without extension>``; an extracted folder is used as it is."""
    url, spec, fname = _entry(name)
    target = folder or _stem(fname)
    if not fname.endswith((".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz")):
        raise DivekitError(f"download_extract({name!r}): {fname} is not a zip or tar archive; "
                           f"use download({name!r})")
    bad = None
    for root, _ in _search_roots(_BOOK_CACHE_DIR, name):
        if (root / target).is_dir() and _usable(name, root / target):
            return str(root / target)
        archive = root / fname
        if archive.is_file():
            if _hash_ok(archive, spec):
                return str(_extract_once(archive, target))
            bad = bad or archive
    if _download_enabled():
        return str(_extract_once(_fetch(name, None), target))
    if bad is None and name in _SUBSTITUTES and not _strict():
        base = _substitute(name)
        if base is not None:
            return str(base / target)
    raise _not_found(name, folder=target, bad=bad)


def _extract_once(archive: Path, target: str) -> Path:
    """Unpack ``archive`` beside itself unless done before; ``base/target``.

    A folder that cannot be written to gets the unpacked files in divekit's cache instead."""
    base = archive.parent
    if (base / target).is_dir():
        return base / target
    if not os.access(base, os.W_OK):
        base = _writable_home()
        if (base / target).is_dir():
            return base / target
    marker = base / f".{archive.name}.extracted"
    stamp = _digest(archive, "sha1")
    if marker.is_file() and marker.read_text().strip() == stamp:
        return base / target
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".extracting", dir=base))
    try:
        hub.extract(archive, tmp)
        _merge(tmp, base)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marker.write_text(stamp + "\n")
    return base / target


def _merge(src: Path, dst: Path) -> None:
    """Move ``src``'s entries into ``dst``; entries already there are kept (folders merged)."""
    for entry in sorted(src.iterdir()):
        into = dst / entry.name
        if not into.exists():
            os.replace(entry, into)
        elif entry.is_dir() and into.is_dir():
            _merge(entry, into)


def download_all() -> None:
    """Make every ``DATA_HUB`` file available; one error line names all that are missing."""
    missing = []
    for name in list(DATA_HUB):
        try:
            download(name)
        except DataNotFoundError:
            missing.append(_entry(name)[2])
    if missing:
        roots = _search_roots()
        raise DataNotFoundError(
            f"download_all: {len(missing)} of {len(DATA_HUB)} files not found in {_where(roots)}: "
            f"{', '.join(missing)}; put them there, or set DIVEKIT_DOWNLOAD=1 to fetch them")


# ------------------------------------------------------------------------------ substitutes
@dataclass
class _Substitute:
    build: Callable[[Path, Any], None]  # writes the stand-in into an empty folder
    describe: Callable[[Path, Any], str]  # "a generated ... from <path>" for the note
    source: Callable[[], Any] = lambda: True  # what the stand-in is made from, None: unavailable
    version: Callable[[], str] = lambda: "1"  # a different version rebuilds the stand-in
    complete: Callable[[Path], bool] = lambda folder: True  # an extracted folder the book can use


def _usable(name: str, folder: Path) -> bool:
    """Whether an extracted ``folder`` of ``name`` holds what the book reads from it (a partial
    copy, such as WikiText-2 without its train split, is passed over for the stand-in)."""
    sub = _SUBSTITUTES.get(name)
    return sub is None or _strict() or sub.complete(folder)


_SUBSTITUTES: dict[str, _Substitute] = {}


def _register_substitute(name: str, build: Callable[[Path, Any], None],
                         describe: Callable[[Path, Any], str], *,
                         source: Callable[[], Any] | None = None,
                         version: Callable[[], str] | None = None,
                         complete: Callable[[Path], bool] | None = None) -> None:
    """Let ``download_extract(name)`` fall back to a stand-in folder that ``build(dest, src)``
    writes once (in the archive's extracted layout) into divekit's cache; ``source()`` finds
    what it is made from (None when nothing is), ``describe(base, src)`` names it in the note;
    ``complete(folder)`` tells an extracted folder the book can read from a partial one."""
    _SUBSTITUTES[name] = _Substitute(build, describe, source or (lambda: True),
                                     version or (lambda: "1"), complete or (lambda folder: True))


def _substitute(name: str) -> Path | None:
    """The stand-in folder for ``name`` (built on first use), with its note; None when its
    source data is not here either."""
    sub = _SUBSTITUTES[name]
    src = sub.source()
    if src is None:
        return None
    base = _writable_home(generated=True) / "d2l-substitutes" / name
    stamp = f"{sub.version()}\n"
    marker = base / ".complete"
    if not (marker.is_file() and marker.read_text() == stamp):
        base.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".building", dir=base.parent))
        try:
            sub.build(tmp, src)
            (tmp / ".complete").write_text(stamp)
            shutil.rmtree(base, ignore_errors=True)
            try:
                os.replace(tmp, base)
            except OSError:  # another process put its copy there first
                if not (marker.is_file() and marker.read_text() == stamp):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    url, spec, fname = _entry(name)
    _note(f"substitute:{name}", f"{fname} (sha1 {spec}) not found in {_where(_search_roots(name=name))}; "
          f"using {sub.describe(base, src)} instead (numbers differ from the book's; "
          f"DIVEKIT_DOWNLOAD=1 fetches the real data, DIVEKIT_BOOK_STRICT=1 refuses stand-ins)")
    return base


def _save_jpeg(image: Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path, quality=95)


# Sizes (train, val) of the generated stand-ins; quick mode (``divekit book run --quick``)
# writes the smaller ones, enough for the sections' batches of 32 and 64.
_BANANA_SIZES = {False: (1000, 100), True: (128, 32)}  # the book's: 1000 and 100 images
_VOC_SIZES = {False: (256, 64), True: (64, 32)}  # images of 384×512 (the book's crop: 320×480)
_CHUNK = 64  # images generated at a time (bounds memory)


_HOTDOG_SIZES = {False: (600, 300), True: (96, 48)}  # scenes; about a third show a disc


def _hotdog_sizes() -> tuple[int, int]:
    return _HOTDOG_SIZES[quick()]


def _banana_sizes() -> tuple[int, int]:
    return _BANANA_SIZES[quick()]


def _voc_sizes() -> tuple[int, int]:
    return _VOC_SIZES[quick()]


def _build_bananas(dest: Path, _src: Any) -> None:
    """The banana layout: ``banana-detection/bananas_{train,val}/label.csv`` + ``images/``,
    one object per 256×256 image, every object class 0 (as every banana)."""
    from divekit.data.detection import make_shapes

    sizes = _banana_sizes()
    for split, count, seed in (("bananas_train", sizes[0], 7001), ("bananas_val", sizes[1], 7002)):
        folder = dest / "banana-detection" / split
        (folder / "images").mkdir(parents=True)
        rows = []
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            x, y = make_shapes(n, 256, seed=seed * 1000 + start, objects=(1, 1))
            pixels = x.mul(255).round_().to(torch.uint8)
            for i in range(n):
                fname = f"{start + i}.jpg"
                _save_jpeg(pixels[i], folder / "images" / fname)
                box = (y[i, 0, 1:] * 256).round().to(torch.int64).tolist()
                rows.append([fname, 0, *box])
        with open(folder / "label.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["img_name", "label", "xmin", "ymin", "xmax", "ymax"])
            writer.writerows(rows)


def _build_hotdog(dest: Path, _src: Any) -> None:
    """The hotdog layout for ``ImageFolder``: ``hotdog/{train,test}/{hotdog,not-hotdog}/``;
    one object per 160×160 scene: a disc is a "hotdog", a square or triangle is not."""
    from divekit.data.detection import make_shapes

    for split, count, seed in zip(("train", "test"), _hotdog_sizes(), (9001, 9002)):
        for cls in ("hotdog", "not-hotdog"):
            (dest / "hotdog" / split / cls).mkdir(parents=True)
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            x, y = make_shapes(n, 160, seed=seed * 1000 + start, objects=(1, 1))
            pixels = x.mul(255).round_().to(torch.uint8)
            for i in range(n):
                cls = "hotdog" if int(y[i, 0, 0]) == 1 else "not-hotdog"
                _save_jpeg(pixels[i], dest / "hotdog" / split / cls / f"{start + i}.jpg")


def _voc_palette() -> list[int]:
    from divekit.data.segmentation import IGNORE_INDEX, VOC_BORDER
    from divekit.data.segmentation import VOC_COLORMAP as colours

    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(colours)] = colours
    palette[IGNORE_INDEX] = VOC_BORDER
    return palette.reshape(-1).tolist()


def _build_voc(dest: Path, _src: Any) -> None:
    """A ``VOCdevkit/VOC2012`` folder of divekit's segmentation scenes (shapes on photo crops):
    ``JPEGImages/*.jpg``, palette ``SegmentationClass/*.png`` (classes 1-3 are the square, disc
    and triangle, in VOC's colours for aeroplane, bicycle, bird), ``ImageSets/Segmentation``."""
    from PIL import Image

    from divekit.data.segmentation import shapes_seg

    root = dest / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    palette = _voc_palette()
    listing: dict[str, list[str]] = {}
    sizes = _voc_sizes()
    for split, count, seed in (("train", sizes[0], 8001), ("val", sizes[1], 8002)):
        names = listing.setdefault(split, [])
        for start in range(0, count, _CHUNK // 2):
            n = min(_CHUNK // 2, count - start)
            images, labels = shapes_seg(n, 512, seed=seed * 1000 + start)
            images, labels = images[:, :, 64:448], labels[:, 64:448]  # 384×512, as VOC's 375×500
            for i in range(n):
                name = f"shapes_{split}_{start + i:06d}"
                _save_jpeg(images[i], root / "JPEGImages" / f"{name}.jpg")
                png = Image.fromarray(labels[i].numpy(), mode="P")
                png.putpalette(palette)
                png.save(root / "SegmentationClass" / f"{name}.png")
                names.append(name)
    for split, names in listing.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    (root / "ImageSets" / "Segmentation" / "trainval.txt").write_text(
        "\n".join(listing["train"] + listing["val"]) + "\n")


def _cifar_sample() -> Path | None:
    """The Kaggle CIFAR-10 sample folder (``kaggle_cifar10_sample/``) in the search folders."""
    found = _find_folder("kaggle_cifar10_sample")
    return found if found is not None and (found / "trainLabels.csv").is_file() else None


def _build_cifar(dest: Path, src: Path) -> None:
    """``kaggle_cifar10_tiny/``: the sample's images, with ``trainLabels.csv`` cut to them."""
    out = dest / "kaggle_cifar10_tiny"
    shutil.copytree(src / "train", out / "train")
    shutil.copytree(src / "test", out / "test")
    present = {p.stem for p in (out / "train").iterdir()}
    with open(src / "trainLabels.csv", newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0] in present]
    with open(out / "trainLabels.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(kept)


_register_substitute(
    "banana-detection", _build_bananas,
    lambda base, _: f"divekit's generated shapes in the banana format from {base} "
                    f"({_banana_sizes()[0]} + {_banana_sizes()[1]} images of 256x256, one object "
                    f"each, class 0)",
    version=lambda: f"1 {_banana_sizes()}")
_register_substitute(
    "voc2012", _build_voc,
    lambda base, _: f"divekit's generated segmentation scenes as a VOC2012 folder in {base} "
                    f"({_voc_sizes()[0]} + {_voc_sizes()[1]} images of 384x512; classes 1-3 are "
                    f"squares, discs, triangles)",
    version=lambda: f"1 {_voc_sizes()}")
_register_substitute(
    "hotdog", _build_hotdog,
    lambda base, _: f"divekit's generated scenes as a two-class hotdog folder in {base} "
                    f"({_hotdog_sizes()[0]} + {_hotdog_sizes()[1]} images of 160x160; "
                    f"'hotdog' shows a disc, 'not-hotdog' a square or triangle)",
    version=lambda: f"1 {_hotdog_sizes()}")
_register_substitute(
    "cifar10_tiny", _build_cifar,
    lambda base, src: f"the 1,000-image Kaggle CIFAR-10 sample from {src} (copied to {base})",
    source=_cifar_sample, version=lambda: f"1 {_cifar_sample()}")


# ------------------------------------------------------------------------------ arrays
def _as_list(batch: tuple[Tensor, ...]) -> list[Tensor]:
    """A batch gathered in one indexing, as the list ``default_collate`` would give."""
    return list(batch)


def load_array(data_arrays: Sequence[Tensor], batch_size: int, is_train: bool = True) -> BoundedLoader:
    """A data loader over tensors (shuffled for training).

    Each batch is one indexing of the tensors (``TensorDataset[list of indices]``, through a
    ``BatchSampler`` over the sampler ``DataLoader(shuffle=is_train)`` would use: the same
    batches from the same random stream) instead of ``batch_size`` single items stacked, which
    costs more than a small model's step (the translation sections: 64 pairs a batch)."""
    dataset = data.TensorDataset(*data_arrays)
    sampler = data.RandomSampler(dataset) if is_train else data.SequentialSampler(dataset)
    return BoundedLoader(data.DataLoader(
        dataset, batch_size=None, sampler=data.BatchSampler(sampler, batch_size, False),
        collate_fn=_as_list))


# ------------------------------------------------------------------------------ Fashion-MNIST
def get_fashion_mnist_labels(labels: Iterable[Any]) -> list[str]:
    """Fashion-MNIST's text labels of class indices."""
    from divekit.data.vision import FASHION_MNIST_CLASSES

    return [FASHION_MNIST_CLASSES[int(i)] for i in labels]


_VISION: dict[tuple[Any, ...], Any] = {}


def _fashion_mnist_data() -> Any:
    """Fashion-MNIST as divekit's ``ImageClassificationData`` from the search folders (fetched
    with ``DIVEKIT_DOWNLOAD=1``), else MNIST, else scikit-learn's digits at 28×28 (with a note);
    loaded once per process and set of folders."""
    from divekit.data.vision import load_digits, load_fashion_mnist, load_mnist

    roots = _search_roots()
    key = (tuple(os.path.abspath(r) for r, _ in roots), _download_enabled(), _strict(),
           str(hub.data_home()))
    if key in _VISION:
        return _VISION[key]
    dirs: list[Path | None] = [r for r, _ in roots if r.is_dir()]
    dirs.append(None)  # divekit's own layout, data_home()/fashion-mnist
    found = _first_loadable(load_fashion_mnist, dirs)
    if found is None and _download_enabled():
        found = (load_fashion_mnist(download=True), None)
    where = _where(roots)
    if found is None:
        if _strict():
            raise DataNotFoundError(
                f"Fashion-MNIST (FashionMNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz) "
                f"not found in {where}; put torchvision's FashionMNIST/raw/ folder there, or set "
                f"DIVEKIT_DOWNLOAD=1 to fetch it from {hub.FASHION_MNIST_URL}")
        found = _first_loadable(load_mnist, dirs)
        if found is not None:
            _note("substitute:fashion-mnist",
                  f"Fashion-MNIST not found in {where}; using MNIST from {found[1] or hub.data_home()} "
                  f"instead (same format; numbers differ from the book's)")
        else:
            found = (load_digits(resize=28), None)
            _note("substitute:fashion-mnist",
                  f"Fashion-MNIST not found in {where}, nor MNIST; using scikit-learn's 1,797 "
                  f"8x8 digits upscaled to 28x28 instead (numbers differ from the book's)")
    _VISION[key] = found[0]
    return found[0]


def _first_loadable(loader: Callable[..., Any], dirs: Sequence[Path | None]) -> tuple[Any, Path | None] | None:
    for d in dirs:
        try:
            return loader(data_dir=d), d
        except DataNotFoundError:
            continue
    return None


def _batch_collate(batch: tuple[Tensor, Tensor], size: int | tuple[int, int] | None = None
                   ) -> tuple[Tensor, Tensor]:
    """A batch gathered in one indexing (``TensorDataset[list of indices]``), resized if asked."""
    from divekit.data.vision import resize_images

    x, y = batch
    return (resize_images(x, size) if size else x), y


def load_data_fashion_mnist(batch_size: int, resize: int | tuple[int, int] | None = None
                            ) -> tuple[BoundedLoader, BoundedLoader]:
    """Training and test loaders of Fashion-MNIST: ``(B, 1, 28, 28)`` (or ``resize``) float32
    images in [0, 1] and int64 labels; the training loader shuffles.

    The images are in memory, so each batch is one indexing of the tensors (a ``BatchSampler``
    over the same sampler a ``DataLoader(shuffle=...)`` uses: the same batches), in this
    process; only resizing, which costs real work, goes to ``get_dataloader_workers()``
    worker processes."""
    d = _fashion_mnist_data()
    collate = functools.partial(_batch_collate, size=resize)
    workers = get_dataloader_workers() if resize else 0
    loaders = []
    for x, y, shuffle in ((d.train_images, d.train_labels, True),
                          (d.val_images, d.val_labels, False)):
        dataset = data.TensorDataset(x, y)
        sampler = data.RandomSampler(dataset) if shuffle else data.SequentialSampler(dataset)
        loaders.append(BoundedLoader(data.DataLoader(
            dataset, batch_size=None, sampler=data.BatchSampler(sampler, batch_size, False),
            num_workers=workers, collate_fn=collate)))
    return loaders[0], loaders[1]


# ------------------------------------------------------------------------------ bananas
def read_data_bananas(is_train: bool = True) -> tuple[list[Tensor], Tensor]:
    """The banana-detection split: a list of ``(3, 256, 256)`` uint8 images and labels
    ``(N, 1, 5)`` rows ``[class, x1, y1, x2, y2]`` with corners divided by 256."""
    from divekit.data.detection import read_banana_split

    data_dir = Path(download_extract("banana-detection"))
    images, labels = read_banana_split(data_dir / ("bananas_train" if is_train else "bananas_val"),
                                       dtype=torch.uint8)
    return list(images), labels


class BananasDataset(data.Dataset):
    """The banana-detection set: items ``(float image 0..255 (3, 256, 256), labels (1, 5))``."""

    def __init__(self, is_train: bool):
        self.features, self.labels = read_data_bananas(is_train)
        kind = "training" if is_train else "validation"
        print(f"read {len(self.features)} {kind} examples")

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        return self.features[idx].float(), self.labels[idx]

    def __len__(self) -> int:
        return len(self.features)


def load_data_bananas(batch_size: int) -> tuple[BoundedLoader, BoundedLoader]:
    """Loaders of the banana-detection training (shuffled) and validation sets."""
    train_iter = data.DataLoader(BananasDataset(is_train=True), batch_size, shuffle=True)
    val_iter = data.DataLoader(BananasDataset(is_train=False), batch_size)
    return BoundedLoader(train_iter), BoundedLoader(val_iter)


# ------------------------------------------------------------------------------ Pascal VOC
def _voc_constants() -> tuple[list[list[int]], list[str]]:
    from divekit.data import segmentation

    return [list(c) for c in segmentation.VOC_COLORMAP], list(segmentation.VOC_CLASSES)


VOC_COLORMAP, VOC_CLASSES = _voc_constants()


def read_voc_images(voc_dir: str | os.PathLike[str], is_train: bool = True
                    ) -> tuple[list[Tensor], list[Tensor]]:
    """The images and colour labels of ``voc_dir``'s train (or val) list: ``(3, H, W)`` uint8
    each. A ``voc_dir`` without VOC's files falls back to the generated stand-in (with a note)
    unless ``DIVEKIT_BOOK_STRICT=1``."""
    from divekit.data.segmentation import read_image_uint8

    root = Path(voc_dir)
    split = "train.txt" if is_train else "val.txt"
    listing = root / "ImageSets" / "Segmentation" / split
    if not listing.is_file():
        root = Path(download_extract("voc2012", os.path.join("VOCdevkit", "VOC2012")))
        listing = root / "ImageSets" / "Segmentation" / split
        if not listing.is_file():
            raise DataNotFoundError(f"VOC2012: no ImageSets/Segmentation/{split} in {voc_dir} "
                                    f"or {root}; point voc_dir at a VOCdevkit/VOC2012 folder")
    names = listing.read_text().split()
    features = [read_image_uint8(root / "JPEGImages" / f"{n}.jpg") for n in names]
    labels = [read_image_uint8(root / "SegmentationClass" / f"{n}.png") for n in names]
    return features, labels


class _ColormapToLabel:
    """What ``voc_colormap2label()`` returns: indexing it with colour codes
    ``(r * 256 + g) * 256 + b`` gives VOC classes (VOC's border colour and class 0 give 0), as
    the book's 256³ table does, without the table."""

    def __getitem__(self, codes: Any) -> Tensor:
        codes = torch.as_tensor(codes, dtype=torch.int64)
        rgb = torch.stack([codes // 65536, codes // 256 % 256, codes % 256])
        return _colours_to_classes(rgb.reshape(3, 1, -1)).reshape(codes.shape)

    def __len__(self) -> int:
        return 256 ** 3

    def __repr__(self) -> str:
        return f"voc_colormap2label(): {len(VOC_COLORMAP)} VOC colours → classes"


def _colours_to_classes(rgb: Tensor) -> Tensor:
    from divekit.data.segmentation import IGNORE_INDEX, VOC_BORDER, colormap_to_label
    from divekit.data.segmentation import VOC_COLORMAP as colours

    label = colormap_to_label(rgb.to(torch.int64), colours, VOC_BORDER, what="VOC label")
    return label.long().masked_fill_(label == IGNORE_INDEX, 0)  # the book: border → class 0


def voc_colormap2label() -> _ColormapToLabel:
    """The map from VOC label colours to class indices (see :class:`_ColormapToLabel`)."""
    return _ColormapToLabel()


def voc_label_indices(colormap: Tensor, colormap2label: Any) -> Tensor:
    """``(3, H, W)`` colour label → ``(H, W)`` int64 VOC class indices."""
    if isinstance(colormap2label, _ColormapToLabel):
        return _colours_to_classes(colormap)
    c = colormap.to(torch.int64)
    return colormap2label[(c[0] * 256 + c[1]) * 256 + c[2]]


def voc_rand_crop(feature: Tensor, label: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """One random ``height × width`` window, cut from ``feature`` and ``label`` alike."""
    from divekit.data.segmentation import random_crop

    return random_crop(feature, label, (height, width))


_VOC_MEAN, _VOC_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class VOCSegDataset(data.Dataset):
    """VOC segmentation: items ``(normalised float image (3, h, w), int64 classes (h, w))``
    cropped at random to ``crop_size``; images smaller than the crop are left out."""

    def __init__(self, is_train: bool, crop_size: tuple[int, int], voc_dir: str | os.PathLike[str]):
        import torchvision

        self.transform = torchvision.transforms.Normalize(mean=_VOC_MEAN, std=_VOC_STD)
        self.crop_size = crop_size
        features, labels = read_voc_images(voc_dir, is_train=is_train)
        self.features = self.filter(features)  # uint8; normalised per item
        self.colormap2label = voc_colormap2label()
        self.labels = [voc_label_indices(y, self.colormap2label).to(torch.uint8)
                       for y in self.filter(labels)]
        print(f"read {len(self.features)} examples")

    def normalize_image(self, img: Tensor) -> Tensor:
        return self.transform(img.float() / 255)

    def filter(self, imgs: list[Tensor]) -> list[Tensor]:
        return [img for img in imgs
                if img.shape[1] >= self.crop_size[0] and img.shape[2] >= self.crop_size[1]]

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        feature, label = voc_rand_crop(self.features[idx], self.labels[idx], *self.crop_size)
        return self.normalize_image(feature), label.long()

    def __len__(self) -> int:
        return len(self.features)


def load_data_voc(batch_size: int, crop_size: tuple[int, int]) -> tuple[BoundedLoader, BoundedLoader]:
    """Loaders of VOC2012 segmentation (training shuffled; both drop the last partial batch)."""
    voc_dir = download_extract("voc2012", os.path.join("VOCdevkit", "VOC2012"))
    workers = get_dataloader_workers()
    train_iter = data.DataLoader(VOCSegDataset(True, crop_size, voc_dir), batch_size,
                                 shuffle=True, drop_last=True, num_workers=workers)
    test_iter = data.DataLoader(VOCSegDataset(False, crop_size, voc_dir), batch_size,
                                drop_last=True, num_workers=workers)
    return BoundedLoader(train_iter), BoundedLoader(test_iter)


# ------------------------------------------------------------------------------ Kaggle CIFAR-10
def read_csv_labels(fname: str | os.PathLike[str]) -> dict[str, str]:
    """``{file name without extension: label}`` of a ``name,label`` CSV with a header line."""
    with open(fname, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    return {r[0]: r[1] for r in rows[1:]}


def copyfile(filename: str | os.PathLike[str], target_dir: str | os.PathLike[str]) -> None:
    """Copy a file into a folder (made when missing)."""
    os.makedirs(target_dir, exist_ok=True)
    shutil.copy(filename, target_dir)


def reorg_train_valid(data_dir: str | os.PathLike[str], labels: dict[str, str],
                      valid_ratio: float) -> int:
    """Copy ``data_dir/train`` into ``train_valid_test/{train_valid,train,valid}/<label>/``:
    each class gives ``max(1, floor(n * valid_ratio))`` files to ``valid`` (``n``: the smallest
    class's count); returns that number."""
    files = sorted(os.listdir(os.path.join(data_dir, "train")))
    n = collections.Counter(labels[f.split(".")[0]] for f in files).most_common()[-1][1]
    n_valid_per_label = max(1, math.floor(n * valid_ratio))
    label_count: dict[str, int] = {}
    out = os.path.join(data_dir, "train_valid_test")
    for train_file in files:
        label = labels[train_file.split(".")[0]]
        fname = os.path.join(data_dir, "train", train_file)
        copyfile(fname, os.path.join(out, "train_valid", label))
        if label_count.get(label, 0) < n_valid_per_label:
            copyfile(fname, os.path.join(out, "valid", label))
            label_count[label] = label_count.get(label, 0) + 1
        else:
            copyfile(fname, os.path.join(out, "train", label))
    return n_valid_per_label


def reorg_test(data_dir: str | os.PathLike[str]) -> None:
    """Copy ``data_dir/test`` into ``train_valid_test/test/unknown/`` (for ImageFolder)."""
    for test_file in sorted(os.listdir(os.path.join(data_dir, "test"))):
        copyfile(os.path.join(data_dir, "test", test_file),
                 os.path.join(data_dir, "train_valid_test", "test", "unknown"))
