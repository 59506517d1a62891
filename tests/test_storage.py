from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fp_ray.storage import SectionStore, StorageError, exists, fingerprint, read_bytes, write_bytes


@pytest.mark.parametrize("as_uri", [False, True])
def test_section_round_trip_by_path_and_uri(tmp_path, as_uri):
    root = tmp_path.as_uri() if as_uri else str(tmp_path)
    store = SectionStore(root)
    latents = torch.randn(1, 16, 9, 6, 8)
    where = store.save("clip-1", "ab" * 32, 3, latents)
    assert exists(where)
    assert torch.equal(store.load("clip-1", "ab" * 32, 3), latents)
    assert store.load("clip-1", "cd" * 32, 3) is None  # same id, other content: nothing reused
    assert [p for p in range(5) if store.has("clip-1", "ab" * 32, p, "section")] == [3]


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    write_bytes(str(tmp_path / "a" / "b.bin"), b"one")
    write_bytes(str(tmp_path / "a" / "b.bin"), b"two")
    assert read_bytes(tmp_path / "a" / "b.bin") == b"two"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]


def test_unsafe_ids_and_bad_uris_are_refused(tmp_path):
    with pytest.raises(StorageError, match="not a safe name"):
        SectionStore(tmp_path).location("../x", "ab" * 32, 0)
    with pytest.raises(StorageError, match="not a safe name"):
        SectionStore(tmp_path).location("a\n", "ab" * 32, 0)  # a trailing newline, which "$" lets through
    with pytest.raises(StorageError, match="cannot open storage"):
        SectionStore("nosuchscheme://bucket/x")
    # a fingerprint names a folder too: one that is not a sha256 (a garbled record's "../..")
    # reaches no path, and removes nothing
    (tmp_path / "store" / "r").mkdir(parents=True)
    (tmp_path / "victim").mkdir()
    for bad in ("../../victim", "../" * 8, "AB" * 32, "ab" * 31):
        with pytest.raises(StorageError, match="not a sha256"):
            SectionStore(tmp_path / "store").remove("r", bad)
    assert (tmp_path / "victim").is_dir() and (tmp_path / "store" / "r").is_dir()


def test_fingerprint_depends_on_image_bytes_not_names():
    assert fingerprint("{}", b"img") == fingerprint("{}", b"img")
    assert fingerprint("{}", b"img") != fingerprint("{}", b"img2")
    assert fingerprint("{}", b"img", None) != fingerprint("{}", b"img", b"end")


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "zeroed":
        data = bytearray(len(data))
    else:  # garbled: a few bytes of the payload flipped, the header intact
        for i in range(len(data) - 40, len(data) - 30):
            data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "zeroed", "garbled"])
def test_a_damaged_entry_reads_as_absent(tmp_path, how):
    store, fp = SectionStore(tmp_path), "ab" * 32
    section = store.save("r", fp, 1, torch.randn(1, 16, 3, 6, 8))
    segment = store.save_segment("r", fp, 1, b"\0\0\0\x08mdat" + bytes(range(256)) * 4)
    assert store.has("r", fp, 1, "section") and store.has("r", fp, 1, "segment")
    for where in (section, segment):
        _damage(Path(where), how)
    assert store.load("r", fp, 1) is None and not store.has("r", fp, 1, "section")
    assert store.load_segment("r", fp, 1) is None and not store.has("r", fp, 1, "segment")


def test_an_entry_moved_to_another_place_does_not_check_out(tmp_path):
    store, fp = SectionStore(tmp_path), "ab" * 32
    latents = torch.randn(1, 16, 3, 6, 8, dtype=torch.bfloat16)
    Path(store.location("r", fp, 2)).parent.mkdir(parents=True)
    os.replace(store.save("r", fp, 1, latents), store.location("r", fp, 2))  # another position
    os.replace(store.save("r", fp, 1, latents, "lead"), store.location("r", fp, 1, "tail"))  # another kind
    os.replace(store.save_segment("r", fp, 1, b"mp4"), store.location("r", fp, 2, "segment"))
    assert store.load("r", fp, 2) is None and store.load("r", fp, 1, "tail") is None
    assert store.load_segment("r", fp, 2) is None
    store.save("r", fp, 1, latents)
    assert torch.equal(store.load("r", fp, 1), latents)  # bfloat16 round-trips and checks out in place


def test_a_symlink_in_the_store_is_replaced_not_written_through(tmp_path):
    store, fp = SectionStore(tmp_path / "store"), "ab" * 32
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep me")
    where = Path(store.location("r", fp, 0))
    where.parent.mkdir(parents=True)
    where.symlink_to(outside)
    assert store.load("r", fp, 0) is None
    store.save("r", fp, 0, torch.ones(2))
    assert outside.read_bytes() == b"keep me" and not where.is_symlink()
    assert torch.equal(store.load("r", fp, 0), torch.ones(2))


def test_a_killed_renders_temporary_store_is_removed_by_the_next(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys
    import tempfile

    from fp_ray.coordinator import render_store
    from fp_ray.storage import temporary_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    host = socket.gethostname()
    orphan = tmp_path / f"fp-ray-{host}-{gone}.abc"  # a render killed without --store
    (orphan / "r" / "fp").mkdir(parents=True)
    (orphan / "r" / "fp" / "section_000.safetensors").write_bytes(b"latents")
    running = tmp_path / f"fp-ray-{host}-{os.getpid()}.def"  # one in flight
    running.mkdir()
    outside = tmp_path / "keep"
    outside.mkdir()
    (tmp_path / f"fp-ray-{host}-{gone}.lnk").symlink_to(outside)  # a link is removed, never followed
    clip = tmp_path / f"fp-ray-{host}-{gone}.clip-x1y2"  # an extension's downloaded or re-encoded clip
    clip.mkdir()
    (clip / "clip.mp4").write_bytes(b"\0" * 1024)
    with render_store(None) as store:
        assert Path(store.root).name.startswith(f"fp-ray-{host}-{os.getpid()}.store-")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["keep", running.name, Path(store.root).name])
        with temporary_folder("clip") as folder:  # what extend.py downloads and re-encodes into
            assert folder.name.startswith(f"fp-ray-{host}-{os.getpid()}.clip-") and folder.parent == tmp_path
        assert not folder.exists()
    assert outside.is_dir()


def test_a_killed_writers_temporary_entries_are_removed_from_the_render_folder(tmp_path):
    import socket
    import subprocess
    import sys

    store, fp = SectionStore(tmp_path), "ab" * 32
    folder = Path(store.save("r", fp, 0, torch.ones(2))).parent
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    host = socket.gethostname()
    (folder / f".{host}-{gone}.0123.tmp").write_bytes(b"half a section")
    (folder / f".{host}-{os.getpid()}.4567.tmp").write_bytes(b"being written")
    store.remove_orphans("r", fp)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f".{host}-{os.getpid()}.4567.tmp", "section_000.safetensors"])


def test_a_live_writer_elsewhere_with_this_hostname_keeps_its_temporary_files(tmp_path):
    """Containers on one machine may share its hostname (Docker's --network host, Kubernetes'
    hostNetwork) and number their processes apart: a pid that is no process here may be a live
    writer there. A writer holds a lock on its file while it writes; a held file is left alone."""
    import fcntl
    import socket
    import subprocess
    import sys

    from fp_ray.storage import remove_orphans

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    host = socket.gethostname()
    store, fp = SectionStore(tmp_path / "store"), "ab" * 32
    folder = Path(store.save("r", fp, 0, torch.ones(2))).parent
    writing = [folder / f".{host}-{gone}.0123.tmp", tmp_path / f".v.mp4.{host}-{gone}.abc.tmp", tmp_path / f"fp-ray-{host}-{gone}.def"]
    killed = [folder / f".{host}-{gone}.4567.tmp", tmp_path / f".v.mp4.{host}-{gone}.ghi.tmp", tmp_path / f"fp-ray-{host}-{gone}.jkl"]
    for path in writing + killed:
        path.mkdir() if path.name.startswith("fp-ray-") else path.write_bytes(b"being written")
    held = [os.open(path, os.O_RDONLY) for path in writing]  # the other container's writers
    try:
        for fd in held:
            fcntl.flock(fd, fcntl.LOCK_EX)
        store.remove_orphans("r", fp)
        remove_orphans(tmp_path, ".v.mp4.", ".tmp")
        remove_orphans(tmp_path, "fp-ray-")
    finally:
        for fd in held:
            os.close(fd)
    assert all(path.exists() for path in writing) and not any(path.exists() for path in killed)
