"""Torch-free runtime for DART-VLM engine directories (numpy, onnxruntime, tokenizers, Pillow).

    import runtime
    pipe = runtime.load("engines/llava-tiny")            # validates manifest.json + sha256
    out = pipe.generate("What is this?", image="cat.jpg", keep_ratio=0.111)
    print(out.text, out.kept_positions, out.timings)

Never imports torch or transformers (a Jetson has neither). `load`, `Pipeline` and
`GenerateOutput` are imported on first use, so `python -m runtime.run --help` stays instant.
"""

from __future__ import annotations

from runtime.errors import EngineError, InputError

__all__ = ["EngineError", "GenerateOutput", "InputError", "Pipeline", "load"]


def __getattr__(name: str):
    if name == "load":
        from runtime import engine

        return engine.load
    if name in ("Pipeline", "GenerateOutput"):
        from runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
