"""An OpenAI-compatible chat-completions server over one engine directory (the `serve` extra:
FastAPI + uvicorn; the runtime itself never needs them).

    python -m runtime.serve --engine-dir engines/llava-tiny --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    out = client.chat.completions.create(model="llava-tiny", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
        max_tokens=64, extra_body={"keep_ratio": 0.111})
    out.choices[0].message.content, out.usage.prompt_tokens, out.usage.model_extra["dart"]

Modules: config (ServeConfig), protocol (the wire format, pure Python), images (data: URLs, files,
downloads), workers (bounded queue + worker threads), generation (one request on the runtime's
steps), metrics (Prometheus text), app (FastAPI: create_app), __main__ (the CLI).
`create_app` is imported on first use, so importing this package does not import FastAPI.
"""

from __future__ import annotations

from runtime.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from runtime.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'runtime.serve' has no attribute {name!r}")
