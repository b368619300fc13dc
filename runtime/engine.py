"""Opening an engine directory: manifest.json, the stages on the chosen backend (ONNX Runtime
providers or native TensorRT, whose engines must match the installed TensorRT), the tokenizer, and
the family's run-time rules; `load` returns a ready runtime.pipeline.Pipeline."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from runtime.errors import EngineError, InputError
from runtime.families import rules_class
from runtime.manifest import STAGE_NAMES, TOKENIZER_NAME, Manifest, TrtSpec, read_manifest
from runtime.prompt import PromptBuilder
from runtime.sampling import as_int, describe
from runtime.stage import OrtStage, Stage

log = logging.getLogger(__name__)


def load(
    engine_dir: str | Path,
    providers: Sequence[str] | None = None,
    *,
    threads: int | None = None,
    verify: bool = True,
    spin: bool = False,
    provider_options: dict[str, dict] | None = None,
    kv_binding: bool = True,
):
    """Open an engine directory: validate manifest.json (and, with `verify`, every file's sha256),
    open the three stages and load the tokenizer. Returns a runtime.pipeline.Pipeline.

    providers: ["tensorrt"] runs the TensorRT engines built by `python -m export.trt` (native
    TensorRT, runtime/trt_stage.py; refused when they were built by another TensorRT version).
    Otherwise ONNX Runtime with these execution providers, in order of preference: "cpu"
    (default), "cuda", "ort-tensorrt" (the last two need onnxruntime-gpu); `provider_options`
    passes ONNX Runtime provider options ({"ort-tensorrt": {"trt_fp16_enable": "True"}}).

    Thread pools (CPU): `threads` intra-op threads per session (the embedding lookup, a gather,
    always runs on one). `spin`: let idle threads busy-wait between ops. Off by default: on a
    small CPU the idle pools of the other sessions then steal cores from the running one (2
    threads, llava-bench: prefill 1.2-1.6x slower with spinning, decode the same within noise;
    docs/BENCHMARKS.md). A single provider name may be given as a string ("cuda").

    kv_binding: keep the KV cache with the decoder between decode steps (ONNX Runtime IOBinding,
    TensorRT device buffers); False copies it to numpy and back every step (Pipeline.kv_binding)."""
    from runtime.pipeline import Pipeline  # (it re-exports this module's names)

    t0 = time.perf_counter()
    if isinstance(providers, str):
        providers = [providers]
    if threads is not None:
        threads = as_int(threads, "threads", "None or an integer >= 1", lambda v: v >= 1)
    manifest = read_manifest(engine_dir, verify=verify)
    rules_class(manifest.family)  # an unknown family fails before any session opens
    stages = open_stages(manifest, providers, threads=threads, spin=spin, provider_options=provider_options)
    prompt = PromptBuilder(manifest.path(TOKENIZER_NAME), manifest.prompt, manifest.tokens)
    if not isinstance(kv_binding, bool):
        raise InputError(f"kv_binding must be True or False, got {describe(kv_binding)}")
    pipe = Pipeline(manifest, stages, prompt, kv_binding=kv_binding)
    log.info("load: %s (%s, K=%d, default ratio %.3f) in %.2f s", manifest.directory, manifest.model,
             manifest.dart.layer, manifest.dart.keep_ratio, time.perf_counter() - t0)
    return pipe


def open_stages(manifest: Manifest, providers: Sequence[str] | None, *, threads: int | None = None,
                spin: bool = False, provider_options: dict[str, dict] | None = None) -> dict[str, Stage]:
    """The engine's stages by name: native TensorRT for providers ["tensorrt"], else ONNX Runtime."""
    names = [p.lower() for p in providers or ["cpu"] if isinstance(p, str)]
    if "tensorrt" in names:
        if len(names) != 1:
            raise EngineError(f"providers {list(providers)}: 'tensorrt' (native engines) cannot be combined "
                              "with ONNX Runtime providers; for ONNX Runtime's TensorRT provider use 'ort-tensorrt'")
        return _trt_stages(manifest)
    return {
        name: OrtStage(manifest.path(manifest.stages[name].file), providers, name=name,
                       threads=1 if name == "embed_tokens" else threads, spin=spin,
                       provider_options=provider_options)
        for name in STAGE_NAMES
    }


def _trt_stages(manifest: Manifest) -> dict[str, Stage]:
    """TensorRT stages, after checking that the engines exist and match this TensorRT."""
    from runtime.trt_stage import TrtStage

    spec = check_trt_engines(manifest)
    return {name: TrtStage(manifest.path(spec.engines[name]), name=name) for name in STAGE_NAMES}


def check_trt_engines(manifest: Manifest) -> TrtSpec:
    """The manifest's TensorRT section, when it exists and its engines were built by the installed
    TensorRT; EngineError otherwise (no engine is deserialized)."""
    from runtime.trt_stage import trt_version

    spec = manifest.tensorrt
    if spec is None:
        raise EngineError(f"{manifest.directory} has no TensorRT engines; build them on this device with: "
                          f"python -m export.trt --engine-dir {manifest.directory}")
    check_trt_version(spec.version, trt_version(), manifest.directory)
    return spec


def check_trt_version(built: str, installed: str | None, directory) -> None:
    """A TensorRT plan only deserializes in the TensorRT version that built it."""
    if installed is None:
        raise EngineError("TensorRT is not installed (on Jetson it comes with JetPack 6; on x86 "
                          "`pip install tensorrt-cu12`); or run the ONNX graphs with --provider cpu/cuda")
    if built != installed:
        raise EngineError(f"{directory}: the TensorRT engines were built with TensorRT {built}, this is "
                          f"{installed}; rebuild them here with: python -m export.trt --engine-dir {directory}")
