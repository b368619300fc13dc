"""Engine vs eager prefill/decode latency across DART keep ratios, side by side in one process.

    python scripts/bench.py                                   # llava-bench on this CPU (a few minutes)
    python scripts/bench.py --engine-dir engines/llava-tiny --repeats 1 --json out.json
    python scripts/bench.py --model llava-7b-shape --device cuda --dtype fp16 --runtimes eager-hf,eager-dart
    python scripts/bench.py --model qwen2.5-vl-bench                  # Qwen2.5-VL, ~1000 vision tokens

The measuring code is the bench/ package (bench/run.py, runners.py, probes.py); the JSON document,
table and plot come from bench/report.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.config import RUNTIMES, BenchConfig
from bench.families import NATIVE
from export.cli import EXIT_OK, Parser, dataclass_defaults, report

log = logging.getLogger("bench")

EPILOG = """examples:
  python scripts/bench.py --json bench.json --plot bench.png     # llava-bench, exported first if needed
  python scripts/bench.py --engine-dir engines/llava              # an engine you exported (eager from its model)
  python scripts/bench.py --model llava-7b-shape --device cuda --dtype fp16 --runtimes eager-hf,eager-dart
  python scripts/bench.py --model qwen2.5-vl-bench --image-size 1092x728   # 1014 vision tokens (its default)
  python scripts/bench.py --model llava-next-bench --ratios 1.0,0.111       # 2928 vision tokens, 324 kept
  python scripts/bench.py --runtimes ort,ort-int8,ort-int4 --ratios 1.0,0.111   # int8 / int4 vs fp32 engines

prefill = time to first token from tokenised ids and preprocessed pixels (vision encoder + embedding +
decoder prefill); speed-up = prefill at keep 1.0 / prefill, within one runtime; FLOP limit = the same
ratio from the analytic model in dart_ops/flops.py.
"""


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep ratios must be numbers separated by commas, got {text!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"keep ratios must be in (0, 1], got {text!r}")
    return tuple(sorted(set(values) | {1.0}, reverse=True))  # 1.0 is the baseline of every speed-up


def _image_size(text: str) -> tuple[int, int]:
    if text == "native":
        return NATIVE
    w, _, h = text.partition("x")
    try:
        size = (int(w), int(h))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be WxH in pixels or 'native', got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return size


def _runtimes(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in RUNTIMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"runtimes must be among {', '.join(RUNTIMES)}, got {text!r}")
    return names


def parse_args(argv=None) -> tuple[BenchConfig, argparse.Namespace]:
    d = dataclass_defaults(BenchConfig)
    p = Parser(prog="python scripts/bench.py", description=__doc__.split("\n")[0], epilog=EPILOG)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None,
                   help=f"preset or checkpoint directory (default: {d['model']}, or the --engine-dir's "
                        "model)")
    m.add_argument("--engine-dir", type=Path, default=d["engine_dir"],
                   help="engine directory for the ort rows (default: engines/<model>, exported when missing)")
    r = p.add_argument_group("what to run")
    r.add_argument("--ratios", type=_ratios, default=d["ratios"],
                   help="keep ratios, comma-separated; 1.0 is always added")
    r.add_argument("--runtimes", type=_runtimes, default=d["runtimes"],
                   help=f"rows to run, comma-separated, from {','.join(RUNTIMES)}; ort-int8 / ort-int4 run the "
                        "engine's weight-only quantized copy in <engine-dir>-int8 / -int4 (python -m "
                        "export.quantize's defaults, made when missing); trt runs the engines of python -m "
                        "export.trt (needs TensorRT)")
    r.add_argument("--new-tokens", type=int, default=d["new_tokens"],
                   help="tokens generated per run, eos ignored")
    r.add_argument("--repeats", type=int, default=d["repeats"], help="timed runs per row")
    r.add_argument("--warmup", type=int, default=d["warmup"], help="untimed runs per row first")
    r.add_argument("--threads", type=int, default=d["threads"],
                   help="torch and ONNX Runtime intra-op threads")
    r.add_argument("--device", default=d["device"], help="eager rows: cpu or cuda[:N]")
    r.add_argument("--dtype", choices=["fp32", "fp16"], default=d["dtype"], help="eager rows")
    r.add_argument("--ort-provider", default=d["ort_provider"], choices=["cpu", "cuda", "ort-tensorrt"],
                   help="ONNX Runtime execution provider of the ort rows (cuda, ort-tensorrt need "
                        "onnxruntime-gpu)")
    r.add_argument("--ort-spin", action="store_true", default=d["ort_spin"],
                   help="let ONNX Runtime's idle threads spin (its own default; off in runtime.load, "
                        "see docs/BENCHMARKS.md)")
    r.add_argument("--prompt", default=d["prompt"], help="question")
    r.add_argument("--image", type=Path, default=d["image"], help="image")
    r.add_argument("--image-size", type=_image_size, default=d["image_size"], metavar="WxH",
                   help="resize the image to W x H pixels first (untimed; 'native': as it is); default: the "
                        "family's (qwen2_vl: 1092x728, which gives 1014 vision tokens when the engine's max_pixels "
                        "allows them; llava_next: 672x672, 5 crops and 2928 vision tokens, the DART paper's 2880-token "
                        "class; llava: as it is)")
    r.add_argument("--no-profile", dest="profile", action="store_false", default=d["profile"],
                   help="skip profiling DartPrune's share of the ort prefill (ONNX Runtime profiler)")
    r.add_argument("--no-kv-binding", dest="kv_binding", action="store_false", default=d["kv_binding"],
                   help="ort rows: copy the KV cache through numpy every decode step (the old path) instead "
                        "of keeping it with the engine (IOBinding)")
    r.add_argument("--kv-binding-ab", action="store_true", default=d["kv_binding_ab"],
                   help="also time decode with and without KV binding on the same engine, alternating "
                        "(JSON: meta.kv_binding_ab)")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, help="write the rows, conditions and targets as JSON")
    o.add_argument("--plot", type=Path, default=None, help="write a PNG: speed-up vs keep ratio, prefill ms")
    o.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    a = p.parse_args(argv)
    for flag in ("new_tokens", "repeats", "threads"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    if not (a.device == "cpu" or a.device == "cuda" or a.device.startswith("cuda:")):
        p.error(f"--device must be cpu or cuda[:N], got {a.device!r}")
    if a.dtype == "fp16" and a.device == "cpu":
        p.error("--dtype fp16 is for --device cuda (fp16 matmuls on CPU are not a deployment target)")
    if not a.image.is_file():
        p.error(f"--image {a.image} is not a file")
    model = a.model
    if a.engine_dir is not None and (a.engine_dir / "manifest.json").is_file():
        try:
            engine_model = json.loads((a.engine_dir / "manifest.json").read_text()).get("model")
        except (ValueError, AttributeError, OSError) as e:
            p.error(f"--engine-dir {a.engine_dir}: manifest.json is not readable ({type(e).__name__}: {e}); "
                    "re-export the engine directory")
        if model is None:
            model = engine_model
    elif a.engine_dir is not None and a.engine_dir.exists() and any(a.engine_dir.iterdir()):
        p.error(f"--engine-dir {a.engine_dir} exists but holds no manifest.json (not an engine directory)")
    cfg = BenchConfig(
        model=model or d["model"], engine_dir=a.engine_dir, ratios=a.ratios, runtimes=a.runtimes,
        new_tokens=a.new_tokens, repeats=a.repeats, warmup=a.warmup, threads=a.threads, device=a.device,
        dtype=a.dtype, ort_provider=a.ort_provider, ort_spin=a.ort_spin, prompt=a.prompt, image=a.image,
        image_size=a.image_size, profile=a.profile, kv_binding=a.kv_binding, kv_binding_ab=a.kv_binding_ab,
    )
    return cfg, a


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    if not args.verbose:
        # Hugging Face's own bars (loading/saving weights) would interleave with ours.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "httpx", "runtime", "export.stages"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    from tqdm import tqdm

    from bench import report as bench_report
    from bench import run as benchmark  # benchmark.run(cfg): looked up at call time (tests replace it)

    try:
        if cfg.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise benchmark.BenchError(f"--device {cfg.device}: this torch build sees no CUDA GPU")
        bar = tqdm(total=benchmark.total_runs(cfg), desc="bench", unit="run", file=sys.stderr,
                   disable=not sys.stderr.isatty())
        rows, meta = benchmark.run(cfg, progress=bar.update)
        bar.close()
        doc = bench_report.to_json(rows, meta)
        print(bench_report.format_table(rows, meta, doc["targets"]))
        if args.json:
            _write_atomic(args.json, lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))
            log.info("bench: wrote %s", args.json)
        if args.plot:
            _write_atomic(args.plot, lambda p: bench_report.write_plot(rows, meta, p))
            log.info("bench: wrote %s", args.plot)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001  one line for the user, the traceback with -v
        return report(e, args.verbose)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
