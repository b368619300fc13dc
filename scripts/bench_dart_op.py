"""DART's ONNX op alone: DartPruneSlots (what exported decoders carry) vs the earlier DartPrune, side by side.

    python scripts/bench_dart_op.py                      # the 7B shapes of LLaVA-1.5 and LLaVA-NeXT, 2 threads
    python scripts/bench_dart_op.py --json op.json --repeats 20

Each case runs both standalone models (dart_ops.onnx_op / dart_ops.onnx_op_slots, bodies sized as
export.stages.dart_sizes sizes them: 8 pivot steps over span + 8 entries) in ONNX Runtime on the
CPU, on the same random layer K-1 states, and checks they keep exactly the same tokens. DartPrune
takes the kept length from its scalars' values (CumSum, Slice); DartPruneSlots from kept_slots'
shape, with no shape-tensor input (issue 15). Reported: median and min milliseconds per call.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

log = logging.getLogger("bench_dart_op")

# (name, S prompt tokens, a span start, L vision tokens, D hidden, F = kv_heads * head_dim, T quota at 0.111)
CASES = {
    "llava-1.5-7b": (633, 5, 576, 4096, 4096, 8),  # Vicuna-7B: 32 KV heads x 128
    "llava-next-7b": (2994, 5, 2928, 4096, 1024, 40),  # Mistral-7B: 8 KV heads x 128; keep_tokens 320
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES), help="shapes to run")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per op and case, after one warm-up "
                                                           "(default 10)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be >= 1")
    if args.json is not None and not args.json.parent.is_dir():
        p.error(f"--json: {args.json.parent} is not a directory")
    return args


def _session(model, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _time(session, feeds: dict, repeats: int):
    session.run(None, feeds)  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        (out,) = session.run(None, feeds)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), min(times), out


def run_case(name: str, threads: int, repeats: int, shape=None) -> dict:
    """One case (or `shape` = (S, a, L, D, F, T)): both ops' timings and kept count; ValueError when they
    keep different tokens."""
    import numpy as np

    from dart_ops import onnx_op, onnx_op_slots
    from dart_ops.spec import kept_len

    S, a, L, D, F, T = shape or CASES[name]
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((1, S, D), np.float32)
    keys = rng.standard_normal((1, S, F), np.float32)
    sizes = {"max_pivots": 8, "max_span": L + 8}
    old = _session(onnx_op.standalone_model(4, 4, 18, **sizes), threads)
    new = _session(onnx_op_slots.standalone_model(4, 4, 18, index_dtype="int32", **sizes), threads)

    def ints(dtype):
        return {n: np.array(v, dtype) for n, v in zip(("span_start", "span_len", "quota"), (a, L, T))}

    kept = kept_len(S, a, L, T)
    feeds_old = {"hidden": hidden, "keys": keys, **ints(np.int64)}
    feeds_new = {"hidden": hidden, "keys": keys, **ints(np.int32), "kept_slots": np.zeros((1, kept), np.int32)}
    old_ms, old_min, keep_old = _time(old, feeds_old, repeats)
    new_ms, new_min, keep_new = _time(new, feeds_new, repeats)
    if not np.array_equal(keep_old, keep_new):
        raise ValueError(f"{name}: DartPrune and DartPruneSlots kept different tokens")
    return {"case": name, "seq": S, "span_start": a, "span_len": L, "hidden": D, "key_dim": F, "quota": T,
            "kept": kept, "DartPrune_ms": round(old_ms, 4), "DartPrune_min_ms": round(old_min, 4),
            "DartPruneSlots_ms": round(new_ms, 4), "DartPruneSlots_min_ms": round(new_min, 4),
            "ratio": round(new_ms / old_ms, 3)}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import onnxruntime as ort

    rows = [run_case(name, args.threads, args.repeats) for name in args.cases]
    log.info("ONNX Runtime %s CPU, %d threads, %s, %d timed calls (median, min ms)", ort.__version__, args.threads,
             platform.processor() or platform.machine(), args.repeats)
    for r in rows:
        log.info("%-14s S %4d, span %4d -> kept %4d: DartPrune %7.2f (%7.2f)  DartPruneSlots %7.2f (%7.2f)  "
                 "slots / old %.2fx, same kept tokens", r["case"], r["seq"], r["span_len"], r["kept"],
                 r["DartPrune_ms"], r["DartPrune_min_ms"], r["DartPruneSlots_ms"], r["DartPruneSlots_min_ms"],
                 r["ratio"])
    if args.json is not None:
        meta = {"onnxruntime": ort.__version__, "threads": args.threads, "repeats": args.repeats,
                "python": platform.python_version(), "machine": platform.machine()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
