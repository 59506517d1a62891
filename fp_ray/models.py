"""Checkpoint loading: every component through `from_pretrained`, local folder or hub id,
placed by the device policy (`devices.py`)."""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

# With torchao installed (fp-ray[fast]), diffusers warns when its model classes load that it
# cannot list the tensor classes of torchao-serialized checkpoints (diffusers 0.42.1 names ones
# torchao 0.17 no longer has). fp-ray quantizes after loading and never loads such checkpoints.
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)

from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
from transformers import AutoTokenizer, CLIPTextModel, LlamaModel, SiglipVisionModel

try:  # transformers >= 5: the PIL backend by name, so SigLIP preprocessing is the same arithmetic
    # on every machine, whether or not torchvision (the default backend) is installed there.
    from transformers import SiglipImageProcessorPil as SiglipImageProcessor
except ImportError:  # transformers 4: SiglipImageProcessor is the PIL one
    from transformers import SiglipImageProcessor

from .devices import DevicePolicy, choose_policy
from .request import RequestError


BASE_MODEL = "hunyuanvideo-community/HunyuanVideo"  # text encoders, tokenizers, VAE, scheduler
IMAGE_ENCODER_MODEL = "lllyasviel/flux_redux_bfl"  # SigLIP + its processor
# Where a cluster keeps them instead (a local copy or a mirror): these variables, or the
# --base / --image-encoder options, which win over them.
BASE_ENV, IMAGE_ENCODER_ENV = "FP_RAY_BASE_MODEL", "FP_RAY_IMAGE_ENCODER"
TRANSFORMERS = {"inverted": "lllyasviel/FramePackI2V_HY", "forward": "lllyasviel/FramePack_F1_I2V_HY_20250503"}
TRAINED_ORDER = {"inverted": "inverted", "bidirectional": "inverted", "forward": "forward"}  # schedule -> checkpoint


DEFAULT_RESOLUTION = 640  # the official demo's bucket


def _declared(model: str) -> dict:
    """The folder's fp_ray.json: what a checkpoint declares about itself."""
    meta = Path(model).expanduser() / "fp_ray.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def default_resolution(model: str) -> int:
    """The bucket side a checkpoint renders at when a request names no size: the official
    640, unless the folder's fp_ray.json says otherwise (the tiny checkpoint: small, for CPUs)."""
    return int(_declared(model).get("default_resolution", DEFAULT_RESOLUTION))


class ModelNotFoundError(FileNotFoundError):
    """A model folder or hub id that cannot be loaded."""


class ScheduleMismatchError(RequestError):
    """A schedule the checkpoint was not trained for (forward on the I2V checkpoint, ...)."""


def transformer_for(model: str, schedule: str) -> str:
    """With a released transformer's hub id, the one trained for `schedule`; else `model`."""
    return TRANSFORMERS[TRAINED_ORDER[schedule]] if model in TRANSFORMERS.values() else model


def trained_schedules(model: str) -> list[str] | None:
    """The schedules a checkpoint is made for, from (in order) its fp_ray.json `schedules`,
    a released hub id, or a folder named as a released repo (what `huggingface-cli download
    --local-dir /models/NAME` gives); None when nothing says."""
    declared = _declared(model).get("schedules")
    if declared is not None:
        return list(declared)
    name = model.rstrip("/").rsplit("/", 1)[-1]
    for order, repo in TRANSFORMERS.items():
        if model == repo or name == repo.rsplit("/", 1)[-1]:
            return [s for s, o in TRAINED_ORDER.items() if o == order]
    return None


def check_schedule(model: str, schedule: str, force: bool = False) -> None:
    """A clear error when `schedule` is not what the checkpoint was trained for, unless forced."""
    allowed = trained_schedules(model)
    if force or allowed is None or schedule in allowed:
        return
    other = TRANSFORMERS[TRAINED_ORDER[schedule]]
    raise ScheduleMismatchError(
        f"schedule: {model} is made for {' / '.join(allowed)}, not {schedule}; use --model {other} "
        f"(or a folder of it), or --force-schedule to run it anyway")


def offline() -> bool:
    """HF_HUB_OFFLINE, read at load time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ModelSources:
    """Where each component comes from: (repo or folder, subfolder)."""

    transformer: tuple[str, str | None]
    base: str
    image_encoder: str

    @classmethod
    def resolve(cls, model: str, base: str | None = None, image_encoder: str | None = None) -> "ModelSources":
        """A folder holding `transformer/` carries every component (the tiny checkpoint's
        layout); otherwise `model` is the transformer alone and the rest come from `base`
        and `image_encoder` (None: $FP_RAY_BASE_MODEL / $FP_RAY_IMAGE_ENCODER, else the hub)."""
        base = base or os.environ.get(BASE_ENV) or BASE_MODEL
        image_encoder = image_encoder or os.environ.get(IMAGE_ENCODER_ENV) or IMAGE_ENCODER_MODEL
        path = Path(model).expanduser()
        if (path / "transformer").is_dir():
            return cls((str(path), "transformer"), str(path), str(path))
        if path.is_dir():
            return cls((str(path), None), base, image_encoder)
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise ModelNotFoundError(f"model folder not found: {model}")
        return cls((model, None), base, image_encoder)


PARTS = ("transformer", "vae", "encoders")  # what a worker may load: generator, decoder, encoder
ENCODERS = ("text_encoder", "text_encoder_2", "image_encoder")


@dataclass
class Components:
    """The loaded checkpoint; parts a worker did not ask for are None."""

    transformer: HunyuanVideoFramepackTransformer3DModel | None
    vae: AutoencoderKLHunyuanVideo | None
    text_encoder: LlamaModel | None
    tokenizer: object
    text_encoder_2: CLIPTextModel | None
    tokenizer_2: object
    image_encoder: SiglipVisionModel | None
    feature_extractor: SiglipImageProcessor | None
    scheduler_config: dict
    policy: DevicePolicy
    spec: "ModelSpec"  # how it was loaded: the checkpoint a worker checks schedules against
    offload_hooks: dict = field(default_factory=dict)  # name -> accelerate hook (swap, offload)

    @property
    def device(self) -> torch.device:
        """Where the models compute (their weights may sit in host RAM between uses)."""
        return self.policy.device

    @property
    def transformer_dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def release_encoders(self) -> None:
        """Send the encoders (and the VAE, which encoded the images) back to host RAM:
        what swap and offload do once a request is encoded. Resident: nothing to do."""
        for name in ENCODERS + ("vae",):
            if name in self.offload_hooks:
                self.offload_hooks[name].offload()


def _load(cls, repo: str, subfolder: str | None, **kwargs):
    if offline():
        kwargs["local_files_only"] = True
    try:
        return cls.from_pretrained(repo, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as e:
        where = f"{repo}/{subfolder}" if subfolder else repo
        hint = " (HF_HUB_OFFLINE is set: only local folders and the hub cache are read)" if offline() else ""
        raise ModelNotFoundError(f"cannot load {cls.__name__} from {where}{hint}: {str(e).splitlines()[0]}") from e


def _place(components: Components, name: str, module: torch.nn.Module) -> None:
    """Put a loaded model where the memory mode wants it, with the libraries' offloading."""
    from accelerate import cpu_offload_with_hook

    module.eval().requires_grad_(False)
    policy = components.policy
    if policy.memory == "resident":
        module.to(policy.device)  # a no-op where from_pretrained already loaded onto the device
        return
    if policy.memory == "offload" and name in ("transformer", "text_encoder"):
        from diffusers.hooks import apply_group_offloading

        # One block on the device at a time; a side stream fetches the next during compute.
        apply_group_offloading(module, onload_device=policy.device, offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1,
                               use_stream=policy.device.type == "cuda")
        return
    _, components.offload_hooks[name] = cpu_offload_with_hook(module, policy.device)


def untiled(vae: AutoencoderKLHunyuanVideo) -> AutoencoderKLHunyuanVideo:
    """`vae` without spatial tiling, as the reference runs it (frames still go through the VAE's
    own temporal tiles): a shallow copy sharing its weights and offload hook, made once, so a
    thread encoding or decoding whole frames never flips a flag under one decoding in tiles."""
    view = vae.__dict__.get("_fp_ray_untiled")
    if view is None:
        view = copy.copy(vae)
        view.use_tiling = False
        vae.__dict__["_fp_ray_untiled"] = view  # a plain attribute, not a submodule
    return view


def load_components(
    model: str,
    device: str | torch.device | None = None,
    transformer_dtype: torch.dtype | str | None = None,
    base: str | None = None,
    image_encoder: str | None = None,
    vae_tile_size: int = 256,
    parts: tuple[str, ...] = PARTS,
    memory: str = "auto",
    policy: DevicePolicy | None = None,
) -> Components:
    """Load a FramePack checkpoint, or only the `parts` a worker needs: "transformer"
    (generators), "vae" (decoders), "encoders" (Llama, CLIP, SigLIP; encoders also need
    "vae"). Device, precisions and memory mode follow `policy` (default: `choose_policy`
    of `device`, `transformer_dtype`, `memory`). Images are encoded whole, as the reference
    does; a chunk decodes whole where the GPU has room for it, else in spatial tiles of
    `vae_tile_size` pixels, bounding decode memory at any resolution (`decode.decode_chunk`)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; expected some of {PARTS}")
    policy = policy or choose_policy(device, transformer_dtype, memory)
    sources = ModelSources.resolve(model, base, image_encoder)
    # Resident models on a GPU load straight onto it: no host-RAM copy of the weights.
    direct = {"device_map": str(policy.device)} if policy.on_gpu and policy.memory == "resident" else {}
    enc = dict(torch_dtype=policy.encoder_dtype, **direct)
    loaded: dict[str, object] = dict.fromkeys(
        ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_encoder", "feature_extractor")
    )
    if "transformer" in parts:
        loaded["transformer"] = _load(HunyuanVideoFramepackTransformer3DModel, *sources.transformer,
                                      torch_dtype=policy.transformer_dtype, **direct)
    if "vae" in parts:
        loaded["vae"] = _load(AutoencoderKLHunyuanVideo, sources.base, "vae", torch_dtype=policy.vae_dtype, **direct)
        loaded["vae"].enable_tiling(tile_sample_min_height=vae_tile_size, tile_sample_min_width=vae_tile_size)
    if "encoders" in parts:
        loaded.update(
            text_encoder=_load(LlamaModel, sources.base, "text_encoder", **enc),
            tokenizer=_load(AutoTokenizer, sources.base, "tokenizer"),
            text_encoder_2=_load(CLIPTextModel, sources.base, "text_encoder_2", **enc),
            tokenizer_2=_load(AutoTokenizer, sources.base, "tokenizer_2"),
            image_encoder=_load(SiglipVisionModel, sources.image_encoder, "image_encoder", **enc),
            feature_extractor=_load(SiglipImageProcessor, sources.image_encoder, "feature_extractor"),
        )
    spec = ModelSpec(model, base, image_encoder, str(policy.device), str(policy.transformer_dtype).removeprefix("torch."),
                     policy.memory)
    components = Components(**loaded, scheduler_config=_scheduler_config(sources.base), policy=policy, spec=spec)
    for name in ("transformer", "vae") + ENCODERS:
        if getattr(components, name) is not None:
            _place(components, name, getattr(components, name))
    if components.vae is not None:
        prefer_onednn_convs(components.vae)
    return components


def prefer_onednn_convs(vae) -> None:
    """Run the VAE's 3D convolutions on oneDNN on the CPU.

    PyTorch sends a CPU float32 convolution to its slow im2col kernel when
    N*C*T*H <= 20480 (a heuristic written for 2D convolutions). The tiny checkpoint's VAE
    has 8-16 channels, so most of its full-resolution convolutions fell under it and ran
    5-10x slower than oneDNN on the same shapes: the decoder was most of a CPU render.
    Real checkpoints (128+ channels) never hit it; on them this changes nothing.
    """
    if vae.device.type != "cpu" or vae.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d) and module.padding_mode == "zeros":
            module.forward = _OneDnnConv3d(module)


class _OneDnnConv3d:
    """Conv3d.forward through aten's oneDNN kernel (same weights, same padding)."""

    def __init__(self, conv: torch.nn.Conv3d):
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if x.device.type != "cpu" or x.dtype != torch.float32:
            return torch.nn.functional.conv3d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return torch.mkldnn_convolution(x.contiguous(), c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups)


def _scheduler_config(base: str) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return dict(_load(FlowMatchEulerDiscreteScheduler, base, "scheduler").config)


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides how a worker loads its models, in every path (CLI, Ray
    actors, batch stages, Serve replicas): the checkpoint, where the base and the image
    encoder come from, and the device policy's inputs (resolved on the worker's machine)."""

    model: str
    base: str | None = None
    image_encoder: str | None = None
    device: str | None = None
    dtype: str | None = None  # transformer precision; None: the policy's
    memory: str = "auto"
    force_schedule: bool = False

    def for_schedule(self, schedule: str) -> "ModelSpec":
        """The spec whose transformer matches `schedule` (a released hub id picks the right one)."""
        return replace(self, model=transformer_for(self.model, schedule))

    def check(self, schedule: str) -> None:
        check_schedule(self.model, schedule, self.force_schedule)

    def load(self, parts: tuple[str, ...] = PARTS) -> Components:
        components = load_components(self.model, self.device, self.dtype, self.base, self.image_encoder,
                                     parts=parts, memory=self.memory)
        components.spec = replace(components.spec, force_schedule=self.force_schedule)
        return components


@functools.lru_cache(maxsize=2)
def cached_components(model: str, device: str | None = None) -> Components:
    """One copy per process (the library call, tests), placed by the default policy."""
    return load_components(model, device)
