"""The generate loop: vision encoder -> embeddings -> decoder prefill (DART at layer K) -> decode.

    pipe = runtime.load("engines/llava-tiny")
    out = pipe.generate("What is in the picture?", image="cat.jpg", keep_ratio=0.111)
    out.text, out.token_ids, out.kept_positions, out.timings

Batch 1. Prefill feeds the whole prompt with empty past KV and the vision span; the decoder prunes
the span at layer K and returns the kept positions. Each decode step feeds one token at position
S + t (S = unpruned prompt length) with span_len 0 and the previous step's present KV. The KV stays
where the decoder runs between steps (runtime.stage.kv_loop: ONNX Runtime IOBinding, TensorRT device
buffers); `Pipeline.kv_binding = False` (or load(kv_binding=False)) makes it a numpy round trip
instead, with bit-identical tokens (tests/test_kv_binding.py), so both can be timed side by side.

Every argument is checked before a graph runs (InputError), and every stage output that feeds the
next stage is checked for NaN / inf (EngineError), so a bad input never surfaces as an ONNX Runtime
error from inside the decoder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import EngineError, InputError
from runtime.engine_checks import check_graphs
from runtime.manifest import STAGE_NAMES, TOKENIZER_NAME, Manifest, TrtSpec, read_manifest
from runtime.preprocess import ImageLike, preprocess
from runtime.prompt import PromptBuilder, find_span
from runtime.sampling import Sampler, as_int, check_keep_ratio, check_max_new_tokens, describe
from runtime.stage import KVLoop, OrtStage, Stage, kv_loop

log = logging.getLogger(__name__)

DECODER_INPUTS = ("inputs_embeds", "position_ids", "span_start", "span_len", "quota")
DECODER_OUTPUTS = ("logits", "kept_positions")


@dataclass(frozen=True)
class GenerateOutput:
    """What generate() returns.

    token_ids:      generated ids only, without the prompt and without the final eos (if reached).
    text:           token_ids decoded, special tokens skipped.
    kept_positions: prompt positions the decoder kept at layer K (all of them when not pruned).
    timings:        vision_ms, embed_ms, prefill_ms, decode_ms, total_ms (and preprocess_ms),
                    tokens_per_s (decode steps per second after prefill), prompt_tokens,
                    kept_tokens, vision_tokens, kept_vision_tokens, new_tokens, decode_steps,
                    kv_bytes (bytes of the KV cache after prefill, both layer groups),
                    max_new_tokens (the limit used: the one asked for, or less when capped to
                    max_context - prompt_tokens).
    keep_ratio:     the ratio used.
    first_logits:   (V,) float32 logits of the prefill step (what chose the first new token).
    """

    token_ids: list[int]
    text: str
    kept_positions: list[int]
    timings: dict[str, float]
    keep_ratio: float
    first_logits: np.ndarray | None = None


def _np_dtype(name: str, where: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError as exc:
        raise EngineError(f"{where}: dtype {name!r} is not supported by the numpy runtime") from exc


def _scalar(v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)  # 0-d int64, as the decoder's span_start/span_len/quota


def cap_new_tokens(max_new_tokens: int, prompt_tokens: int, max_context: int) -> int:
    """How many tokens generate() may add: prompt + new tokens fit the engine's max_context (the KV
    cache's length bound), as transformers' generate stops at max_length. 0 when the prompt fills it."""
    return max(0, min(max_new_tokens, max_context - prompt_tokens))


def _asarray(value, name: str, want: str) -> np.ndarray:
    """np.asarray, with numpy's errors on ragged nested lists turned into InputError."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError):
        raise InputError(f"{name} must be {want}, got {describe(value)}, not a rectangular array") from None


def _finite(x: np.ndarray, stage: str, what: str) -> np.ndarray:
    """`x`, after checking that a stage's output holds no NaN / inf (which the next stage would turn
    into garbage tokens, or an error from inside DartPrune)."""
    if not np.isfinite(x).all():
        raise EngineError(f"{stage} produced non-finite values (NaN or inf) in {what} from finite inputs; the "
                          "engine is corrupt or overflows (an fp16 export?): re-export, e.g. with --dtype fp32")
    return x


class Pipeline:
    """One engine, ready to generate. Build with `runtime.load(engine_dir)`; tests may pass their
    own `stages` (anything with the Stage interface) and `prompt` builder.

    kv_binding: keep the KV cache where the decoder runs between decode steps (True, the default;
    decoders without a bound loop of their own use the numpy round trip anyway), or copy it to
    numpy and back every step (False; for measuring the difference)."""

    def __init__(self, manifest: Manifest, stages: dict[str, Stage], prompt: PromptBuilder,
                 kv_binding: bool = True):
        self.manifest = manifest
        self.kv_binding = kv_binding
        self.vision = stages["vision_encoder"]
        self.embed = stages["embed_tokens"]
        self.decoder = stages["decoder"]
        self.prompt = prompt
        for name, stage in stages.items():
            _check_names(name, stage, manifest)
        check_graphs(manifest, stages)  # dims, K, vocab, DART metadata: the graphs match the manifest
        self._check_decoder()
        dec_spec = manifest.stages["decoder"]
        self.embeds_dtype = _np_dtype(_spec_dtype(dec_spec, "inputs_embeds", manifest.dtype), "decoder")
        vis_spec, emb_spec = manifest.stages["vision_encoder"], manifest.stages["embed_tokens"]
        self.pixel_name, self.features_name = vis_spec.inputs[0].name, vis_spec.outputs[0].name
        self.pixel_dtype = _np_dtype(vis_spec.inputs[0].dtype, "vision_encoder")
        self.ids_name, self.embeds_name = emb_spec.inputs[0].name, emb_spec.outputs[0].name
        # past_key_0 -> present_key_0, ...: how one step's outputs feed the next step's inputs.
        self.past_names = [n for n in self.decoder.input_names if n.startswith("past_")]
        self.present_for = {n: "present_" + n[len("past_"):] for n in self.past_names}
        kv_shape = (1, manifest.decoder.num_kv_heads, 0, manifest.decoder.head_dim)
        self.empty_past = {
            n: np.zeros(kv_shape, _np_dtype(_spec_dtype(dec_spec, n, manifest.dtype), "decoder"))
            for n in self.past_names
        }

    def _check_decoder(self) -> None:
        names, outs = set(self.decoder.input_names), set(self.decoder.output_names)
        missing = [n for n in DECODER_INPUTS if n not in names] + [n for n in DECODER_OUTPUTS if n not in outs]
        past = [n for n in names if n.startswith("past_")]
        missing += [f"present_{n[5:]}" for n in past if f"present_{n[5:]}" not in outs]
        if missing or len(past) != 2 * self.manifest.decoder.num_layers:
            raise EngineError(f"decoder: graph does not have the decoder interface (missing {missing or 'none'}, "
                              f"{len(past)} past inputs for {self.manifest.decoder.num_layers} layers); re-export")

    def kv_loop(self) -> KVLoop:
        """The decoder's calls for one generation: present KV -> next past KV, logits and kept
        positions back as numpy (bound to the backend unless kv_binding is False)."""
        carry = {self.present_for[n]: n for n in self.past_names}
        return kv_loop(self.decoder, carry, DECODER_OUTPUTS, bound=self.kv_binding)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embed.run({self.ids_name: ids})[self.embeds_name]

    # --- inputs -----------------------------------------------------------------------------------

    def _prompt_ids(self, prompt, input_ids, with_image: bool) -> list[int]:
        if prompt is not None and input_ids is not None:
            raise InputError("give either prompt or input_ids, not both")
        if prompt is None and input_ids is None:
            raise InputError("give a prompt (text) or input_ids (a full prompt with one image token)")
        if prompt is not None:
            return self.prompt.encode(prompt, with_image)
        arr = _asarray(input_ids, "input_ids", "a non-empty 1-D (or [1, S]) sequence of ints (batch 1 only)")
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"input_ids must be a non-empty 1-D (or [1, S]) sequence of ints, got shape "
                             f"{arr.shape} dtype {arr.dtype} (batch 1 only)")
        self._check_length(arr.size)  # before copying it into a list: expanding only makes it longer
        vocab = self.manifest.decoder.vocab_size
        if arr.min() < 0 or arr.max() >= vocab:
            raise InputError(f"input_ids must be in [0, {vocab}), got values from {arr.min()} to {arr.max()}")
        return self.prompt.expand(arr.tolist())

    def _pixels(self, image, pixel_values) -> np.ndarray | None:
        if image is not None and pixel_values is not None:
            raise InputError("give either image or pixel_values, not both")
        if image is not None:
            return preprocess(image, self.manifest.preprocess).astype(self.pixel_dtype, copy=False)
        if pixel_values is None:
            return None
        size = self.manifest.preprocess.image_size
        want = f"a float array [1, 3, {size}, {size}]"
        pv = _asarray(pixel_values, "pixel_values", want)
        if pv.shape != (1, 3, size, size) or not np.issubdtype(pv.dtype, np.floating):
            raise InputError(f"pixel_values must be {want}, got {pv.dtype} {list(pv.shape)}")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, refused below
            pv = pv.astype(self.pixel_dtype, copy=False)  # (1, 3, H, W): small, the shape is checked
        if not np.isfinite(pv).all():
            raise InputError(f"pixel_values hold NaN or infinite values (as {pv.dtype}); give finite, normalised "
                             "pixels (or pass image= and let the engine preprocess it)")
        return pv

    def _check_length(self, S: int) -> None:
        m = self.manifest
        if S > m.max_seq:
            raise InputError(f"prompt has {S} tokens; this engine was exported for at most {m.max_seq} "
                             "(re-export with --max-seq)")

    def _cap_new_tokens(self, S: int, max_new_tokens: int) -> int:
        m = self.manifest
        n = cap_new_tokens(max_new_tokens, S, m.max_context)
        if n < max_new_tokens:
            log.warning("generate: max_new_tokens %d capped to %d: the prompt's %d tokens + new tokens must fit "
                        "this engine's max_context %d (re-export with --max-context for longer answers)",
                        max_new_tokens, n, S, m.max_context)
        return n

    def resolve_ratio(self, keep_ratio: float | None) -> float:
        """The keep ratio to use: `keep_ratio` (a Python or numpy real in (0, 1]) or the manifest's."""
        r = self.manifest.dart.keep_ratio if keep_ratio is None else keep_ratio
        return check_keep_ratio(r)

    # --- generate ---------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        image: ImageLike | None = None,
        *,
        input_ids: Sequence[int] | np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        keep_ratio: float | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: Callable[[str], None] | None = None,
        ignore_eos: bool = False,
    ) -> GenerateOutput:
        """Answer one prompt (batch 1). Stops at an eos token (not included in token_ids) or after
        max_new_tokens. `stream` receives each new piece of text as soon as it decodes cleanly.
        `ignore_eos` generates exactly max_new_tokens (eos tokens included; for benchmarks).

        Numbers may be Python or numpy scalars (bools are refused): keep_ratio in (0, 1] (None: the
        manifest's), max_new_tokens an integer >= 0, temperature finite >= 0 (0 = greedy), top_p in
        (0, 1], seed None or an integer in [0, 2**63 - 1] (negative seeds are refused, not mapped).
        max_new_tokens larger than max_context - prompt tokens is capped to it, with a warning (as
        transformers' generate stops at max_length); timings["max_new_tokens"] is the limit used. A
        prompt longer than the engine's max_seq raises InputError.

        Raises InputError for a bad argument (before any graph runs) and EngineError when a stage fails
        or produces NaN / inf. An exception raised by `stream` itself propagates unchanged and ends
        the generation."""
        m = self.manifest
        t_start = time.perf_counter()
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        ratio = self.resolve_ratio(keep_ratio)
        sampler = Sampler(temperature, top_p, seed)
        if stream is not None and not callable(stream):
            raise InputError(f"stream must be a callable taking each new piece of text, got {describe(stream)}")

        pixels = self._pixels(image, pixel_values)
        ids = self._prompt_ids(prompt, input_ids, with_image=pixels is not None)
        S = len(ids)
        a, L = find_span(ids, m.tokens.image_token_id)
        if L and pixels is None:
            raise InputError("the prompt has image tokens but no image was given; pass image= or pixel_values=")
        if pixels is not None and not L:
            raise InputError("an image was given but input_ids hold no image token; add one where the image goes")
        self._check_length(S)
        max_new_tokens = self._cap_new_tokens(S, max_new_tokens)
        t_pre = time.perf_counter()

        dart = m.dart
        counts = dart.config(ratio).counts(L, S - a - L)
        span_len = L if counts.prune else 0
        if span_len > dart.max_span:
            raise EngineError(f"vision span of {L} tokens exceeds the engine's max_span {dart.max_span}")

        t0 = time.perf_counter()
        features = None
        if pixels is not None:
            features = self.vision.run({self.pixel_name: pixels})[self.features_name]  # (1, N, D)
        t1 = time.perf_counter()
        embeds = self._embed(np.asarray([ids], dtype=np.int64))  # (1, S, D)
        embeds = _finite(embeds.astype(self.embeds_dtype, copy=False), "embed_tokens", self.embeds_name)
        if features is not None:
            if features.shape[0] != 1 or features.shape[1] != L or features.shape[2] != embeds.shape[2]:
                raise EngineError(f"vision_encoder returned features {list(features.shape)} for {L} image tokens "
                                  f"of width {embeds.shape[2]} (tokens.image_seq_len disagrees); re-export")
            _finite(features, "vision_encoder", self.features_name)
            embeds = embeds.copy()
            embeds[0, a:a + L] = features[0]
        t2 = time.perf_counter()

        loop = self.kv_loop()
        out = loop.run({
            "inputs_embeds": embeds,
            "position_ids": np.arange(S, dtype=np.int64)[None],  # (1, S)
            "span_start": _scalar(a),
            "span_len": _scalar(span_len),
            "quota": _scalar(counts.quota),
            **self.empty_past,
        })
        _finite(out["logits"], "decoder", "logits (prefill)")
        kept = [int(p) for p in out["kept_positions"][0]]
        t3 = time.perf_counter()
        kv_bytes = loop.kv_bytes()

        tokens: list[int] = []
        streamer = _Streamer(self.prompt.decode, stream) if stream else None
        eos = set() if ignore_eos else set(m.tokens.eos_token_ids)
        steps = 0
        first_logits = out["logits"][0].astype(np.float32)
        for t in range(max_new_tokens):
            tok = sampler(out["logits"][0])
            if tok in eos:
                break
            tokens.append(tok)
            if streamer:
                streamer.push(tokens)
            if t + 1 == max_new_tokens:
                break
            emb = self._embed(np.array([[tok]], dtype=np.int64))  # (1, 1, D)
            out = loop.run({  # past KV: carried from the previous call
                "inputs_embeds": emb.astype(self.embeds_dtype, copy=False),
                "position_ids": np.array([[S + t]], dtype=np.int64),
                "span_start": _scalar(0),
                "span_len": _scalar(0),
                "quota": _scalar(0),
            })
            _finite(out["logits"], "decoder", f"logits (decode step {t + 1})")
            steps += 1
        text = self.prompt.decode(tokens)
        if streamer:
            streamer.finish(text)
        t4 = time.perf_counter()

        decode_s = t4 - t3
        timings = {
            "preprocess_ms": 1e3 * (t_pre - t_start),
            "vision_ms": 1e3 * (t1 - t0),
            "embed_ms": 1e3 * (t2 - t1),
            "prefill_ms": 1e3 * (t3 - t2),
            "decode_ms": 1e3 * decode_s,
            "total_ms": 1e3 * (t4 - t_start),
            "tokens_per_s": steps / decode_s if steps and decode_s > 0 else 0.0,
            "prompt_tokens": S,
            "kept_tokens": len(kept),
            "vision_tokens": L,
            "kept_vision_tokens": sum(1 for p in kept if a <= p < a + L),
            "new_tokens": len(tokens),
            "decode_steps": steps,
            "kv_bytes": kv_bytes,
            "max_new_tokens": max_new_tokens,
        }
        log.info("generate: S=%d, span [%d, %d), ratio %.3f -> T=%d, kept %d; %d new tokens",
                 S, a, a + L, ratio, counts.quota, len(kept), len(tokens))
        return GenerateOutput(tokens, text, kept, timings, ratio, first_logits)


class _Streamer:
    """Incremental detokenisation: decode all generated ids, emit the new suffix. Holds back text
    ending in U+FFFD (a multi-byte character cut in the middle) until it completes."""

    def __init__(self, decode: Callable[[list[int]], str], sink: Callable[[str], None]):
        self.decode = decode
        self.sink = sink
        self.sent = ""

    def push(self, tokens: list[int]) -> None:
        text = self.decode(tokens)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def finish(self, text: str) -> None:
        self._emit(text)

    def _emit(self, text: str) -> None:
        if len(text) > len(self.sent):
            self.sink(text[len(self.sent):])
            self.sent = text


def _spec_dtype(stage, name: str, default: str) -> str:
    spec = stage.input(name)
    return spec.dtype if spec else default


def _check_names(name: str, stage: Stage, manifest: Manifest) -> None:
    spec = manifest.stages[name]
    want_in, want_out = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
    if set(stage.input_names) != set(want_in) or set(stage.output_names) != set(want_out):
        raise EngineError(f"{spec.file}: graph inputs {stage.input_names} / outputs {stage.output_names} differ "
                          f"from manifest.json's {want_in} / {want_out}; re-export the engine")


def load(
    engine_dir: str | Path,
    providers: Sequence[str] | None = None,
    *,
    threads: int | None = None,
    verify: bool = True,
    spin: bool = False,
    provider_options: dict[str, dict] | None = None,
    kv_binding: bool = True,
) -> Pipeline:
    """Open an engine directory: validate manifest.json (and, with `verify`, every file's sha256),
    open the three stages and load the tokenizer.

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
    t0 = time.perf_counter()
    if isinstance(providers, str):
        providers = [providers]
    if threads is not None:
        threads = as_int(threads, "threads", "None or an integer >= 1", lambda v: v >= 1)
    manifest = read_manifest(engine_dir, verify=verify)
    names = [p.lower() for p in providers or ["cpu"] if isinstance(p, str)]
    if "tensorrt" in names:
        if len(names) != 1:
            raise EngineError(f"providers {list(providers)}: 'tensorrt' (native engines) cannot be combined "
                              "with ONNX Runtime providers; for ONNX Runtime's TensorRT provider use 'ort-tensorrt'")
        stages = _trt_stages(manifest)
    else:
        stages = {
            name: OrtStage(manifest.path(manifest.stages[name].file), providers, name=name,
                           threads=1 if name == "embed_tokens" else threads, spin=spin,
                           provider_options=provider_options)
            for name in STAGE_NAMES
        }
    prompt = PromptBuilder(manifest.path(TOKENIZER_NAME), manifest.prompt, manifest.tokens)
    if not isinstance(kv_binding, bool):
        raise InputError(f"kv_binding must be True or False, got {describe(kv_binding)}")
    pipe = Pipeline(manifest, stages, prompt, kv_binding=kv_binding)
    log.info("load: %s (%s, K=%d, default ratio %.3f) in %.2f s", manifest.directory, manifest.model,
             manifest.dart.layer, manifest.dart.keep_ratio, time.perf_counter() - t0)
    return pipe


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
