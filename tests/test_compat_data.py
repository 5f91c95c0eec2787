"""The book's data layer (``divekit.compat.d2l._data``): offline-first DATA_HUB files (downloads
only from a local 127.0.0.1 server, and only with DIVEKIT_DOWNLOAD=1), the vision loaders'
shapes/dtypes/ranges as the book documents them, VOC helpers against brute force, the
stand-ins for missing data, and quick-mode bounds. Nothing here touches the internet."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from divekit import hub
from divekit.compat.d2l import _data as D
from divekit.data.detection import make_shapes, read_banana_split
from divekit.data.idx import write_idx
from divekit.data.segmentation import VOC_BORDER
from divekit.errors import DataNotFoundError, DivekitError, UnknownNameError

SHARED = Path(__file__).resolve().parents[2] / "shared"
VOC_FIXTURE = Path(__file__).parent / "fixtures" / "voc" / "VOC2012"
CONTENT = b"The Time Machine, by H. G. Wells [1898]\n" * 50


def sha1(b: bytes) -> str:
    return hashlib.sha1(b).hexdigest()


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch) -> dict[str, Path]:
    """A fresh world per test: cwd ``tmp/work`` (so the book's ``../data`` is ``tmp/data``),
    ``$DIVEKIT_DATA`` = ``tmp/dk``, ``HOME`` = ``tmp/home``; no download, strict or quick flags;
    tiny stand-ins; loaders in the main process."""
    paths = {k: tmp_path / k for k in ("work", "data", "dk", "home")}
    for p in paths.values():
        p.mkdir()
    monkeypatch.chdir(paths["work"])
    monkeypatch.setenv("DIVEKIT_DATA", str(paths["dk"]))
    monkeypatch.setenv("HOME", str(paths["home"]))
    for name in ("DIVEKIT_DOWNLOAD", "DIVEKIT_BOOK_STRICT", "DIVEKIT_BOOK_QUICK",
                 "DIVEKIT_BOOK_QUICK_BATCHES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(D, "_NOTED", set())
    monkeypatch.setattr(D, "_VISION", {})
    monkeypatch.setattr(D, "_BANANA_SIZES", {False: (5, 3), True: (4, 2)})
    monkeypatch.setattr(D, "_VOC_SIZES", {False: (3, 2), True: (2, 2)})
    monkeypatch.setattr(D, "get_dataloader_workers", lambda: 0)
    return paths


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and message
    return message


# ============================================================================ DATA_HUB
@pytest.mark.skipif(not (SHARED / "book" / "API.md").is_file(), reason="../shared/book absent")
def test_data_hub_is_the_books_table():
    text = (SHARED / "book" / "API.md").read_text()
    table = text.split("## DATA_HUB", 1)[1]
    rows = re.findall(r"^\| (\S+) \| `(.+?)` \| `([0-9a-f]{40})` \|$", table, re.M)
    assert len(rows) == 18
    expected = {k: (url.replace("DATA_URL + ", D.DATA_URL).replace("'", ""), h)
                for k, url, h in rows}
    assert D.DATA_HUB == expected
    assert D.DATA_URL == "http://d2l-data.s3-accelerate.amazonaws.com/"


def test_data_hub_is_a_plain_mutable_dict():
    assert type(D.DATA_HUB) is dict
    assert D.DATA_HUB["fra-eng"] == hub.DATA_HUB["fra-eng"]  # the book's sums are divekit's


def test_unknown_name_is_a_clear_error():
    with pytest.raises(UnknownNameError, match="time_machine"):
        D.download("no-such-thing")


# ============================================================================ download, offline
def test_download_looks_in_data_then_divekit_data_then_the_cache(env, monkeypatch):
    monkeypatch.setitem(D.DATA_HUB, "tm", ("http://127.0.0.1:9/x/timemachine.txt", sha1(CONTENT)))
    cache = env["home"] / ".cache" / "divekit"
    cache.mkdir(parents=True)
    (cache / "timemachine.txt").write_bytes(CONTENT)
    assert D.download("tm") == str(cache / "timemachine.txt")
    (env["dk"] / "timemachine.txt").write_bytes(CONTENT)
    assert D.download("tm") == str(env["dk"] / "timemachine.txt")
    (env["data"] / "timemachine.txt").write_bytes(CONTENT)
    path = D.download("tm")
    assert isinstance(path, str) and path == str(Path("..", "data", "timemachine.txt"))
    assert D.download("tm", cache_dir=str(cache)) == str(cache / "timemachine.txt")


def test_missing_file_is_one_line_naming_file_sha1_folders_and_url(server, env, monkeypatch):
    base, _, requests = server
    monkeypatch.setitem(D.DATA_HUB, "fe", (base + "fra-eng.zip", "9" * 40))
    with pytest.raises(DataNotFoundError) as e:
        D.download("fe")
    message = one_line(e)
    for part in ("fra-eng.zip", "sha1 " + "9" * 40, "../data", str(env["dk"]), "~/.cache/divekit",
                 "DIVEKIT_DOWNLOAD=1", base + "fra-eng.zip"):
        assert part in message
    with pytest.raises(DataNotFoundError, match="extracted folder fra-eng/") as e:
        D.download_extract("fe")
    one_line(e)
    assert requests == []  # never asked the network


def test_wrong_sha1_is_one_line_and_a_good_copy_elsewhere_wins(env, monkeypatch):
    monkeypatch.setitem(D.DATA_HUB, "tm", ("http://127.0.0.1:9/timemachine.txt", sha1(CONTENT)))
    (env["data"] / "timemachine.txt").write_bytes(b"something else")
    with pytest.raises(DivekitError) as e:
        D.download("tm")
    message = one_line(e)
    assert sha1(b"something else") in message and sha1(CONTENT) in message
    assert "timemachine.txt" in message and "DIVEKIT_DOWNLOAD=1" in message
    (env["dk"] / "timemachine.txt").write_bytes(CONTENT)
    assert D.download("tm") == str(env["dk"] / "timemachine.txt")


# ============================================================================ download, network
def test_download_fetches_only_with_divekit_download(server, env, monkeypatch):
    base, www, requests = server
    (www / "timemachine.txt").write_bytes(CONTENT)
    monkeypatch.setitem(D.DATA_HUB, "tm", (base + "timemachine.txt", sha1(CONTENT)))
    with pytest.raises(DataNotFoundError):
        D.download("tm")
    assert requests == []
    monkeypatch.setenv("DIVEKIT_DOWNLOAD", "1")
    path = D.download("tm")
    assert path == str(env["dk"] / "timemachine.txt")  # into divekit's cache, not ../data
    assert Path(path).read_bytes() == CONTENT and requests == ["/timemachine.txt"]
    assert D.download("tm") == path and len(requests) == 1  # found now: not fetched again
    assert not (env["data"] / "timemachine.txt").exists()


def test_download_into_a_named_cache_dir(server, env, monkeypatch, tmp_path):
    base, www, _ = server
    (www / "a.txt").write_bytes(CONTENT)
    monkeypatch.setitem(D.DATA_HUB, "a", (base + "a.txt", sha1(CONTENT)))
    monkeypatch.setenv("DIVEKIT_DOWNLOAD", "1")
    assert D.download("a", cache_dir=str(tmp_path / "mine")) == str(tmp_path / "mine" / "a.txt")


def test_a_wrong_sha1_on_the_server_is_one_line_and_saves_nothing(server, env, monkeypatch):
    base, www, _ = server
    (www / "timemachine.txt").write_bytes(CONTENT + b"tampered")
    monkeypatch.setitem(D.DATA_HUB, "tm", (base + "timemachine.txt", sha1(CONTENT)))
    monkeypatch.setenv("DIVEKIT_DOWNLOAD", "1")
    with pytest.raises(DivekitError) as e:
        D.download("tm")
    message = one_line(e)
    assert sha1(CONTENT) in message and sha1(CONTENT + b"tampered") in message
    assert list(env["dk"].iterdir()) == []


def test_a_dead_address_is_one_line(server, env, monkeypatch):
    base, _, _ = server
    monkeypatch.setitem(D.DATA_HUB, "gone", (base + "gone.zip", "1" * 40))
    monkeypatch.setenv("DIVEKIT_DOWNLOAD", "1")
    with pytest.raises(DivekitError, match="404") as e:
        D.download_extract("gone")
    one_line(e)


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return path


def test_download_extract_fetches_unpacks_once_and_returns_the_folder(server, env, monkeypatch):
    base, www, requests = server
    archive = make_zip(www / "fra-eng.zip", {"fra-eng/fra.txt": b"Go.\tVa !\n"})
    monkeypatch.setitem(D.DATA_HUB, "fe", (base + "fra-eng.zip", sha1(archive.read_bytes())))
    monkeypatch.setenv("DIVEKIT_DOWNLOAD", "1")
    folder = D.download_extract("fe")
    assert folder == str(env["dk"] / "fra-eng")
    assert (Path(folder) / "fra.txt").read_bytes() == b"Go.\tVa !\n"
    assert sorted(p.name for p in env["dk"].iterdir()) == [".fra-eng.zip.extracted", "fra-eng",
                                                           "fra-eng.zip"]  # no temp folder left
    (Path(folder) / "fra.txt").unlink()
    assert D.download_extract("fe") == folder and not (Path(folder) / "fra.txt").exists()
    assert len(requests) == 1


def test_download_extract_offline_from_data_and_from_a_folder_alone(env, monkeypatch):
    archive = make_zip(env["data"] / "fra-eng.zip", {"fra-eng/fra.txt": b"x"})
    monkeypatch.setitem(D.DATA_HUB, "fe", ("http://127.0.0.1:9/fra-eng.zip",
                                           sha1(archive.read_bytes())))
    assert D.download_extract("fe") == str(Path("..", "data", "fra-eng"))  # beside the archive
    assert (env["data"] / "fra-eng" / "fra.txt").read_bytes() == b"x"
    # only the extracted folder, no archive: used as it is
    (env["data"] / "fra-eng.zip").unlink()
    assert D.download_extract("fe") == str(Path("..", "data", "fra-eng"))
    monkeypatch.setitem(D.DATA_HUB, "other", ("http://127.0.0.1:9/other.zip", "2" * 40))
    (env["dk"] / "other").mkdir()
    assert D.download_extract("other") == str(env["dk"] / "other")


def test_download_extract_a_tar_with_a_folder(env, monkeypatch):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"a\nb"))
    (env["dk"] / "VOCtrainval.tar").write_bytes(buf.getvalue())
    monkeypatch.setitem(D.DATA_HUB, "voc", ("http://127.0.0.1:9/VOCtrainval.tar",
                                            sha1(buf.getvalue())))
    voc_dir = D.download_extract("voc", "VOCdevkit/VOC2012")
    assert voc_dir == str(env["dk"] / "VOCdevkit" / "VOC2012")
    assert (Path(voc_dir) / "ImageSets" / "Segmentation" / "train.txt").read_text() == "a\nb"
    assert D.download_extract("voc") == str(env["dk"] / "VOCtrainval")  # the book's default


def test_download_all_names_every_missing_file(env, monkeypatch):
    monkeypatch.setattr(D, "DATA_HUB", {
        "tm": ("http://127.0.0.1:9/timemachine.txt", sha1(CONTENT)),
        "a": ("http://127.0.0.1:9/a.zip", "1" * 40),
        "b": ("http://127.0.0.1:9/b.csv", "2" * 40),
    })
    (env["dk"] / "timemachine.txt").write_bytes(CONTENT)
    with pytest.raises(DataNotFoundError, match=r"2 of 3 files .*a\.zip, b\.csv") as e:
        D.download_all()
    one_line(e)
    (env["dk"] / "a.zip").write_bytes(b"")
    monkeypatch.setitem(D.DATA_HUB, "a", ("http://127.0.0.1:9/a.zip", sha1(b"")))
    (env["dk"] / "b.csv").write_bytes(b"")
    monkeypatch.setitem(D.DATA_HUB, "b", ("http://127.0.0.1:9/b.csv", sha1(b"")))
    assert D.download_all() is None


# ============================================================================ real data
@pytest.mark.skipif(not (SHARED / "data" / "fra-eng.zip").is_file(), reason="../shared/data absent")
def test_the_real_files_on_this_machine(monkeypatch, capsys):
    monkeypatch.setenv("DIVEKIT_DATA", str(SHARED / "data"))
    assert D.download("time_machine") == str(SHARED / "data" / "timemachine.txt")
    assert D.download_extract("fra-eng") == str(SHARED / "data" / "fra-eng")
    assert D.download_extract("ptb") == str(SHARED / "data" / "ptb")
    train_iter, test_iter = D.load_data_fashion_mnist(1000)  # Fashion-MNIST is partial: MNIST
    assert (len(train_iter), len(test_iter)) == (60, 10)
    X, y = next(iter(test_iter))
    assert X.shape == (1000, 1, 28, 28) and y.dtype == torch.int64
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and "using MNIST from" in err


# ============================================================================ arrays, Fashion-MNIST
def test_load_array_batches_and_order():
    X, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    batches = list(D.load_array((X, y), 4, is_train=False))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    torch.manual_seed(0)
    shuffled = torch.cat([b[1] for b in D.load_array((X, y), 4)])
    assert sorted(shuffled.tolist()) == list(range(10)) and not torch.equal(shuffled, y)


def test_load_array_gives_the_batches_of_a_plain_dataloader():
    """One indexing per batch, yet the batches (and the random stream after them) of
    ``DataLoader(TensorDataset(...), batch_size, shuffle=is_train)``."""
    from torch.utils import data

    X, y = torch.randn(37, 3), torch.arange(37)
    for is_train in (True, False):
        torch.manual_seed(3)
        ours = [b for _ in range(2) for b in D.load_array((X, y), 8, is_train)]
        after_ours = torch.rand(1)
        torch.manual_seed(3)
        plain = data.DataLoader(data.TensorDataset(X, y), 8, shuffle=is_train)
        theirs = [b for _ in range(2) for b in plain]
        assert torch.equal(after_ours, torch.rand(1))
        assert len(ours) == len(theirs) == 10 and all(isinstance(b, list) for b in ours)
        for (a, b), (c, d) in zip(ours, theirs):
            assert torch.equal(a, c) and torch.equal(b, d)


def test_quick_mode_bounds_the_loaders(monkeypatch):
    X, y = torch.zeros(100, 2), torch.zeros(100)
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_BATCHES", "3")
    loader = D.load_array((X, y), 10)
    assert len(loader) == 3 and len(list(loader)) == 3 and len(list(loader)) == 3
    assert len(loader.dataset) == 100  # attributes fall through to the DataLoader
    monkeypatch.delenv("DIVEKIT_BOOK_QUICK")
    assert len(loader) == 10 and len(list(loader)) == 10


def test_get_fashion_mnist_labels():
    assert D.get_fashion_mnist_labels(torch.tensor([0, 9, 3])) == ["t-shirt", "ankle boot", "dress"]


def write_mnist_format(folder: Path, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    arrays = (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, n_train, dtype=np.uint8),
              rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              rng.integers(0, 10, n_test, dtype=np.uint8))
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    folder.mkdir(parents=True)
    for name, a in zip(names, arrays):
        write_idx(folder / f"{name}.gz", a)
    return arrays


def test_fashion_mnist_in_the_books_layout(env, capsys):
    tx, ty, vx, vy = write_mnist_format(env["data"] / "FashionMNIST" / "raw", 12, 6, seed=1)
    train_iter, test_iter = D.load_data_fashion_mnist(5)
    assert (len(train_iter), len(test_iter)) == (3, 2)
    X, y = torch.cat([b[0] for b in test_iter]), torch.cat([b[1] for b in test_iter])
    assert X.shape == (6, 1, 28, 28) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(X[:, 0], torch.from_numpy(vx).float() / 255)  # ToTensor's scaling, in order
    assert torch.equal(y, torch.from_numpy(vy).long())
    Xt = torch.cat([b[0] for b in train_iter])
    assert sorted(Xt.sum(dim=(1, 2, 3)).tolist()) == sorted(
        (torch.from_numpy(tx).float() / 255).sum(dim=(1, 2)).tolist())
    assert capsys.readouterr().err == ""  # the real thing: no note


def test_fashion_mnist_resize(env):
    _, _, vx, _ = write_mnist_format(env["dk"] / "FashionMNIST" / "raw", 4, 4, seed=2)
    _, test_iter = D.load_data_fashion_mnist(4, resize=64)
    X, _ = next(iter(test_iter))
    assert X.shape == (4, 1, 64, 64) and X.dtype == torch.float32
    assert 0 <= X.min() and X.max() <= 1
    # torchvision's Resize on the PIL image (what the book does), up to interpolation details
    ref = torchvision.transforms.Compose([torchvision.transforms.Resize(64),
                                          torchvision.transforms.ToTensor()])
    expected = torch.stack([ref(Image.fromarray(v)) for v in vx])
    assert (X - expected).abs().mean() < 0.02


def test_mnist_stands_in_with_one_note(env, capsys):
    _, _, vx, _ = write_mnist_format(env["dk"] / "MNIST" / "raw", 8, 4, seed=3)
    for _ in range(2):
        _, test_iter = D.load_data_fashion_mnist(4)
    X, _ = next(iter(test_iter))
    assert torch.equal(X[:, 0], torch.from_numpy(vx).float() / 255)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("d2l: Fashion-MNIST not found")
    assert f"using MNIST from {env['dk']}" in err[0] and "numbers differ" in err[0]


def test_digits_stand_in_when_there_is_no_mnist_either(capsys):
    train_iter, test_iter = D.load_data_fashion_mnist(256)
    X, y = next(iter(train_iter))
    assert X.shape == (256, 1, 28, 28) and 0 <= X.min() and X.max() <= 1 and y.max() <= 9
    assert len(train_iter.dataset) + len(test_iter.dataset) == 1797
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "digits upscaled to 28x28" in err[0]


def test_strict_mode_refuses_stand_ins(env, monkeypatch):
    write_mnist_format(env["dk"] / "MNIST" / "raw", 2, 2, seed=4)
    monkeypatch.setenv("DIVEKIT_BOOK_STRICT", "1")
    with pytest.raises(DataNotFoundError, match="Fashion-MNIST .*not found") as e:
        D.load_data_fashion_mnist(4)
    one_line(e)
    with pytest.raises(DataNotFoundError, match="banana-detection.zip") as e:
        D.load_data_bananas(4)
    one_line(e)
    with pytest.raises(DataNotFoundError, match="VOCtrainval_11-May-2012.tar") as e:
        D.read_voc_images("../data/VOCdevkit/VOC2012")
    one_line(e)


# ============================================================================ bananas
def write_bananas(root: Path, boxes: list[list[int]]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    images = []
    for split in ("bananas_train", "bananas_val"):
        (root / split / "images").mkdir(parents=True)
        lines = ["img_name,label,xmin,ymin,xmax,ymax"]
        for i, box in enumerate(boxes):
            img = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / split / "images" / f"{i}.png")
            lines.append(f"{i}.png,0,{','.join(map(str, box))}")
            images.append(img)
        (root / split / "label.csv").write_text("\n".join(lines) + "\n")
    return images


def test_read_data_bananas_in_the_books_format(env, capsys):
    boxes = [[10, 20, 50, 80], [100, 0, 256, 30]]
    images = write_bananas(env["data"] / "banana-detection", boxes)
    features, labels = D.read_data_bananas(is_train=True)
    assert isinstance(features, list) and len(features) == 2
    assert features[0].dtype == torch.uint8 and features[0].shape == (3, 256, 256)
    assert torch.equal(features[1], torch.from_numpy(images[1]).permute(2, 0, 1))
    assert labels.shape == (2, 1, 5) and labels.dtype == torch.float32
    assert torch.equal(labels[:, 0], torch.tensor([[0.0, *b] for b in boxes]) / 256)
    ds = D.BananasDataset(is_train=False)
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.max() > 1 and len(ds) == 2  # the book's 0..255 floats
    assert capsys.readouterr().out == "read 2 validation examples\n"


def test_banana_stand_in_in_the_books_layout(env, capsys):
    import pandas as pd

    data_dir = Path(D.download_extract("banana-detection"))
    assert data_dir == env["home"] / ".cache" / "divekit" / "d2l-substitutes" / "banana-detection" \
        / "banana-detection"
    assert not (env["dk"] / "d2l-substitutes").exists()  # never mixed into $DIVEKIT_DATA
    csv = pd.read_csv(data_dir / "bananas_train" / "label.csv").set_index("img_name")
    assert len(csv) == 5 and list(csv.columns) == ["label", "xmin", "ymin", "xmax", "ymax"]
    for name, row in csv.iterrows():  # what the section's own reader does
        img = torchvision.io.read_image(str(data_dir / "bananas_train" / "images" / name))
        assert img.shape == (3, 256, 256) and row["label"] == 0
        assert 0 <= row["xmin"] < row["xmax"] <= 256 and 0 <= row["ymin"] < row["ymax"] <= 256
    train_iter, val_iter = D.load_data_bananas(2)
    X, Y = next(iter(train_iter))
    assert X.shape == (2, 3, 256, 256) and X.dtype == torch.float32 and X.max() <= 255
    assert Y.shape == (2, 1, 5) and (Y[..., 0] == 0).all()
    assert ((0 <= Y[..., 1:]) & (Y[..., 1:] <= 1)).all() and (Y[..., 3] > Y[..., 1]).all()
    assert len(val_iter.dataset) == 3
    captured = capsys.readouterr()
    notes = captured.err.splitlines()
    assert len(notes) == 1 and notes[0].startswith("d2l: banana-detection.zip (sha1 5de26c8f")
    assert "generated shapes in the banana format" in notes[0]
    assert captured.out == "read 5 training examples\nread 3 validation examples\n"


def test_the_banana_stand_in_boxes_are_the_shapes(env):
    """The CSV's boxes are the generator's exact boxes (in pixels) of one object per image."""
    data_dir = Path(D.download_extract("banana-detection"))
    _, labels = read_banana_split(data_dir / "bananas_train")
    _, ref = make_shapes(5, 256, seed=7001 * 1000, objects=(1, 1))
    assert torch.allclose(labels[:, 0, 1:], ref[:, 0, 1:], atol=0.5 / 256)


def test_the_stand_in_is_written_once_and_rebuilt_in_quick_mode(env, monkeypatch):
    first = Path(D.download_extract("banana-detection"))
    stamp = (first / "bananas_train" / "label.csv").stat().st_mtime_ns
    assert Path(D.download_extract("banana-detection")) == first
    assert (first / "bananas_train" / "label.csv").stat().st_mtime_ns == stamp
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")
    D.download_extract("banana-detection")
    assert len((first / "bananas_train" / "label.csv").read_text().splitlines()) == 1 + 4


# ============================================================================ VOC
def test_voc_constants():
    assert D.VOC_COLORMAP[:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]] and len(D.VOC_COLORMAP) == 21
    assert D.VOC_CLASSES[0] == "background" and D.VOC_CLASSES[-1] == "tv/monitor"
    assert len(D.VOC_CLASSES) == 21


def brute_force_classes(rgb: torch.Tensor) -> torch.Tensor:
    """The book's table lookup, written out: a class colour gives its index, anything else 0."""
    out = torch.zeros(rgb.shape[1:], dtype=torch.int64)
    for y in range(rgb.shape[1]):
        for x in range(rgb.shape[2]):
            colour = rgb[:, y, x].tolist()
            out[y, x] = D.VOC_COLORMAP.index(colour) if colour in D.VOC_COLORMAP else 0
    return out


def random_colour_label(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, 21, (h, w), generator=g)
    palette = torch.tensor(D.VOC_COLORMAP + [list(VOC_BORDER)], dtype=torch.uint8)
    classes[torch.rand(h, w, generator=g) < 0.2] = 21  # the border colour
    return palette[classes].permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("seed", [0, 1])
def test_voc_label_indices_against_brute_force(seed):
    rgb = random_colour_label(13, 17, seed)
    expected = brute_force_classes(rgb)
    got = D.voc_label_indices(rgb, D.voc_colormap2label())
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    c = rgb.long()
    codes = (c[0] * 256 + c[1]) * 256 + c[2]
    assert torch.equal(D.voc_colormap2label()[codes], expected)  # indexing as the book's table
    table = torch.zeros(256 ** 3, dtype=torch.int8)  # a real table, the book's way, indexed
    for i, (r, g, b) in enumerate(D.VOC_COLORMAP):
        table[(r * 256 + g) * 256 + b] = i
    assert torch.equal(D.voc_label_indices(rgb, table).long(), expected)


def test_a_colour_outside_the_voc_map_is_one_line():
    rgb = random_colour_label(4, 5, 0)
    rgb[:, 1, 2] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    with pytest.raises(DivekitError, match=r"\(1, 2, 3\)") as e:
        D.voc_label_indices(rgb, D.voc_colormap2label())
    one_line(e)


def test_voc_rand_crop_keeps_feature_and_label_aligned_and_matches_torchvision():
    h, w = 30, 40
    feature = torch.arange(3 * h * w).reshape(3, h, w)
    label = feature[0] * 7  # a per-pixel function of the feature
    torch.manual_seed(5)
    for _ in range(10):
        f, lab = D.voc_rand_crop(feature, label, 11, 13)
        assert f.shape == (3, 11, 13) and lab.shape == (11, 13)
        assert torch.equal(lab, f[0] * 7)
    torch.manual_seed(6)
    f, _ = D.voc_rand_crop(feature, label, 11, 13)
    torch.manual_seed(6)
    top, left, _, _ = torchvision.transforms.RandomCrop.get_params(feature, (11, 13))
    assert torch.equal(f, feature[:, top:top + 11, left:left + 13])  # the book's crop, same stream
    colour = random_colour_label(h, w, 1)
    f, lab = D.voc_rand_crop(feature, colour, 11, 13)  # the book crops (3, H, W) colour labels
    assert lab.shape == (3, 11, 13)


def test_read_voc_images_reads_the_real_format(capsys):
    features, labels = D.read_voc_images(str(VOC_FIXTURE), is_train=True)
    names = (VOC_FIXTURE / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(features) == len(labels) == len(names) == 4
    for name, x, y in zip(names, features, labels):
        assert x.dtype == y.dtype == torch.uint8 and x.shape[0] == y.shape[0] == 3
        assert x.shape == y.shape
        ref = torchvision.io.read_image(str(VOC_FIXTURE / "SegmentationClass" / f"{name}.png"),
                                        torchvision.io.ImageReadMode.RGB)
        assert torch.equal(y, ref)  # what the book's reader gives
    assert len(D.read_voc_images(VOC_FIXTURE, is_train=False)[0]) == 2
    assert capsys.readouterr().err == ""


def test_voc_seg_dataset_items(capsys):
    features, labels = D.read_voc_images(VOC_FIXTURE, True)
    crop = (40, 50)
    ds = D.VOCSegDataset(True, crop, str(VOC_FIXTURE))
    keep = [i for i, x in enumerate(features) if x.shape[1] >= 40 and x.shape[2] >= 50]
    assert len(ds) == len(keep) >= 1
    assert capsys.readouterr().out == f"read {len(keep)} examples\n"
    for k, i in enumerate(keep):
        torch.manual_seed(k)
        x, y = ds[k]
        assert x.shape == (3, 40, 50) and x.dtype == torch.float32
        assert y.shape == (40, 50) and y.dtype == torch.int64
        torch.manual_seed(k)  # replay the book's item: crop, normalise, look up colours
        top, left, _, _ = torchvision.transforms.RandomCrop.get_params(features[i], crop)
        f = features[i][:, top:top + 40, left:left + 50].float() / 255
        mean, std = torch.tensor(D._VOC_MEAN)[:, None, None], torch.tensor(D._VOC_STD)[:, None, None]
        assert torch.allclose(x, (f - mean) / std, atol=1e-6)
        assert torch.equal(y, brute_force_classes(labels[i][:, top:top + 40, left:left + 50]))
    assert len(D.VOCSegDataset(True, (1000, 1000), VOC_FIXTURE)) == 0  # all filtered, as the book


def test_voc_stand_in_is_a_real_voc_folder(env, capsys):
    voc_dir = Path(D.download_extract("voc2012", "VOCdevkit/VOC2012"))
    assert voc_dir.parts[-2:] == ("VOCdevkit", "VOC2012")
    names = (voc_dir / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(names) == 3
    png = Image.open(voc_dir / "SegmentationClass" / f"{names[0]}.png")
    assert png.mode == "P" and png.size == (512, 384)
    features, labels = D.read_voc_images(voc_dir, True)
    assert features[0].shape == labels[0].shape == (3, 384, 512)
    classes = D.voc_label_indices(labels[0], D.voc_colormap2label())
    assert set(classes.unique().tolist()) <= {0, 1, 2, 3}
    train_iter, test_iter = D.load_data_voc(2, (320, 480))
    X, Y = next(iter(train_iter))
    assert X.shape == (2, 3, 320, 480) and X.dtype == torch.float32
    assert Y.shape == (2, 320, 480) and Y.dtype == torch.int64
    assert len(train_iter) == 1 and len(test_iter) == 1  # drop_last: 3 → 1 batch, 2 → 1
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 1 and "VOCtrainval_11-May-2012.tar" in notes[0]


def test_read_voc_images_from_a_missing_folder_uses_the_stand_in(env, capsys):
    features, labels = D.read_voc_images(Path("..", "data", "VOCdevkit", "VOC2012"), False)
    assert len(features) == len(labels) == 2
    assert "generated segmentation scenes" in capsys.readouterr().err


# ============================================================================ Kaggle CIFAR-10
def write_kaggle(root: Path, labels: dict[int, str], n_test: int, extra_rows: int = 0) -> None:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    for i in labels:
        (root / "train" / f"{i}.png").write_bytes(f"image {i}".encode())
    for i in range(1, n_test + 1):
        (root / "test" / f"{i}.png").write_bytes(b"t")
    rows = ["id,label"] + [f"{i},{c}" for i, c in labels.items()]
    rows += [f"{1000 + j},cat" for j in range(extra_rows)]  # rows without an image
    (root / "trainLabels.csv").write_text("\n".join(rows) + "\n\n")


def test_kaggle_reorganisation(tmp_path):
    labels = {i: ("cat" if i % 3 else "dog") for i in range(1, 31)}  # 20 cats, 10 dogs
    write_kaggle(tmp_path / "k", labels, n_test=4, extra_rows=100)
    read = D.read_csv_labels(tmp_path / "k" / "trainLabels.csv")
    assert len(read) == 130 and read["3"] == "dog" and read["1"] == "cat"
    n = D.reorg_train_valid(str(tmp_path / "k"), read, 0.25)
    assert n == 2  # the smallest class present (10 dogs) × 0.25
    out = tmp_path / "k" / "train_valid_test"
    count = {(s, c): len(list((out / s / c).iterdir()))
             for s in ("train", "valid", "train_valid") for c in ("cat", "dog")}
    assert count == {("train", "cat"): 18, ("train", "dog"): 8, ("valid", "cat"): 2,
                     ("valid", "dog"): 2, ("train_valid", "cat"): 20, ("train_valid", "dog"): 10}
    assert sorted(p.name for p in (out / "valid" / "dog").iterdir()) == ["12.png", "15.png"]
    assert (out / "valid" / "cat" / "1.png").read_bytes() == b"image 1"
    D.reorg_test(tmp_path / "k")
    assert len(list((out / "test" / "unknown").iterdir())) == 4
    D.copyfile(tmp_path / "k" / "trainLabels.csv", tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir" / "trainLabels.csv").is_file()


def test_cifar10_tiny_stand_in_from_the_sample(env, capsys):
    write_kaggle(env["dk"] / "kaggle_cifar10_sample", {1: "cat", 2: "dog", 7: "cat"}, 2,
                 extra_rows=50)
    data_dir = Path(D.download_extract("cifar10_tiny"))
    assert data_dir.name == "kaggle_cifar10_tiny"
    labels = D.read_csv_labels(data_dir / "trainLabels.csv")
    assert labels == {"1": "cat", "2": "dog", "7": "cat"}  # cut to the images present
    assert "Kaggle CIFAR-10 sample" in capsys.readouterr().err
    D.reorg_train_valid(data_dir, labels, 0.1)
    assert not (env["dk"] / "kaggle_cifar10_sample" / "train_valid_test").exists()


def test_cifar10_tiny_without_the_sample_is_not_found():
    with pytest.raises(DataNotFoundError, match="kaggle_cifar10_tiny.zip") as e:
        D.download_extract("cifar10_tiny")
    one_line(e)


# ============================================================================ divekit hooks
def test_make_shapes_objects_hook():
    _, labels = make_shapes(6, 48, seed=3, objects=(1, 1))
    assert ((labels[..., 0] >= 0).sum(dim=1) == 1).all()
    a, b = make_shapes(4, 48, seed=3), make_shapes(4, 48, seed=3, objects=(0, 3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # the default stream is unchanged
    with pytest.raises(DivekitError, match="objects"):
        make_shapes(1, 48, seed=0, objects=(2, 5))


def test_read_banana_split_uint8_hook(tmp_path):
    write_bananas(tmp_path, [[1, 2, 30, 40]])
    xf, yf = read_banana_split(tmp_path / "bananas_train")
    xu, yu = read_banana_split(tmp_path / "bananas_train", dtype=torch.uint8)
    assert xu.dtype == torch.uint8 and torch.equal(xu.float() / 255, xf) and torch.equal(yu, yf)


# ============================================================================ hotdog
def test_hotdog_stand_in_is_a_two_class_image_folder(env, monkeypatch, capsys):
    monkeypatch.setattr(D, "_HOTDOG_SIZES", {False: (12, 6), True: (12, 6)})
    data_dir = D.download_extract("hotdog")
    train = torchvision.datasets.ImageFolder(str(Path(data_dir) / "train"))
    test = torchvision.datasets.ImageFolder(str(Path(data_dir) / "test"))
    assert train.classes == ["hotdog", "not-hotdog"] and len(train) == 12 and len(test) == 6
    _, labels = make_shapes(12, 32, seed=9001 * 1000, objects=(1, 1))
    assert sorted(t for _, t in train.samples) == sorted((labels[:, 0, 0] != 1).long().tolist())
    assert "two-class hotdog folder" in capsys.readouterr().err


def test_hotdog_quick_stand_in_has_eight_of_each_class_for_the_section():
    """The section shows 8 images of each class; the kinds do not depend on the image size."""
    for count, seed in zip(D._HOTDOG_SIZES[True], (9001, 9002)):
        _, labels = make_shapes(count, 32, seed=seed * 1000, objects=(1, 1))
        discs = int((labels[:, 0, 0] == 1).sum())
        assert discs >= 8 and count - discs >= 8


# ============================================================================ signatures
@pytest.mark.skipif(not (SHARED / "book" / "API.md").is_file(), reason="../shared/book absent")
def test_signatures_are_the_books():
    import inspect

    text = (SHARED / "book" / "API.md").read_text()
    checked = 0
    for name in D.__all__:
        row = re.search(rf"^\| \*{{0,2}}`{re.escape(name)}`\*{{0,2}} \| (\w+) \|[^|]*\| `([^`]*)`",
                        text, re.M)
        assert row, name
        kind, sig = row.groups()
        if kind == "constant":
            continue
        if kind == "class":
            sig = re.search(r"__init__(\(.*?\))", sig).group(1) if "__init__" in sig else sig
            params = list(inspect.signature(getattr(D, name).__init__).parameters.values())[1:]
        else:
            params = list(inspect.signature(getattr(D, name)).parameters.values())
        ours = ", ".join(p.name if p.default is inspect.Parameter.empty
                         else f"{p.name}={p.default!r}" for p in params)
        book = sig[1:-1].replace("os.path.join('..', 'data')", repr(str(Path("..", "data"))))
        assert ours == book, name
        checked += 1
    assert checked == 19


def test_load_data_voc_finds_a_real_voc_folder_in_data(env, capsys, monkeypatch):
    import shutil

    shutil.copytree(VOC_FIXTURE, env["data"] / "VOCdevkit" / "VOC2012")
    train_iter, test_iter = D.load_data_voc(2, (24, 30))  # every fixture image is that large
    X, Y = next(iter(train_iter))
    assert X.shape == (2, 3, 24, 30) and Y.shape == (2, 24, 30) and Y.dtype == torch.int64
    assert (len(train_iter), len(test_iter)) == (2, 1)  # 4 train, 2 val images
    assert capsys.readouterr().err == ""  # the real folder: no stand-in, no note
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_BATCHES", "1")
    assert len(train_iter) == 1 and len(list(train_iter)) == 1


def test_quick_mode_bounds_the_fashion_mnist_loaders(env, monkeypatch):
    write_mnist_format(env["data"] / "FashionMNIST" / "raw", 12, 6, seed=1)
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK", "1")
    monkeypatch.setenv("DIVEKIT_BOOK_QUICK_BATCHES", "2")
    train_iter, test_iter = D.load_data_fashion_mnist(2)
    assert (len(train_iter), len(test_iter)) == (2, 2)
    assert len(list(train_iter)) == 2 and len(train_iter.dataset) == 12
