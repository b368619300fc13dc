"""Checks of an engine directory beyond parsing its manifest (runtime/manifest.py):

    check_files(m)        both verify modes: the files the runtime opens exist inside the directory,
                          listed ones with their recorded sizes
    verify_files(m)       verify=True only: every listed file's sha256
    check_graph_files(m)  both verify modes: external data a graph references is inside and listed
    check_graphs(m, st)   once the stages are open: the graphs' dims, K, vocab and DART metadata
                          are the manifest's

Each failure is one EngineError line naming the file or manifest key.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Mapping
from typing import Any

from runtime.errors import EngineError
from runtime.manifest import (
    EXPORT_HINT, MAX_PATH, TOKENIZER_NAME, Manifest, PreprocessSpec, _fail, _show, sha256_file,
)
from runtime.onnx_refs import external_data_locations

log = logging.getLogger(__name__)


def check_files(manifest: Manifest) -> None:
    """Both verify modes: the files the runtime opens (stage graphs, tokenizer.json) exist inside
    the directory and the stage graphs are listed; every listed file exists inside the directory
    with its recorded size."""
    d = manifest.directory
    for name in [s.file for s in manifest.stages.values()] + [TOKENIZER_NAME]:
        if not manifest.path(name).is_file():
            raise EngineError(f"{name} is missing from {d}; the engine directory is incomplete, re-export it")
    for stage in manifest.stages.values():
        if stage.file not in manifest.files:
            raise _fail(f"'files' has no sha256 for {stage.file}")
    if TOKENIZER_NAME not in manifest.files:
        log.warning("manifest: 'files' has no sha256 for %s; it is used unchecked", TOKENIZER_NAME)
    for name, entry in manifest.files.items():
        path = manifest.path(name)
        if not path.is_file():
            raise EngineError(f"{name} is listed in manifest.json but missing from {d}; re-export the engine")
        size = path.stat().st_size
        if entry.bytes is not None and size != entry.bytes:
            raise EngineError(f"{name} was modified after export (size {size} bytes, manifest says "
                              f"{entry.bytes}); re-export the engine")


def verify_files(manifest: Manifest) -> None:
    """verify=True only: every listed file's sha256 is the recorded one (reads every byte)."""
    t0 = time.perf_counter()
    total = 0
    for name, entry in manifest.files.items():
        path = manifest.path(name)
        if sha256_file(path) != entry.sha256:
            raise EngineError(f"{name} was modified after export (sha256 mismatch); re-export the engine")
        total += path.stat().st_size
    log.info("manifest: verified %d files (%.1f MB) in %.2f s",
             len(manifest.files), total / 1e6, time.perf_counter() - t0)


def check_graph_files(manifest: Manifest) -> None:
    """Both verify modes, before any graph reaches ONNX Runtime: every external-data file a stage
    graph references (runtime/onnx_refs.py) lies inside the engine directory and is listed in
    'files', so that verify=True hashes it."""
    for stage in manifest.stages.values():
        for location in external_data_locations(manifest.path(stage.file)):
            name = posixpath.normpath(posixpath.join(posixpath.dirname(stage.file), location))
            shown = _show(location, MAX_PATH)
            if (not location.isprintable() or location.startswith("/") or name == ".."
                    or name.startswith("../")):
                raise EngineError(f"{stage.file} references external data {shown} outside the engine "
                                  "directory; re-export the engine")
            manifest.path(name)  # symlinks
            if name not in manifest.files:
                raise EngineError(f"{stage.file} references external data {shown} that manifest.json "
                                  "'files' does not list (it would be loaded unchecked); re-export the "
                                  "engine")


# --- graphs --------------------------------------------------------------------------------------


def _shapes(stage: Any, attr: str) -> Mapping[str, Any]:
    shapes = getattr(stage, attr, None)
    return shapes if isinstance(shapes, Mapping) else {}


def _fixed(dim: Any) -> int | None:
    """A fixed dim as an int; None for dynamic ones (names, None, TensorRT's -1)."""
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 else None


def _disagree(file: str, graph_says: str, key: str, value: Any) -> EngineError:
    return EngineError(f"{file}: {graph_says}, but manifest.json '{key}' is {_show(value)}; the manifest "
                       f"does not describe this graph, re-export the engine with: {EXPORT_HINT}")


def _check_dims(file: str, tensor: str, shape: Any, want: dict[int, tuple[str, int]]) -> None:
    """shape[i] == value for each i -> (manifest key, value), where shape[i] is fixed."""
    if not isinstance(shape, (list, tuple)):
        return
    rank = 1 + max(want)
    if len(shape) < rank:
        raise EngineError(f"{file}: '{tensor}' has {len(shape)} dims, expected at least {rank}; "
                          "re-export the engine")
    for i, (key, value) in want.items():
        dim = _fixed(shape[i])
        if dim is not None and dim != value:
            raise _disagree(file, f"'{tensor}' has dim {i} = {dim}", key, value)


def _check_vision(m: Manifest, stage: Any) -> None:
    spec = m.stages["vision_encoder"]
    pixels, features = spec.inputs[0].name, spec.outputs[0].name
    width = ("decoder.hidden_size", m.decoder.hidden_size)
    inputs, outputs = _shapes(stage, "input_shapes"), _shapes(stage, "output_shapes")
    feature_shape = outputs.get(features)
    if isinstance(feature_shape, (list, tuple)) and feature_shape:  # (..., D): the last dim, any family
        _check_dims(spec.file, features, feature_shape, {len(feature_shape) - 1: width})
    if not isinstance(m.preprocess, PreprocessSpec):
        return  # another family's vision inputs: its own rules check them
    size = ("preprocess.image_size", m.preprocess.image_size)
    tokens = ("tokens.image_seq_len", m.tokens.image_seq_len)
    _check_dims(spec.file, pixels, inputs.get(pixels), {2: size, 3: size})  # (B, 3, H, W)
    if m.tokens.image_seq_len is not None:
        _check_dims(spec.file, features, feature_shape, {1: tokens})  # (B, N, D)


def _check_embed(m: Manifest, stage: Any) -> None:
    spec = m.stages["embed_tokens"]
    embeds = spec.outputs[0].name
    _check_dims(spec.file, embeds, _shapes(stage, "output_shapes").get(embeds),
                {2: ("decoder.hidden_size", m.decoder.hidden_size)})  # (B, S, D)


def _check_decoder(m: Manifest, stage: Any) -> None:
    file, dec = m.stages["decoder"].file, m.decoder
    inputs = _shapes(stage, "input_shapes")
    if not inputs:
        return
    _check_dims(file, "inputs_embeds", inputs.get("inputs_embeds"),
                {2: ("decoder.hidden_size", dec.hidden_size)})  # (B, S, D)
    _check_dims(file, "logits", _shapes(stage, "output_shapes").get("logits"),
                {1: ("decoder.vocab_size", dec.vocab_size)})  # (B, V)
    layers = ("decoder.num_layers", dec.num_layers)
    past = [n for n in inputs if n.startswith("past_")]
    if len(past) != 2 * dec.num_layers:
        raise _disagree(file, f"the graph has {len(past)} past_* KV inputs", *layers)
    kv = {1: ("decoder.num_kv_heads", dec.num_kv_heads), 3: ("decoder.head_dim", dec.head_dim)}
    lengths = []  # the past-length axis of each layer: "past_full" for layers < K, "past_kept" after
    for i in range(dec.num_layers):
        for name in (f"past_key_{i}", f"past_value_{i}"):
            if name not in inputs:
                raise _disagree(file, f"the graph has no input '{name}'", *layers)
            _check_dims(file, name, inputs[name], kv)  # (B, kv_heads, past, head_dim)
        shape = inputs[f"past_key_{i}"]
        lengths.append(shape[2] if isinstance(shape, (list, tuple)) else None)
    if all(axis in ("past_full", "past_kept") for axis in lengths):
        k = lengths.count("past_full")
        if k != m.dart.layer:
            says = f"the graph prunes at layer K = {k} (its first {k} layers keep the full KV)"
            raise _disagree(file, says, "dart.layer", m.dart.layer)


def _check_metadata(m: Manifest, stage: Any) -> None:
    """The decoder's ONNX metadata_props (written by the exporter; absent in older graphs)."""
    meta = getattr(stage, "metadata", None)
    if not isinstance(meta, Mapping):
        return
    file, dart = m.stages["decoder"].file, m.dart
    want = {"dart.layer": dart.layer, "dart.pivots_image": dart.pivots_image,
            "dart.pivots_text": dart.pivots_text, "dart.max_span": dart.max_span}
    got = {}
    for key in (*want, "dart.max_pivots"):
        if key in meta:
            try:
                got[key] = int(meta[key])
            except (TypeError, ValueError):
                raise EngineError(f"{file}: metadata {key} = {_show(meta[key])} is not an integer; "
                                  "re-export the engine") from None
    for key, value in want.items():
        if key in got and got[key] != value:
            raise _disagree(file, f"the graph's metadata has {key} = {got[key]}", key, value)
    pivots = dart.pivots_image + dart.pivots_text
    if "dart.max_pivots" in got and got["dart.max_pivots"] < pivots:
        says = f"DartPruneSlots unrolls {got['dart.max_pivots']} pivot steps (metadata dart.max_pivots)"
        raise _disagree(file, says, "dart.pivots_image' + 'dart.pivots_text", pivots)


def check_graphs(manifest: Manifest, stages: Mapping[str, Any]) -> None:
    """The opened stages agree with the manifest's numbers (called by the pipeline once the stages
    are open). A stage may expose `input_shapes` / `output_shapes` ({tensor: [int | str | None]})
    and `metadata` ({key: str}, the ONNX metadata_props); what it does not expose is not checked.

    Checks: the vision input's H, W == preprocess.image_size; its output's token count ==
    tokens.image_seq_len and width == decoder.hidden_size (also the embeddings'); 2 past_* inputs
    per decoder layer with num_kv_heads and head_dim; K (the layers whose past length is the
    "past_full" axis) == dart.layer; logits width == vocab_size; the decoder's metadata dart.layer,
    dart.pivots_image, dart.pivots_text, dart.max_span == the manifest's, dart.max_pivots >= the
    pivots. Fixed dims only: dynamic ones (names, None) match anything."""
    _check_vision(manifest, stages.get("vision_encoder"))
    _check_embed(manifest, stages.get("embed_tokens"))
    _check_decoder(manifest, stages.get("decoder"))
    _check_metadata(manifest, stages.get("decoder"))
