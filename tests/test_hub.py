"""The data hub: verified downloads from a local HTTP server, and archive extraction that never
writes outside its destination. Nothing here touches the internet."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from divekit import hub
from divekit.errors import DataNotFoundError, DivekitError, UnknownNameError

CONTENT = b"The Time Machine, by H. G. Wells [1898]\n" * 100


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Point the cache at a fresh folder so no test reads or writes ~/.cache."""
    home = tmp_path / "cache"
    monkeypatch.setenv("DIVEKIT_DATA", str(home))
    return home


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# ----------------------------------------------------------------------------- hashes


def test_data_home_follows_the_environment(cache):
    assert hub.data_home() == cache


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("a" * 40, ("sha1", "a" * 40)),
        ("md5:" + "B" * 32, ("md5", "b" * 32)),
        ("sha256:" + "0" * 64, ("sha256", "0" * 64)),
        ("sha1:" + "1" * 40, ("sha1", "1" * 40)),
    ],
)
def test_hash_specs(spec, expected):
    assert hub.parse_hash(spec) == expected


@pytest.mark.parametrize("spec", ["md5:" + "a" * 40, "crc32:abcd", "xyz", "sha1:" + "g" * 40])
def test_malformed_hash_spec_is_refused(spec):
    with pytest.raises(DivekitError, match="bad hash"):
        hub.parse_hash(spec)


def test_the_course_entries_are_in_the_hub():
    assert hub.DATA_HUB["time_machine"] == (
        hub.DATA_URL + "timemachine.txt", "090b5e7e70c295757f55df93cb0a180b9691891a"
    )
    for url, spec in hub.DATA_HUB.values():
        assert url.startswith(("http://", "https://"))
        hub.parse_hash(spec)
    assert hub.DATA_HUB["mnist/train-labels-idx1-ubyte.gz"][1] == "md5:d53e105ee54ea40749a09fcbcd1e9432"


# ----------------------------------------------------------------------------- download


def test_download_verifies_and_caches(server, cache, monkeypatch):
    base, www, requests = server
    (www / "timemachine.txt").write_bytes(CONTENT)
    monkeypatch.setitem(hub.DATA_HUB, "tm", (base + "timemachine.txt", sha1(CONTENT)))

    path = hub.download("tm", progress=False)
    assert path == cache / "timemachine.txt"
    assert path.read_bytes() == CONTENT
    assert requests == ["/timemachine.txt"]

    assert hub.download("tm", progress=False) == path  # cached: the server is not asked again
    assert requests == ["/timemachine.txt"]
    assert sorted(p.name for p in cache.iterdir()) == ["timemachine.txt"]  # no temp file left


def test_download_by_url_with_an_md5_spec(server, tmp_path):
    base, www, _ = server
    (www / "a.bin").write_bytes(CONTENT)
    spec = "md5:" + hashlib.md5(CONTENT).hexdigest()
    path = hub.download(base + "a.bin", tmp_path / "elsewhere", sha1=spec, progress=False)
    assert path.read_bytes() == CONTENT and path.parent == tmp_path / "elsewhere"


def test_a_cached_file_with_a_wrong_hash_is_fetched_again(server, cache, monkeypatch):
    base, www, requests = server
    (www / "f.txt").write_bytes(CONTENT)
    monkeypatch.setitem(hub.DATA_HUB, "f", (base + "f.txt", sha1(CONTENT)))
    cache.mkdir()
    (cache / "f.txt").write_bytes(b"stale")
    assert hub.download("f", progress=False).read_bytes() == CONTENT
    assert len(requests) == 1


def test_corrupted_download_leaves_nothing(server, cache, monkeypatch):
    base, www, _ = server
    (www / "f.txt").write_bytes(CONTENT + b"tampered")
    monkeypatch.setitem(hub.DATA_HUB, "f", (base + "f.txt", sha1(CONTENT)))
    with pytest.raises(DivekitError) as e:
        hub.download("f", progress=False)
    message = str(e.value)
    assert sha1(CONTENT) in message and sha1(CONTENT + b"tampered") in message
    assert str(cache) in message and "\n" not in message
    assert list(cache.iterdir()) == []  # neither the temp file nor the bad file


def test_missing_remote_file_is_a_clear_error(server, cache):
    base, _, _ = server
    with pytest.raises(DivekitError, match=r"404.*put 'nope\.zip' in"):
        hub.download(base + "nope.zip", sha1="a" * 40, progress=False)
    assert list(cache.iterdir()) == []


def test_unreachable_server_is_a_clear_error(cache):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DivekitError, match=f"cannot download .*127.0.0.1:{port}"):
        hub.download(f"http://127.0.0.1:{port}/x.txt", progress=False, timeout=5)


def test_unknown_hub_name():
    with pytest.raises(UnknownNameError, match="time_machine"):
        hub.download("no-such-file")


# ----------------------------------------------------------------------------- extraction


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_extract_zip_and_tar_gz(tmp_path):
    members = {"fra-eng/fra.txt": b"Go.\tVa !\n", "fra-eng/_about.txt": b"about"}
    z = make_zip(tmp_path / "a.zip", members)
    t = make_tar(tmp_path / "a.tar.gz", list(members.items()))
    for archive in (z, t):
        dest = hub.extract(archive, tmp_path / archive.name.replace(".", "_"))
        assert (dest / "fra-eng" / "fra.txt").read_bytes() == b"Go.\tVa !\n"
        assert files_under(dest) == ["fra-eng", "fra-eng/_about.txt", "fra-eng/fra.txt"]


def test_a_link_inside_the_destination_is_fine(tmp_path):
    t = make_tar(tmp_path / "ok.tgz", [("data/a.txt", b"a"), link("data/b.txt", "a.txt")])
    dest = hub.extract(t, tmp_path / "out")
    assert (dest / "data" / "b.txt").read_bytes() == b"a"


EVIL_TARS = {
    "dotdot": [("ok.txt", b"ok"), ("../evil", b"x")],
    "absolute": [("ok.txt", b"ok"), ("/tmp/divekit-test-evil", b"x")],
    "symlink-out": [("ok.txt", b"ok"), link("escape", "../..")],
    "absolute-symlink": [("ok.txt", b"ok"), link("escape", "/etc")],
    "write-through-link": [link("d", "."), link("e", "d/.."), ("e/evil", b"x")],
    "hardlink-out": [("ok.txt", b"ok"), link("h", "../outside.txt", tarfile.LNKTYPE)],
}


@pytest.mark.parametrize("case", sorted(EVIL_TARS))
def test_unsafe_tar_is_refused_and_nothing_written(tmp_path, case):
    box = tmp_path / "box"  # everything the test may touch lives here
    box.mkdir()
    (box / "outside.txt").write_bytes(b"secret")
    archive = make_tar(box / "evil.tar.gz", EVIL_TARS[case])
    dest = box / "work" / "dest"
    before = files_under(box)
    with pytest.raises(DivekitError, match="refusing to extract.*nothing extracted"):
        hub.extract(archive, dest)
    assert files_under(box) == sorted([*before, "work", "work/dest"])  # dest made but empty
    assert not Path("/tmp/divekit-test-evil").exists()


@pytest.mark.parametrize("name", ["../evil", "/tmp/divekit-test-evil", "a/../../evil"])
def test_unsafe_zip_is_refused_and_nothing_written(tmp_path, name):
    archive = make_zip(tmp_path / "evil.zip", {"ok.txt": b"ok", name: b"x"})
    dest = tmp_path / "work" / "dest"
    with pytest.raises(DivekitError, match="refusing to extract"):
        hub.extract(archive, dest)
    assert files_under(tmp_path) == ["evil.zip", "work", "work/dest"]
    assert not Path("/tmp/divekit-test-evil").exists()


def test_zip_symlink_pointing_outside_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("escape")
        info.external_attr = 0o120777 << 16  # a symlink; its data is the target
        zf.writestr(info, "../../etc")
    with pytest.raises(DivekitError, match="symlink"):
        hub.extract(archive, tmp_path / "dest")
    assert files_under(tmp_path / "dest") == []


def test_not_an_archive(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"plain text")
    with pytest.raises(DivekitError, match="not a zip or tar"):
        hub.extract(tmp_path / "x.zip")


def test_download_extract_unpacks_once(server, cache, monkeypatch):
    base, www, requests = server
    archive = make_zip(www / "fra-eng.zip", {"fra-eng/fra.txt": b"Go.\tVa !\n"})
    monkeypatch.setitem(hub.DATA_HUB, "fe", (base + "fra-eng.zip", sha1(archive.read_bytes())))
    folder = hub.download_extract("fe")
    assert folder == cache / "fra-eng" and (folder / "fra.txt").is_file()
    (folder / "fra.txt").unlink()
    assert hub.download_extract("fe") == folder and not (folder / "fra.txt").exists()  # not redone
    assert len(requests) == 1


# ----------------------------------------------------------------------------- locate


def test_locate_finds_files_in_data_dir_subfolders_and_the_cache(tmp_path, cache):
    (tmp_path / "d" / "raw").mkdir(parents=True)
    (tmp_path / "d" / "raw" / "a.gz").write_bytes(b"a")
    (cache / "toy").mkdir(parents=True)
    (cache / "toy" / "b").write_bytes(b"b")
    found = hub.locate(["a", "b"], name="toy", data_dir=tmp_path / "d", subdirs=("", "raw"),
                       suffixes=(".gz", ""))
    assert found == [tmp_path / "d" / "raw" / "a.gz", cache / "toy" / "b"]


def test_locate_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(hub.DATA_HUB, "toy/a.gz", ("http://example.invalid/a.gz", "a" * 40))
    with pytest.raises(DataNotFoundError) as e:
        hub.locate(["a"], name="toy", data_dir=tmp_path, sources={"a": "toy/a.gz"})
    message = str(e.value)
    for part in ("a", "http://example.invalid/a.gz", str(tmp_path), "--download"):
        assert part in message
    assert "\n" not in message


def test_locate_downloads_when_asked(server, tmp_path, monkeypatch):
    base, www, _ = server
    (www / "a.gz").write_bytes(CONTENT)
    monkeypatch.setitem(hub.DATA_HUB, "toy/a.gz", (base + "a.gz", sha1(CONTENT)))
    found = hub.locate(["a"], name="toy", data_dir=tmp_path, suffixes=(".gz",),
                       sources={"a": "toy/a.gz"}, download=True, progress=False)
    assert found == [tmp_path / "a.gz"]


def test_locate_refuses_a_data_dir_that_does_not_exist(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        hub.locate(["a"], name="toy", data_dir=tmp_path / "nope")
