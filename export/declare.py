"""Stage declarations: what each exported graph takes and returns, written once per family.

A StageDecl names a stage's graph file and its input and output tensors; a TensorDecl's dims are
ints (fixed) or names of dynamic axes (export/axes.py `declare`: min/opt/max). Output dims may also
be derived labels ("seq + past_full", "kept") that are not axes. From a declaration come the
manifest's tensor signatures (`signature`), the example inputs for tracing (`example_inputs`), the
torch.export dynamic shapes (`dynamic_shapes`) and the post-export check that every declared
dynamic axis is still symbolic in the graph (`check_graph`). torch and onnx are imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runtime.manifest import INDEX_DTYPE, Axis, StageSpec, TensorSpec

__all__ = ["StageDecl", "TensorDecl", "check_graph", "dynamic_shapes", "example_inputs", "signature"]


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str  # numpy-style name: "float32", "float16", "int32", "bool" (INDEX_DTYPE for indices)
    dims: tuple[int | str, ...]  # ints fixed; strings name dynamic axes (outputs: or derived labels)
    # Tracing value: "random" (randn / small ints) or "positions" (0..n-1 along the last dim).
    example: str = "random"


@dataclass(frozen=True)
class StageDecl:
    name: str  # "vision_encoder", "embed_tokens", "decoder"
    file: str  # graph file in the engine directory
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def text_decls(flat, dims: dict, dtype: str) -> dict[str, StageDecl]:
    """embed_tokens and decoder as DartDecoder exports them, for any family: what differs between
    families is the vision stage and the position layout (the text adapter's position_shape,
    [batch, seq] or [3, batch, seq]). dims: the manifest's decoder sizes; dtype "float32"/"float16"."""
    T = TensorDecl
    D, H, hd, V = dims["hidden_size"], dims["num_kv_heads"], dims["head_dim"], dims["vocab_size"]
    K = flat.decoder.layer
    past = lambda i: "past_full" if i // 2 < K else "past_kept"  # noqa: E731  (KV in pairs: layer i // 2)
    names_in, names_present = flat.input_names(), flat.present_names()
    kv_past = [T(n, dtype, ("batch", H, past(i), hd)) for i, n in enumerate(names_in[-len(names_present):])]
    kv_present = [T(n, dtype, ("batch", H, "seq + " + past(i), hd)) for i, n in enumerate(names_present)]
    positions = tuple(flat.decoder.text.position_shape)
    I = INDEX_DTYPE  # noqa: E741  (every integer input and output: int32, runtime/manifest.py says why)
    return {
        "embed_tokens": StageDecl("embed_tokens", "embed_tokens.onnx",
                                  inputs=(T("input_ids", I, ("batch", "seq")),),
                                  outputs=(T("inputs_embeds", dtype, ("batch", "seq", D)),)),
        "decoder": StageDecl("decoder", "decoder.onnx",
                             inputs=(T("inputs_embeds", dtype, ("batch", "seq", D)),
                                     T("position_ids", I, positions, example="positions"),
                                     # data only (masks, comparisons): no value decides a shape
                                     *(T(n, I, ()) for n in ("span_start", "span_len", "quota")),
                                     # S' from this input's last dim (dart_ops/onnx_op_slots.py)
                                     T("kept_slots", I, ("batch", "kept"), example="zeros"),
                                     *kv_past),
                             outputs=(T("logits", dtype, ("batch", V)), *kv_present,
                                      T("kept_positions", I, ("batch", "kept")),
                                      T("image_pivots", I, ("batch", max(flat.decoder.pivots_image, 1))))),
    }


def signature(decl: StageDecl) -> StageSpec:
    """The manifest's tensor signature of a stage."""
    spec = lambda t: TensorSpec(t.name, t.dtype, tuple(t.dims))
    return StageSpec(decl.file, inputs=tuple(map(spec, decl.inputs)), outputs=tuple(map(spec, decl.outputs)))


def example_inputs(decl: StageDecl, sizes: dict[str, int], values: dict[str, int] | None = None,
                   seed: int = 0) -> list:
    """One torch tensor per input for tracing: dynamic dims take `sizes[axis]`; inputs named in
    `values` are filled with that value (scalars: 0-d tensors); random values from `seed`."""
    import torch

    values = values or {}
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in decl.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.dims)
        dtype = getattr(torch, t.dtype)
        if t.name in values:
            out.append(torch.full(shape, values[t.name], dtype=dtype))
        elif t.example == "positions":  # (..., S): 0..S-1 along the last dim, the same for every row
            out.append(torch.arange(shape[-1], dtype=dtype).expand(shape))
        elif t.example == "zeros":
            out.append(torch.zeros(shape, dtype=dtype))
        elif dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dtype))
        else:
            out.append(torch.randint(0, 10, shape, generator=g).to(dtype))
    return out


def dynamic_shapes(decl: StageDecl, axes: dict[str, Axis]) -> list:
    """torch.export dynamic_shapes, one entry per input: {dim index: torch.export.Dim} or None.
    One Dim object per axis name, shared by every input that uses it."""
    from export.axes import torch_dim

    used = {d for t in decl.inputs for d in t.dims if isinstance(d, str)}
    missing = sorted(used - axes.keys())
    if missing:
        raise ValueError(f"{decl.name}: inputs use axes {missing} that are not declared ({sorted(axes)})")
    dim = {name: torch_dim(axes[name]) for name in sorted(used)}
    return [{i: dim[d] for i, d in enumerate(t.dims) if isinstance(d, str)} or None for t in decl.inputs]


def check_graph(decl: StageDecl, path: Path) -> None:
    """Raise export.validate.ValidationError unless the ONNX graph at `path` has the declared inputs,
    every declared dynamic dim still symbolic (the exporter can bake one to its traced size) and
    every fixed dim the declared value."""
    import onnx

    from export.validate import ValidationError

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    found = {v.name: v for v in graph.input if v.name not in inits}
    names = [v.name for v in graph.input if v.name not in inits]
    if names != decl.input_names():
        raise ValidationError(f"{decl.name}: graph inputs {names} differ from the declared "
                              f"{decl.input_names()}")
    for t in decl.inputs:
        dims = found[t.name].type.tensor_type.shape.dim
        if len(dims) != len(t.dims):
            raise ValidationError(f"{decl.name}: input {t.name} has rank {len(dims)} in the graph, "
                                  f"declared {len(t.dims)} {t.dims}")
        for i, (got, want) in enumerate(zip(dims, t.dims)):
            if isinstance(want, str) and got.HasField("dim_value"):
                raise ValidationError(f"{decl.name}: input {t.name} dim {i} (axis '{want}') was baked to "
                                      f"{got.dim_value} by the exporter; it is declared dynamic")
            if isinstance(want, int) and not (got.HasField("dim_value") and got.dim_value == want):
                have = got.dim_value if got.HasField("dim_value") else repr(got.dim_param)
                raise ValidationError(f"{decl.name}: input {t.name} dim {i} is {have} in the graph, "
                                      f"declared {want}")
