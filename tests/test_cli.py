from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from fp_ray import SAMPLE_IMAGE
from fp_ray.cli import SAMPLE_PROMPT, main
from fp_ray.video import encode_segment, join_segments, read_frames

from images import png_header_only

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
        (["--out", "{out_txt}"], "must name a .mp4"),
        (["--out", "{out_dir}"], "is a folder, not a file"),
        (["--out", "{file}/x.mp4"], "is not a folder"),
        (["--out", "/proc/fp-ray-test/x.mp4"], "cannot write in /proc"),
        (["--previews", "{file}"], "--previews: "),
        (["--out", "{long_name}"], "--out: the file name is 254 bytes; at most 160"),
        (["--image", "{huge}", "--prompt", "x"], "huge.png' is too large (400,000,000 pixels; at most 64,000,000)"),
        (["--image", "{tiny}", "--prompt", "x"], "each side at least 16"),
        (["--end-image", "{huge}"], "end_image: "),
        (["--prompt", ""], "prompt: String should have at least 1 character"),
        (["--prompt", "   "], "prompt: must not be blank"),
        (["--seconds", "nan"], "seconds: Input should be a finite number"),
        (["--guidance", "inf"], "guidance: Input should be a finite number"),
        (["--fps", "1", "--seconds", "10"], "seconds: 10 s is less than half a section (a section is 36 s"),
        (["--size", "1" * 5000 + "x16"], "size: expected WIDTHxHEIGHT"),
        (["--cfg", "0.5"], "cfg: Input should be greater than or equal to 1"),
        (["--cfg", "nan"], "cfg: Input should be a finite number"),
        (["--cfg", "3", "--cfg-rescale", "1.5"], "cfg_rescale: Input should be less than or equal to 1"),
        (["--negative-prompt", "blurry"], "negative_prompt: needs cfg above 1"),
        (["--cfg-rescale", "0.5"], "cfg_rescale: needs cfg above 1"),
    ],
)
def test_bad_input_one_line_no_output(tmp_path, capsys, args, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "huge.png").write_bytes(png_header_only(20000, 20000))
    (tmp_path / "tiny.png").write_bytes(png_header_only(8, 8))
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "file").write_text("a file")
    paths = {"corrupt": corrupt, "missing": tmp_path / "nope.png", "out_txt": tmp_path / "video.txt", "huge": tmp_path / "huge.png",
             "tiny": tmp_path / "tiny.png", "out_dir": tmp_path / "dir.mp4", "file": tmp_path / "file",
             "long_name": tmp_path / ("v" * 250 + ".mp4")}
    args = [a.format(**paths) if len(a) < 1000 else a for a in args]
    out = tmp_path / "video.mp4"
    argv = ["render", *FAST, "--out", str(out), *args] if "--out" not in args else ["render", *FAST, *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fp-ray: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "video.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".mp4" and p.is_file()]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no probe or temporary file left


def test_real_cfg_flags_reach_the_render(components, tmp_path):
    """--cfg, --negative-prompt and --cfg-rescale make the video the request with those fields makes."""
    from fp_ray.render import render
    from fp_ray.request import make_request

    guided = ["--cfg", "2.5", "--negative-prompt", "blurry, static", "--cfg-rescale", "0.3"]
    assert main(["render", *FAST, "--seconds", "1.2", "--out", str(tmp_path / "cli.mp4"), *guided]) == 0
    request = make_request(prompt=SAMPLE_PROMPT, width=64, height=48, steps=2, seconds=1.2, cfg=2.5,
                           negative_prompt="blurry, static", cfg_rescale=0.3)
    local = render(request, tmp_path / "local.mp4", components=components)
    plain = render(request.model_copy(update={"cfg": 1.0, "negative_prompt": "", "cfg_rescale": 0.0}), tmp_path / "plain.mp4",
                   components=components)
    assert (tmp_path / "cli.mp4").read_bytes() == local.path.read_bytes() != plain.path.read_bytes()


def test_errors_name_the_field_once_and_cut_long_values(capsys):
    long_prompt = "0s: a calm sea; " + "x" * 5000 + "; 1s"
    assert main(["render", *FAST, "--prompt", long_prompt]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 300, err
    assert err.count("prompt:") == 1


def test_plan_into_a_closed_pipe_is_not_an_error():
    proc = subprocess.run(f"{sys.executable} -m fp_ray.cli plan --seconds 600 | head -1", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("schedule inverted: 500 sections")
    assert proc.stderr == ""


def test_render_is_quiet_by_default(tmp_path):
    """No library warnings or weight-loading bars; -v brings the libraries' chatter back."""
    base = [sys.executable, "-m", "fp_ray.cli"]
    args = ["render", "--seconds", "1.2", *FAST, "--steps", "1"]
    quiet = subprocess.run([*base, *args, "--out", str(tmp_path / "q.mp4")], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" not in quiet.stderr and "[transformers]" not in quiet.stderr and "Warning" not in quiet.stderr
    loud = subprocess.run([*base, "-v", *args, "--out", str(tmp_path / "v.mp4")], capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and "Loading weights" in loud.stderr


def test_serve_token_file_that_cannot_be_read_fails_before_anything_starts(tmp_path, capsys):
    assert main(["serve", "--token-file", str(tmp_path / "missing"), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fp-ray: error: --token-file: cannot read") and len(err.splitlines()) == 1


def test_serve_token_file_that_is_a_fifo_is_refused_at_once(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe")
    # a subprocess: reading the fifo waited for a writer forever
    done = subprocess.run([sys.executable, "-m", "fp_ray.cli", "serve", "--token-file", str(tmp_path / "pipe"), "--address", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.endswith(": not a regular file\n") and done.stderr.count("\n") == 1, done.stderr


def test_batch_store_that_is_a_file_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    def no_ray(address):
        raise AssertionError("Ray must not start for a store that cannot be written")

    monkeypatch.setattr("fp_ray.cli.connect", no_ray)  # every row failed in the generate stage
    (tmp_path / "m.jsonl").write_text('{"id": "a", "prompt": "x"}\n')
    (tmp_path / "file").write_text("a file")
    assert main(["batch", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o"), "--store", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "--store: " in err and "is a file, not a folder" in err, err


def test_ray_on_a_cluster_needs_a_store_every_node_sees(tmp_path, capsys):
    code = main(["render", *FAST, "--ray", "--address", "127.0.0.1:1", "--out", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fp-ray: error: --store: on a Ray cluster")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One small render with its own start image, to render again from."""
    tmp = tmp_path_factory.mktemp("from")
    image = tmp / "start.png"
    image.write_bytes(SAMPLE_IMAGE.read_bytes())
    out = tmp / "a.mp4"
    args = ["render", *FAST, "--seconds", "1.2", "--image", str(image), "--prompt", "a calm lake", "--seed", "5"]
    assert main([*args, "--out", str(out), "--progressive", str(tmp / "progressive.mp4")]) == 0
    return image, out


def test_render_from_a_video_is_bit_identical_and_options_override(rendered, tmp_path):
    image, original = rendered
    sidecar = Path(f"{original}.json")
    record = json.loads(sidecar.read_text())
    for video in (original, original.parent / "progressive.mp4"):  # the mp4 and the fragmented one
        with av.open(str(video)) as container:
            assert json.loads(container.metadata["comment"]) == record
    assert record["request"] | {"image": str(image), "prompt": "a calm lake", "seed": 5, "width": 64, "height": 48, "steps": 2} == record["request"]
    again = tmp_path / "again.mp4"
    assert main(["render", "--from", str(original), "--out", str(again)]) == 0
    assert again.read_bytes() == original.read_bytes()
    assert np.array_equal(read_frames(again), read_frames(original))
    changed = tmp_path / "changed.mp4"
    assert main(["render", "--from", str(sidecar), "--seed", "6", "--out", str(changed)]) == 0
    request = json.loads(Path(f"{changed}.json").read_text())["request"]
    assert request == {**record["request"], "seed": 6}
    assert not np.array_equal(read_frames(changed), read_frames(original))


def test_from_a_fifo_is_refused_at_once(tmp_path):
    pipe = tmp_path / "pipe.mp4"
    os.mkfifo(pipe)
    # a subprocess: opening the fifo waited for a writer forever
    done = subprocess.run([sys.executable, "-m", "fp_ray.cli", "plan", "--from", str(pipe)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == f"fp-ray: error: --from {str(pipe)!r}: not a regular file\n", done.stderr


@pytest.mark.parametrize("case,message", [
    ("changed", "--image: the start image '{image}' has changed since the render"),
    ("gone", "--image: the start image '{image}' is gone; give it with --image"),
    ("plain", "is not a video fp-ray made"),
    ("missing", "--from '{source}': file not found"),
])
def test_render_from_without_its_inputs_is_one_line(rendered, tmp_path, capsys, case, message):
    record = json.loads(Path(f"{rendered[1]}.json").read_text())
    image = tmp_path / "start.png"
    source = tmp_path / "v.mp4.json"
    record["request"]["image"] = str(image)
    source.write_text(json.dumps(record))
    if case == "changed":
        image.write_bytes(SAMPLE_IMAGE.read_bytes() + b"\0")
    elif case == "plain":
        source = join_segments([encode_segment(np.zeros((2, 48, 64, 3), dtype=np.uint8), 30, 16)], tmp_path / "plain.mp4", 30)
    elif case == "missing":
        source = tmp_path / "nope.mp4"
    out = tmp_path / "out.mp4"
    assert main(["render", "--from", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fp-ray: error:") and message.format(image=image, source=source) in err, err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_from_notes_another_version_or_model(rendered, tmp_path, capsys):
    record = json.loads(Path(f"{rendered[1]}.json").read_text())
    record["fp_ray_version"] = "0.0.1"
    record["model"]["transformer"]["sha256"] = "0" * 64
    (tmp_path / "v.mp4.json").write_text(json.dumps(record))
    assert main(["plan", "--from", str(tmp_path / "v.mp4.json")]) == 0
    captured = capsys.readouterr()
    assert "rendered with fp-ray 0.0.1" in captured.err and "this model (transformer) is not the one recorded" in captured.err
    assert "64x48" in captured.out  # the recorded size, planned again


def test_bad_flags_are_one_line_too(capsys):
    for argv in (["render", "--steps", "abc"], ["render", "--keyframe"], ["nonsense"], ["render", "--bogus"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert caught.value.code == 2 and "\n" not in err and err.startswith("fp-ray"), err


@pytest.mark.parametrize("argv", [
    ["batch", "m.jsonl", "--out", "o", "--generator-gpus", "nan"],
    ["batch", "m.jsonl", "--out", "o", "--decoder-gpus", "-1"],
    ["render", "--ray", "--encoder-gpus", "inf"],
])
def test_gpu_amounts_are_finite_and_not_negative(argv, capsys):
    with pytest.raises(SystemExit) as caught:  # Ray took them: a batch with nan GPUs per generator ran
        main(argv)
    err = capsys.readouterr().err.strip()
    assert caught.value.code == 2 and "expected a number >= 0" in err and "\n" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["render", "--ray", "--max-restarts", "-5"], "expected a whole number >= 0, or -1 for no limit"),  # a ValueError traceback from Ray
    (["serve", "--port", "99999"], "expected a port, 0 to 65535"),  # an OverflowError traceback once Ray and Serve had started
])
def test_integer_flags_out_of_range_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert caught.value.code == 2 and message in err and "\n" not in err, err


def test_resource_amounts_are_numbers_too(capsys):
    for value in ("fp_gpu=nan", "fp_gpu=x"):  # nan was taken after Ray started; x was refused only then
        with pytest.raises(SystemExit) as caught:
            main(["batch", "m.jsonl", "--out", "o", "--generator-resource", value])
        assert caught.value.code == 2 and "expected NAME=AMOUNT, AMOUNT a number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("fault, code, message", [
    ("SIGTERM", 143, "stopped by SIGTERM"),
    ("SIGINT", 130, "stopped by SIGINT"),
    ("ENOSPC", 1, "No space left on device"),
])
def test_a_stop_or_full_disk_mid_render_is_one_line_and_the_rerun_resumes(tmp_path, capsys, monkeypatch, fault, code, message):
    import errno
    import os
    import signal

    from fp_ray import storage

    args = ["render", *FAST, "--window", "2", "--seconds", "1.6", "--id", "r"]
    assert main([*args, "--store", str(tmp_path / "clean"), "--out", str(tmp_path / "clean.mp4")]) == 0
    out, store = tmp_path / "out.mp4", tmp_path / "store"
    original, saved = storage.write_bytes, []

    def third_save_fails(location, data):
        if len(saved) == 2:
            if fault == "ENOSPC":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.kill(os.getpid(), getattr(signal, fault))  # reaches the main thread, the render's event loop
        saved.append(location)
        original(location, data)

    monkeypatch.setattr(storage, "write_bytes", third_save_fails)
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGTERM)  # the default, or Ray's where a test before started it here
    assert main([*args, "--store", str(store), "--out", str(out)]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert message in lines[-1] and f"kept in {store}" in lines[-1] and "Traceback" not in "".join(lines), lines[-5:]
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert signal.getsignal(signal.SIGTERM) is handler  # the command's handler is gone with it
    kept = [Path(p) for p in saved if Path(p).name.startswith("section_")]
    monkeypatch.setattr(storage, "write_bytes", original)
    before = {p: p.stat().st_mtime_ns for p in kept}
    assert main([*args, "--store", str(store), "--out", str(out)]) == 0
    assert kept and all(p.stat().st_mtime_ns == t for p, t in before.items())  # reused, not made again
    assert out.read_bytes() == (tmp_path / "clean.mp4").read_bytes()


def test_a_stop_while_the_video_is_joined_puts_no_video_in_place(tmp_path, capsys, monkeypatch):
    """SIGTERM once the mp4's join has begun: the command says stopped, and no video appears
    after it (the join thread stops at its next segment, where it used to join on and put a
    whole video in place); an older video stays, and the rerun reuses every segment."""
    import os
    import signal

    from fp_ray.segments import Segments

    out, store = tmp_path / "out.mp4", tmp_path / "store"
    args = ["render", *FAST, "--window", "2", "--seconds", "1.6", "--id", "r", "--store", str(store), "--out", str(out)]
    out.write_bytes(b"an older video")
    original, reached = Segments._check_stop, []

    def stop_once_joining(self):
        if not reached:
            # sent from the join's own thread, which the kernel may pick to take it: the main
            # thread, asleep in the event loop until this thread ends, must still wake and stop
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append(self._stop_writing.wait(10))
        original(self)

    monkeypatch.setattr(Segments, "_check_stop", stop_once_joining)
    capsys.readouterr()
    assert main(args) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert "stopped by SIGTERM" in err[-1] and "Traceback" not in "".join(err), err[-5:]
    assert reached == [True], "the stop reached the join only once it had ended"
    assert out.read_bytes() == b"an older video"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    segments = sorted(store.rglob("segment_*"))
    before = {p: p.stat().st_mtime_ns for p in segments}
    monkeypatch.setattr(Segments, "_check_stop", original)
    assert main(args) == 0
    assert segments and all(p.stat().st_mtime_ns == t for p, t in before.items())  # joined, not made again
    assert out.read_bytes()[4:8] == b"ftyp"


def test_a_video_is_never_left_beside_another_renders_sidecar(tmp_path, monkeypatch):
    """The sidecar's rename fails (a full disk, a kill) after the new video is in place: the old
    record goes, it does not stay beside the new video."""
    import os

    from fp_ray.metadata import TAG

    out = tmp_path / "v.mp4"
    args = ["render", *FAST, "--window", "2", "--seconds", "0.8", "--out", str(out)]
    assert main([*args, "--seed", "1"]) == 0
    original = os.replace

    def sidecar_fails(src, dst, *a, **k):
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device", str(dst))
        return original(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", sidecar_fails)
    assert main([*args, "--seed", "2"]) == 1
    with av.open(str(out)) as video:
        record = video.metadata[TAG]
    sidecar = Path(f"{out}.json")
    assert json.loads(record)["request"]["seed"] == 2
    assert not sidecar.exists() or sidecar.read_text() == record


def test_sigterm_stays_ours_after_ray_starts(monkeypatch):
    """ray.init installs its own SIGTERM handler (exit at once with a native stack dump); the
    command's goes back in place, and the one before the command after it."""
    import signal

    import ray

    from fp_ray import cli

    monkeypatch.setattr(ray, "init", lambda **kwargs: signal.signal(signal.SIGTERM, lambda *a: None))
    before = signal.getsignal(signal.SIGTERM)
    with cli.terminate_as_interrupt():
        cli.connect(None)
        with pytest.raises(cli.Interrupted):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_ray_start_up_logs_stay_quiet_without_v(monkeypatch):
    """Importing ray sets its logger to INFO whatever was set before: ray.init still gets the
    quiet level, so its token and dashboard lines do not reach a user's terminal (-v shows them)."""
    import logging

    import ray

    import fp_ray.cli as cli

    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setitem(cli._ray_logging_level, "level", logging.INFO)
    cli.configure_output(True)
    cli.connect(None)
    assert seen["logging_level"] == logging.INFO
    cli.configure_output(False)
    logging.getLogger("ray").setLevel(logging.INFO)  # what `import ray` does when it comes after
    cli.connect(None)
    assert seen["logging_level"] == logging.ERROR and seen["log_to_driver"] is False


def test_a_store_holding_other_renders_of_the_id_says_so(tmp_path, capsys):
    """Other settings under the same --id keep the earlier render's folder (a rerun of those
    settings reuses it): the command says how much it holds and which folder is the new one."""
    store = tmp_path / "store"
    args = ["render", *FAST, "--seconds", "0.8", "--window", "2", "--id", "r", "--store", str(store), "--out", str(tmp_path / "v.mp4")]
    assert main([*args, "--seed", "1"]) == 0
    assert "note" not in capsys.readouterr().err
    assert main([*args, "--seed", "2"]) == 0
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "other render" in l]
    folders = sorted(p.name for p in (store / "r").iterdir())
    (kept,) = [f for f in folders if f"but {f}/" in line]
    (other,) = set(folders) - {kept}
    size = sum(p.stat().st_size for p in (store / "r" / other).iterdir())
    assert f"{store}/r/ also holds 1 other render of this id ({size / 1e6:.1f} MB)" in line
