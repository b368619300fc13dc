"""Parsing manifest.json's decoded object into runtime/manifest.py's schema: types, ranges and
cross-checks, one EngineError line naming the key (`_fail`). Unknown keys are ignored, except in
"stages". runtime/manifest.py re-exports the public parsers (parse_manifest, parse_tokens,
parse_prompt, parse_preprocess, parse_any_preprocess, register_preprocess)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dart_ops.spec import MAX_PIVOTS, MAX_SPAN
from runtime.manifest import (
    CHECKPOINT_DIR, MAX_DIM, MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_IMAGE, MAX_LAYERS, MAX_RANK, MAX_TOKENS,
    OPSET_RANGE, QUANT_FORMATS, STAGE_NAMES, Axis, DartSpec, DecoderSpec, FileEntry, Manifest, PreprocessSpec,
    PromptSpec, QuantSpec, StageSpec, TensorSpec, TokenSpec, TrtSpec,
)
from runtime.manifest_json import (
    _dtype, _eos_ids, _fail, _get, _in_range, _int, _num, _opt_int, _rel_path, _show, _three, check_template,
)



def _tensor(d: Any, where: str) -> TensorSpec:
    if not isinstance(d, dict):
        raise _fail(f"'{where}' must be an object with name, dtype, shape")
    shape = _get(d, "shape", list, where + ".")
    if len(shape) > MAX_RANK:
        raise _fail(f"'{where}.shape' has {len(shape)} dims, more than {MAX_RANK}")
    for i, dim in enumerate(shape):
        named = isinstance(dim, str) and 0 < len(dim) <= 256
        if not named and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise _fail(f"'{where}.shape' holds {_show(dim)}; dims are ints or dynamic-axis names")
        if isinstance(dim, int):
            _in_range(dim, f"{where}.shape[{i}]", 0, MAX_DIM)
    dtype = _dtype(d, "dtype", where + ".")
    return TensorSpec(_get(d, "name", str, where + "."), dtype, tuple(shape))


def _stage(name: str, d: Any) -> StageSpec:
    where = f"stages.{name}"
    if not isinstance(d, dict):
        raise _fail(f"'{where}' must be an object")
    inputs = _get(d, "inputs", list, where + ".")
    outputs = _get(d, "outputs", list, where + ".")
    quant = _get(d, "quantization", (dict, type(None)), where + ".", None)
    return StageSpec(
        file=_rel_path(_get(d, "file", str, where + "."), f"'{where}.file'"),
        inputs=tuple(_tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(inputs)),
        outputs=tuple(_tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(outputs)),
        quantization=None if quant is None else _quant(quant, f"{where}.quantization."),
    )


def _quant(q: dict, w: str) -> QuantSpec:
    fmt = _get(q, "format", str, w)
    if fmt not in QUANT_FORMATS:
        raise _fail(f"'{w}format' must be one of {', '.join(QUANT_FORMATS)}, got {_show(fmt)}")
    bits = _int(q, "bits", w, 2, 8)
    if bits not in (4, 8):
        raise _fail(f"'{w}bits' must be 4 or 8, got {bits}")
    excluded = _get(q, "excluded", list, w, [])
    if len(excluded) > 1 << 16 or not all(isinstance(n, str) for n in excluded):
        raise _fail(f"'{w}excluded' must be a list of node names")
    return QuantSpec(
        bits=bits, block_size=_int(q, "block_size", w, 16, 1 << 16), symmetric=_get(q, "symmetric", bool, w),
        algorithm=_get(q, "algorithm", str, w), format=fmt, nodes=_int(q, "nodes", w, 0, 1 << 24),
        accuracy_level=_opt_int(q, "accuracy_level", w, 0, 4), excluded=tuple(excluded),
    )


def parse_tokens(tok: dict, vocab_size: int = MAX_DIM) -> TokenSpec:
    """The manifest's "tokens" object; token ids must lie in [0, vocab_size)."""
    hi = vocab_size - 1
    eos = _eos_ids(_get(tok, "eos_token_id", (int, list, type(None)), "tokens."))
    for i, v in enumerate(eos):
        _in_range(v, f"tokens.eos_token_id[{i}]" if len(eos) > 1 else "tokens.eos_token_id", 0, hi)
    return TokenSpec(
        image_token=_get(tok, "image_token", str, "tokens."),
        image_token_id=_int(tok, "image_token_id", "tokens.", 0, hi),
        image_seq_len=_opt_int(tok, "image_seq_len", "tokens.", 1, MAX_SPAN),
        eos_token_ids=eos,
        bos_token_id=_opt_int(tok, "bos_token_id", "tokens.", 0, hi),
        pad_token_id=_opt_int(tok, "pad_token_id", "tokens.", 0, hi),
    )


def _template(prm: dict, key: str) -> str:
    value = _get(prm, key, str, "prompt.")
    check_template(value, key)
    return value


def parse_prompt(prm: dict) -> PromptSpec:
    """The manifest's "prompt" object."""
    return PromptSpec(
        template=_template(prm, "template"),
        template_text_only=_template(prm, "template_text_only"),
        add_special_tokens=_get(prm, "add_special_tokens", bool, "prompt."),
    )


def parse_preprocess(pre: dict) -> PreprocessSpec:
    """The manifest's "preprocess" object (also what preprocess() accepts as a plain dict)."""
    spec = PreprocessSpec(
        image_size=_int(pre, "image_size", "preprocess.", 1, MAX_IMAGE),
        pad_to_square=_get(pre, "pad_to_square", bool, "preprocess."),
        resample=_get(pre, "resample", str, "preprocess."),
        rescale=_num(pre, "rescale", "preprocess.", 0, 1, lo_open=True),
        mean=_three(pre, "mean", "preprocess.", 0, 1),  # the pad colour int(255 * mean) is a byte
        std=_three(pre, "std", "preprocess.", 1e-6, 1e6),
        shortest_edge=_opt_int(pre, "shortest_edge", "preprocess.", 1, MAX_IMAGE),
        center_crop=_get(pre, "center_crop", bool, "preprocess.", default=True),
    )
    problem = spec.problem()
    if problem:
        raise _fail(problem)
    return spec


# Preprocessing kinds: the "kind" key of the manifest's "preprocess" object; absent means "clip"
# (PreprocessSpec, LLaVA-1.5's processors). A family with another processor registers its spec's
# parser (a dict -> spec callable raising ValueError with one line) from its run-time rules module;
# its spec's to_json writes the "kind".
_PREPROCESS_KINDS: dict[str, Any] = {}


def register_preprocess(kind: str, parse) -> None:
    if kind == "clip" or _PREPROCESS_KINDS.get(kind, parse) is not parse:
        raise ValueError(f"preprocess kind {kind!r} is already registered")
    _PREPROCESS_KINDS[kind] = parse


def parse_any_preprocess(pre: dict):
    """The "preprocess" object as its kind's spec (PreprocessSpec for "clip", the default)."""
    kind = _get(pre, "kind", str, "preprocess.", "clip")
    if kind == "clip":
        return parse_preprocess(pre)
    import runtime.families  # noqa: F401  (the families' rules modules register their kinds)

    parse = _PREPROCESS_KINDS.get(kind)
    if parse is None:
        raise _fail(f"'preprocess.kind' {_show(kind)} is not one this runtime knows "
                    f"(clip, {', '.join(sorted(_PREPROCESS_KINDS))})")
    try:
        return parse(pre)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _dart(dart: dict, num_layers: int) -> DartSpec:
    w = "dart."
    pivots_image = _int(dart, "pivots_image", w, 0, MAX_PIVOTS)
    pivots_text = _int(dart, "pivots_text", w, 0, MAX_PIVOTS)
    if not 1 <= pivots_image + pivots_text <= MAX_PIVOTS:
        raise _fail(f"'dart.pivots_image' + 'dart.pivots_text' must be in [1, {MAX_PIVOTS}], "
                    f"got {pivots_image} + {pivots_text}")
    return DartSpec(
        layer=_int(dart, "layer", w, 1, num_layers - 1),  # DART scores with layer K-1; K < num_layers
        pivots_image=pivots_image,
        pivots_text=pivots_text,
        keep_ratio=_num(dart, "keep_ratio", w, 0, 1, lo_open=True),
        max_span=_int(dart, "max_span", w, 1, MAX_SPAN),
    )


def _decoder(dec: dict) -> DecoderSpec:
    w = "decoder."
    return DecoderSpec(
        num_layers=_int(dec, "num_layers", w, 2, MAX_LAYERS),
        num_kv_heads=_int(dec, "num_kv_heads", w, 1, MAX_HEADS),
        head_dim=_int(dec, "head_dim", w, 1, MAX_HEAD_DIM),
        hidden_size=_int(dec, "hidden_size", w, 1, MAX_HIDDEN),
        vocab_size=_int(dec, "vocab_size", w, 2, MAX_DIM),
    )


def _files(section: dict) -> dict[str, FileEntry]:
    files = {}
    for name, entry in section.items():
        _rel_path(name, "a 'files' key")
        if not isinstance(entry, dict):
            raise _fail(f"'files.{name}' must be an object with sha256 and bytes")
        sha = _get(entry, "sha256", str, f"files.{name}.")
        if len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha):
            raise _fail(f"'files.{name}.sha256' must be 64 hex digits, got {_show(sha)}")
        size = _opt_int(entry, "bytes", f"files.{name}.", 0, 1 << 50)
        files[name] = FileEntry(sha.lower(), size)
    return files


def _axes(section: dict) -> dict[str, Axis]:
    axes = {}
    for name, a in section.items():
        if not isinstance(a, dict):
            raise _fail(f"'dynamic_axes.{name}' must be an object with min, opt, max")
        w = f"dynamic_axes.{name}."
        lo, opt, hi = (_int(a, k, w, 0, MAX_TOKENS) for k in ("min", "opt", "max"))
        if not lo <= opt <= hi:
            raise _fail(f"'dynamic_axes.{name}' must have min <= opt <= max, got {lo}, {opt}, {hi}")
        axes[name] = Axis(lo, opt, hi, name)
    return axes


def _stages(section: dict, axes: dict[str, Axis]) -> dict[str, StageSpec]:
    for name in STAGE_NAMES:
        if name not in section:
            raise _fail(f"missing key 'stages.{name}'")
    unknown = [name for name in section if name not in STAGE_NAMES]
    if unknown:
        raise _fail(f"'stages.{unknown[0]}' is not a stage this runtime runs ({', '.join(STAGE_NAMES)})")
    stages = {name: _stage(name, d) for name, d in section.items()}
    # Inputs' dynamic dims must be declared (they bound what the runtime may feed and become TensorRT
    # profiles); outputs may have derived dims ("kept", "seq + past_full") that are only labels.
    for stage_name, stage in stages.items():
        for t in stage.inputs:
            for dim in t.shape:
                if isinstance(dim, str) and dim not in axes:
                    raise _fail(f"stages.{stage_name} input '{t.name}' uses axis '{dim}' "
                                "that dynamic_axes does not declare")
    return stages


def _checkpoint(value: list) -> tuple[str, ...]:
    return tuple(_rel_path(_get({"n": n}, "n", str, f"{CHECKPOINT_DIR}[{i}]."), f"'{CHECKPOINT_DIR}[{i}]'")
                 for i, n in enumerate(value))


def _tools(section: dict) -> dict[str, str]:
    for name, version in section.items():
        if not isinstance(version, str):
            raise _fail(f"'tools.{name}' must be a version string, got {type(version).__name__}")
    return dict(section)


def parse_manifest(raw: dict, directory: Path) -> Manifest:
    """Manifest from the decoded JSON object (format and version already checked). Unknown keys
    are ignored, except in "stages" (each stage names a file the runtime would open)."""
    decoder = _decoder(_get(raw, "decoder", dict, ""))
    dart = _dart(_get(raw, "dart", dict, ""), decoder.num_layers)
    tokens = parse_tokens(_get(raw, "tokens", dict, ""), decoder.vocab_size)
    if tokens.image_seq_len is not None and tokens.image_seq_len > dart.max_span:
        raise _fail(f"'tokens.image_seq_len' must be in [1, {dart.max_span}] ('dart.max_span'), "
                    f"got {tokens.image_seq_len}")
    files = _files(_get(raw, "files", dict, ""))
    axes = _axes(_get(raw, "dynamic_axes", dict, ""))
    preprocess = parse_any_preprocess(_get(raw, "preprocess", dict, ""))
    if isinstance(preprocess, PreprocessSpec) and tokens.image_seq_len is None:
        raise _fail("missing key 'tokens.image_seq_len' (a clip preprocess crops every image to one size, "
                    "so its vision-token count is fixed)")
    return Manifest(
        directory=directory,
        format_version=raw["format_version"],
        family=_get(raw, "family", str, ""),
        model=_get(raw, "model", str, ""),
        dtype=_dtype(raw, "dtype", ""),
        dart=dart,
        files=files,
        stages=_stages(_get(raw, "stages", dict, ""), axes),
        decoder=decoder,
        dynamic_axes=axes,
        max_context=_int(raw, "max_context", "", 1, MAX_TOKENS),
        tokens=tokens,
        preprocess=preprocess,
        prompt=parse_prompt(_get(raw, "prompt", dict, "")),
        opset=_opt_int(raw, "opset", "", *OPSET_RANGE),
        tools=_tools(_get(raw, "tools", dict, "", default={})),
        tensorrt=_trt(raw.get("tensorrt"), files),
        checkpoint=_checkpoint(_get(raw, CHECKPOINT_DIR, list, "", default=[])),
    )


def _trt(section: Any, files: dict) -> TrtSpec | None:
    if section is None:
        return None
    if not isinstance(section, dict):
        raise _fail("'tensorrt' must be an object")
    engines = _get(section, "engines", dict, "tensorrt.")
    for stage in STAGE_NAMES:
        name = engines.get(stage)
        if not isinstance(name, str):
            raise _fail(f"missing key 'tensorrt.engines.{stage}'")
        if name not in files:
            raise _fail(f"tensorrt.engines.{stage} = {_show(name)} is not listed in 'files'")
    return TrtSpec(
        version=_get(section, "version", str, "tensorrt."),
        engines=dict(engines),
        strongly_typed=_get(section, "strongly_typed", bool, "tensorrt.", default=False),
        fp16=_get(section, "fp16", bool, "tensorrt.", default=False),
        workspace_mib=_opt_int(section, "workspace_mib", "tensorrt.", 1, 1 << 40),
        profiles=_profiles(_get(section, "profiles", dict, "tensorrt.", default={})),
    )


def _profiles(section: dict) -> dict[str, list]:
    """The build's optimization profiles: informational (the plans hold them), kept as written."""
    for stage, specs in section.items():
        if not isinstance(specs, list):
            raise _fail(f"'tensorrt.profiles.{stage}' must be a list, got {type(specs).__name__}")
    return dict(section)


