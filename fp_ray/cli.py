"""`fp-ray`: render a video or print a plan, from the command line."""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: start-up counts in a render's wall time

import argparse
import contextlib
import contextvars
import logging
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from . import TINY_CHECKPOINT, __version__
from .coordinator import RenderFailed
from .segments import SegmentsMissing
from .encode import ImageError, decode_request_images, load_image, read_request_images
from .extend import downloads_held
from .devices import MEMORY_MODES, MemoryModeError
from .lora import LoraRegistry
from .metadata import MetadataError, model_identity, read_metadata, recorded_image, recorded_keyframes
from .models import ModelNotFoundError, ModelSources, ModelSpec
from .placement import PlacementError
from .request import RenderRequest, RequestError, excerpt, make_request, parse_size
from .schedule import SCHEDULES
from .speed import CACHE_METHODS, FAST_CACHE_THRESHOLD, SpeedOptionError, SpeedOptions
from .storage import StorageError, is_uri, read_bytes
from .workers import SectionOutOfMemory, WorkerStartError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SAMPLE_PROMPT = "A quiet mountain valley on a sunny day, the camera slowly moves forward, trees sway in the wind."


class OneLineParser(argparse.ArgumentParser):
    """Bad flags are one line on stderr and exit 2, as every other bad input (`-h` shows usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


class CliError(Exception):
    """Reported as one line on stderr with exit code 2."""


def add_request_args(p: argparse.ArgumentParser) -> None:
    # Defaults are None here and filled by the request model, so that with --from only the
    # options a user gives override the recorded request.
    d = {name: f.default for name, f in RenderRequest.model_fields.items()}
    p.add_argument("--from", dest="source", metavar="VIDEO",
                   help="re-render a video fp-ray made (its mp4 or its .mp4.json sidecar): its recorded request, "
                        "with the options given here overriding fields; the images are read from their recorded "
                        "paths when unchanged, else give --image / --end-image")
    p.add_argument("--image", help="start image (default: the sample image fp-ray ships)")
    p.add_argument("--prompt", help="text prompt; timestamped parts switch prompts per section: '0s: ...; 4s: ...'")
    p.add_argument("--end-image", help="end image (inverted or bidirectional schedule)")
    p.add_argument("--loop", action=argparse.BooleanOptionalAction,
                   help="a seamless loop: the start image is also the end, the last frames crossfade into the first (--no-loop: off, e.g. with --from)")
    p.add_argument("--extend", metavar="VIDEO",
                   help="a clip to extend (path, URL or URI): --schedule forward continues it, inverted leads into it "
                        "from --image; the output is the clip, untouched, and --seconds of new video, at the clip's size and fps")
    p.add_argument("--seconds", type=float, help=f"video length (default {d['seconds']})")
    p.add_argument("--schedule", help=f"{' | '.join(SCHEDULES)} (default {d['schedule']})")
    p.add_argument("--sampler", help=f"unipc | euler (default {d['sampler']})")
    p.add_argument("--steps", type=int, help=f"denoising steps per section (default {d['steps']})")
    p.add_argument("--guidance", type=float, help=f"distilled guidance (default {d['guidance']})")
    p.add_argument("--cfg", type=float,
                   help=f"real guidance scale; above 1 each step runs the transformer twice, against --negative-prompt (default {d['cfg']}: off)")
    p.add_argument("--negative-prompt", help="what to steer away from, with --cfg above 1 (default: empty)")
    p.add_argument("--cfg-rescale", type=float,
                   help=f"0..1: pull the guided prediction's spread back toward the prompt's, with --cfg above 1 (default {d['cfg_rescale']})")
    p.add_argument("--seed", type=int, help=f"noise seed (default {d['seed']})")
    p.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16 (default: the image's aspect at --resolution)")
    p.add_argument("--resolution", type=int, help="bucket side when --size is not given (default: 640; the tiny checkpoint: 160)")
    p.add_argument("--window", type=int, help=f"latent frames per section (default {d['window']})")
    p.add_argument("--fps", type=int, help=f"frames per second (default {d['fps']})")
    p.add_argument("--crf", type=int, help=f"x264 quality, lower is better (default {d['crf']})")
    p.add_argument("--model", help="checkpoint folder or hub id (default: the tiny checkpoint)")
    p.add_argument("--cache-threshold", type=float, help=f"step cache (fast mode): its threshold, e.g. {FAST_CACHE_THRESHOLD}; higher skips more steps (default: off)")
    p.add_argument("--cache-method", choices=CACHE_METHODS, help="the step cache: mag (MagCache, calibrated skips; --fast's) "
                   "or first_block (FirstBlockCache); sets --cache-threshold "
                   f"{FAST_CACHE_THRESHOLD} unless given")
    p.add_argument("--keyframe", action="append", metavar="TIME:IMAGE",
                   help="an image the video passes through, e.g. 4s:pose.png (repeatable; bidirectional schedule); "
                        "the time snaps to the nearest section boundary (`fp-ray plan` shows where)")
    p.add_argument("--lora", action="append", metavar="PATH_OR_ID[:WEIGHT]",
                   help="a LoRA: .safetensors file, folder or hub id, with its weight (default 1), e.g. style.safetensors:0.8 (repeatable)")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """The generators' speed options (docs/benchmarks.md has their measured cost)."""
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (exact; slow first section)")
    p.add_argument("--attention", help="diffusers attention backend, e.g. _native_cudnn, _native_flash, flash (exact)")
    p.add_argument("--fp8", action="store_true", help="FP8 matmuls in the transformer blocks (approximate; torchao, GPU >= sm89)")
    p.add_argument("--fast", action="store_true", help=f"fast mode: --compile --fp8, and for render --cache-method mag --cache-threshold {FAST_CACHE_THRESHOLD} unless given (batch: cache_method and cache_threshold columns)")


def speed_from_args(args: argparse.Namespace) -> SpeedOptions:
    # FP8's per-call activation scaling is fused only in compiled code: fast mode compiles too.
    flag = lambda name: getattr(args, name, None)  # commands (and callers) without these flags run as loaded
    options = SpeedOptions(compile=bool(flag("compile") or flag("fast")), attention=flag("attention"), fp8=bool(flag("fp8") or flag("fast")))
    if options.fp8 and flag("dtype") not in (None, "bf16"):
        raise SpeedOptionError(f"--fp8 / --fast need the bf16 transformer, not --dtype {flag('dtype')} "
                               "(FP8's per-row scales are taken from bfloat16 weights)")
    return options


REQUEST_OPTIONS = ("prompt", "image", "end_image", "extend", "seconds", "schedule", "sampler", "steps", "guidance", "cfg",
                   "negative_prompt", "cfg_rescale", "seed", "resolution", "window", "fps", "crf", "model", "loop")


def recorded_fields(args: argparse.Namespace) -> dict:
    """With --from: the recorded request's fields, images checked against their hashes."""
    if not args.source:
        return {}
    record = read_metadata(args.source, f"--from {excerpt(args.source, 120)}")
    known = set(RenderRequest.model_fields)
    fields = {k: v for k, v in record["request"].items() if k in known}
    fields["image"] = recorded_image(record, "image", args.image, "--image")
    fields["end_image"] = recorded_image(record, "end_image", args.end_image, "--end-image")
    fields["keyframes"] = recorded_keyframes(record, args.keyframe)
    fields["extend"] = recorded_image(record, "extend", args.extend, "--extend")
    if record.get("fp_ray_version") != __version__:
        note(f"{args.source} was rendered with fp-ray {record.get('fp_ray_version')}, this is {__version__}: the video may differ")
    if args.model is None and isinstance(record.get("model"), dict):
        here = model_identity(fields.get("model") or str(TINY_CHECKPOINT), getattr(args, "base", None), getattr(args, "image_encoder", None))
        changed = [name for name, part in here.items() if part["sha256"] != (record["model"].get(name) or {}).get("sha256")]
        if changed:
            note(f"{args.source}: this model ({', '.join(changed)}) is not the one recorded: the video may differ")
    if not args.lora and isinstance(record.get("loras"), list):
        recorded = {c.get("name"): c.get("sha256") for c in record["loras"] if isinstance(c, dict)}
        try:
            here = {f.name: f.digest for f in LoraRegistry().resolve(make_request(prompt="-", loras=fields.get("loras") or ()).loras)}
        except (RequestError, ValueError, OSError):
            here = {}  # a LoRA that is gone fails with its own message when the request resolves it
        if changed := sorted(name for name, digest in here.items() if recorded.get(name) not in (None, digest)):
            note(f"{args.source}: LoRA {', '.join(changed)} is not the file recorded: the video may differ")
    return fields


def note(line: str) -> None:
    print(f"fp-ray: note: {line}", file=sys.stderr)


def request_from_args(args: argparse.Namespace) -> RenderRequest:
    if args.image and args.prompt is None and not args.source:
        raise CliError("--prompt is required with --image")
    fields = {"prompt": SAMPLE_PROMPT, **recorded_fields(args)}
    fields.update({name: getattr(args, name) for name in REQUEST_OPTIONS if getattr(args, name) is not None})
    if args.size:
        fields["width"], fields["height"] = parse_size(args.size)
    method = getattr(args, "cache_method", None)
    if args.cache_threshold is not None or method or getattr(args, "fast", False):
        fields["cache_threshold"] = FAST_CACHE_THRESHOLD if args.cache_threshold is None else args.cache_threshold
        fields["cache_method"] = method or ("mag" if getattr(args, "fast", False) else fields.get("cache_method", "first_block"))
    if args.lora:
        fields["loras"] = args.lora
    if args.keyframe:
        fields["keyframes"] = args.keyframe
    request = make_request(**fields)
    # Everything that can be checked before loading a model is checked here.
    decode_request_images(request, read_request_images(request))
    for k, b in zip(request.keyframes, request.keyframe_boundaries):
        if abs(k.at - b * request.seconds_per_section) > 1e-6:
            note(f"keyframe {k.at:g}s snaps to section boundary {b}, at {b * request.seconds_per_section:g}s")
    if request.extend:
        from .extend import checked_request

        request = checked_request(request)[0]  # the clip's size and fps
    if request.loras and speed_from_args(args).fp8:
        raise CliError("--lora: PEFT cannot wrap the FP8-quantized layers of --fp8 / --fast; drop them "
                       "(--compile and --cache-threshold work with LoRAs)")
    LoraRegistry().resolve(request.loras)  # the files exist and are safetensors (hashes are kept for the encoder)
    ModelSources.resolve(request.model)
    return request


def cmd_plan(args: argparse.Namespace) -> None:
    from .encode import frame_size, plan_request

    request = request_from_args(args)
    width, height = frame_size(request, *load_image(request.image_path).size)
    plan = plan_request(request, width, height)
    tokens = plan.tokens()
    print(f"schedule {plan.schedule}{' (loop)' if plan.loop else ''}: {plan.num_sections} sections x {plan.window} latent frames, {width}x{height}, "
          f"{plan.pixel_frames} frames ({plan.pixel_frames / request.fps:.2f} s at {request.fps} fps)")
    if request.extend:  # the new part's frames; the clip's are kept as they are
        where = "after" if request.schedule == "forward" else "before"
        print(f"extends {request.extend}: {plan.pixel_frames - (where == 'after')} new frames {where} its own, which read its "
              f"{'last' if where == 'after' else 'first'} latent frames as context")
    print(f"context tokens per section: window {tokens.window} + clean {tokens.clean} + 2x {tokens.history_2x} "
          f"+ 4x {tokens.history_4x} = {tokens.total}")
    key = lambda i: f"key{i}"
    for i, (k, b) in enumerate(zip(request.keyframes, request.keyframe_boundaries)):
        print(f"{key(i)}: {k.at:g}s -> section boundary {b} ({b * request.seconds_per_section:g}s), {k.image}")
    print(f"{'order':>5} {'pos':>4} {'wave':>4} {'padding':>7} {'gap':>4}  {'prefix':<8} {'history':<14} {'depends on':<12} {'decode':<10} prompt")
    for s in plan.sections:
        left, right = s.anchors
        prefix = ("start" if left is None else key(left)) if s.prefix is None else f"sec {s.prefix}"
        lead = ("end+" if right is None else f"{key(right)}+") if s.history_starts_with_end else ""
        history = (lead + ",".join(map(str, s.history))).rstrip("+") or "-"
        deps = ",".join(map(str, s.depends_on)) or "-"
        span = f"{s.decode_span[0]}:{s.decode_span[1]}"
        print(f"{s.order:>5} {s.position:>4} {s.wave:>4} {s.layout.padding:>7} {s.layout.gap:>4}  {prefix:<8} {history:<14} {deps:<12} {span:<10} {s.prompt[:60]}")
    print("waves: " + "  ".join(f"[{', '.join(str(s.position) for s in w)}]" for w in plan.waves()))


def add_load_args(p: argparse.ArgumentParser) -> None:
    """How the models load, the same for every command (models.ModelSpec)."""
    p.add_argument("--device", help="torch device (default: cuda where the worker sees one, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="transformer precision (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--memory", choices=MEMORY_MODES, default="auto",
                   help="resident | swap (encoders leave the GPU after encoding) | offload (block by block); "
                        "default auto: by free GPU memory")
    p.add_argument("--base", help="text encoders, tokenizers, VAE: folder or hub id (default: env FP_RAY_BASE_MODEL, "
                                  "else hunyuanvideo-community/HunyuanVideo)")
    p.add_argument("--image-encoder", help="SigLIP: folder or hub id (default: env FP_RAY_IMAGE_ENCODER, else lllyasviel/flux_redux_bfl)")
    p.add_argument("--force-schedule", action="store_true", help="run a schedule the checkpoint was not trained for")


def load_spec(args: argparse.Namespace, model: str) -> ModelSpec:
    return ModelSpec(model, args.base, args.image_encoder, args.device, DTYPES.get(args.dtype), args.memory, args.force_schedule)


@downloads_held()  # a URL clip: the request's check, the encoder and the output read one download
def cmd_render(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .render import render
    from .speed import apply_speed
    from .storage import SectionStore

    request = request_from_args(args)
    out = writable_file(args.out, "--out", ".mp4")
    if args.previews:
        writable_folder(args.previews, "--previews")
    if args.progressive:
        writable_file(args.progressive, "--progressive", ".mp4")
    if args.store and not is_uri(args.store):
        writable_folder(args.store, "--store")
    if args.ray and not args.store and (args.address or os.environ.get("RAY_ADDRESS")):
        # Decoders on other nodes write segments where the coordinator reads them: a folder
        # on this machine alone would not do.
        raise CliError("--store: on a Ray cluster, give a folder every node sees or a URI (s3://...) for the "
                       "section latents and segments")
    spec = load_spec(args, request.model).for_schedule(request.schedule)  # a hub id: the matching transformer
    spec.check(request.schedule)
    store = SectionStore(args.store) if args.store else None
    bars: dict[str, tqdm] = {}

    def on_event(e: dict) -> None:
        kind, key = e["type"], f"section {e.get('position')}"
        if kind == "plan":
            bars["sections"] = tqdm(total=e["sections"], initial=len(e["reused"]), desc="sections", unit="sec", position=0)
            bars["segments"] = tqdm(total=e["sections"], desc="segments", unit="seg", position=1)
        elif kind == "section_started":
            bars[key] = tqdm(total=e["steps"], desc=key, unit="step", position=len(bars), leave=False)
        elif kind == "step":
            bars[key].update(1)
        elif kind in ("section_finished", "section_retry"):
            bars.pop(key).close()
            if kind == "section_finished":
                bars["sections"].update(1)
            else:  # a worker was lost mid-section: say so, once, and that it runs again
                tqdm.write(f"fp-ray: section {e['position']}: {e['error']}; running it again (attempt {e['attempt'] + 1})",
                           file=sys.stderr)
        elif kind == "section_decoded" and "segments" in bars:  # decoded, crossfaded, encoded
            bars["segments"].update(1)
        elif kind == "writing":
            for bar in bars.values():
                bar.close()
            print(f"joining {e['segments']} segments into {out}", file=sys.stderr)

    try:
        if args.ray:
            from .actors import RayPools
            from .coordinator import run_in_new_loop, run_render

            config = pool_config(args)  # bad options fail here, before Ray starts
            connect(args.address)
            pools = RayPools(spec.model, config)
            pools.wait_ready(notify=lambda line: print(line, file=sys.stderr))
            startup = time.perf_counter() - STARTED
            result = run_in_new_loop(run_render(request, pools, out=out, store=store, request_id=args.id, on_event=on_event,
                                                preview_dir=args.previews, progressive=args.progressive))
        else:
            components = spec.load()
            apply_speed(components.transformer, speed_from_args(args), components.device)
            startup = time.perf_counter() - STARTED
            result = render(request, out, components, on_event=on_event, preview_dir=args.previews, store=store,
                            request_id=args.id, progressive=args.progressive)
            global _skip_teardown
            _skip_teardown = True  # everything is written and closed; nothing of this render outlives it
    finally:
        for bar in bars.values():  # now, not when collected: a bar cleared later draws over the error line
            bar.close()
    t = result.timings
    print(f"wrote {result.path}: {result.frames} frames, {result.plan.num_sections} sections in {startup + t['total']:.1f} s = "
          f"start-up {startup:.1f} + encode {t['encode']:.1f} + generate {t['generate']:.1f} + decode {t['decode']:.1f} "
          f"+ write {t['write']:.1f} s (decoding also ran {t['decode_overlap']:.1f} s alongside generation)")
    if args.store:
        folders, size = SectionStore(args.store).others(result.request_id, result.fingerprint)
        if folders:
            where = f"{args.store.rstrip('/')}/{result.request_id}/"
            note(f"{where} also holds {len(folders)} other render{'s' * (len(folders) > 1)} of this id ({size / 1e6:.1f} MB), "
                 f"kept for a rerun of those settings: delete every folder there but {result.fingerprint[:16]}/ to free it")


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(folder: Path, flag: str, target: str) -> None:
    """A folder that exists (or the nearest existing ancestor of one to be made) must be a
    directory we can create files in: tried for real, since permission bits lie to root
    and on read-only or network filesystems."""
    existing = _first_existing(folder)
    if not existing.is_dir():
        raise CliError(f"{flag}: cannot create {target}: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fp-ray-probe.", dir=existing)
    except OSError as e:
        raise CliError(f"{flag}: cannot write in {existing}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


# Filesystems take names of 255 bytes; the temporary file an output is written as adds up to 86
# (".{name}.{host}-{pid}.{random}.tmp"), its sidecar ".json".
MAX_NAME_BYTES = 160


def writable_file(location: str, flag: str, suffix: str) -> Path:
    """Check, before any model loads, that the render's output file can be written."""
    path = Path(location).expanduser()
    if path.suffix.lower() != suffix:
        raise CliError(f"{flag} must name a {suffix} file, got {excerpt(location)}")
    if len(os.fsencode(path.name)) > MAX_NAME_BYTES:  # the render ran whole, then its temporary file's name was too long
        raise CliError(f"{flag}: the file name is {len(os.fsencode(path.name))} bytes; at most {MAX_NAME_BYTES}")
    if path.is_dir():
        raise CliError(f"{flag}: {excerpt(location)} is a folder, not a file")
    _check_can_create_in(path.parent, flag, excerpt(location))
    return path


def writable_folder(location: str, flag: str) -> Path:
    path = Path(location).expanduser()
    if path.exists() and not path.is_dir():
        raise CliError(f"{flag}: {excerpt(location)} is a file, not a folder")
    _check_can_create_in(path, flag, excerpt(location))
    return path


# The "ray" logger's level for ray.init: importing ray sets the logger to INFO whatever was set
# before, so configure_output's choice is kept here and ray.init applies it.
_ray_logging_level = {"level": logging.INFO}


def connect(address: str | None) -> None:
    import ray

    level = _ray_logging_level["level"]
    ray.init(address=address, log_to_driver=False, logging_level=level) if address else ray.init(log_to_driver=False, logging_level=level)
    if _stopping.get():  # ray.init put its own in place (exit at once, a native stack dump): ours again
        signal.signal(signal.SIGTERM, _interrupt)


def pool_size(text: str) -> tuple[int, int]:
    """'2' -> (2, 2); '0-4' -> (0, 4): Ray Data grows the pool between the two."""
    low, _, high = text.partition("-")
    try:
        sizes = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if sizes[0] < 0 or sizes[1] < max(1, sizes[0]):
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return sizes


def amount(text: str) -> float:
    """A resource amount (GPUs per actor): a finite number >= 0. Ray takes nan, inf or a
    negative amount and schedules it without a word."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def integer_in(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """An argparse type: an integer from `low` to `high` (None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def resource(text: str) -> tuple[str, float]:
    """'fp_generator=1' -> ('fp_generator', 1.0); the amount defaults to 1."""
    name, _, value = text.partition("=")
    try:
        return name, amount(value or "1")
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT, AMOUNT a number >= 0, got {text!r}") from None


def add_pool_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generators", type=pool_size, default=(1, 1), help="generator actors: N or MIN-MAX (default 1)")
    p.add_argument("--decoders", type=pool_size, default=(1, 1), help="decoder actors: N or MIN-MAX (default 1)")
    p.add_argument("--encoders", type=pool_size, default=(1, 1), help="encoder actors: N or MIN-MAX (default 1)")
    p.add_argument("--generator-gpus", type=amount, help="GPUs per generator (default 1)")
    p.add_argument("--decoder-gpus", type=amount, help="GPUs per decoder (default 0.5)")
    p.add_argument("--encoder-gpus", type=amount, help="GPUs per encoder (default 0.5; none of them with --device cpu; "
                   "a Ray fp-ray starts itself on a machine with one GPU shares it among all actors, on none uses the CPU)")
    p.add_argument("--autoscaling", action="store_true",
                   help="the cluster adds nodes on demand: wait for actors no node fits yet instead of failing")
    for kind in ("generator", "decoder", "encoder"):
        p.add_argument(f"--{kind}-resource", type=resource, action="append", default=[], metavar="NAME=AMOUNT",
                       help=f"custom resource a {kind} needs, e.g. fp_{kind}=1: a GPU node type (repeatable)")
    p.add_argument("--max-restarts", type=integer_in(-1, None, "a whole number >= 0, or -1 for no limit"), default=3,
                   help="restarts of a crashed actor, -1: no limit (default %(default)s); batch: more tries of a row "
                        "whose worker was lost, then the row is an error record")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


def pool_config(args: argparse.Namespace):
    from .actors import PoolConfig

    resources: dict[str, dict[str, float]] = {}
    for kind in ("generator", "decoder", "encoder"):
        for name, value in getattr(args, f"{kind}_resource"):
            resources.setdefault(kind, {})[name] = value
    fields = dict(
        generators=args.generators[1], decoders=args.decoders[1], encoders=args.encoders[1],
        resources=resources, max_restarts=args.max_restarts, autoscaling=args.autoscaling,
        device=args.device, dtype=DTYPES.get(args.dtype), memory=args.memory, base=args.base,
        image_encoder=args.image_encoder, force_schedule=args.force_schedule,
        **{f"{kind}_gpus": getattr(args, f"{kind}_gpus") for kind in ("generator", "decoder", "encoder")
           if getattr(args, f"{kind}_gpus") is not None},
        speed=speed_from_args(args),
    )
    if args.address or os.environ.get("RAY_ADDRESS"):
        return PoolConfig(**fields)
    import torch  # a Ray fp-ray starts here: its GPUs are this machine's

    return PoolConfig.one_machine(torch.cuda.device_count(), **fields)


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import BatchConfig, ManifestError, check_manifest, run_batch

    ModelSources.resolve(args.model)
    for flag, location in (("--out", args.out), ("--store", args.store)):
        if location and not is_uri(location):
            writable_folder(location, flag)
    try:
        # the manifest, its ids and every row's fields and images, before Ray starts
        checked = check_manifest(args.manifest, args.out, args.model, (args.base, args.image_encoder))
    except ManifestError as e:
        raise CliError(str(e)) from None
    connect(args.address)
    quiet_ray_data(args.verbose)
    config = BatchConfig(encoders=args.encoders, generators=args.generators, decoders=args.decoders, pools=pool_config(args),
                         keep_sections=args.keep_sections)
    records = run_batch(args.manifest, args.out, args.model, config, store=args.store, checked=checked)
    ok = [r for r in records if r["status"] == "ok"]
    reused = [r for r in ok if r["reused"]]
    for r in records:
        if r["status"] == "error":
            print(f"{r['id']}: {r['error']}")
    again = {r["id"] for r in checked if r.get("again")}
    again_ok = sum(1 for r in ok if r["id"] in again and not r["reused"])
    why = f" ({again_ok} again: their fields, images or model, or fp-ray's output revision, changed)" if again_ok else ""
    print(f"{len(ok) - len(reused)} rendered{why}, {len(reused)} already done, {len(records) - len(ok)} failed; "
          f"results in {args.out.rstrip('/')}/results.parquet")
    return 1 if len(ok) < len(records) else 0  # a job runner sees that rows failed


def cmd_submit(args: argparse.Namespace) -> None:
    from .jobs import submit_batch

    submit_batch(args)


def cmd_job(args: argparse.Namespace) -> None:
    from .jobs import job_command

    job_command(args)


def serve_gpus(args: argparse.Namespace) -> dict[str, float]:
    """GPUs per deployment when fp-ray starts Ray on this machine (a cluster: its YAML)."""
    if args.address or os.environ.get("RAY_ADDRESS") or args.device == "cpu":
        return {}
    import torch

    from .actors import PoolConfig

    gpus = torch.cuda.device_count()
    config = PoolConfig.one_machine(gpus)
    return {name: config.gpus(kind) for name, kind in (("Encoder", "encoder"), ("Generator", "generator"), ("Decoder", "decoder"))} if gpus else {}


def cmd_serve(args: argparse.Namespace) -> None:
    from ray import serve

    from serving.app import build_app

    token = args.token
    if args.token_file:  # a file, so the token does not show in `ps`
        try:  # capped reads take regular files only: a fifo would wait for a writer forever
            token = read_bytes(Path(args.token_file).expanduser(), limit=1 << 16).decode().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--token-file: cannot read {args.token_file}: {getattr(e, 'strerror', None) or e}") from None
    ModelSources.resolve(args.model)
    loras = LoraRegistry.from_config(",".join(args.lora)).locations  # checked before Ray starts
    connect(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_app({"model": args.model, "storage": args.storage, "database": args.database, "auth_token": token,
                     "device": args.device, "dtype": DTYPES.get(args.dtype), "memory": args.memory, "base": args.base,
                     "image_encoder": args.image_encoder, "force_schedule": args.force_schedule,
                     "num_gpus": serve_gpus(args), "loras": loras})
    serve.run(app, name="fp-ray", route_prefix="/", blocking=False)
    print(f"fp-ray is serving on http://{args.host}:{args.port}/ (API docs at /docs); Ctrl-C stops it", flush=True)
    try:
        threading.Event().wait()  # until Ctrl-C
    except KeyboardInterrupt:
        serve.shutdown()


def configure_output(verbose: bool) -> None:
    """Quiet by default: the libraries' warnings, loading bars and Ray's start-up logs are
    chatter to a user of the command; `-v` shows them."""
    if verbose:
        return
    import warnings

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    import huggingface_hub.utils

    huggingface_hub.utils.disable_progress_bars()  # downloads from the hub
    for lib in (transformers_logging, diffusers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"(transformers|diffusers|torch|ray)\b")
    logging.getLogger("ray").setLevel(logging.ERROR)
    _ray_logging_level["level"] = logging.ERROR  # ray.init's own start-up logs (token auth, dashboard address)


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data logs every pipeline's progress at INFO and draws bars, and a row whose worker
    was lost past its retries with a traceback at ERROR (fp-ray prints that row's one-line
    record); `-v` keeps them."""
    if verbose:
        return
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    ray.data.DataContext.get_current().enable_progress_bars = False


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="fp-ray", description="Render long FramePack videos, locally or on Ray.")
    parser.add_argument("--version", action="version", version=f"fp-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own logs and loading bars")
    sub = parser.add_subparsers(dest="command", required=True)
    p_render = sub.add_parser("render", help="render one video to mp4 in this process")
    add_request_args(p_render)
    p_render.add_argument("--out", default="video.mp4", help="output mp4 (default %(default)s)")
    p_render.add_argument("--previews", help="folder for one preview mp4 per segment (each section's part of the video)")
    p_render.add_argument("--progressive", help="fragmented mp4 of the finished start of the video, growing while it renders")
    add_load_args(p_render)
    p_render.set_defaults(func=cmd_render)
    p_render.add_argument("--ray", action="store_true", help="render on a Ray cluster's actors (see --address)")
    p_render.add_argument("--store", help="section checkpoints: a folder or URI (a restarted render reuses them)")
    p_render.add_argument("--id", help="render id for the checkpoints (default: from the request's fingerprint)")
    add_pool_args(p_render)
    add_speed_args(p_render)

    p_batch = sub.add_parser("batch", help="render every row of a manifest on Ray (Ray Data)")
    p_batch.add_argument("manifest", help="Parquet, JSONL or CSV: id, prompt, image, [end_image, seconds, seed, schedule, size, ...]")
    p_batch.add_argument("--out", required=True, help="folder or URI for {id}.mp4, records/ and results.parquet")
    p_batch.add_argument("--model", default=RenderRequest.model_fields["model"].default, help="checkpoint (default: tiny)")
    p_batch.add_argument("--store", help="section checkpoints (default: OUT/sections)")
    p_batch.add_argument("--keep-sections", action="store_true",
                         help="keep each row's checkpoints once its video is written (default: removed; a 10-minute 640x640 video's are over 2 GB)")
    add_load_args(p_batch)
    add_pool_args(p_batch)
    add_speed_args(p_batch)
    p_batch.set_defaults(func=cmd_batch)

    p_submit = sub.add_parser("submit", help="submit a batch to a running cluster as a Ray Job")
    p_submit.add_argument("manifest", help="manifest path or URI, as the cluster sees it")
    p_submit.add_argument("--out", required=True, help="output folder or URI, as the cluster sees it")
    p_submit.add_argument("--address", default=None, help="Ray dashboard, e.g. http://head:8265 (default: RAY_ADDRESS)")
    p_submit.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    p_submit.epilog = "More `fp-ray batch` flags go after --: fp-ray submit m.parquet --out s3://b/v -- --generators 1-8"
    p_submit.set_defaults(func=cmd_submit)

    p_job = sub.add_parser("job", help="status, logs or stop of a submitted job")
    p_job.add_argument("action", choices=["status", "logs", "stop", "list"])
    p_job.add_argument("job_id", nargs="?")
    p_job.add_argument("--address", default=None, help="Ray dashboard (default: RAY_ADDRESS)")
    p_job.set_defaults(func=cmd_job)

    p_serve = sub.add_parser("serve", help="run the Ray Serve app (HTTP API + web page) on this machine")
    p_serve.add_argument("--model", default=RenderRequest.model_fields["model"].default, help="checkpoint (default: tiny)")
    p_serve.add_argument("--storage", default="fp-ray-data", help="artifacts + checkpoints folder (default %(default)s)")
    p_serve.add_argument("--database", help="SQLite file for render records (default: STORAGE/renders.db)")
    p_serve.add_argument("--token", help="require Authorization: Bearer TOKEN on /v1 (default: env FP_RAY_API_TOKEN; "
                         "visible in ps: prefer --token-file or the env)")
    p_serve.add_argument("--token-file", help="read the bearer token from this file")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=integer_in(0, 65535, "a port, 0 to 65535"), default=8000)
    p_serve.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p_serve.add_argument("--lora", action="append", default=[], metavar="NAME=LOCATION",
                         help="a LoRA requests may name: NAME for a .safetensors file, folder or hub id (repeatable); "
                              "requests can name no other")
    add_load_args(p_serve)
    p_serve.set_defaults(func=cmd_serve)

    p_plan = sub.add_parser("plan", help="print the section plan of a request")
    add_request_args(p_plan)
    p_plan.set_defaults(func=cmd_plan)
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser.parse_args(argv)
    if extra and args.command != "submit":
        parser.error(f"unexpected arguments after --: {' '.join(extra)}")
    args.batch_args = extra
    configure_output(args.verbose)
    try:
        with terminate_as_interrupt():
            return args.func(args) or 0
    except (CliError, RequestError, ImageError, ModelNotFoundError, StorageError, PlacementError, MemoryModeError,
            SpeedOptionError, MetadataError) as e:
        print(f"fp-ray: error: {e}", file=sys.stderr)
        return 2
    except (RenderFailed, SegmentsMissing, SectionOutOfMemory, WorkerStartError) as e:  # the input was fine; the render could not finish
        print(f"fp-ray: error: {e}{resume_hint(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # Ctrl-C or SIGTERM: the video is written whole or not at all (temporary file, renamed)
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"fp-ray: error: stopped by {signal.Signals(signum).name}{resume_hint(args)}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        # The reader went away (`fp-ray plan | head`): not an error. Point stdout at devnull
        # so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the machine's side: a full disk, a folder gone read-only or away
        where = f": {e.filename}" if e.filename else ""
        print(f"fp-ray: error: {e.strerror or e}{where}{resume_hint(args)}", file=sys.stderr)
        return 1


class Interrupted(KeyboardInterrupt):
    """A stop signal other than Ctrl-C's (SIGTERM), ending the command the same way."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (`kill`, a job runner's stop) unwinds like Ctrl-C: the cancelled render's
    temporary files are removed and the command says so in one line, where by default the
    process would vanish without a word."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    token = _stopping.set(True)
    try:
        yield
    finally:
        _stopping.reset(token)
        signal.signal(signal.SIGTERM, previous)


_stopping = contextvars.ContextVar("sigterm_interrupts", default=False)  # inside terminate_as_interrupt


def _interrupt(signum: int, frame) -> None:
    raise Interrupted(signum)


def resume_hint(args: argparse.Namespace) -> str:
    store = getattr(args, "store", None) if args.command == "render" else None
    return f"; the finished sections are kept in {store}: the same command resumes" if store else ""


# Set by a finished local render: `run` then leaves without the interpreter's teardown, about 1 s
# (up to 2 s on a loaded machine) of freeing torch's and the models' objects one by one, a tenth
# of the README demo. Never after --ray (Ray's own exit hooks stop the processes it started).
_skip_teardown = False


def run() -> None:
    """The `fp-ray` command."""
    code = main()
    if _skip_teardown:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
