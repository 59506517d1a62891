"""The markdown table of a bench/gpu.py result, written between markers in docs/benchmarks.md."""

from __future__ import annotations

import re
import statistics
from pathlib import Path


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _s(x, fmt="{:.2f} s") -> str:
    return "-" if x is None else fmt.format(x)


def _mean(xs) -> float | None:
    return statistics.mean(xs) if xs else None


def _ratio(base, x) -> str:
    return "" if base is None or not x else f" ({base / x:.2f}x)"


def render(results: dict) -> str:
    meta, parts = results["meta"], results["parts"]
    size = meta["sizes"][0]
    ref, exact, fast = parts.get("reference_e2e", {}), parts.get("exact_e2e", {}), parts.get("fast_e2e", {})
    fwd = lambda part, *k: _get(parts.get(part), *k, "seconds")
    stock = fwd("forward_eager", size, "stock")
    best_exact = fwd("compile", size) or fwd("forward_eager", size, "trimmed")
    rows = [
        ("forward, " + size, _s(stock), _s(best_exact) + _ratio(stock, best_exact),
         _s(fwd("fp8_forward", size)) + _ratio(stock, fwd("fp8_forward", size))),
        ("MFU of that forward (of the bf16 peak, FP8 too)", _s(_get(parts.get("forward_eager"), size, "stock", "mfu"), "{:.0%}"),
         _s(_get(parts.get("compile"), size, "mfu") or _get(parts.get("forward_eager"), size, "trimmed", "mfu"), "{:.0%}"),
         _s(_get(parts.get("fp8_forward"), size, "mfu"), "{:.0%}")),
    ]
    for other in meta["sizes"][1:]:
        o_stock = fwd("forward_eager", other, "stock")
        # exact mode compiled: only a compiled forward at this size stands for it
        compiled = fwd("compile_other_sizes", other)
        o_exact = compiled or (None if fwd("compile", size) else fwd("forward_eager", other, "trimmed"))
        o_fast = fwd("fp8_other_sizes", other)
        rows.append(("forward, " + other, _s(o_stock), _s(o_exact) + _ratio(o_stock, o_exact), _s(o_fast) + _ratio(o_stock, o_fast)))
    # a section's generation with nothing decoding beside it: the reference decodes between
    # sections; fp-ray's first section is the one that runs before any chunk is ready
    sec = [_mean(ref.get("section_s")), *((p.get("section_s") or [None])[0] for p in (exact, fast))]
    dec = [_mean(p.get("decode_s")) for p in (ref, exact, fast)]
    tot = [p.get("total_s") for p in (ref, exact, fast)]
    # Each section of a long video also has a full chunk (2 windows of latent frames) to decode,
    # the largest chunk of the run. On one GPU: the section plus that decode, the reference's in
    # its loop, fp-ray's beside the next section (their sum: overlapping two jobs that each fill
    # the GPU gains little). With fp-ray's decoders on GPUs of their own: the section alone.
    full_chunk = [max(p.get("decode_s") or [0]) or None for p in (ref, exact, fast)]
    one_gpu = [a + b if a and b else None for a, b in zip(sec, full_chunk)]
    rows += [
        (f"section ({meta['steps']} steps, nothing decoding beside it)", _s(sec[0]), _s(sec[1]) + _ratio(sec[0], sec[1]), _s(sec[2]) + _ratio(sec[0], sec[2])),
        ("decode per chunk (mean; fp-ray overlapped with generation)", _s(dec[0]), _s(dec[1]), _s(dec[2])),
        ("per section of a long video, one GPU, projected (the section + a full chunk's decode)",
         *(_s(v) + ("" if i == 0 else _ratio(one_gpu[0], v)) for i, v in enumerate(one_gpu))),
        ("per section of a long video, fp-ray's decoders on other GPUs, projected (the section alone)",
         _s(one_gpu[0]) + " (one GPU)", _s(sec[1]) + _ratio(one_gpu[0], sec[1]), _s(sec[2]) + _ratio(one_gpu[0], sec[2])),
        (f"end to end, {meta['sections']} sections", _s(tot[0]), _s(tot[1]) + _ratio(tot[0], tot[1]), _s(tot[2]) + _ratio(tot[0], tot[2])),
        ("peak GPU memory", *(_s(p.get("peak_gib"), "{:.1f} GiB") for p in (ref, exact, fast))),
        ("max abs latent diff vs reference (latent max)", "-",
         _s(_get(exact, "vs_reference", "max_abs_latent_diff"), "{:.2e}") + _s(_get(exact, "vs_reference", "latent_scale"), " ({:.1f})"), "-"),
        ("PSNR of frames vs exact mode", "-", "-", _s(_get(fast, "vs_exact", "psnr_db"), "{:.1f} dB")),
        ("steps computed in full (step cache)", "all", "all", f"{fast.get('steps_computed', '-')}/{fast.get('steps', '-')}"),
    ]
    lines = [
        f"Run `{meta['setup']}` on {meta['device']}, {meta['date']}: torch {meta['torch']}, diffusers {meta['diffusers']}, "
        f"window {meta['window']}, {meta['steps']} steps; matmul peak "
        f"{_s(_get(parts.get('matmul_peak'), 'tflops'), '{:.3g} TFLOP/s')}; exact mode: "
        f"compiled={_get(exact, 'compiled')}, attention backend {_get(exact, 'backend') or 'native'}; "
        f"fast mode: fp8={_get(fast, 'fp8')}, cache threshold {meta['cache_threshold']}.",
        "",
        "| measure | diffusers pipeline | fp-ray exact | fp-ray fast |",
        "| --- | --- | --- | --- |",
        *(f"| {' | '.join(r)} |" for r in rows),
        "",
        "| switch (forward, " + size + ") | off | on |",
        "| --- | --- | --- |",
        f"| prompt without padding | {_s(stock)} | {_s(fwd('forward_eager', size, 'trimmed'))} |",
    ]
    for name, r in (parts.get("attention_backends") or {}).items():
        if isinstance(r, dict) and name != "native":
            on = _s(r.get("seconds")) if "seconds" in r else r.get("error", "-")[:60]
            lines.append(f"| attention backend `{name}` | {_s(fwd('attention_backends', 'native'))} | {on} |")
    lines += [
        f"| torch.compile of the blocks | {_s(fwd('forward_eager', size, 'trimmed'))} | {_s(fwd('compile', size))} |",
        f"| FP8 matmuls (after compile) | {_s(fwd('compile', size))} | {_s(fwd('fp8_forward', size))} |",
        f"| Inductor autotuning of the FP8 kernels (torchao's settings) | {_s(fwd('fp8_forward', size))} | {_s(fwd('fp8_autotuned', size))} |",
        f"| decode overlapped (fast mode, end to end) | {_s(parts.get('fast_e2e_decode_inline', {}).get('total_s'))} | {_s(tot[2])} |",
    ]
    for name, label in (("profile_stock", "reference forward"), ("profile_exact", "exact-mode forward")):
        prof = parts.get(name) or {}
        if prof.get("top"):
            lines += ["", f"Profile of one {label}: {prof['total_ms']:.0f} ms of kernels, attention "
                      f"{prof['attention_share']:.0%}, matmul {prof['matmul_share']:.0%}. Top kernels:", ""]
            lines += [f"- {k['share']:.1%} `{k['name'][:90]}` ({k['calls']} calls, {k['ms']:.1f} ms)" for k in prof["top"][:6]]
    syncs = _get(parts.get("syncs"), "per_step")
    if syncs:
        where = ", ".join(f"`{k}` x{v}" for k, v in parts["syncs"]["where"].items())
        lines += ["", f"Host syncs per step of fp-ray's loop: {syncs} (from {where})."]
    skipped = [f"{k} ({v['status']})" for k, v in parts.items() if v.get("status") != "ok"]
    if skipped:
        lines += ["", "Not measured in this run: " + ", ".join(skipped) + "."]
    return "\n".join(lines)


def write_table(results: dict, docs: Path) -> None:
    """Replace the text between `<!-- gpu-bench:NAME -->` and `<!-- /gpu-bench:NAME -->`."""
    name = results["meta"]["setup"]
    start, end = f"<!-- gpu-bench:{name} -->", f"<!-- /gpu-bench:{name} -->"
    text = docs.read_text() if docs.exists() else ""
    block = f"{start}\n{render(results)}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.write_text(text)
