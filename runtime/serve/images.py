"""A request's image: bytes from a data: URL, a local file or an http(s) download, opened as the
runtime opens an image file (runtime.preprocess.load_image(path): header checked against the
runtime's pixel limits before decoding, EXIF orientation applied, RGB). Runs in a worker thread.

Local files and downloads are off unless the server enables them (ServeConfig.allow_local_files /
allow_remote_urls); both are bounded by ServeConfig.max_image_bytes, a download also by
url_timeout_s in total (checked after each network read, and each read waits at most that long). An enabled download fetches whatever URL a client names (any host the
server can reach, redirects followed): enable it only where clients are trusted.
"""

from __future__ import annotations

import io
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from runtime.errors import InputError
from runtime.preprocess import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from runtime.serve.protocol import APIError, ImageRef, bad, decode_data_url

CHUNK = 1 << 16


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 << 20
    url_timeout_s: float = 10.0


def load_request_image(ref: ImageRef, limits: ImageLimits) -> Image.Image:
    """The RGB image an image_url names; APIError 400 when it cannot be read."""
    if ref.kind == "data":
        data = decode_data_url(ref.url, limits.max_bytes)
    elif ref.kind == "file":
        data = read_file(ref.url, limits.max_bytes)
    elif ref.kind == "url":
        data = download(ref.url, limits)
    else:
        raise ValueError(f"unknown image kind {ref.kind!r}")
    try:
        return open_image(data)
    except InputError as exc:
        raise bad(str(exc), "image_url", "invalid_image") from None


def open_image(data: bytes) -> Image.Image:
    """Image bytes as an RGB PIL image, the same pixels as runtime.preprocess.load_image(path) gives
    for a file with these bytes; InputError (one line) when they are not a readable image."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            _check_size(im.size)
            im.load()
            _check_size(im.size)
            ImageOps.exif_transpose(im, in_place=True)
            return im if im.mode == "RGB" else im.convert("RGB")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001  (Pillow raises many types on corrupt data)
        lines = str(exc).strip().splitlines()
        raise InputError(f"cannot read the image: {lines[0] if lines else type(exc).__name__}") from None


def _check_size(size: tuple[int, int]) -> None:
    w, h = size
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS or max(w, h) > MAX_IMAGE_SIDE:
        raise InputError(f"the image is {w}x{h}; the runtime takes images of at most {MAX_IMAGE_PIXELS} "
                         f"pixels and {MAX_IMAGE_SIDE} px a side: downscale it first")


def read_file(url: str, max_bytes: int) -> bytes:
    """A local file named by file:///abs/path or /abs/path."""
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url)
    if not path.is_absolute():
        raise bad(f"image file {str(path)!r} must be an absolute path", "image_url")
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise bad(f"cannot read image file {str(path)!r}: {exc.strerror or type(exc).__name__}",
                  "image_url", "invalid_image") from None
    if len(data) > max_bytes:
        raise bad(f"image file {str(path)!r} is over this server's limit of {max_bytes} bytes", "image_url",
                  "image_too_large")
    return data


def download(url: str, limits: ImageLimits) -> bytes:
    """An http(s) image, at most limits.max_bytes, within limits.url_timeout_s in total."""
    deadline = time.monotonic() + limits.url_timeout_s
    req = urllib.request.Request(url, headers={"User-Agent": "dart-vlm-serve"})
    try:
        with urllib.request.urlopen(req, timeout=limits.url_timeout_s) as resp:
            size = resp.headers.get("Content-Length")
            if size and size.isdigit() and int(size) > limits.max_bytes:
                raise _too_large(url, limits.max_bytes)
            chunks, n = [], 0
            while chunk := resp.read1(CHUNK):  # what has arrived: the deadline is checked between reads
                n += len(chunk)
                if n > limits.max_bytes:
                    raise _too_large(url, limits.max_bytes)
                if time.monotonic() > deadline:
                    raise TimeoutError()
                chunks.append(chunk)
            return b"".join(chunks)
    except APIError:
        raise
    except urllib.error.HTTPError as exc:
        raise bad(f"cannot download image {_short(url)}: HTTP {exc.code}", "image_url",
                  "invalid_image") from None
    except TimeoutError:
        raise _timed_out(url, limits) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, TimeoutError):
            raise _timed_out(url, limits) from None
        raise bad(f"cannot download image {_short(url)}: {reason}", "image_url", "invalid_image") from None


def _timed_out(url: str, limits: ImageLimits) -> APIError:
    return bad(f"cannot download image {_short(url)}: no answer within {limits.url_timeout_s:g} s",
               "image_url", "image_timeout")


def _too_large(url: str, max_bytes: int) -> APIError:
    return bad(f"image {_short(url)} is over this server's limit of {max_bytes} bytes", "image_url",
               "image_too_large")


def _short(url: str) -> str:
    return repr(url if len(url) <= 80 else url[:77] + "...")
