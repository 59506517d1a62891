"""Where renders keep their work: a local folder or any `pyarrow.fs` URI (s3://, gs://, ...).

A render's work lives under `{root}/{request_id}/{fingerprint[:16]}/`: the section latents
(`section_{k:03d}.safetensors`), the finished video segments (`segment_{k:03d}.mp4`) and, while
a segment waits for its neighbour, the decoded pixels of its seam (`lead_{k:03d}` /
`tail_{k:03d}.safetensors`). The request id names the render, the fingerprint (request fields
+ image bytes) makes sure a reused id with different content never reads stale work.

Every entry carries a sha256 over its render, position, kind and content (a tensor next to the
latents; a trailing mp4 `free` box after a segment, which players skip), checked on every
read: a truncated, garbled or misplaced entry reads as absent and is made again, never trusted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import os
import re
import shutil
import socket
import struct
import stat
import tempfile
import urllib.error
import urllib.request
from typing import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

# \Z, not $: "$" also matches before a trailing newline, and "a\n" would name a folder
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
FINGERPRINT = re.compile(r"^[0-9a-f]{64}\Z")  # a render's sha256 (`fingerprint`), part of its folder's name


class StorageError(OSError):
    """A storage location or object that cannot be used; the message names it."""


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def filesystem(location: str | os.PathLike):
    """(pyarrow filesystem, path inside it) for a local path or a URI such as s3://bucket/prefix.
    pyarrow is imported here only: local files need none (a GPU box running the Ray-free
    modules may not have it)."""
    from pyarrow import fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as e:
        raise StorageError(f"cannot open storage {location}: {e}") from None


def _is_file(fs, path: str) -> bool:
    from pyarrow import fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


def join(location: str, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts])


class TooLarge(StorageError):
    """An object over the size its reader takes."""


def _capped(read, limit: int | None, location) -> bytes:
    data = read() if limit is None else read(limit + 1)
    if limit is not None and len(data) > limit:
        raise TooLarge(f"{location} is over {limit:,} bytes")
    return data


def read_bytes(location: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes of a local file, an http(s) URL or a pyarrow.fs URI (FileNotFoundError if
    absent). `limit`: at most this many bytes are read (TooLarge past it), and a local path must
    be a regular file (not a device or pipe that never ends)."""
    if not is_uri(location):
        path = Path(location)
        if limit is not None:
            mode = path.stat().st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, "is a folder", str(location))
            if not stat.S_ISREG(mode):
                raise StorageError(errno.EINVAL, "not a regular file", str(location))
        with path.open("rb") as f:
            return _capped(f.read, limit, location)
    with open_remote(location) as f:
        return _capped(f.read, limit, location)


@contextlib.contextmanager
def open_remote(location: str) -> Iterator:
    """An http(s) URL or pyarrow.fs URI as a stream to read from (`.read(n)`): FileNotFoundError
    if absent, StorageError if it cannot be fetched."""
    if not str(location).startswith(("http://", "https://")):
        fs, path = filesystem(location)
        if not _is_file(fs, path):
            raise FileNotFoundError(location)
        with fs.open_input_stream(path) as f:
            yield f
        return
    try:
        with urllib.request.urlopen(str(location), timeout=30) as r:
            yield r
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(location) from None
        raise StorageError(f"cannot fetch {location}: HTTP {e.code}") from None
    except urllib.error.URLError as e:
        raise StorageError(f"cannot fetch {location}: {e.reason}") from None


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write atomically: readers see the old object or the whole new one, never a part."""
    if not is_uri(location):
        # not resolved: a symlink at `location` is replaced, never written through (it could
        # point anywhere, e.g. into another render's store or at a system file); the temporary
        # file's name is the one SectionStore.remove_orphans looks for
        with atomic_file(os.path.abspath(location), prefix=".") as tmp:
            Path(tmp).write_bytes(data)
        return
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:  # object stores publish an object only when its upload completes
        f.write(data)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, prefix: str | None = None) -> Iterator[str]:
    """A temporary file in `path`'s folder, renamed to `path` when the block succeeds. Its name
    (`{prefix}{writer_tag()}.*.tmp`) says which process writes it, and it is held (`hold`)
    until renamed. With the default prefix (`.{name}.`), those of `path` whose process is gone
    (killed mid-write, so nothing removed them; a long video's are gigabytes) are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if prefix is None:
        prefix = f".{path.name}."
        remove_orphans(path.parent, prefix, ".tmp")
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{writer_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        hold(fd)  # until renamed: another container's render with this hostname leaves it
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an entry or a video is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def writer_tag() -> str:
    """This process, in the name of a temporary file or folder it writes (`{prefix}{tag}.`):
    a later run tells those a killed process left from those still being written."""
    return f"{socket.gethostname()}-{os.getpid()}"


def remove_orphans(folder: Path, prefix: str, suffix: str = "") -> None:
    """Remove what this host's processes that are gone left in `folder` as
    `{prefix}{writer_tag()}.*{suffix}`: nothing removes a killed writer's temporary files, and
    a long video's are gigabytes."""
    head = f"{prefix}{socket.gethostname()}-"
    for orphan in folder.glob(f"{glob.escape(head)}*{glob.escape(suffix)}"):
        pid = orphan.name[len(head):].split(".", 1)[0]
        if not pid.isdigit() or _running(int(pid)) or _held(orphan):
            continue
        if orphan.is_dir() and not orphan.is_symlink():
            shutil.rmtree(orphan, ignore_errors=True)
        else:
            orphan.unlink(missing_ok=True)


def hold(fd: int) -> None:
    """Mark the temporary file or folder open at `fd` as being written, until the descriptor
    closes: `remove_orphans` leaves what a live writer holds, whatever pid its name says (a
    container on this machine may share its hostname and number its processes apart). Where
    the filesystem has no locks, the pid alone tells."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX)


@contextlib.contextmanager
def temporary_folder(label: str) -> Iterator[Path]:
    """A temporary folder of this process (`fp-ray-{writer_tag()}.{label}-*` in the system's
    temporary folder), held while in use and removed after. Those a killed process left (a
    render's temporary store, a downloaded or re-encoded clip, a video on its way to a URI:
    gigabytes, possibly) are removed first."""
    root = Path(tempfile.gettempdir())
    remove_orphans(root, "fp-ray-")
    with tempfile.TemporaryDirectory(prefix=f"fp-ray-{writer_tag()}.{label}-") as tmp:
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            hold(fd)
            yield Path(tmp)
        finally:
            os.close(fd)


def _held(path: Path) -> bool:
    """Whether a live writer holds `path` (`hold`); a link is no writer's."""
    if path.is_symlink():
        return False
    try:  # an exclusive lock over NFS needs the file open for writing (folders: local ones)
        fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if path.is_dir() else (os.O_RDWR | os.O_NOFOLLOW))
    except FileNotFoundError:
        return False
    except OSError:  # cannot tell: left alone
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks here: the pid tells
        return False
    finally:
        os.close(fd)
    return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def exists(location: str | os.PathLike) -> bool:
    if not is_uri(location):
        return Path(location).is_file()
    return _is_file(*filesystem(location))


def upload(local: Path, location: str) -> None:
    """Copy a local file to a URI in blocks (a long video is never whole in memory); an
    object store publishes the object only when its upload completes."""
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with local.open("rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def delete(location: str | os.PathLike) -> None:
    """Remove an object if it exists."""
    if not is_uri(location):
        if Path(location).is_file():
            Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    if _is_file(fs, path):
        fs.delete_file(path)


def remove_tree(location: str) -> None:
    """Remove a folder (local path or storage URI) and everything under it, if it exists."""
    fs, path = filesystem(location)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file, read in chunks (a clip to extend may be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fingerprint(request_json: str, *images: bytes | None) -> str:
    """sha256 over what decides a render's output: the request and its image bytes."""
    h = hashlib.sha256(request_json.encode())
    for data in images:
        h.update(b"\0" if data is None else hashlib.sha256(data).digest())
    return h.hexdigest()


class SectionStore:
    """Finished sections and segments of every render, keyed by request id, fingerprint and position."""

    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        if is_uri(self.root):
            filesystem(self.root)  # fail early on an unusable URI

    def folder(self, request_id: str, fingerprint: str) -> str:
        """Where one render's checkpoints live: one folder per id and fingerprint (a sha256)."""
        if not SAFE_ID.match(request_id):
            raise StorageError(f"request id {request_id!r} is not a safe name ([A-Za-z0-9._-], 1-128 chars)")
        if not FINGERPRINT.match(fingerprint):
            raise StorageError(f"fingerprint {fingerprint[:80]!r} is not a sha256")
        return join(self.root, request_id, fingerprint[:16])

    def location(self, request_id: str, fingerprint: str, position: int, kind: str = "section") -> str:
        """kind: section (latents), segment (mp4), lead or tail (seam pixels)."""
        suffix = "mp4" if kind == "segment" else "safetensors"
        return join(self.folder(request_id, fingerprint), f"{kind}_{position:03d}.{suffix}")

    def remove(self, request_id: str, fingerprint: str) -> None:
        """Drop one render's checkpoints (its video written, or the render cancelled: nothing
        reads them again), and its id's local folder once that is empty (object stores have no
        empty folders)."""
        remove_tree(self.folder(request_id, fingerprint))
        if not is_uri(self.root):
            with contextlib.suppress(OSError):  # another render's folder is still in it
                Path(self.root, request_id).rmdir()

    def save(self, request_id: str, fingerprint: str, position: int, latents: torch.Tensor, kind: str = "section") -> str:
        where = self.location(request_id, fingerprint, position, kind)
        latents = latents.detach().cpu().contiguous()
        digest = torch.frombuffer(bytearray(_tensor_digest(latents, fingerprint, position, kind)), dtype=torch.uint8)
        write_bytes(where, save_safetensors({"latents": latents, "sha256": digest}))
        return where

    def load(self, request_id: str, fingerprint: str, position: int, kind: str = "section") -> torch.Tensor | None:
        """The saved tensor (section latents, seam pixels), or None when there is none or it
        does not check out (truncated, garbled, another render's or position's)."""
        try:
            tensors = load_safetensors(read_bytes(self.location(request_id, fingerprint, position, kind)))
        except (FileNotFoundError, SafetensorError):
            return None
        latents, digest = tensors.get("latents"), tensors.get("sha256")
        if latents is None or digest is None or bytes(digest.numpy()) != _tensor_digest(latents, fingerprint, position, kind):
            return None
        return latents

    def save_segment(self, request_id: str, fingerprint: str, position: int, data: bytes) -> str:
        """A segment's mp4 bytes, sealed with their digest in a trailing `free` box."""
        where = self.location(request_id, fingerprint, position, "segment")
        seal = SEAL_TAG + _digest(data, fingerprint, position, "segment").hex().encode()
        write_bytes(where, data + struct.pack(">I4s", 8 + len(seal), b"free") + seal)
        return where

    def load_segment(self, request_id: str, fingerprint: str, position: int) -> bytes | None:
        """A segment's mp4 bytes (its seal kept: players skip the box), or None when there is
        none or its seal does not match."""
        try:
            data = read_bytes(self.location(request_id, fingerprint, position, "segment"))
        except FileNotFoundError:
            return None
        body, trailer = data[:-SEAL_SIZE], data[-SEAL_SIZE:]
        seal = SEAL_TAG + _digest(body, fingerprint, position, "segment").hex().encode()
        return data if trailer == struct.pack(">I4s", SEAL_SIZE, b"free") + seal else None

    def others(self, request_id: str, fingerprint: str) -> tuple[list[str], int]:
        """The folders of this id's other renders (another fingerprint: other settings or
        images, another model or output revision) and their bytes, which nothing reads again
        unless that render is asked for again: (folder names, total size)."""
        import pyarrow.fs as pafs

        fs, path = filesystem(join(self.root, request_id))
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except OSError:
            return [], 0
        mine = fingerprint[:16]
        others: dict[str, int] = {}
        for info in infos:
            folder, _, rest = info.path[len(path):].lstrip("/").partition("/")
            if folder != mine and (rest or info.type == pafs.FileType.Directory):
                size = (info.size or 0) if info.type == pafs.FileType.File else 0
                others[folder] = others.get(folder, 0) + size
        return sorted(others), sum(others.values())

    def remove_orphans(self, request_id: str, fingerprint: str) -> None:
        """Temporary files a killed writer left in a render's local folder (object stores have none)."""
        folder = Path(self.folder(request_id, fingerprint))
        if not is_uri(self.root) and folder.is_dir():
            remove_orphans(folder, ".", ".tmp")

    def has(self, request_id: str, fingerprint: str, position: int, kind: str, check: bool = True) -> bool:
        """Whether a sound entry is there (read and checked whole; `check` False: whether one exists)."""
        if not exists(self.location(request_id, fingerprint, position, kind)):
            return False
        if not check:
            return True
        if kind == "segment":
            return self.load_segment(request_id, fingerprint, position) is not None
        return self.load(request_id, fingerprint, position, kind) is not None


SEAL_TAG = b"fp-ray sha256 "
SEAL_SIZE = 8 + len(SEAL_TAG) + 64  # box header, tag, hex digest


def _digest(data, fingerprint: str, position: int, kind: str, *extra: str) -> bytes:
    """sha256 binding an entry's content to its place: a copy under another render, position or
    kind does not check out."""
    h = hashlib.sha256("/".join((fingerprint, str(position), kind, *extra)).encode())
    h.update(data)
    return h.digest()


def _tensor_digest(t: torch.Tensor, fingerprint: str, position: int, kind: str) -> bytes:
    t = t.contiguous()
    return _digest(t.reshape(-1).view(torch.uint8).numpy(), fingerprint, position, kind, str(t.dtype), str(list(t.shape)))
