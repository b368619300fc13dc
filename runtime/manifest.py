"""Read and validate an engine directory's manifest.json (docs/ENGINE_FORMAT.md, format_version 1).

`read_manifest(engine_dir)` parses the manifest into frozen dataclasses and, unless told not to,
checks that every listed file exists and has the recorded size and sha256. Anything wrong is an
`EngineError` whose one-line message names the file or key and says what to do (usually: re-export).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import EngineError

log = logging.getLogger(__name__)

FORMAT = "dart-vlm-engine"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
STAGE_NAMES = ("vision_encoder", "embed_tokens", "decoder")
EXPORT_HINT = "python -m export.build --model llava-tiny"
_HASH_CHUNK = 1 << 20  # 1 MiB


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "float32", "float16", "int64"
    shape: tuple[int | str, ...]  # ints for fixed dims, names (keys of dynamic_axes) for dynamic ones


@dataclass(frozen=True)
class StageSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass(frozen=True)
class DartSpec:
    layer: int
    pivots_image: int
    pivots_text: int
    keep_ratio: float  # default ratio; generate(keep_ratio=...) overrides it
    max_span: int


@dataclass(frozen=True)
class DecoderSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class Axis:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class TokenSpec:
    image_token: str
    image_token_id: int
    image_seq_len: int
    eos_token_ids: tuple[int, ...]  # manifest "eos_token_id": an int, a list of ints, or null
    bos_token_id: int | None = None
    pad_token_id: int | None = None


@dataclass(frozen=True)
class PreprocessSpec:
    """The checkpoint's image processor (LlavaImageProcessor / CLIPImageProcessor, PIL backend):
    image -> RGB (alpha composited on white, EXIF orientation applied) -> [pad to square with
    int(255 * mean)] -> resize so the shortest edge is `shortest_edge` -> center crop to
    image_size x image_size -> * rescale -> (x - mean) / std."""

    image_size: int  # the vision graph's input height = width (the crop)
    pad_to_square: bool  # LlavaImageProcessor(do_pad=True), LLaVA's expand2square
    resample: str  # bicubic, bilinear, nearest, lanczos
    rescale: float  # 1/255 (do_rescale=False is recorded as 1.0)
    mean: tuple[float, float, float]  # do_normalize=False is recorded as mean 0, std 1
    std: tuple[float, float, float]
    shortest_edge: int | None = None  # resize target of the shortest edge; None: image_size
    center_crop: bool = True  # crop the centre image_size x image_size after resizing

    @property
    def resize_edge(self) -> int:
        return self.image_size if self.shortest_edge is None else self.shortest_edge


@dataclass(frozen=True)
class PromptSpec:
    template: str  # has "{prompt}" and the image token
    template_text_only: str  # has "{prompt}"
    add_special_tokens: bool


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int | None


@dataclass(frozen=True)
class TrtSpec:
    """The "tensorrt" section written by python -m export.trt (absent until engines are built)."""

    version: str  # TensorRT version the engines were built with; plans only load in that version
    engines: dict[str, str]  # stage -> engine file
    strongly_typed: bool
    fp16: bool


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
    preprocess: PreprocessSpec
    prompt: PromptSpec
    opset: int | None = None
    tools: dict[str, str] = field(default_factory=dict)
    tensorrt: TrtSpec | None = None

    def path(self, name: str) -> Path:
        return self.directory / name

    @property
    def max_seq(self) -> int:
        """Longest prompt (in tokens, image tokens expanded) the engine accepts."""
        axis = self.dynamic_axes.get("seq")
        return min(axis.max, self.max_context) if axis else self.max_context


# --- parsing --------------------------------------------------------------------------------------


def _fail(what: str) -> EngineError:
    return EngineError(f"manifest.json: {what}; re-export the engine with: {EXPORT_HINT}")


def _get(d: dict, key: str, kind, where: str, default: Any = ...) -> Any:
    """d[key] checked against `kind` (a type or tuple of types); bools are not ints."""
    if key not in d:
        if default is not ...:
            return default
        raise _fail(f"missing key '{where}{key}'")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise _fail(f"'{where}{key}' must be {_kind_name(kinds)}, got {value!r}")
    if not isinstance(value, kinds):
        raise _fail(f"'{where}{key}' must be {_kind_name(kinds)}, got {type(value).__name__}")
    return value


def _kind_name(kinds: tuple) -> str:
    return " or ".join(k.__name__ for k in kinds)


def _num(d: dict, key: str, where: str) -> float:
    return float(_get(d, key, (int, float), where))


def _tensor(d: Any, where: str) -> TensorSpec:
    if not isinstance(d, dict):
        raise _fail(f"'{where}' must be an object with name, dtype, shape")
    shape = _get(d, "shape", list, where + ".")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, (int, str)):
            raise _fail(f"'{where}.shape' holds {dim!r}; dims are ints or dynamic-axis names")
    return TensorSpec(_get(d, "name", str, where + "."), _get(d, "dtype", str, where + "."), tuple(shape))


def _stage(name: str, d: Any) -> StageSpec:
    where = f"stages.{name}"
    if not isinstance(d, dict):
        raise _fail(f"'{where}' must be an object")
    inputs = _get(d, "inputs", list, where + ".")
    outputs = _get(d, "outputs", list, where + ".")
    return StageSpec(
        file=_get(d, "file", str, where + "."),
        inputs=tuple(_tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(inputs)),
        outputs=tuple(_tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(outputs)),
    )


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise _fail(f"'tokens.eos_token_id' must be an int, a list of ints or null, got {value!r}")


def _three(d: dict, key: str, where: str) -> tuple[float, float, float]:
    v = _get(d, key, list, where)
    if len(v) != 3 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise _fail(f"'{where}{key}' must be 3 numbers (R, G, B), got {v!r}")
    return (float(v[0]), float(v[1]), float(v[2]))


def parse_tokens(tok: dict) -> TokenSpec:
    """The manifest's "tokens" object."""
    return TokenSpec(
        image_token=_get(tok, "image_token", str, "tokens."),
        image_token_id=_get(tok, "image_token_id", int, "tokens."),
        image_seq_len=_get(tok, "image_seq_len", int, "tokens."),
        eos_token_ids=_eos_ids(_get(tok, "eos_token_id", (int, list, type(None)), "tokens.")),
        bos_token_id=_get(tok, "bos_token_id", (int, type(None)), "tokens.", default=None),
        pad_token_id=_get(tok, "pad_token_id", (int, type(None)), "tokens.", default=None),
    )


def parse_prompt(prm: dict) -> PromptSpec:
    """The manifest's "prompt" object."""
    return PromptSpec(
        template=_get(prm, "template", str, "prompt."),
        template_text_only=_get(prm, "template_text_only", str, "prompt."),
        add_special_tokens=_get(prm, "add_special_tokens", bool, "prompt."),
    )


def parse_preprocess(pre: dict) -> PreprocessSpec:
    """The manifest's "preprocess" object (also what preprocess() accepts as a plain dict)."""
    return PreprocessSpec(
        image_size=_get(pre, "image_size", int, "preprocess."),
        pad_to_square=_get(pre, "pad_to_square", bool, "preprocess."),
        resample=_get(pre, "resample", str, "preprocess."),
        rescale=_num(pre, "rescale", "preprocess."),
        mean=_three(pre, "mean", "preprocess."),
        std=_three(pre, "std", "preprocess."),
        shortest_edge=_get(pre, "shortest_edge", (int, type(None)), "preprocess.", default=None),
        center_crop=_get(pre, "center_crop", bool, "preprocess.", default=True),
    )


def parse_manifest(raw: dict, directory: Path) -> Manifest:
    """Manifest from the decoded JSON object (format and version already checked)."""
    dart = _get(raw, "dart", dict, "")
    dec = _get(raw, "decoder", dict, "")
    tok = _get(raw, "tokens", dict, "")
    pre = _get(raw, "preprocess", dict, "")
    prm = _get(raw, "prompt", dict, "")

    files = {}
    for name, entry in _get(raw, "files", dict, "").items():
        if not isinstance(entry, dict):
            raise _fail(f"'files.{name}' must be an object with sha256 and bytes")
        size = _get(entry, "bytes", int, f"files.{name}.", default=None)
        files[name] = FileEntry(_get(entry, "sha256", str, f"files.{name}.").lower(), size)

    stages_raw = _get(raw, "stages", dict, "")
    for name in STAGE_NAMES:
        if name not in stages_raw:
            raise _fail(f"missing key 'stages.{name}'")
    stages = {name: _stage(name, d) for name, d in stages_raw.items()}

    axes = {}
    for name, a in _get(raw, "dynamic_axes", dict, "").items():
        if not isinstance(a, dict):
            raise _fail(f"'dynamic_axes.{name}' must be an object with min, opt, max")
        w = f"dynamic_axes.{name}."
        axes[name] = Axis(_get(a, "min", int, w), _get(a, "opt", int, w), _get(a, "max", int, w))
    # Inputs' dynamic dims must be declared (they bound what the runtime may feed and become TensorRT
    # profiles); outputs may have derived dims ("kept", "seq + past_full") that are only labels.
    for stage_name, stage in stages.items():
        for t in stage.inputs:
            for dim in t.shape:
                if isinstance(dim, str) and dim not in axes:
                    raise _fail(f"stages.{stage_name} input '{t.name}' uses axis '{dim}' "
                                "that dynamic_axes does not declare")

    return Manifest(
        directory=directory,
        format_version=raw["format_version"],
        family=_get(raw, "family", str, ""),
        model=_get(raw, "model", str, ""),
        dtype=_get(raw, "dtype", str, ""),
        dart=DartSpec(
            layer=_get(dart, "layer", int, "dart."),
            pivots_image=_get(dart, "pivots_image", int, "dart."),
            pivots_text=_get(dart, "pivots_text", int, "dart."),
            keep_ratio=_num(dart, "keep_ratio", "dart."),
            max_span=_get(dart, "max_span", int, "dart."),
        ),
        files=files,
        stages=stages,
        decoder=DecoderSpec(**{k: _get(dec, k, int, "decoder.") for k in (
            "num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")}),
        dynamic_axes=axes,
        max_context=_get(raw, "max_context", int, ""),
        tokens=parse_tokens(tok),
        preprocess=parse_preprocess(pre),
        prompt=parse_prompt(prm),
        opset=_get(raw, "opset", (int, type(None)), "", default=None),
        tools=dict(_get(raw, "tools", dict, "", default={})),
        tensorrt=_trt(raw.get("tensorrt"), files),
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
            raise _fail(f"tensorrt.engines.{stage} = {name!r} is not listed in 'files'")
    return TrtSpec(
        version=_get(section, "version", str, "tensorrt."),
        engines=dict(engines),
        strongly_typed=_get(section, "strongly_typed", bool, "tensorrt.", default=False),
        fp16=_get(section, "fp16", bool, "tensorrt.", default=False),
    )


# --- files ---------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (decoder weights can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _resolve_inside(directory: Path, name: str) -> Path:
    path = (directory / name).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise _fail(f"file '{name}' points outside the engine directory")
    return path


def verify_files(manifest: Manifest) -> None:
    """Every listed file exists with the recorded size and sha256; the files the runtime opens
    (stage graphs, tokenizer.json) exist and the stage graphs are listed."""
    d = manifest.directory
    needed = [s.file for s in manifest.stages.values()] + [TOKENIZER_NAME]
    for name in needed:
        if not _resolve_inside(d, name).is_file():
            raise EngineError(f"{name} is missing from {d}; the engine directory is incomplete, re-export it")
    for stage in manifest.stages.values():
        if stage.file not in manifest.files:
            raise _fail(f"'files' has no sha256 for {stage.file}")
    if TOKENIZER_NAME not in manifest.files:
        log.warning("manifest: 'files' has no sha256 for %s; it is used unchecked", TOKENIZER_NAME)

    t0 = time.perf_counter()
    total = 0
    for name, entry in manifest.files.items():
        path = _resolve_inside(d, name)
        if not path.is_file():
            raise EngineError(f"{name} is listed in manifest.json but missing from {d}; re-export the engine")
        size = path.stat().st_size
        if entry.bytes is not None and size != entry.bytes:
            raise EngineError(f"{name} was modified after export (size {size} bytes, manifest says "
                              f"{entry.bytes}); re-export the engine")
        if sha256_file(path) != entry.sha256:
            raise EngineError(f"{name} was modified after export (sha256 mismatch); re-export the engine")
        total += size
    log.info("manifest: verified %d files (%.1f MB) in %.2f s",
             len(manifest.files), total / 1e6, time.perf_counter() - t0)


def read_manifest(engine_dir: str | Path, verify: bool = True) -> Manifest:
    """Parse `engine_dir/manifest.json`; with `verify`, also check every listed file's sha256."""
    d = Path(engine_dir)
    mpath = d / MANIFEST_NAME
    if not d.is_dir() or not mpath.is_file():
        raise EngineError(f"{d} is not an engine directory (no {MANIFEST_NAME}); export one with: {EXPORT_HINT}")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"{mpath} is not valid JSON ({exc}); re-export the engine with: {EXPORT_HINT}") from exc
    if not isinstance(raw, dict):
        raise _fail("the top level must be a JSON object")
    fmt, version = raw.get("format"), raw.get("format_version")
    if fmt != FORMAT or version != FORMAT_VERSION:
        raise EngineError(
            f"{mpath} has format {fmt!r} version {version!r}; this runtime reads {FORMAT!r} version "
            f"{FORMAT_VERSION}: re-export the engine with this version of dart-vlm ({EXPORT_HINT})"
        )
    manifest = parse_manifest(raw, d)
    if verify:
        verify_files(manifest)
    return manifest
