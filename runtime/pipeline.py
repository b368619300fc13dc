"""The generate loop: vision encoder -> embeddings -> decoder prefill (DART at layer K) -> decode.

    pipe = runtime.load("engines/llava-tiny")
    out = pipe.generate("What is in the picture?", image="cat.jpg", keep_ratio=0.111)
    out.text, out.token_ids, out.kept_positions, out.timings

generate = prepare + prefill + a decode loop, each callable alone (batch 1):

    prompt = pipe.prepare(Request("What is this?", image="cat.jpg"))  # checks, ids, pixels, spans
    state = pipe.prefill(prompt)                # vision, embed, decoder prefill: state.logits, state.kept
    logits = pipe.decode_step(state, token)     # one token at the next decode position
    for token in pipe.tokens(prompt, state): ...  # sample, stop at eos / max_new_tokens, decode_step

The family's run-time rules (runtime/families/, picked by manifest.family) decide the
preprocessing, the prompt, where the vision features go and the position ids. Prefill feeds the
whole prompt with empty past KV and the (first) vision span; the decoder prunes the span at layer K.
Each decode step feeds one token with span_len 0 and the previous step's present KV. The KV stays
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
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from dart_ops.spec import decoder_span
from runtime.engine import check_trt_engines, check_trt_version, load  # noqa: F401  (re-exported)
from runtime.engine_checks import check_graphs
from runtime.errors import EngineError, InputError
from runtime.families import VisionInput, as_array, np_dtype, rules_for
from runtime.manifest import INDEX_DTYPE, Manifest
from runtime.output import GenerateOutput, KeptView, Streamer, cap_new_tokens
from runtime.output import Streamer as _Streamer  # noqa: F401  (its old name here)
from runtime.preprocess import ImageLike
from runtime.prompt import PromptBuilder
from runtime.sampling import Sampler, check_keep_ratio, check_keep_tokens, check_max_new_tokens, describe
from runtime.stage import KVLoop, Stage, kv_loop
from runtime.steps import Prompt, Request, State, step_timings

log = logging.getLogger(__name__)

DECODER_INPUTS = ("inputs_embeds", "position_ids", "span_start", "span_len", "quota", "kept_slots")
DECODER_OUTPUTS = ("logits", "kept_positions")
PIVOTS_OUTPUT = "image_pivots"  # (1, P) sequence indices of the image pivots, -1 unused (engines since issue 13)


INDEX = np.dtype(INDEX_DTYPE)  # every integer input of the graphs (runtime/manifest.py says why)


def _scalar(v: int) -> np.ndarray:
    return np.array(v, dtype=INDEX)  # 0-d, as the decoder's span_start/span_len/quota


def _index(x: np.ndarray) -> np.ndarray:
    """Position ids as the decoder takes them (a family's rules may give any integer dtype; values are
    bounded by max_context, far below 2**31)."""
    return np.asarray(x, dtype=INDEX)


def _kept_slots(n: int) -> np.ndarray:
    """The decoder's kept_slots input (1, n): only its length is read, the pruned length S'
    (dart_ops/onnx_op_slots.py: how the graph has no shape-tensor input)."""
    return np.zeros((1, n), dtype=INDEX)


def _finite(x: np.ndarray, stage: str, what: str) -> np.ndarray:
    """`x`, after checking that a stage's output holds no NaN / inf (which the next stage would turn
    into garbage tokens, or an error from inside DartPruneSlots)."""
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
        self.embeds_dtype = np_dtype(_spec_dtype(dec_spec, "inputs_embeds", manifest.dtype), "decoder")
        self.rules = rules_for(manifest, prompt)  # the family's run-time rules
        vis_spec, emb_spec = manifest.stages["vision_encoder"], manifest.stages["embed_tokens"]
        self.features_name = vis_spec.outputs[0].name
        self.ids_name, self.embeds_name = emb_spec.inputs[0].name, emb_spec.outputs[0].name
        # past_key_0 -> present_key_0, ...: how one step's outputs feed the next step's inputs.
        self.past_names = [n for n in self.decoder.input_names if n.startswith("past_")]
        self.present_for = {n: "present_" + n[len("past_"):] for n in self.past_names}
        kv_shape = (1, manifest.decoder.num_kv_heads, 0, manifest.decoder.head_dim)
        self.empty_past = {
            n: np.zeros(kv_shape, np_dtype(_spec_dtype(dec_spec, n, manifest.dtype), "decoder"))
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
        fetch = DECODER_OUTPUTS + ((PIVOTS_OUTPUT,) if PIVOTS_OUTPUT in self.decoder.output_names else ())
        return kv_loop(self.decoder, carry, fetch, bound=self.kv_binding)

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embed.run({self.ids_name: ids})[self.embeds_name]

    def resolve_ratio(self, keep_ratio: float | None) -> float:
        """The keep ratio to use: `keep_ratio` (a Python or numpy real in (0, 1]) or the manifest's."""
        r = self.manifest.dart.keep_ratio if keep_ratio is None else keep_ratio
        return check_keep_ratio(r)

    # --- prepare: every check before any graph runs ---------------------------------------------------

    def prepare(self, request: Request) -> Prompt:
        """Check a request and build its prompt: InputError for a bad argument, EngineError when it
        does not fit the engine (a span longer than DART's max_span). Runs no graph."""
        r, m = request, self.manifest
        max_new_tokens = check_max_new_tokens(r.max_new_tokens)
        if r.keep_ratio is not None and r.keep_tokens is not None:
            raise InputError("give either keep_ratio or keep_tokens, not both")
        keep_tokens = None if r.keep_tokens is None else check_keep_tokens(r.keep_tokens)
        ratio = None if keep_tokens is not None else self.resolve_ratio(r.keep_ratio)
        sampler = Sampler(r.temperature, r.top_p, r.seed)
        if r.stream is not None and not callable(r.stream):
            raise InputError(f"stream must be a callable taking each new piece of text, got {describe(r.stream)}")
        vision = self.rules.vision_inputs(r.image, r.pixel_values)
        ids = self._prompt_ids(r.prompt, r.input_ids, vision)
        spans = self.rules.spans(ids)
        if spans and vision is None:
            raise InputError("the prompt has image tokens but no image was given; pass image= or pixel_values=")
        if vision is not None and not spans:
            raise InputError("an image was given but input_ids hold no image token; add one where the image goes")
        S = len(ids)
        self._check_length(S)
        max_new_tokens = self._cap_new_tokens(S, max_new_tokens)
        a, L = spans[0] if spans else (0, 0)  # DART prunes the first image's span
        L_dec = decoder_span(S, a, L)  # as the decoder clamps it: the last token is never pruned
        counts = m.dart.config(ratio, keep_tokens).counts(L_dec, S - a - L_dec)
        # The graph cannot check this (no data-dependent shape can fail in it: onnx_op_slots' contract).
        if counts.prune and L_dec > m.dart.max_span:
            raise EngineError(f"vision span of {L_dec} tokens exceeds the engine's max_span {m.dart.max_span}")
        positions = self.rules.positions(ids, spans, vision)
        return Prompt(ids, vision, spans, (a, L), positions, ratio, counts, max_new_tokens, sampler,
                      r.stream, r.ignore_eos)

    def _prompt_ids(self, prompt, input_ids, vision: VisionInput | None) -> list[int]:
        if prompt is not None and input_ids is not None:
            raise InputError("give either prompt or input_ids, not both")
        if prompt is None and input_ids is None:
            raise InputError("give a prompt (text) or input_ids (a full prompt with one image token)")
        if prompt is not None:
            return self.rules.prompt_ids(prompt, None, vision)
        arr = as_array(input_ids, "input_ids", "a non-empty 1-D (or [1, S]) sequence of ints (batch 1 only)")
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"input_ids must be a non-empty 1-D (or [1, S]) sequence of ints, got shape "
                             f"{arr.shape} dtype {arr.dtype} (batch 1 only)")
        self._check_length(arr.size)  # before copying it into a list: expanding only makes it longer
        vocab = self.manifest.decoder.vocab_size
        if arr.min() < 0 or arr.max() >= vocab:
            raise InputError(f"input_ids must be in [0, {vocab}), got values from {arr.min()} to {arr.max()}")
        return self.rules.prompt_ids(None, arr.tolist(), vision)

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

    # --- prefill and decode ---------------------------------------------------------------------------

    def prefill(self, prompt: Prompt) -> State:
        """Vision encoder, embeddings with the features placed in the spans, and the decoder's
        prefill (DART prunes prompt.span at layer K). State.kept: kept sequence indices."""
        t0 = time.perf_counter()
        features = None
        if prompt.vision is not None:
            features = self.vision.run(prompt.vision.feeds)[self.features_name]  # (1, N, D)
        t1 = time.perf_counter()
        embeds = self._embed(np.asarray([prompt.ids], dtype=INDEX))  # (1, S, D)
        embeds = _finite(embeds.astype(self.embeds_dtype, copy=False), "embed_tokens", self.embeds_name)
        if features is not None:
            embeds = self.rules.place(embeds, features, prompt.spans)  # checks the shape first
            _finite(features, "vision_encoder", self.features_name)
        t2 = time.perf_counter()
        loop = self.kv_loop()
        out = loop.run({
            "inputs_embeds": embeds,
            "position_ids": _index(prompt.positions.prefill),  # (1, S) or (3, 1, S)
            "span_start": _scalar(prompt.span[0]),
            "span_len": _scalar(prompt.span_len),
            "quota": _scalar(prompt.counts.quota),
            "kept_slots": _kept_slots(prompt.kept_len),  # (1, S')
            **self.empty_past,
        })
        _finite(out["logits"], "decoder", "logits (prefill)")
        kept = self.rules.kept_indices(out["kept_positions"][0], prompt.positions)
        pivots = _pivots(out.get(PIVOTS_OUTPUT), prompt, kept)
        t3 = time.perf_counter()
        return State(prompt, loop, out["logits"][0], kept, loop.kv_bytes(), vision_s=t1 - t0, embed_s=t2 - t1,
                     prefill_s=t3 - t2, pivots=pivots)

    def decode_step(self, state: State, token: int) -> np.ndarray:
        """Feed `token` at the next decode position; returns (and keeps in state) the logits (V,)."""
        t = state.steps
        emb = self._embed(np.array([[token]], dtype=INDEX))  # (1, 1, D)
        out = state.loop.run({  # past KV: carried from the previous call
            "inputs_embeds": emb.astype(self.embeds_dtype, copy=False),
            "position_ids": _index(self.rules.decode_positions(state.prompt.positions.decode_start + t)),
            "span_start": _scalar(0),
            "span_len": _scalar(0),
            "quota": _scalar(0),
            "kept_slots": _kept_slots(1),
        })
        _finite(out["logits"], "decoder", f"logits (decode step {t + 1})")
        state.steps, state.logits = t + 1, out["logits"][0]
        return state.logits

    def tokens(self, prompt: Prompt, state: State) -> Iterator[int]:
        """The generated tokens after prefill, one at a time: sampled from the latest logits, until an
        eos token (not yielded; state.finish = "stop") or prompt.max_new_tokens (state.finish =
        "length"). The decode step for the next token runs only when the next one is asked for, so a
        caller that stops iterating (a stop string, a cancelled request) costs no extra step."""
        eos = set() if prompt.ignore_eos else set(self.manifest.tokens.eos_token_ids)
        logits, state.finish = state.logits, "length"
        for t in range(prompt.max_new_tokens):
            tok = prompt.sampler(logits)
            if tok in eos:
                state.finish = "stop"
                return
            yield tok
            if t + 1 == prompt.max_new_tokens:
                return
            logits = self.decode_step(state, tok)

    # --- generate ---------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        image: ImageLike | None = None,
        *,
        input_ids: Sequence[int] | np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        keep_ratio: float | None = None,
        keep_tokens: int | None = None,
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
        manifest's) or instead keep_tokens, an absolute budget of vision tokens >= 0 (T =
        keep_tokens // P pivots' quota; a budget of at least the span keeps it all), max_new_tokens an integer >= 0, temperature finite >= 0 (0 = greedy), top_p in
        (0, 1], seed None or an integer in [0, 2**63 - 1] (negative seeds are refused, not mapped).
        max_new_tokens larger than max_context - prompt tokens is capped to it, with a warning (as
        transformers' generate stops at max_length); timings["max_new_tokens"] is the limit used. A
        prompt longer than the engine's max_seq raises InputError.

        Raises InputError for a bad argument (before any graph runs) and EngineError when a stage fails
        or produces NaN / inf. An exception raised by `stream` itself propagates unchanged and ends
        the generation."""
        t_start = time.perf_counter()
        p = self.prepare(Request(prompt, image, input_ids, pixel_values, keep_ratio, max_new_tokens, temperature,
                                 top_p, seed, stream, ignore_eos, keep_tokens))
        t_pre = time.perf_counter()
        state = self.prefill(p)
        t3 = time.perf_counter()
        first_logits = state.logits.astype(np.float32)
        tokens: list[int] = []
        streamer = Streamer(self.prompt.decode, p.stream) if p.stream else None
        for tok in self.tokens(p, state):
            tokens.append(tok)
            if streamer:
                streamer.push(tokens)
        text = self.prompt.decode(tokens)
        if streamer:
            streamer.finish(text)
        t4 = time.perf_counter()
        timings = step_timings(p, state, tokens, pre_s=t_pre - t_start, decode_s=t4 - t3, total_s=t4 - t_start)
        log.info("generate: S=%d, span [%d, %d), %s -> T=%d, kept %d; %d new tokens", len(p.ids), p.span[0],
                 sum(p.span), f"ratio {p.ratio:.3f}" if p.ratio is not None else "keep_tokens",
                 p.counts.quota, len(state.kept), len(tokens))
        return GenerateOutput(tokens, text, state.kept, timings, p.ratio, first_logits, state.pivots,
                              self._kept_view(p, state, keep_tokens))

    def _kept_view(self, p: Prompt, state: State, keep_tokens: int | None) -> KeptView | None:
        """What GenerateOutput.kept_image draws (None without an image to draw on)."""
        if p.vision is None or p.vision.image is None or not p.spans or not hasattr(self.rules, "regions"):
            return None
        a, L = p.span
        kept = sum(1 for i in state.kept if a <= i < a + L)
        budget = f"ratio {p.ratio:.3f}" if p.ratio is not None else f"keep_tokens {keep_tokens}"
        caption = f"{budget}: kept {kept}/{L} vision tokens" + ("" if state.pivots else " (not pruned)")
        return KeptView(p.vision.image, lambda: self.rules.regions(p.vision), p.span, state.kept, state.pivots,
                        caption)


def _pivots(raw: np.ndarray | None, prompt: Prompt, kept: list[int]) -> list[int]:
    """The image pivots' sequence indices from the decoder's image_pivots output (1, P): none when
    DART did not prune (the output then names the span's best tokens, which chose nothing), and
    only the first min(P, pivots_image) valid slots; EngineError unless they are kept span tokens."""
    if raw is None or not prompt.span_len:
        return []
    a, L = prompt.span
    pivots = [int(i) for i in raw[0][:prompt.counts.pivots_image] if i >= 0]
    if any(not a <= i < a + L for i in pivots) or not set(pivots) <= set(kept):
        raise EngineError(f"decoder returned image pivots {pivots} that are not kept tokens of the image span "
                          f"[{a}, {a + L}); the engine is corrupt: re-export")
    return pivots


def _spec_dtype(stage, name: str, default: str) -> str:
    spec = stage.input(name)
    return spec.dtype if spec else default


def _check_names(name: str, stage: Stage, manifest: Manifest) -> None:
    spec = manifest.stages[name]
    want_in, want_out = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
    if set(stage.input_names) != set(want_in) or set(stage.output_names) != set(want_out):
        raise EngineError(f"{spec.file}: graph inputs {stage.input_names} / outputs {stage.output_names} differ "
                          f"from manifest.json's {want_in} / {want_out}; re-export the engine")
