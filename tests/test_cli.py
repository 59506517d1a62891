from __future__ import annotations

import subprocess
import sys

import pytest

from fp_ray import SAMPLE_IMAGE
from fp_ray.cli import main
from fp_ray.video import read_frames

FAST = ["--size", "64x48", "--steps", "2"]


def test_console_script_renders_the_sample(tmp_path):
    out = tmp_path / "demo.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "fp_ray.cli", "render", "--seconds", "1.2", "--out", str(out), "--previews", str(tmp_path / "p"), *FAST],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert read_frames(out).shape == (37, 48, 64, 3)
    assert len(list((tmp_path / "p").glob("*.mp4"))) == 1


def test_plan_prints_sections_waves_and_tokens(capsys):
    assert main(["plan", "--schedule", "bidirectional", "--seconds", "6", "--size", "640x640"]) == 0
    out = capsys.readouterr().out
    assert "5 sections" in out
    assert "window 14400 + clean 3200 + 2x 400 + 4x 400 = 18400" in out
    assert "waves: [4]  [2]  [1, 3]  [0]" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--image", "{corrupt}", "--prompt", "x"], "is not an image"),
        (["--image", "{missing}", "--prompt", "x"], "image: file not found"),
        (["--image", str(SAMPLE_IMAGE)], "--prompt is required"),
        (["--size", "100x100"], "multiple of 16"),
        (["--size", "4096x4096"], "between 32 and 2048"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--seconds", "0"], "seconds: Input should be greater than 0"),
        (["--seconds", "100000"], "seconds: Input should be less than or equal to 600"),
        (["--schedule", "sideways"], "schedule: Input should be 'forward', 'inverted' or 'bidirectional'"),
        (["--sampler", "ddim"], "sampler: Input should be 'unipc' or 'euler'"),
        (["--model", "{missing}"], "model folder not found"),
        (["--end-image", str(SAMPLE_IMAGE), "--schedule", "forward"], "end_image needs the inverted or bidirectional"),
        (["--prompt", "0s: a; 1s"], "needs a timestamp"),
        (["--out", "{out_txt}"], "must name an .mp4"),
    ],
)
def test_bad_input_one_line_no_output(tmp_path, capsys, args, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    paths = {"corrupt": corrupt, "missing": tmp_path / "nope.png", "out_txt": tmp_path / "video.txt"}
    args = [a.format(**paths) for a in args]
    out = tmp_path / "video.mp4"
    argv = ["render", *FAST, "--out", str(out), *args] if "--out" not in args else ["render", *FAST, *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fp-ray: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "video.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".mp4"]


def test_serve_token_file_that_cannot_be_read_fails_before_anything_starts(tmp_path, capsys):
    assert main(["serve", "--token-file", str(tmp_path / "missing"), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fp-ray: error: --token-file: cannot read") and len(err.splitlines()) == 1
