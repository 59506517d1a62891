"""LoRA adapters on a resident transformer.

A request names LoRAs (`RenderRequest.loras`: name + weight). Where a name is found is the
worker's `LoraRegistry`: open for the CLI and batch (a local file or folder, or a hub id; with
HF_HUB_OFFLINE set, the hub cache only), closed for Serve (only the names its config lists, so
a request never makes the server read a path of its choosing). The encoder resolves the
names to `LoraFile`s (file + sha256), which enter the render's fingerprint and travel with its
context to the generators.

A generator loads each file once with diffusers' own loader (`HunyuanVideoLoraLoaderMixin`,
which converts the original HunyuanVideo format), as a PEFT adapter named by the file's hash,
next to the base weights: these are never reloaded. The adapters stay loaded (at most
`ADAPTERS_KEPT` per transformer, least recently used deleted first); a section activates its
request's adapters with their weights and disables them after, so a request without LoRAs
runs the base layers alone (PEFT's disabled layers return the base layer's output as is).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import re
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .request import LoraChoice, RequestError, excerpt

log = logging.getLogger(__name__)

ADAPTERS_KEPT = 4  # per transformer; a 13B LoRA of rank 32 is ~0.3 GB in bf16
REGISTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PREFERRED_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


class LoraError(RequestError):
    """A LoRA that cannot be used: unknown name, missing or unreadable file, or a transformer
    it cannot run on. The message names the LoRA."""


@dataclass(frozen=True)
class LoraFile:
    """A request's LoRA resolved: the local safetensors file a generator loads and its sha256."""

    name: str  # as the request names it
    weight: float
    location: str
    digest: str

    @property
    def adapter(self) -> str:
        """The PEFT adapter name: the content's, so a changed file is another adapter."""
        return f"lora_{self.digest[:16]}"


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, computed once per (path, size, modification time)."""
    stat = os.stat(path)
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


def _single_file(folder: Path, what: str) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    preferred = [f for f in files if f.name == PREFERRED_FILE]
    if len(preferred) == 1 or len(files) == 1:
        return (preferred or files)[0]
    found = "none" if not files else f"{len(files)}: name one, e.g. {files[0]}"
    raise LoraError(f"lora {what}: expected one .safetensors file in {folder}, found {found}")


def find_lora_file(location: str) -> Path:
    """A local .safetensors file, a folder holding one, or a hub id (`owner/repo`, or
    `owner/repo/file.safetensors`) from the hub or, offline, its cache."""
    what = excerpt(location)
    path = Path(location).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise LoraError(f"lora {what}: only .safetensors files are read, not {path.suffix or 'a file without suffix'}")
        return path.resolve()
    if path.is_dir():
        return _single_file(path, what).resolve()
    parts = location.split("/")
    hub_id = len(parts) == 2 and not location.endswith(".safetensors") or len(parts) > 2 and location.endswith(".safetensors")
    if location.startswith((".", "/", "~")) or not hub_id or not all(parts):
        raise LoraError(f"lora {what}: no such file or folder")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError

    from .models import offline

    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if file:
            return Path(hf_hub_download(repo, file, local_files_only=offline()))
        return _single_file(Path(snapshot_download(repo, allow_patterns=["*.safetensors"], local_files_only=offline())), what)
    except (OSError, ValueError, HFValidationError) as e:  # not found, offline and not cached, bad id
        hint = " (HF_HUB_OFFLINE is set: only local files and the hub cache are read)" if offline() else ""
        raise LoraError(f"lora {what}: not a local file or folder, and not found as a hub id{hint}") from e


class LoraRegistry:
    """Where a worker finds the LoRAs a request names. `locations` None: open, a name is a
    path or hub id (CLI, batch). A mapping: closed, only its names, each to its location
    (Serve's `loras:` config)."""

    def __init__(self, locations: Mapping[str, str] | None = None):
        self.locations = None if locations is None else dict(locations)

    @classmethod
    def from_config(cls, config: Mapping[str, str] | str | None) -> "LoraRegistry":
        """A closed registry from YAML ({name: location}) or `name=location,...` text."""
        if isinstance(config, str):
            pairs = [item.split("=", 1) for item in config.split(",") if item.strip()]
            if any(len(p) != 2 for p in pairs):
                raise LoraError("loras: expected name=location[,name=location...]")
            config = {name.strip(): location.strip() for name, location in pairs}
        config = dict(config or {})
        bad = [excerpt(n, 40) for n, loc in config.items() if not isinstance(n, str) or not REGISTRY_NAME.match(n)
               or not isinstance(loc, str) or not loc]
        if bad:
            raise LoraError(f"loras: names must be 1-64 of [A-Za-z0-9._-] with a location each; bad: {', '.join(bad[:5])}")
        return cls(config)

    @property
    def names(self) -> list[str]:
        return sorted(self.locations or ())

    def check(self, loras: Sequence[LoraChoice]) -> None:
        """Closed: every name is registered (no file is touched). Open: nothing to check here."""
        if self.locations is None:
            return
        unknown = [excerpt(c.name, 40) for c in loras if c.name not in self.locations]
        if unknown:
            offered = ", ".join(self.names) or "none"
            raise LoraError(f"loras: unknown LoRA {', '.join(unknown)}; this server offers: {offered}")

    def resolve(self, loras: Sequence[LoraChoice]) -> tuple[LoraFile, ...]:
        """Each LoRA's file and hash. Two names for the same file are refused: their adapters
        would be one."""
        if not loras:
            return ()
        if importlib.util.find_spec("peft") is None:
            raise LoraError("loras need the peft package: pip install peft (fp-ray's dependencies include it)")
        self.check(loras)
        files = []
        for choice in loras:
            try:
                path = find_lora_file(choice.name if self.locations is None else self.locations[choice.name])
                _check_safetensors(path, choice.name)
            except LoraError as e:
                if self.locations is None:
                    raise
                # a server's paths stay in its log, not in the answer to a request
                log.error("registered LoRA %r: %s", choice.name, e)
                raise LoraError(f"lora {excerpt(choice.name)}: the server cannot read its file; see the server log") from None
            files.append(LoraFile(choice.name, choice.weight, str(path), file_digest(path)))
        digests = [f.digest for f in files]
        if len(set(digests)) < len(digests):
            raise LoraError("loras: two names load the same file; give it once with the sum of the weights")
        return tuple(files)


def _check_safetensors(path: Path, name: str) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise LoraError(f"lora {excerpt(name)}: {path.name} is not a readable safetensors file ({e})") from None
    if not keys:
        raise LoraError(f"lora {excerpt(name)}: {path.name} holds no tensors")


class LoadedAdapters:
    """The LoRA adapters loaded into one transformer, by content hash, least recently used
    first. One per transformer (`adapters_of`), whichever workers share it."""

    def __init__(self, transformer, size: int = ADAPTERS_KEPT):
        self.transformer, self.size = transformer, size
        self.loaded: OrderedDict[str, str] = OrderedDict()  # digest -> adapter name

    def ensure(self, files: Sequence[LoraFile]) -> list[str]:
        """Load what is missing (deleting the least recently used adapters beyond `size`, never
        one of `files`); their adapter names, in order."""
        for f in files:
            if f.digest in self.loaded:
                self.loaded.move_to_end(f.digest)
                continue
            self._load(f)
            self.loaded[f.digest] = f.adapter
        wanted = {f.digest for f in files}
        for digest in [d for d in self.loaded if d not in wanted][: max(0, len(self.loaded) - self.size)]:
            self.transformer.delete_adapters(self.loaded.pop(digest))
        return [f.adapter for f in files]

    def _load(self, f: LoraFile) -> None:
        from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading
        from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin as Loader

        if file_digest(f.location) != f.digest:
            raise LoraError(f"lora {excerpt(f.name)}: {f.location} changed since the render was planned; submit it again")
        try:
            state, metadata = Loader.lora_state_dict(f.location, return_lora_metadata=True, local_files_only=True)
            if not any(k.startswith("transformer.") for k in state):  # saved by PEFT alone: bare module names
                state = {f"transformer.{k}": v for k, v in state.items()}
                metadata = {f"transformer.{k}": v for k, v in (metadata or {}).items()} or None
            with warnings.catch_warnings():  # "multiple adapters in the model": what the cache is for
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                Loader.load_lora_into_transformer(state, self.transformer, adapter_name=f.adapter, metadata=metadata)
        except (ValueError, KeyError, RuntimeError) as e:  # keys or shapes of another model
            raise LoraError(f"lora {excerpt(f.name)}: cannot load onto this transformer: {str(e).splitlines()[0][:200]}") from e
        if f.adapter not in getattr(self.transformer, "peft_config", {}):
            raise LoraError(f"lora {excerpt(f.name)}: no weights in it match this transformer's layers")
        # Block offloading (memory mode offload) moves the parameters it saw when applied:
        # re-apply it so the new adapter's weights move with their blocks.
        _maybe_remove_and_reapply_group_offloading(self.transformer)


def adapters_of(transformer) -> LoadedAdapters:
    """The transformer's `LoadedAdapters`, kept on it as a plain attribute (not a submodule)."""
    adapters = transformer.__dict__.get("_fp_ray_adapters")
    if adapters is None:
        adapters = transformer.__dict__["_fp_ray_adapters"] = LoadedAdapters(transformer)
    return adapters


@contextmanager
def lora_scope(transformer, files: Sequence[LoraFile]) -> Iterator[None]:
    """The request's adapters active with their weights for the enclosed section (none: the
    base layers alone); disabled again after it, however it ends."""
    adapters = transformer.__dict__.get("_fp_ray_adapters")
    if not files:
        if adapters is not None and adapters.loaded:
            transformer.disable_lora()
        yield
        return
    from .speed import applied_speed

    if applied_speed(transformer).fp8:
        raise LoraError("loras: this generator's transformer runs FP8 (fast mode) and PEFT cannot wrap its quantized "
                        "layers; run LoRAs on a generator without fp8")
    names = adapters_of(transformer).ensure(files)
    transformer.set_adapters(names, [f.weight for f in files])
    transformer.enable_lora()
    try:
        yield
    finally:
        transformer.disable_lora()
