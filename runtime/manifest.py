"""The manifest schema of an engine directory (docs/ENGINE_FORMAT.md, format_version 2): read,
validated and written here; the exporter (export/manifest.py) builds these objects and writes them.

`read_manifest(engine_dir)` parses the manifest into frozen dataclasses, refusing any value outside
its documented range and any path that leaves the engine directory (symlinks followed), then runs
the file checks of runtime/engine_checks.py (sizes, sha256 unless verify=False, external data).
Anything wrong is an `EngineError` whose one-line message names the file or key and says what to
do (usually: re-export). `Manifest.to_json()` is the exact JSON object `Manifest.from_json` reads;
`write_manifest(m)` writes it as manifest.json (indent 2, fixed key order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dart_ops.spec import MAX_PIVOTS, MAX_SPAN, DartConfig
from runtime.errors import EngineError
from runtime.manifest_json import (  # noqa: F401  (EXPORT_HINT, MAX_*, ...: part of this module's API)
    DTYPES, EXPORT_HINT, FORMAT, FORMAT_VERSION, MANIFEST_NAME, MAX_EOS, MAX_MANIFEST_BYTES, MAX_NESTING,
    MAX_PATH, _dtype, _eos_ids, _fail, _get, _in_range, _inside, _int, _num, _opt_int, read_json, _real,
    _rel_path, _show, _three, check_format, check_template, dump, fields_json, plain, sha256_file, write_atomic,
)

log = logging.getLogger(__name__)

TOKENIZER_NAME = "tokenizer.json"
STAGE_NAMES = ("vision_encoder", "embed_tokens", "decoder")
CHECKPOINT_DIR = "checkpoint"  # weights that exist nowhere else (llava-tiny), listed in "checkpoint"

# Bounds of manifest values (docs/ENGINE_FORMAT.md, "Ranges"). Generous for real models, small
# enough that no value can make the runtime allocate without limit.
MAX_TOKENS = 1 << 20  # dynamic_axes values, max_context
MAX_DIM = 1 << 24  # fixed dims of stage tensors, decoder.vocab_size
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_HIDDEN = 1 << 16
MAX_IMAGE = 4096  # preprocess.image_size, preprocess.shortest_edge
MAX_RANK = 8
OPSET_RANGE = (7, 64)
RESAMPLE = ("bicubic", "bilinear")  # the filters runtime/preprocess.py reproduces exactly


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "float32", "float16", "int64"
    shape: tuple[int | str, ...]  # ints for fixed dims, names (keys of dynamic_axes) for dynamic ones
    # 0-d integer inputs whose VALUE sets shapes inside the graph (the decoder's span and quota):
    # the axis in dynamic_axes whose min/opt/max bound the value (TensorRT profiles them as
    # shape-tensor values). None for every other tensor (and not written).
    values: str | None = None

    def to_json(self) -> dict:
        return fields_json(self, skip=() if self.values else ("values",))


QUANT_FORMATS = ("MatMulNBits", "GatherBlockQuantized", "QDQ")  # com.microsoft ops (ONNX Runtime); DQ -> MatMul


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only quantization of one stage's graph (python -m export.quantize)."""

    bits: int  # 4 or 8
    block_size: int  # weights per scale along the input dim
    symmetric: bool  # no zero points
    algorithm: str  # "rtn": ONNX Runtime's default weight-only quantizer (round to nearest)
    format: str  # QUANT_FORMATS: "MatMulNBits" for ONNX Runtime, "QDQ" for TensorRT
    nodes: int  # MatMul (and Gather) nodes quantized
    accuracy_level: int | None = None  # MatMulNBits compute type (4: int8 compute on CPU)
    excluded: tuple[str, ...] = ()  # nodes left in float on purpose (e.g. the LM head)

    def to_json(self) -> dict:
        return fields_json(self)


@dataclass(frozen=True)
class StageSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quantization: QuantSpec | None = None  # None: weights in the manifest's dtype

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def precision(self, dtype: str) -> str:
        """"int4" / "int8" for a quantized stage, else the engine's dtype ("float32", "float16")."""
        return f"int{self.quantization.bits}" if self.quantization else dtype

    def to_json(self) -> dict:
        return fields_json(self, skip=() if self.quantization else ("quantization",))


@dataclass(frozen=True)
class DartSpec:
    layer: int
    pivots_image: int
    pivots_text: int
    keep_ratio: float  # default ratio; generate(keep_ratio=...) overrides it
    max_span: int

    def config(self, keep_ratio: float | None = None, keep_tokens: int | None = None) -> DartConfig:
        """The DartConfig of this engine at `keep_ratio` (default: the manifest's), or with an
        absolute budget of `keep_tokens` vision tokens (T = keep_tokens // P; a budget covering the
        whole span keeps it all)."""
        if keep_tokens is not None:
            return DartConfig(layer=self.layer, pivots_image=self.pivots_image, pivots_text=self.pivots_text,
                              keep_ratio=None, budget=keep_tokens)
        return DartConfig(layer=self.layer, pivots_image=self.pivots_image, pivots_text=self.pivots_text,
                          keep_ratio=self.keep_ratio if keep_ratio is None else keep_ratio)

    def to_json(self) -> dict:
        return {**fields_json(self), "keep_ratio": float(self.keep_ratio)}


@dataclass(frozen=True)
class DecoderSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    def to_json(self) -> dict:
        return fields_json(self)


@dataclass(frozen=True)
class Axis:
    """One dynamic axis, declared once at export (export/axes.py) with its name."""

    min: int
    opt: int
    max: int
    name: str = ""  # the key in dynamic_axes (not written inside the object)

    def to_json(self) -> dict:
        return fields_json(self, skip=("name",))


@dataclass(frozen=True)
class TokenSpec:
    image_token: str
    image_token_id: int
    image_seq_len: int | None  # vision tokens per image; None: they vary (dynamic_axes.vision_tokens)
    eos_token_ids: tuple[int, ...]  # manifest "eos_token_id": an int, a list of ints, or null
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    def to_json(self) -> dict:
        """eos_token_id as the file has it: null (none), an int (one) or a list (more)."""
        eos = self.eos_token_ids
        raw = fields_json(self, skip=("eos_token_ids",))
        return {**raw, "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else list(eos)}


@dataclass(frozen=True)
class PreprocessSpec:
    """The checkpoint's image processor (LlavaImageProcessor / CLIPImageProcessor, PIL backend):
    image -> RGB -> [pad to square with int(255 * mean)] -> resize so the shortest edge is
    `resize_edge` -> center crop to image_size x image_size -> * rescale -> (x - mean) / std.
    How paths and PIL images become RGB (alpha, palettes, EXIF): runtime/preprocess.py."""

    image_size: int  # the vision graph's input height = width (the crop)
    pad_to_square: bool  # LlavaImageProcessor(do_pad=True), LLaVA's expand2square
    resample: str  # bicubic or bilinear
    rescale: float  # 1/255 (do_rescale=False is recorded as 1.0)
    mean: tuple[float, float, float]  # do_normalize=False is recorded as mean 0, std 1
    std: tuple[float, float, float]
    shortest_edge: int | None = None  # resize target of the shortest edge; None: image_size
    center_crop: bool = True  # crop the centre image_size x image_size after resizing

    def to_json(self) -> dict:
        return {**fields_json(self), "rescale": float(self.rescale), "mean": [float(x) for x in self.mean],
                "std": [float(x) for x in self.std]}

    @property
    def resize_edge(self) -> int:
        return self.image_size if self.shortest_edge is None else self.shortest_edge

    def problem(self) -> str | None:
        """Why runtime/preprocess.py cannot reproduce this spec, naming the manifest key; None if it can."""
        if self.resample.lower() not in RESAMPLE:
            return f"'preprocess.resample' must be one of {', '.join(RESAMPLE)}, got {_show(self.resample)}"
        # The result must be image_size x image_size: the crop needs a resize at least that large, and
        # without a crop only a padded square resized to exactly image_size has that shape.
        if not 1 <= self.image_size <= self.resize_edge:
            return (f"'preprocess.shortest_edge' {self.resize_edge} is smaller than 'preprocess.image_size' "
                    f"{self.image_size} (the center crop)")
        if not self.center_crop and not (self.pad_to_square and self.resize_edge == self.image_size):
            return ("'preprocess.center_crop' is false, but without pad_to_square and shortest_edge == "
                    "image_size the image is not image_size x image_size")
        return None


@dataclass(frozen=True)
class PromptSpec:
    template: str  # has "{prompt}" and the image token
    template_text_only: str  # has "{prompt}"
    add_special_tokens: bool

    def to_json(self) -> dict:
        return fields_json(self)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int | None

    @classmethod
    def of(cls, path: Path) -> FileEntry:
        """The entry of a file on disk: its sha256 and size."""
        return cls(sha256_file(path), path.stat().st_size)

    def to_json(self) -> dict:
        return fields_json(self)


@dataclass(frozen=True)
class TrtSpec:
    """The "tensorrt" section written by python -m export.trt (absent until engines are built)."""

    version: str  # TensorRT version the engines were built with; plans only load in that version
    engines: dict[str, str]  # stage -> engine file
    strongly_typed: bool
    fp16: bool
    workspace_mib: int | None = None  # builder memory-pool limit, informational
    profiles: dict[str, list] = field(default_factory=dict)  # stage -> export.trt.profile_specs (plain data)

    def to_json(self) -> dict:
        return fields_json(self)


@dataclass(frozen=True)
class Manifest:
    directory: Path
    format_version: int
    family: str
    model: str
    dtype: str
    dart: DartSpec
    files: dict[str, FileEntry]
    stages: dict[str, StageSpec]
    decoder: DecoderSpec
    dynamic_axes: dict[str, Axis]
    max_context: int
    tokens: TokenSpec
    preprocess: PreprocessSpec | Any  # PreprocessSpec, or the spec of a registered preprocess kind
    prompt: PromptSpec
    opset: int | None = None
    tools: dict[str, str] = field(default_factory=dict)
    tensorrt: TrtSpec | None = None
    checkpoint: tuple[str, ...] = ()  # files under checkpoint/ (not hashed; export/outdir.py's ownership)

    @classmethod
    def from_json(cls, raw: Any, directory: Path) -> Manifest:
        """The Manifest of a decoded manifest.json (format and version checked); no file checks."""
        check_format(raw, Path(directory) / MANIFEST_NAME)
        return parse_manifest(raw, Path(directory))

    def to_json(self) -> dict:
        """The JSON object of manifest.json, keys in the file's order; from_json reads it back equal."""
        raw = {"format": FORMAT, **fields_json(self, skip=("directory", "tensorrt", "checkpoint", "opset"))}
        order = ("format", "format_version", "family", "model", "dtype", "opset", "dart", "stages", "decoder",
                 "dynamic_axes", "max_context", "tokens", "preprocess", "prompt", CHECKPOINT_DIR, "files",
                 "tools", "tensorrt")
        optional = {"opset": self.opset, CHECKPOINT_DIR: list(self.checkpoint) or None, "tensorrt": self.tensorrt}
        raw.update({k: plain(v) for k, v in optional.items() if v is not None})
        return {k: raw[k] for k in order if k in raw}

    def path(self, name: str) -> Path:
        """directory / name; EngineError when it resolves outside the directory (symlinks followed)."""
        return _inside(self.directory, name)

    @property
    def max_seq(self) -> int:
        """Longest prompt (in tokens, image tokens expanded) the engine accepts."""
        axis = self.dynamic_axes.get("seq")
        return min(axis.max, self.max_context) if axis else self.max_context


# --- parsing --------------------------------------------------------------------------------------


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
    values = _get(d, "values", str, where + ".", None)
    if values is not None and (shape or not dtype.startswith("int")):
        raise _fail(f"'{where}.values' is only for 0-d integer inputs (this one is {dtype} {shape})")
    return TensorSpec(_get(d, "name", str, where + "."), dtype, tuple(shape), values)


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
            for dim in (*t.shape, t.values):
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


# --- files ---------------------------------------------------------------------------------------


# --- reading -------------------------------------------------------------------------------------


def read_manifest(engine_dir: str | Path, verify: bool = True) -> Manifest:
    """Parse `engine_dir/manifest.json` and check the files it names (docs/ENGINE_FORMAT.md). With
    verify=False the sha256 of the files is not computed; every other check still runs."""
    d = Path(engine_dir)
    mpath = d / MANIFEST_NAME
    if not d.is_dir() or not mpath.is_file():
        raise EngineError(f"{d} is not an engine directory (no {MANIFEST_NAME}); export one with: "
                          f"{EXPORT_HINT}")
    manifest = Manifest.from_json(read_json(_inside(d, MANIFEST_NAME)), d)
    from runtime import engine_checks  # (it imports this module)

    engine_checks.check_files(manifest)
    if verify:
        engine_checks.verify_files(manifest)
    engine_checks.check_graph_files(manifest)
    return manifest


def write_manifest(manifest: Manifest, directory: str | Path | None = None) -> Path:
    """Write `manifest` as `directory`/manifest.json (default: manifest.directory), atomically.
    The object is checked first by reading its JSON back: a writer cannot publish what the reader
    refuses."""
    raw = manifest.to_json()
    parse_manifest(raw, manifest.directory)
    path = Path(manifest.directory if directory is None else directory) / MANIFEST_NAME
    write_atomic(path, dump(raw))
    return path
