"""`fp-ray`: render a video or print a plan, from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .encode import ImageError, load_image
from .models import ModelNotFoundError, ModelSources
from .request import RenderRequest, RequestError, make_request, parse_size
from .schedule import SCHEDULES

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SAMPLE_PROMPT = "A quiet mountain valley on a sunny day, the camera slowly moves forward, trees sway in the wind."


class CliError(Exception):
    """Reported as one line on stderr with exit code 2."""


def add_request_args(p: argparse.ArgumentParser) -> None:
    d = RenderRequest.model_fields
    p.add_argument("--image", help="start image (default: the sample image fp-ray ships)")
    p.add_argument("--prompt", help="text prompt; timestamped parts switch prompts per section: '0s: ...; 4s: ...'")
    p.add_argument("--end-image", help="end image (inverted or bidirectional schedule)")
    p.add_argument("--seconds", type=float, default=d["seconds"].default, help="video length (default %(default)s)")
    p.add_argument("--schedule", default=d["schedule"].default, help=f"{' | '.join(SCHEDULES)} (default %(default)s)")
    p.add_argument("--sampler", default=d["sampler"].default, help="unipc | euler (default %(default)s)")
    p.add_argument("--steps", type=int, default=d["steps"].default, help="denoising steps per section (default %(default)s)")
    p.add_argument("--guidance", type=float, default=d["guidance"].default, help="distilled guidance (default %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"].default, help="noise seed (default %(default)s)")
    p.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16 (default: the image's aspect at --resolution)")
    p.add_argument("--resolution", type=int, default=d["resolution"].default, help="bucket side when --size is not given (default: 640; the tiny checkpoint: 160)")
    p.add_argument("--window", type=int, default=d["window"].default, help="latent frames per section (default %(default)s)")
    p.add_argument("--fps", type=int, default=d["fps"].default)
    p.add_argument("--crf", type=int, default=d["crf"].default, help="x264 quality, lower is better (default %(default)s)")
    p.add_argument("--model", default=d["model"].default, help="checkpoint folder or hub id (default: the tiny checkpoint)")


def request_from_args(args: argparse.Namespace) -> RenderRequest:
    if args.image and not args.prompt:
        raise CliError("--prompt is required with --image")
    width = height = None
    if args.size:
        width, height = parse_size(args.size)
    request = make_request(
        prompt=args.prompt or SAMPLE_PROMPT,
        image=args.image,
        end_image=args.end_image,
        seconds=args.seconds,
        schedule=args.schedule,
        sampler=args.sampler,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        width=width,
        height=height,
        resolution=args.resolution,
        window=args.window,
        fps=args.fps,
        crf=args.crf,
        model=args.model,
    )
    # Everything that can be checked before loading a model is checked here.
    load_image(request.image_path, "image")
    if request.end_image:
        load_image(request.end_image, "end_image")
    ModelSources.resolve(request.model)
    return request


def cmd_plan(args: argparse.Namespace) -> None:
    from .encode import frame_size, plan_request

    request = request_from_args(args)
    width, height = frame_size(request, *load_image(request.image_path).size)
    plan = plan_request(request, width, height)
    tokens = plan.tokens()
    print(f"schedule {plan.schedule}: {plan.num_sections} sections x {plan.window} latent frames, {width}x{height}, "
          f"{plan.pixel_frames} frames ({plan.pixel_frames / request.fps:.2f} s at {request.fps} fps)")
    print(f"context tokens per section: window {tokens.window} + clean {tokens.clean} + 2x {tokens.history_2x} "
          f"+ 4x {tokens.history_4x} = {tokens.total}")
    print(f"{'order':>5} {'pos':>4} {'wave':>4} {'padding':>7} {'gap':>4}  {'prefix':<8} {'history':<14} {'depends on':<12} {'decode':<10} prompt")
    for s in plan.sections:
        prefix = "start" if s.prefix is None else f"sec {s.prefix}"
        history = ("end+" if s.history_starts_with_end else "") + (",".join(map(str, s.history)) or "-")
        deps = ",".join(map(str, s.depends_on)) or "-"
        span = f"{s.decode_span[0]}:{s.decode_span[1]}"
        print(f"{s.order:>5} {s.position:>4} {s.wave:>4} {s.layout.padding:>7} {s.layout.gap:>4}  {prefix:<8} {history:<14} {deps:<12} {span:<10} {s.prompt[:60]}")
    print("waves: " + "  ".join(f"[{', '.join(str(s.position) for s in w)}]" for w in plan.waves()))


def cmd_render(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from .models import load_components
    from .render import render

    request = request_from_args(args)
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise CliError(f"--out must name an .mp4 file, got {args.out}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    components = load_components(request.model, device, DTYPES.get(args.dtype))
    bars: dict[str, tqdm] = {}

    def on_event(e: dict) -> None:
        if e["type"] == "plan":
            bars["sections"] = tqdm(total=e["sections"], desc="sections", unit="sec", position=0)
        elif e["type"] == "section_started":
            bars["steps"] = tqdm(total=e["steps"], desc=f"section {e['position']}", unit="step", position=1, leave=False)
        elif e["type"] == "step":
            bars["steps"].update(1)
        elif e["type"] == "section_finished":
            bars.pop("steps").close()
            bars["sections"].update(1)

    result = render(request, out, components, on_event=on_event, preview_dir=args.previews)
    bars["sections"].close()
    t = result.timings
    print(f"wrote {result.path}: {len(result.frames)} frames, {result.plan.num_sections} sections, "
          f"{t['total']:.1f} s (generate {t['generate']:.1f} s, decode {t['decode']:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fp-ray", description="Render long FramePack videos, locally or on Ray.")
    parser.add_argument("--version", action="version", version=f"fp-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_render = sub.add_parser("render", help="render one video to mp4 in this process")
    add_request_args(p_render)
    p_render.add_argument("--out", default="video.mp4", help="output mp4 (default %(default)s)")
    p_render.add_argument("--previews", help="folder for one preview mp4 per decoded section")
    p_render.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p_render.add_argument("--dtype", choices=sorted(DTYPES), help="transformer precision (default: bf16 on GPU, fp32 on CPU)")
    p_render.set_defaults(func=cmd_render)
    p_plan = sub.add_parser("plan", help="print the section plan of a request")
    add_request_args(p_plan)
    p_plan.set_defaults(func=cmd_plan)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CliError, RequestError, ImageError, ModelNotFoundError) as e:
        print(f"fp-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
