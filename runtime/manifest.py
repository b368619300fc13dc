"""The manifest schema of an engine directory (docs/ENGINE_FORMAT.md, format_version 3): read,
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

from dart_ops.spec import MAX_PIVOTS, MAX_SPAN, DartConfig  # noqa: F401  (MAX_*: part of the API)
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
# The dtype of every integer input and output of the graphs (ids, positions, spans, kept indices,
# vision index tables). TensorRT 10.3 uses INT32 for indices natively: its ONNX parser casts INT64
# Gather/GatherElements indices on non-INT64 data and all ScatterElements indices to INT32, and
# its TopK/NonZero layers produce INT32 (docs/TENSORRT_10.3.md sections 3 and 7, citing the 10.3
# headers NvInfer.h and the onnx-tensorrt parser); INT64 I/O would build, but needs INT64 bindings
# and casts at every use. Values here are bounded far below 2**31 (MAX_TOKENS).
INDEX_DTYPE = "int32"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "float32", "float16", "int32", "bool"
    shape: tuple[int | str, ...]  # ints for fixed dims, names (keys of dynamic_axes) for dynamic ones

    def to_json(self) -> dict:
        return fields_json(self)


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

# The parsers live in runtime/manifest_parse.py (imported last: it reads the classes above).
from runtime.manifest_parse import (  # noqa: E402, F401
    parse_any_preprocess, parse_manifest, parse_preprocess, parse_prompt, parse_tokens, register_preprocess,
)
