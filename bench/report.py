"""Reports of a benchmark run: a table for the terminal, the JSON document, a PNG plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

MiB = 1 << 20
SCHEMA = "dart-vlm-bench/1"


def targets(rows: list) -> list[dict]:
    """The issue's targets, evaluated on these rows (at the smallest ratio measured)."""
    ort = {r.keep_ratio: r for r in rows if r.runtime == "ort"}
    eager = {r.keep_ratio: r for r in rows if r.runtime == "eager-dart"}
    pruned = sorted(r for r in ort if r < 1.0)
    out = []
    if 1.0 in ort and pruned:
        low = ort[pruned[0]]
        out.append({"target": f"ort prefill speed-up at {low.keep_ratio:g} >= 90% of the FLOP limit",
                    "value": low.speedup_vs_limit, "threshold": 0.9, "met": low.speedup_vs_limit >= 0.9})
    common = sorted(set(ort) & set(eager))
    if common:
        r = min(common)
        ratio = eager[r].prefill_ms / ort[r].prefill_ms
        out.append({"target": f"ort prefill >= 2x faster than eager-dart at {r:g}", "value": ratio,
                    "threshold": 2.0, "met": ratio >= 2.0})
    if pruned and ort[pruned[0]].dart_prune_share is not None:
        share = ort[pruned[0]].dart_prune_share
        out.append({"target": f"DartPrune < 2% of ort prefill (time to first token) at {pruned[0]:g}",
                    "value": share, "threshold": 0.02, "met": share < 0.02})
    return out + quantized_targets(rows)


def quantized_targets(rows: list, rt: str = "ort-int4") -> list[dict]:
    """The int4 targets: decoder bytes <= 0.3x the fp32 engine's; at the smallest keep ratio both ran,
    decode tok/s >= 3x and prefill >= 2x faster than eager-dart."""
    quant = {r.keep_ratio: r for r in rows if r.runtime == rt}
    ort = {r.keep_ratio: r for r in rows if r.runtime == "ort"}
    eager = {r.keep_ratio: r for r in rows if r.runtime == "eager-dart"}
    out = []
    if quant and ort:
        q, f = next(iter(quant.values())), next(iter(ort.values()))
        share = q.engine_bytes["decoder"] / f.engine_bytes["decoder"]
        out.append({"target": f"{rt} decoder bytes <= 0.3x the fp32 decoder's", "value": share,
                    "threshold": 0.3, "met": share <= 0.3})
    common = sorted(set(quant) & set(eager))
    if common:
        r = min(common)
        decode = quant[r].decode_tok_s / eager[r].decode_tok_s
        prefill = eager[r].prefill_ms / quant[r].prefill_ms
        out.append({"target": f"{rt} decode tok/s >= 3x eager-dart's at {r:g}", "value": decode,
                    "threshold": 3.0, "met": decode >= 3.0})
        out.append({"target": f"{rt} prefill >= 2x faster than eager-dart at {r:g}", "value": prefill,
                    "threshold": 2.0, "met": prefill >= 2.0})
    return out


def quantized_vs_ort(rows: list) -> list[dict]:
    """Per quantized row: its figures next to the ort (fp32) row at the same keep ratio."""
    ort = {r.keep_ratio: r for r in rows if r.runtime == "ort"}
    out = []
    for q in rows:
        f = ort.get(q.keep_ratio)
        if q.quant_bits is None or f is None:
            continue
        out.append({"runtime": q.runtime, "keep_ratio": q.keep_ratio, "kept_tokens": q.kept_tokens,
                    "ort_kept_tokens": f.kept_tokens, "decoder_bytes": q.engine_bytes["decoder"],
                    "ort_decoder_bytes": f.engine_bytes["decoder"],
                    "engine_bytes": sum(q.engine_bytes.values()), "ort_engine_bytes": sum(f.engine_bytes.values()),
                    "prefill_ms": q.prefill_ms, "ort_prefill_ms": f.prefill_ms,
                    "decode_tok_s": q.decode_tok_s, "ort_decode_tok_s": f.decode_tok_s,
                    "peak_rss_bytes": q.peak_rss_bytes, "ort_peak_rss_bytes": f.peak_rss_bytes,
                    "logits_cosine": q.logits_cosine, "greedy_agreement": q.greedy_agreement})
    return out


def side_by_side(rows: list, a: str = "eager-dart", b: str = "ort") -> list[dict]:
    """Per keep ratio both runtimes ran: their prefill ms, a / b, and each one's speed-up next to the
    FLOP limit (the same for both: one prompt, one image)."""
    left = {r.keep_ratio: r for r in rows if r.runtime == a}
    right = {r.keep_ratio: r for r in rows if r.runtime == b}
    return [{"keep_ratio": k, f"{a}_prefill_ms": left[k].prefill_ms, f"{b}_prefill_ms": right[k].prefill_ms,
             "ratio": left[k].prefill_ms / right[k].prefill_ms, f"{a}_speedup": left[k].prefill_speedup,
             f"{b}_speedup": right[k].prefill_speedup, "flop_limit_speedup": right[k].flop_limit_speedup}
            for k in sorted(set(left) & set(right), reverse=True)]


def to_json(rows: list, meta: dict) -> dict:
    return {"schema": SCHEMA, "meta": meta, "rows": [asdict(r) for r in rows],
            "ort_vs_eager_dart": side_by_side(rows), "quantized_vs_ort": quantized_vs_ort(rows),
            "targets": targets(rows)}


def _side_by_side_lines(pairs: list[dict]) -> list[str]:
    if not pairs:
        return []
    head = ["keep", "eager-dart ms", "ort ms", "eager-dart / ort", "eager-dart speed-up", "ort speed-up",
            "FLOP limit"]
    cells = [head] + [[f"{p['keep_ratio']:g}", f"{p['eager-dart_prefill_ms']:.1f}", f"{p['ort_prefill_ms']:.1f}",
                       f"{p['ratio']:.2f}x", f"{p['eager-dart_speedup']:.2f}x", f"{p['ort_speedup']:.2f}x",
                       f"{p['flop_limit_speedup']:.2f}x"] for p in pairs]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return ["", "ort vs eager-dart, same keep ratio (time to first token):"] + [
        "  ".join(x.rjust(w) for x, w in zip(c, widths)) for c in cells]


def _quantized_lines(pairs: list[dict]) -> list[str]:
    if not pairs:
        return []
    head = ["runtime", "keep", "kept", "decoder MB", "of fp32", "engine MB", "prefill ms", "vs fp32",
            "decode tok/s", "vs fp32", "peak RSS MiB", "logits cos", "greedy agree"]
    cells = [head] + [[p["runtime"], f"{p['keep_ratio']:g}", f"{p['kept_tokens']}",
                       f"{p['decoder_bytes'] / 1e6:.1f}", f"{p['decoder_bytes'] / p['ort_decoder_bytes']:.3f}x",
                       f"{p['engine_bytes'] / 1e6:.1f}", f"{p['prefill_ms']:.1f}",
                       f"{p['ort_prefill_ms'] / p['prefill_ms']:.2f}x", f"{p['decode_tok_s']:.1f}",
                       f"{p['decode_tok_s'] / p['ort_decode_tok_s']:.2f}x", f"{p['peak_rss_bytes'] / MiB:.0f}",
                       f"{p['logits_cosine']:.4f}", f"{p['greedy_agreement']:.3f}"] for p in pairs]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return ["", ("quantized vs ort (fp32), same keep ratio (vs fp32: fp32 ms / ms, tok/s / fp32 tok/s; "
                "MB = 1e6 bytes on disk):")] + [
        "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))) for c in cells]


def _row_cells(r) -> list[str]:
    lo, hi = r.spread["prefill_ms"]
    share = f"{100 * r.dart_prune_share:.2f}%" if r.dart_prune_share is not None else "-"
    rss = f"{r.peak_rss_bytes / MiB:.0f} (+{r.rss_delta_bytes / MiB:.0f})"
    gpu = f"{r.peak_gpu_bytes / MiB:.0f}" if r.peak_gpu_bytes is not None else "-"
    return [
        r.runtime, f"{r.keep_ratio:g}", f"{r.kept_tokens}/{r.prompt_tokens}",
        f"{r.kept_vision_tokens}/{r.vision_tokens}", f"{r.vision_ms:.1f}", f"{r.prefill_ms:.1f}",
        f"{lo:.1f}-{hi:.1f}", f"{r.prefill_speedup:.2f}x", f"{r.flop_limit_speedup:.2f}x",
        f"{100 * r.speedup_vs_limit:.0f}%", f"{r.prefill_gflop_s:.3g}", f"{r.decode_tok_s:.1f}", f"{r.e2e_ms:.0f}",
        f"{r.kv_bytes / MiB:.2f}", rss, gpu, share,
    ]


HEADER = ["runtime", "keep", "tokens", "vision", "vision ms", "prefill ms", "(min-max)", "speed-up",
          "FLOP limit", "of limit", "GFLOP/s", "decode tok/s", "e2e ms", "KV MiB", "peak RSS MiB", "GPU MiB", "DartPrune"]


def _image(meta: dict) -> str:
    """"; image W x H px = gh x gw patches" (Qwen) or "= N crops" (LLaVA-NeXT) for families whose token
    count depends on the image."""
    grid, crops = meta.get("grid"), meta.get("crops")
    size = f"; image {meta['image_size'][0]}x{meta['image_size'][1]} px"
    return f"{size} = {grid[0]}x{grid[1]} patches" if grid else f"{size} = {crops} crops" if crops else ""


def format_table(rows, meta: dict, targets: list[dict]) -> str:
    """A fixed-width table of the rows, the conditions above it and the targets below it."""
    cells = [HEADER] + [_row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    fmt = lambda c: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths)))
    v = meta["versions"]
    lines = [
        (f"model {meta['model']} ({meta['dtype']}), prompt {meta['prompt_tokens']} tokens "
        f"({meta['vision_tokens']} vision{_image(meta)}), {meta['new_tokens']} new tokens, "
        f"{meta['warmup']} warm-up + {meta['repeats']} timed runs per row (median, min-max)"),
        f"{meta['cpu']}, {meta['threads']} threads; " + ", ".join(f"{k} {x}" for k, x in v.items())
        + (f"; GPU {meta['gpu']}" if meta.get("gpu") else ""),
        ("prefill = time to first token (vision + embed + decoder prefill); speed-up = prefill at keep 1.0 "
        "/ prefill, same runtime; FLOP limit and GFLOP/s from dart_ops.flops; DartPrune = its share of prefill"),
        *[f"one fp32 matmul {'x'.join(map(str, m['shape']))} (the MLP's up-projection): "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in m["gflop_s"].items()) for m in meta.get("matmul", [])],
        "",
        fmt(HEADER),
        fmt(["-" * w for w in widths]),
        *[fmt(c) for c in cells[1:]],
        *_side_by_side_lines(side_by_side(rows)),
        *_quantized_lines(quantized_vs_ort(rows)),
    ]
    if targets:
        lines.append("")
        for t in targets:
            value = f"{100 * t['value']:.2f}%" if t["threshold"] < 1 and "DartPrune" in t["target"] else f"{t['value']:.2f}"
            lines.append(f"{'MET ' if t['met'] else 'MISS'}  {t['target']}: {value}")
    return "\n".join(lines)


def write_plot(rows, meta: dict, path: Path) -> None:
    """PNG: prefill speed-up vs keep ratio per runtime with the FLOP-limit curve; absolute prefill ms."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or the [bench] extra)") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    runtimes = sorted({r.runtime for r in rows}, key=[r.runtime for r in rows].index)
    limit = sorted({(r.keep_ratio, r.flop_limit_speedup) for r in rows if r.runtime != "eager-hf"})
    if limit:
        ax1.plot([x for x, _ in limit], [y for _, y in limit], "k--", label="FLOP limit")
    for i, rt in enumerate(runtimes):
        color = f"C{i}"  # one colour per runtime in both panels
        rs = sorted((r for r in rows if r.runtime == rt), key=lambda r: r.keep_ratio)
        x = [r.keep_ratio for r in rs]
        if len(rs) > 1:
            ax1.plot(x, [r.prefill_speedup for r in rs], "o-", color=color, label=rt)
        ax2.plot(x, [r.prefill_ms for r in rs], "o-" if len(rs) > 1 else "s", color=color, label=rt)
        lo = [r.prefill_ms - r.spread["prefill_ms"][0] for r in rs]
        hi = [r.spread["prefill_ms"][1] - r.prefill_ms for r in rs]
        ax2.errorbar(x, [r.prefill_ms for r in rs], yerr=[lo, hi], fmt="none", ecolor="gray", capsize=3)
    for ax in (ax1, ax2):
        ax.set_xlabel("keep ratio of vision tokens")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_ylabel("prefill speed-up vs keep 1.0")
    ax2.set_ylabel("prefill (time to first token), ms")
    ax2.set_ylim(bottom=0)
    fig.suptitle(f"{meta['model']}: {meta['prompt_tokens']} prompt tokens ({meta['vision_tokens']} vision), "
                 f"{meta['cpu'] if not meta.get('gpu') else meta['gpu']}, {meta['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
