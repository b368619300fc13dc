"""OpenAI chat-completions wire format: request parsing and checks, response / chunk / usage / error
bodies, stop strings. Pure Python (no FastAPI), so every rule here is unit-tested without a server.

What a request may hold, and why:
- messages: system (or developer) messages, then exactly ONE user message. An engine's chat template
  wraps one user turn with at most one image (manifest.json prompt.template), so a conversation with
  assistant or tool turns, or two user turns, is refused (400) rather than flattened into a prompt the
  model was never trained on. System text is prepended to the user's text, separated by a blank
  line, as chat templates without a system role do (Gemma's); clients that always send a system
  message still work.
- content: a string, or a list of "text" and "image_url" parts; other part types are refused (400).
  Text parts are joined with newlines. The image goes where the family's template puts it,
  whatever its place among the parts. At most MAX_IMAGES images per request (the runtime prunes one
  vision span). image_url.detail is ignored (as vLLM does).
- image_url.url: a base64 `data:image/...;base64,` URL always; a file on the server (file:///abs or
  /abs) only with allow_local_files; an http(s) URL only with allow_remote_urls.
- max_completion_tokens (or its older name max_tokens; both only if equal), temperature (default
  1.0, as OpenAI's), top_p, seed, stop (a string or up to MAX_STOP strings, cut from the text as
  OpenAI does), stream, stream_options.include_usage (only with stream), n (1 only), model (must be
  the served model's id: 404 otherwise, as OpenAI's model_not_found).
- extensions at the top level: keep_ratio in (0, 1] or keep_tokens >= 0 (DART's budget; default:
  the manifest's ratio), ignore_eos (generate exactly the token limit; for load tests, as vLLM's).
- features this server does not have (tools, logprobs, logit_bias, penalties, a JSON response
  format, audio) are refused when asked for (400) instead of silently ignored; their "off" values
  (null, false, 0, [], {"type": "text"}, tool_choice "auto" without tools) pass. Other unknown
  fields are ignored.
Without max_tokens a request may fill the engine's context (max_context - prompt tokens), as
OpenAI's default; a larger max_tokens is capped to that, and the answer ends with finish_reason
"length".
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from runtime.errors import InputError

MAX_IMAGES = 1  # images per request: the runtime's prompts hold one vision span
MAX_STOP = 4  # stop strings per request, as OpenAI
SYSTEM_ROLES = ("system", "developer")
PART_TYPES = ("text", "image_url")
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?"  # media type (optional)
                       r"(?P<params>(?:;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.IGNORECASE)
_B64_CHARS = re.compile(rb"[A-Za-z0-9+/]*={0,2}")

# HTTP status -> OpenAI error "type".
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "server_error"}


class APIError(Exception):
    """An error response: HTTP status and OpenAI's error JSON ({"error": {message, type, param, code}})."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# --- the request -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """An image_url as given: kind "data" (a data: URL), "file" (a path on the server) or "url" (http(s))."""

    kind: str
    url: str


@dataclass(frozen=True)
class ChatRequest:
    """One checked chat-completions request, in the runtime's terms."""

    prompt: str
    image: ImageRef | None = None
    max_tokens: int | None = None  # None: up to the engine's context
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    keep_ratio: float | None = None
    keep_tokens: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class Limits:
    """What image sources a server accepts."""

    allow_local_files: bool = False
    allow_remote_urls: bool = False


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; 400 otherwise."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"the request body is not valid JSON ({exc}); send a JSON object "
                  "(Content-Type: application/json)") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def parse_chat_request(body: dict, model_name: str, limits: Limits = Limits()) -> ChatRequest:
    """Check a chat-completions body and turn it into a ChatRequest; APIError (400, or 404 for
    another model) naming the field and what is accepted."""
    _check_model(body.get("model"), model_name)
    _refuse_unsupported(body)
    n = body.get("n")
    if n is not None and (_not_int(n) or n != 1):
        raise bad(f"n must be 1 (this server returns one choice per request), got {n!r}", "n")
    prompt, image = _messages(body.get("messages"), limits)
    stream = _bool(body, "stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    keep_ratio, keep_tokens = body.get("keep_ratio"), body.get("keep_tokens")
    if keep_ratio is not None and keep_tokens is not None:
        raise bad("give keep_ratio or keep_tokens, not both", "keep_tokens")
    return ChatRequest(
        prompt=prompt, image=image, max_tokens=_max_tokens(body),
        temperature=_checked(body, "temperature", "check_temperature", 1.0),
        top_p=_checked(body, "top_p", "check_top_p", 1.0),
        seed=_checked(body, "seed", "check_seed", None),
        stop=_stop(body.get("stop")), stream=stream, include_usage=include_usage,
        keep_ratio=_checked(body, "keep_ratio", "check_keep_ratio", None),
        keep_tokens=_checked(body, "keep_tokens", "check_keep_tokens", None),
        ignore_eos=_bool(body, "ignore_eos"),
    )


def _check_model(model: Any, served: str) -> None:
    if model is None:
        return
    if not isinstance(model, str):
        raise bad(f"model must be a string, got {_kind(model)}", "model")
    if model != served:
        raise APIError(404, f"the model {model!r} is not served here; this server serves {served!r} "
                            "(GET /v1/models)", "model", "model_not_found")


# field -> (is it "off"?, what to say). Asked-for features the server does not have: 400, never ignored.
_UNSUPPORTED = {
    "tools": (lambda v: not v, "tool calls are not supported"),
    "functions": (lambda v: not v, "function calls are not supported"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool calls are not supported"),
    "function_call": (lambda v: v in (None, "none", "auto"), "function calls are not supported"),
    "logprobs": (lambda v: v in (None, False), "logprobs are not supported"),
    "top_logprobs": (lambda v: v in (None, 0), "logprobs are not supported"),
    "logit_bias": (lambda v: not v, "logit_bias is not supported"),
    "presence_penalty": (lambda v: v in (None, 0), "presence_penalty is not supported (send 0 or omit it)"),
    "frequency_penalty": (lambda v: v in (None, 0), "frequency_penalty is not supported (send 0 or omit it)"),
    "response_format": (lambda v: v in (None, {"type": "text"}), "only text responses are supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality is supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
}


def _refuse_unsupported(body: dict) -> None:
    for name, (off, why) in _UNSUPPORTED.items():
        if not off(body.get(name)):
            raise bad(f"{name}: {why} by this server", name, "unsupported_parameter")


def _messages(messages: Any, limits: Limits) -> tuple[str, ImageRef | None]:
    """(prompt text, image) from the messages: system messages, then one user message."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    roles = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role, got {_kind(m)}", f"messages[{i}]")
        roles.append(m["role"])
    users = [i for i, r in enumerate(roles) if r == "user"]
    others = [r for r in roles if r != "user" and r not in SYSTEM_ROLES]
    if others or len(users) != 1 or users[0] != len(messages) - 1:
        raise bad(f"this engine's chat template holds one user turn (with at most {MAX_IMAGES} image); send "
                  f"optional system messages and then one user message, got roles {roles}", "messages",
                  "unsupported_conversation")
    texts, images = [], []
    for i, m in enumerate(messages):
        t, ims = _content(m.get("content"), f"messages[{i}].content", limits, images_ok=m["role"] == "user")
        texts.append(t)
        images += ims
    if len(images) > MAX_IMAGES:
        raise bad(f"the user message has {len(images)} images; this engine takes at most {MAX_IMAGES} per "
                  "request", "messages", "too_many_images")
    system = "\n\n".join(t for t in texts[:-1] if t)
    prompt = f"{system}\n\n{texts[-1]}" if system else texts[-1]
    return prompt, images[0] if images else None


def _content(content: Any, where: str, limits: Limits, images_ok: bool) -> tuple[str, list[ImageRef]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where} must be a string or a list of content parts, got {_kind(content)}", where)
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "text":
            raise bad(f"{at}.text must be a string", at)
        elif kind == "image_url" and images_ok:
            images.append(_image_ref(part.get("image_url"), at, limits))
        elif kind == "image_url":
            raise bad(f"{at}: images go in the user message", at)
        else:
            raise bad(f"{at}: unsupported content part type {kind!r}; this server takes {list(PART_TYPES)}",
                      at, "unsupported_content")
    return "\n".join(texts), images


def _image_ref(obj: Any, at: str, limits: Limits) -> ImageRef:
    url = obj.get("url") if isinstance(obj, dict) else obj
    if not isinstance(url, str) or not url:
        raise bad(f"{at}.image_url must be an object with a url string", at)
    low = url[:8].lower()
    if low.startswith("data:"):
        return ImageRef("data", url)
    if low.startswith(("http://", "https://")):
        if not limits.allow_remote_urls:
            raise bad(f"{at}: this server does not download image URLs; send the image as a base64 data: URL "
                      "(or start the server with --allow-remote-urls)", at, "image_url_disabled")
        return ImageRef("url", url)
    if low.startswith("file://") or url.startswith("/"):
        if not limits.allow_local_files:
            raise bad(f"{at}: this server does not read local files; send the image as a base64 data: URL "
                      "(or start the server with --allow-local-files)", at, "image_url_disabled")
        return ImageRef("file", url)
    raise bad(f"{at}: image_url.url must be a data:image/...;base64 URL (or, where the server allows them, "
              f"an http(s) URL or a local file), got {url[:40]!r}", at)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 data: URL (data:image/png;base64,...); 400 for another media type, a URL
    that is not base64, invalid base64, or more than max_bytes decoded."""
    m = _DATA_URL.match(url)
    if not m or not m.group("b64"):
        raise bad("image data: URL must be data:image/<type>;base64,<data>", "image_url")
    media = (m.group("type") or "").lower()
    if media and not media.startswith("image/") and media != "application/octet-stream":
        raise bad(f"image data: URL has media type {media!r}; send an image (image/png, image/jpeg, ...)",
                  "image_url")
    data = url[m.end():].encode("ascii", "replace")
    data = re.sub(rb"\s+", b"", data)
    if 3 * (len(data) // 4) > max_bytes + 2:
        raise bad(f"the image is over this server's limit of {max_bytes} bytes", "image_url",
                  "image_too_large")
    if len(data) % 4 or not _B64_CHARS.fullmatch(data):
        raise bad("the image data: URL is not valid base64 (characters A-Z a-z 0-9 + / and = padding, a "
                  "length divisible by 4)", "image_url", "invalid_base64")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad("the image data: URL is not valid base64", "image_url", "invalid_base64") from None
    if len(raw) > max_bytes:
        raise bad(f"the image is {len(raw)} bytes, over this server's limit of {max_bytes}", "image_url",
                  "image_too_large")
    return raw


def _max_tokens(body: dict) -> int | None:
    a, b = body.get("max_completion_tokens"), body.get("max_tokens")
    for name, v in (("max_completion_tokens", a), ("max_tokens", b)):
        if v is not None and (_not_int(v) or v < 1):
            raise bad(f"{name} must be an integer >= 1, got {v!r}", name)
    if a is not None and b is not None and a != b:
        raise bad(f"max_completion_tokens ({a}) and max_tokens ({b}) differ; give one", "max_tokens")
    return a if a is not None else b


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) for s in stops):
        raise bad(f"stop must be a string or a list of at most {MAX_STOP} strings", "stop")
    return tuple(s for s in stops if s)


def _stream_options(opts: Any, stream: bool) -> bool:
    if opts is None:
        return False
    if not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(opts, dict):
        raise bad(f"stream_options must be an object, got {_kind(opts)}", "stream_options")
    return _bool(opts, "include_usage", "stream_options.include_usage")


def _bool(obj: dict, name: str, param: str | None = None) -> bool:
    v = obj.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"{param or name} must be true or false, got {v!r}", param or name)
    return v


def _checked(body: dict, name: str, check: str, default):
    """body[name] through the runtime's own check (runtime.sampling), so the server and generate()
    accept the same values; its InputError -> 400."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"{name} must be a number, got {_kind(v)}", name)
    from runtime import sampling  # numpy: imported on the first request, not for --help

    try:
        return getattr(sampling, check)(v)
    except InputError as exc:
        raise bad(str(exc), name) from None


def _not_int(v: Any) -> bool:
    return isinstance(v, bool) or not isinstance(v, int)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


# --- stop strings --------------------------------------------------------------------------------


class StopMatcher:
    """Streams text with stop strings cut as OpenAI does: feed() returns what may be sent now; text
    that could be the start of a stop string is held back until the next piece decides; at a stop
    string the text before it is returned and `stopped` is set. `text`: everything returned so far."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.text = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        buf = self.pending + piece
        at = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if at >= 0:
            out, self.pending, self.stopped = buf[:at], "", True
        else:
            keep = self._held(buf)
            out, self.pending = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out

    def flush(self) -> str:
        """The held-back text, at the end of a generation that met no stop string."""
        out, self.pending = self.pending, ""
        self.text += out
        return out

    def _held(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if s.startswith(buf[len(buf) - n:]):
                    best = n
                    break
        return best


# --- responses -----------------------------------------------------------------------------------


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(timings: dict, keep_ratio: float | None, keep_tokens: int | None) -> dict:
    """OpenAI's usage from a generation's timings (runtime.steps.step_timings): prompt_tokens is the
    UNPRUNED prompt; the "dart" extension says what DART kept."""
    prompt, completion = int(timings["prompt_tokens"]), int(timings["new_tokens"])
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "dart": {"keep_ratio": keep_ratio, "keep_tokens": keep_tokens,
                 "vision_tokens": int(timings["vision_tokens"]),
                 "kept_vision_tokens": int(timings["kept_vision_tokens"]),
                 "kept_tokens": int(timings["kept_tokens"])},
    }


def completion_body(rid: str, created: int, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


def chunk_body(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               with_usage: bool = False) -> dict:
    """A chat.completion.chunk; with_usage (stream_options.include_usage): "usage": null, as OpenAI."""
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        body["usage"] = None
    return body


def usage_chunk(rid: str, created: int, model: str, usage: dict) -> dict:
    """The last chunk before [DONE] with include_usage: no choices, the whole request's usage."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage}


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_body(model, created)]}


def model_body(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "dart-vlm"}


def sse(obj: dict) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def now() -> int:
    return int(time.time())
