from __future__ import annotations

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
    with pytest.raises(StorageError, match="cannot open storage"):
        SectionStore("nosuchscheme://bucket/x")


def test_fingerprint_depends_on_image_bytes_not_names():
    assert fingerprint("{}", b"img") == fingerprint("{}", b"img")
    assert fingerprint("{}", b"img") != fingerprint("{}", b"img2")
    assert fingerprint("{}", b"img", None) != fingerprint("{}", b"img", b"end")
