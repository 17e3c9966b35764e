"""``image_url`` parts -> RGB uint8 arrays.

Base64 ``data:`` URLs always work. A local path (or ``file://`` URL) is read only when the server
was started with ``--allow-local-images DIR`` and the file lies inside DIR (resolved, so ``..``
and symlinks cannot leave it); an http(s) URL is fetched only with ``--allow-remote-images``
(the server then makes requests on a client's behalf: enable it only for trusted clients).
Every failure is an InputError that says which image and what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevl.errors import InputError
from edgevl.preprocess import to_rgb_uint8

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


@dataclass
class ImagePolicy:
    local_dir: Path | None = None        # where local paths may point; None: refused
    allow_remote: bool = False
    max_bytes: int = 20 * 2**20          # one image's encoded size
    max_pixels: int = 50_000_000         # checked from the header, before decoding (decompression bombs)
    fetch_timeout_s: float = 10.0


def _describe(url: str) -> str:
    return url if len(url) <= 60 else url[:57] + "..."


def load_image(url: str, policy: ImagePolicy, index: int = 1) -> np.ndarray:
    """One image_url -> RGB uint8 (H, W, 3)."""
    data = _read_bytes(url, policy, index)
    if len(data) > policy.max_bytes:
        raise InputError(f"image {index} is {len(data)} bytes; the limit is {policy.max_bytes} bytes")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > policy.max_pixels:
                raise InputError(f"image {index} is {w}x{h} pixels; the limit is {policy.max_pixels} pixels")
            im.load()
            return to_rgb_uint8(im)
    except InputError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise InputError(f"image {index} ({_describe(url)}) cannot be decoded: {e}; send a PNG, JPEG, WebP or "
                         "other image Pillow can read") from None


def _read_bytes(url: str, policy: ImagePolicy, index: int) -> bytes:
    if url.startswith("data:"):
        m = _DATA_URL.match(url)
        if m is None or not m.group("b64"):
            raise InputError(f"image {index} is a data URL that is not base64 ({_describe(url)}); send "
                             "data:image/png;base64,<base64 of the file>")
        try:
            return base64.b64decode(url[m.end():], validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"image {index}: its data URL holds invalid base64 ({e})") from None
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch(url, policy, index)
    if scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):   # path, file://, C:\...
        return _read_local(url, policy, index)
    raise InputError(f"image {index} has an unsupported URL scheme {scheme!r}; send a base64 data: URL")


def _fetch(url: str, policy: ImagePolicy, index: int) -> bytes:
    if not policy.allow_remote:
        raise InputError(f"image {index} is an http(s) URL, and this server does not fetch remote images; send it "
                         "as a base64 data: URL, or start the server with --allow-remote-images")
    try:
        with urllib.request.urlopen(url, timeout=policy.fetch_timeout_s) as response:   # noqa: S310 (opt-in)
            data = response.read(policy.max_bytes + 1)
    except OSError as e:
        raise InputError(f"image {index}: fetching {_describe(url)} failed: {e}") from None
    return data


def _read_local(url: str, policy: ImagePolicy, index: int) -> bytes:
    if policy.local_dir is None:
        raise InputError(f"image {index} is a local path, and this server does not read local files; send it as a "
                         "base64 data: URL, or start the server with --allow-local-images DIR")
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url)
    root = policy.local_dir.resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise InputError(f"image {index}: {path} is outside the allowed image folder {root}")
    if not resolved.is_file():
        raise InputError(f"image {index}: {path} is not a file in {root}")
    with open(resolved, "rb") as f:
        return f.read(policy.max_bytes + 1)
