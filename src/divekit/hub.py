"""The data hub: remote files by name, a cache directory, verified downloads, safe extraction.

As in the course, ``DATA_HUB`` maps a name to ``(url, hash)``; :func:`download` fetches a file
once into the cache and checks its hash, :func:`extract` unpacks an archive. Differences from
``d2l.download``: the file is written to a temporary name and moved into place only after its
hash matched (an interrupted or corrupted download never looks like a good file), errors are
one-line :class:`~divekit.errors.DivekitError` messages, and archives whose members would land
outside the destination are refused before anything is written.

A hash is written ``'sha1:<hex>'``, ``'md5:<hex>'`` or ``'sha256:<hex>'``; a bare hex string is
taken by its length (40: sha1, as in the course; 32: md5; 64: sha256); ``'sha256:<hex>...'`` is
a digest prefix (torchvision's weight files, see :mod:`divekit.weights`).

The hub sits low in the layers (beside :mod:`divekit.io`, above only :mod:`divekit.errors`):
datasets (:mod:`divekit.data`) and weights files (:mod:`divekit.weights`, which models read
from) both download through it, so neither has to import the other.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PureWindowsPath
from typing import BinaryIO

from tqdm import tqdm

from divekit.errors import DataNotFoundError, DivekitError, UnknownNameError

DATA_URL = "http://d2l-data.s3-accelerate.amazonaws.com/"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's mirror
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # zalando's

# MNIST and Fashion-MNIST publish md5 sums of the .gz files only (the ones torchvision checks).
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

DATA_HUB: dict[str, tuple[str, str]] = {
    # name: (url, hash) -- the course's entries keep the course's names and sha1 sums.
    "time_machine": (DATA_URL + "timemachine.txt", "090b5e7e70c295757f55df93cb0a180b9691891a"),
    "fra-eng": (DATA_URL + "fra-eng.zip", "94646ad1522d915e7b0f9296181140edcf86a4f5"),
    "ptb": (DATA_URL + "ptb.zip", "319d85e578af0cdc590547f26231e4e31cdf1e42"),
    "banana-detection": (DATA_URL + "banana-detection.zip", "5de26c8fce5ccdea9f91267273464dc968d20d72"),
    "voc2012": (DATA_URL + "VOCtrainval_11-May-2012.tar", "4e443f8a2eca6b1dac8a6c57641b67dd40621a49"),
    "hotdog": (DATA_URL + "hotdog.zip", "fba480ffa8aa7e0febbb511d181409f899b9baa5"),
    "airfoil": (DATA_URL + "airfoil_self_noise.dat", "76e5be1548fd8222e5074cf0faae75edff8cf93f"),
    "kaggle_house_train": (DATA_URL + "kaggle_house_pred_train.csv", "585e9cc93e70b39160e7921475f9bcd7d31219ce"),
    "kaggle_house_test": (DATA_URL + "kaggle_house_pred_test.csv", "fa19780a7b011d9b009e8bff8e99922a8ee2eb90"),
    # WikiText-2 v1 where Salesforce's page now points (the course's S3 address is gone); the
    # sha1 is of the zip, the course's and GluonNLP's both (divekit.data.bert_pretrain checks
    # the members' published sha1s on the files in ../shared/data)
    "wikitext-2": (
        "https://wikitext.smerity.com/wikitext-2-v1.zip",
        "3c914d17d80b1459be871a5039ac23e752a53cbe",
    ),
    **{f"mnist/{f}": (MNIST_URL + f, f"md5:{h}") for f, h in _MNIST_MD5.items()},
    **{f"fashion-mnist/{f}": (FASHION_MNIST_URL + f, f"md5:{h}") for f, h in _FASHION_MNIST_MD5.items()},
}

_HASH_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64}
_MIN_PREFIX = 8  # hex digits of a digest prefix (torchvision names carry 8)
_CHUNK = 1 << 20
TIMEOUT_S = 30.0


def data_home() -> Path:
    """Where downloaded data lives: ``$DIVEKIT_DATA`` or ``~/.cache/divekit``."""
    return Path(os.environ.get("DIVEKIT_DATA") or Path.home() / ".cache" / "divekit").expanduser()


# ----------------------------------------------------------------------------- hashes


def parse_hash(spec: str) -> tuple[str, str]:
    """``'md5:ab..'`` → ``('md5', 'ab..')``; a bare hex string is typed by its length.

    ``'sha256:f37072fd...'`` (a named algorithm, at least 8 hex digits, then ``...``) is a
    prefix of the digest, as torchvision's weight files carry in their names
    (``resnet18-f37072fd.pth``); the digest returned is that prefix, and a file matches when its
    digest starts with it (:func:`digest_matches`).
    """
    algorithm, _, digest = spec.rpartition(":")
    digest = digest.strip().lower()
    prefix = bool(algorithm) and digest.endswith("...")
    digest = digest.removesuffix("...") if prefix else digest
    if not algorithm:
        algorithm = next((a for a, n in _HASH_LENGTHS.items() if n == len(digest)), "")
    algorithm = algorithm.lower()
    full = _HASH_LENGTHS.get(algorithm, 0)
    length_ok = _MIN_PREFIX <= len(digest) <= full if prefix else len(digest) == full
    if not full or not length_ok or not re.fullmatch("[0-9a-f]+", digest):
        raise DivekitError(
            f"bad hash {spec!r}; expected 'sha1:<40 hex>', 'md5:<32 hex>', 'sha256:<64 hex>', "
            f"a bare 40-hex sha1, or a prefix 'sha256:<{_MIN_PREFIX}+ hex>...'"
        )
    return algorithm, digest


def digest_matches(actual: str | None, expected: str) -> bool:
    """Whether a hex digest is ``expected`` (a whole digest, or a prefix from :func:`parse_hash`)."""
    return actual is not None and actual.startswith(expected)


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha1") -> str:
    """The hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_hash(path: str | os.PathLike[str], spec: str) -> bool:
    """Whether a file's content matches a hash spec."""
    algorithm, digest = parse_hash(spec)
    return digest_matches(file_digest(path, algorithm), digest)


# ----------------------------------------------------------------------------- download


def _resolve(name_or_url: str, spec: str | None) -> tuple[str, str, str | None]:
    """(display name, url, hash spec) of a hub name or a plain URL."""
    if "://" in name_or_url:
        return name_or_url, name_or_url, spec
    if name_or_url not in DATA_HUB:
        raise UnknownNameError("data hub file", name_or_url, DATA_HUB)
    url, hub_spec = DATA_HUB[name_or_url]
    return name_or_url, url, spec or hub_spec


def _filename(url: str, filename: str | None) -> str:
    name = filename or url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise DivekitError(f"cannot tell a file name from {url!r}; pass filename=")
    return name


def download(
    name_or_url: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    sha1: str | None = None,
    filename: str | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
) -> Path:
    """Fetch a ``DATA_HUB`` name or a URL into ``cache_dir`` (default :func:`data_home`).

    A file already there whose hash matches is returned without touching the network.
    ``sha1`` is a hash spec (any algorithm, see the module doc); for a hub name it overrides
    the hub's hash. A plain URL without a hash is fetched once and never verified.
    """
    name, url, spec = _resolve(name_or_url, sha1)
    if spec is not None:
        parse_hash(spec)  # refuse a malformed hash before any network traffic
    folder = Path(cache_dir) if cache_dir is not None else data_home()
    path = folder / _filename(url, filename)
    if path.is_file() and (spec is None or check_hash(path, spec)):
        return path
    if not url.startswith(("http://", "https://")):
        raise DivekitError(f"cannot download {name}: {url!r} is not an http(s) URL")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(url, out, spec, desc=path.name, progress=progress, timeout=timeout)
        _verify(name, url, spec, digest, path)
        os.replace(tmp, path)
    except (OSError, ValueError, http.client.HTTPException) as e:  # HTTP errors, timeouts, disk
        if isinstance(e, urllib.error.HTTPError):
            e.close()  # it holds the open response; its str() is "HTTP Error 404: ..."
            cause: object = e
        else:
            cause = getattr(e, "reason", None) or e
        raise DivekitError(
            f"cannot download {name} from {url}: {cause}; put {path.name!r} in {str(folder)!r} by hand"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fetch(url: str, out: BinaryIO, spec: str | None, *, desc: str, progress: bool, timeout: float) -> str | None:
    """Stream ``url`` into the open file ``out``; the hex digest of what was written."""
    h = hashlib.new(parse_hash(spec)[0]) if spec else None
    request = urllib.request.Request(url, headers={"User-Agent": "divekit"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                  disable=not progress, leave=False) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                if h is not None:
                    h.update(chunk)
                bar.update(len(chunk))
    return h.hexdigest() if h is not None else None


def _verify(name: str, url: str, spec: str | None, digest: str | None, path: Path) -> None:
    if spec is None:
        return
    algorithm, expected = parse_hash(spec)
    if not digest_matches(digest, expected):
        raise DivekitError(
            f"{name}: {url} has {algorithm} {digest}, expected {expected} (corrupted or changed "
            f"upstream); nothing was saved; put a good copy at {str(path)!r} by hand"
        )


# ----------------------------------------------------------------------------- extraction


def _parts(name: str) -> list[str]:
    return [p for p in re.split(r"[\\/]", name) if p not in ("", ".")]


def _unsafe_name(name: str) -> str | None:
    """Why a member name may not be written under the destination, or None when it may."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "is an absolute path"
    if ".." in _parts(name):
        return "has a '..' component"
    return None


def _link_escapes(parent: list[str], target: str, links: set[str]) -> bool:
    """Whether a relative link target, followed from ``parent``, leaves the root.

    ``..`` after another link of the archive cannot be judged by name alone, so a target
    that goes *through* another link is refused too.
    """
    if _unsafe_name(target) == "is an absolute path":
        return True
    stack = list(parent)
    steps = _parts(target)
    for i, p in enumerate(steps):
        if p == "..":
            if not stack:
                return True
            stack.pop()
        else:
            stack.append(p)
            if "/".join(stack) in links and i < len(steps) - 1:
                return True
    return False


def _check_members(archive: Path, members: list[tuple[str, str, str]], root: Path) -> None:
    """Refuse the whole archive if any ``(name, kind, link target)`` would land outside ``root``.

    ``kind`` is 'file', 'dir', 'symlink', 'hardlink' or 'other' (devices, fifos).
    """
    links = {"/".join(_parts(n)) for n, kind, _ in members if kind == "symlink"}
    for name, kind, target in members:
        parts = _parts(name)
        why = _unsafe_name(name)
        if why is None and any("/".join(parts[:i]) in links for i in range(1, len(parts))):
            why = "is written through a link"
        if why is None and not _inside(root, parts):
            why = "leaves the destination through an existing link"
        if why is None and kind == "symlink" and _link_escapes(parts[:-1], target, links):
            why = f"is a symlink to {target!r} outside the destination"
        if why is None and kind == "hardlink" and (_unsafe_name(target) or _link_escapes([], target, links)):
            why = f"is a hard link to {target!r} outside the destination"
        if why is None and kind == "other":
            why = "is a device or fifo"
        if why:
            raise DivekitError(f"refusing to extract {str(archive)!r}: member {name!r} {why}; nothing extracted")


def _inside(root: Path, parts: list[str]) -> bool:
    """Whether ``root/parts`` stays inside ``root`` when links already on disk are followed."""
    target = root.joinpath(*parts).resolve()
    return target == root or root in target.parents


def _tar_members(tf: tarfile.TarFile) -> list[tuple[str, str, str]]:
    def kind(m: tarfile.TarInfo) -> str:
        if m.issym():
            return "symlink"
        if m.islnk():
            return "hardlink"
        return "file" if m.isfile() else "dir" if m.isdir() else "other"

    return [(m.name, kind(m), m.linkname) for m in tf.getmembers()]


def _zip_members(zf: zipfile.ZipFile) -> list[tuple[str, str, str]]:
    out = []
    for info in zf.infolist():
        if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink: the target is the data
            out.append((info.filename, "symlink", zf.read(info).decode("utf-8", "replace")))
        else:
            out.append((info.filename, "dir" if info.is_dir() else "file", ""))
    return out


def extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None) -> Path:
    """Unpack a .zip, .tar, .tar.gz/.tgz (or other compressed tar) into ``dest``.

    ``dest`` defaults to the archive's folder. Every member is checked first: absolute paths,
    ``..`` components and links that point outside ``dest`` are refused with a
    :class:`DivekitError` before anything is written.
    """
    archive = Path(archive)
    root = Path(dest) if dest is not None else archive.parent
    if not archive.is_file():
        raise DataNotFoundError(f"archive {str(archive)!r} does not exist")
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _check_members(archive, _zip_members(zf), root)
                zf.extractall(root)  # writes a symlink member as a small text file
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                _check_members(archive, _tar_members(tf), root)
                tf.extractall(root, filter="data")  # the stdlib's own checks as a second line
        else:
            raise DivekitError(f"{str(archive)!r} is not a zip or tar archive")
    except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DivekitError(f"cannot extract {str(archive)!r}: {e}") from None
    return root


def download_extract(name: str, folder: str | None = None, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The course's ``download_extract``: fetch a hub archive, unpack it beside itself.

    Returns ``<cache>/<folder>`` when ``folder`` is given, else the archive's name without
    its extension. Unpacking is skipped when a marker says this exact archive was unpacked.
    """
    archive = download(name, cache_dir)
    base = archive.parent
    marker = base / f".{archive.name}.extracted"
    stamp = file_digest(archive, "sha1")
    if not (marker.is_file() and marker.read_text().strip() == stamp):
        extract(archive, base)
        marker.write_text(stamp + "\n")
    stem = re.sub(r"(\.tar)?\.[^.]+$", "", archive.name)
    return base / (folder or stem)


# ----------------------------------------------------------------------------- finding files

_download = download  # `locate` has a parameter of that name


def locate(
    files: Sequence[str],
    *,
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    subdirs: Sequence[str] = ("",),
    suffixes: Sequence[str] = ("",),
    sources: Mapping[str, str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Find a dataset's files on disk, or download them, or say exactly what is missing.

    Each of ``files`` is looked for, with each of ``suffixes`` appended (e.g. ``('', '.gz')``),
    in ``data_dir/<subdir>`` then ``data_home()/name/<subdir>``. Missing files are downloaded
    when ``download`` is true, from ``sources[file]`` (a ``DATA_HUB`` name), into ``data_dir``
    when given, else ``data_home()/name``. Otherwise :class:`DataNotFoundError` names the
    files, their URLs and the folder to put them in.
    """
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataNotFoundError(f"{name}: data folder {str(data_dir)!r} does not exist or is not a folder")
    roots = ([Path(data_dir)] if data_dir is not None else []) + [data_home() / name]
    folders = [r / s for r in roots for s in subdirs]
    found = {f: _find(f, folders, suffixes) for f in files}
    missing = [f for f, p in found.items() if p is None]
    if missing:
        target = roots[0]
        sources = sources or {}
        if not download or any(f not in sources for f in missing):
            raise _not_found(name, missing, sources, target, folders)
        for f in missing:
            found[f] = _download(sources[f], target, progress=progress)
    return [found[f] for f in files]  # type: ignore[misc]


def _find(file: str, folders: Sequence[Path], suffixes: Sequence[str]) -> Path | None:
    for folder in folders:
        for suffix in suffixes:
            if (folder / (file + suffix)).is_file():
                return folder / (file + suffix)
    return None


def _not_found(
    name: str, missing: Sequence[str], sources: Mapping[str, str], target: Path, folders: Sequence[Path]
) -> DataNotFoundError:
    urls = [DATA_HUB[sources[f]][0] for f in missing if sources.get(f) in DATA_HUB]
    where = f"download {', '.join(urls)} into" if urls else "put them in"
    hint = "pass --download (download=True), or " if urls else ""
    looked = ", ".join(dict.fromkeys(str(f) for f in folders))
    return DataNotFoundError(
        f"{name}: missing {', '.join(missing)} (looked in {looked}); {where} {str(target)!r}, "
        f"or {hint}pass --data-dir DIR for a folder that holds them"
    )
