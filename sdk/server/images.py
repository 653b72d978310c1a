"""image_url -> a decoded PIL image: data URLs always, local files under --media-dir, http(s) with --allow-remote-images.

The image is decoded here, in the connection's thread, before a worker is taken: an image that fails to
decode costs no worker. The SDK's own checks (sdk/preprocess.py: pixel limit from the header, regular files
only) run on it.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image, ImageOps

from ..errors import ImageError
from ..preprocess import load_image
from .config import ServerConfig
from .errors import ApiError, bad_request


def from_url(url: str, config: ServerConfig) -> Image.Image:
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url must be a non-empty string (a data: URL with a base64 image)",
                          "messages", "invalid_image_url")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    fetch = FETCHERS.get(scheme, local_file if len(scheme) <= 1 else None)  # "c:" is a Windows drive, "" a path
    if fetch is None:
        raise bad_request(f"image_url scheme {scheme!r} is not supported: send a data: URL (base64)",
                          "messages", "invalid_image_url")
    return decode(fetch(url, config))


def data_url(url: str, config: ServerConfig) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise bad_request("image_url data: URL must be base64, e.g. data:image/png;base64,iVBOR...",
                          "messages", "invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("image_url data: URL holds invalid base64", "messages", "invalid_image_url") from None


def local_file(url: str, config: ServerConfig) -> Path:
    if config.media_dir is None:
        raise bad_request("image_url names a local file, but this server was started without --media-dir: "
                          "send a data: URL", "messages", "invalid_image_url")
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url
    root = Path(config.media_dir).resolve()
    candidate = (root / path).resolve()
    if not candidate.is_relative_to(root):
        raise ApiError(403, f"image_url {path!r} lies outside the media directory", param="messages",
                       code="forbidden_path")
    return candidate  # a path: the SDK refuses FIFOs, devices and directories before opening


def remote(url: str, config: ServerConfig) -> bytes:
    if not config.allow_remote_images:
        raise bad_request("remote image URLs are refused by this server (start it with --allow-remote-images): "
                          "send a data: URL", "messages", "invalid_image_url")
    limit = config.max_body_bytes
    try:
        with urllib.request.urlopen(url, timeout=config.remote_timeout_s) as response:
            data = response.read(limit + 1)
    except Exception as err:  # URLError, timeout, HTTP errors, bad hosts
        raise bad_request(f"image_url could not be fetched ({type(err).__name__}: {err})", "messages",
                          "image_fetch_failed") from None
    if len(data) > limit:
        raise ApiError(413, f"the remote image is larger than {limit} bytes", param="messages", code="image_too_large")
    return data


FETCHERS = {"data": data_url, "file": local_file, "http": remote, "https": remote}


def decode(source: bytes | Path) -> Image.Image:
    """Bytes or a path -> RGB PIL image, through the SDK's loader (pixel limit before decoding, typed errors)."""
    try:
        if isinstance(source, Path):
            return load_image(source)
        opened = Image.open(io.BytesIO(source))
        load_image(opened)  # the pixel limit from the header, then decoding, with typed errors
        return load_image(oriented(opened))
    except ImageError:
        raise
    except Exception as err:  # Image.open on bytes that are no image: UnidentifiedImageError, bomb errors
        raise ImageError(f"the image could not be decoded ({type(err).__name__}: {err}); send a PNG or JPEG "
                         "image") from None


def oriented(image: Image.Image) -> Image.Image:
    """The EXIF orientation applied, as the SDK does for paths (and transformers' load_image)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block: the pixels are fine, keep them as stored
        return image
