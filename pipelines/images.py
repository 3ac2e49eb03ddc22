"""Images for vision models: fetched and decoded in the prompt stage, within the spec's byte and pixel limits.

An image is given as bytes (a Parquet binary column) or a string: a local path (relative ones to the row's input
file's folder), a file://, s3:// or gs:// URL (gs:// through fsspec's gcsfs, when installed), an http(s):// URL, or
a data: URL. A bad image is the row's RowError, never the job's failure; the engine gets the original encoded bytes
(the smallest form to carry) and decodes them again.
"""

from __future__ import annotations

import base64
import binascii
import io
import posixpath
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from qwen_batch.pipelines import storage
from qwen_batch.schemas.errors import RowError, SpecError
from qwen_batch.schemas.results import IMAGES_FIELD
from qwen_batch.schemas.spec import ImagesSpec

# What Qwen2.5-VL's processor takes through Pillow; other formats Pillow opens are refused by name.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# The processor refuses images more than this many times as wide as high, or as high as wide.
MAX_ASPECT_RATIO = 200
# Signatures of common image formats Pillow cannot open, so the error says "unsupported", not "corrupt".
_UNSUPPORTED_SIGNATURES = {b"ftypheic": "HEIC", b"ftypheix": "HEIC", b"ftypmif1": "HEIF", b"ftypavif": "AVIF"}

IMAGES_TYPE = IMAGES_FIELD.type  # the output's `images` column: schemas.results owns its shape
# The encoded images the engine decodes, per row; large_binary: a shard's images can pass 2 GiB.
IMAGE_DATA_TYPE = pa.list_(pa.large_binary())


@dataclass(frozen=True)
class ImageConfig:
    """How the prompt stage loads a vision model's images: the template's image columns and the spec's limits."""

    columns: tuple[str, ...]  # prompt.images
    limits: ImagesSpec
    storage_options: dict[str, Any]  # the input's: images in object storage are read as the input is

    def load(self, value: Any, where: str, source_file: str | None) -> LoadedImage:
        """The image of a prompt column's value (its bytes arrive base64 in the row's prompt JSON) or of an image
        part's URL, or the row's RowError."""
        if isinstance(value, dict) and set(value) == {"$bytes"}:
            value = base64.b64decode(value["$bytes"])
        elif isinstance(value, dict) and set(value) == {"$missing"}:
            raise RowError("invalid_field", f"{where} is not in this row; give every row an image there")
        elif value is None:
            raise RowError("invalid_field", f"{where} is null; give every row an image there")
        return load_image(value, where, self.limits, self.storage_options, source_file)


@dataclass(frozen=True)
class VisionGrid:
    """How the checkpoint's image processor sizes an image: scaled to a multiple of `factor` pixels a side within
    [min_pixels, max_pixels], one token per factor x factor pixels (14-pixel patches merged 2x2 for Qwen2.5-VL)."""

    factor: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def of_checkpoint(cls, path: str) -> VisionGrid:
        """The grid of the image processor next to a checkpoint (its preprocessor_config.json)."""
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path)
        return cls(processor.patch_size * processor.merge_size, processor.size["shortest_edge"],
                   processor.size["longest_edge"])

    def tokens(self, image: LoadedImage) -> int:
        """Prompt tokens the image takes, as the processor will make them."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        height, width = smart_resize(image.height, image.width, self.factor, self.min_pixels, self.max_pixels)
        return (height // self.factor) * (width // self.factor)


@dataclass(frozen=True)
class LoadedImage:
    """One image of a row, checked against the limits: its encoded bytes and what the output says about it."""

    data: bytes
    source: str
    format: str
    width: int
    height: int

    def info(self, tokens: int = 0) -> dict[str, Any]:
        """The image's entry in the output's `images` column."""
        return {"source": self.source, "format": self.format, "width": self.width, "height": self.height,
                "bytes": len(self.data), "tokens": tokens}


def load_image(value: Any, where: str, limits: ImagesSpec, storage_options: dict[str, Any],
               source_file: str | None = None) -> LoadedImage:
    """The image `value` (bytes or a path/URL string) names, or RowError (`image_fetch_failed`, `invalid_image`,
    `unsupported_image_format`, `image_too_large`) saying which image of the row and why. `where` names the image
    in messages (`column 'photo'`, `message 1 content part 0`)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data, source = bytes(value), where
        _check_size(data, where, limits)
    elif isinstance(value, str) and value.strip():
        data, source = _fetch(value.strip(), where, limits, storage_options, source_file)
    else:
        raise RowError("invalid_field", f"{where} must be image bytes or a path or URL of an image, found "
                       f"{'an empty string' if isinstance(value, str) else type(value).__name__}")
    return _decoded(data, source, where, limits)


def image_data_column(rows: list[list[LoadedImage] | None]) -> pa.Array:
    """The engine's input: each row's encoded images, null for rows without images."""
    return pa.array([None if images is None else [image.data for image in images] for images in rows],
                    IMAGE_DATA_TYPE)


def image_token_counts(prompt_token_ids: list[int], image_token_id: int) -> list[int]:
    """Tokens each image took in a prompt as the engine expanded it: the runs of its image token, in order (text is
    tokenized as plain BPE, so a row's text never holds that token)."""
    counts: list[int] = []
    previous = None
    for token in prompt_token_ids:
        if token == image_token_id:
            if previous == image_token_id:
                counts[-1] += 1
            else:
                counts.append(1)
        previous = token
    return counts


def decode(data: bytes) -> Image.Image:
    """An image the prompt stage checked, as the RGB picture vLLM's processor takes."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _fetch(reference: str, where: str, limits: ImagesSpec, storage_options: dict[str, Any],
           source_file: str | None) -> tuple[bytes, str]:
    """The bytes a path or URL names, at most limits.max_bytes of them, and how the output names the source."""
    scheme = urllib.parse.urlsplit(reference).scheme.lower()
    if scheme == "data":
        return _data_url(reference, where, limits)
    if scheme in ("http", "https"):
        return _http(reference, where, limits), storage.display_url(reference)
    if not scheme and not posixpath.isabs(reference) and source_file is not None:
        reference = posixpath.join(posixpath.dirname(source_file), reference)
    shown = storage.display_url(reference)
    try:
        data = storage.read_bytes(reference, storage_options, 0, limits.max_bytes + 1)
    except FileNotFoundError:
        raise RowError("image_fetch_failed", f"{where}: no image at {shown}") from None
    except (SpecError, OSError, ValueError) as exc:
        raise RowError("image_fetch_failed", f"{where}: could not read {shown}: "
                       f"{storage.redact_text(str(exc))}") from None
    _check_size(data, f"{where} ({shown})", limits, at_least=True)
    return data, shown


def _data_url(reference: str, where: str, limits: ImagesSpec) -> tuple[bytes, str]:
    """The bytes of a `data:[<media type>][;base64],<data>` URL."""
    header, comma, payload = reference.partition(",")
    media_type = header[len("data:"):].split(";")[0] or "text/plain"
    if not comma or not header.endswith(";base64"):
        raise RowError("invalid_image", f"{where}: a data: URL of an image must be base64 "
                       f"(data:image/png;base64,...), found {header[:60]!r}")
    if len(payload) * 3 // 4 > limits.max_bytes + 2:
        _check_size(b"", where, limits, found=len(payload) * 3 // 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RowError("invalid_image", f"{where}: the data: URL's base64 payload does not decode") from None
    _check_size(data, where, limits)
    return data, f"data:{media_type}"


def _http(url: str, where: str, limits: ImagesSpec) -> bytes:
    """GET `url` within limits.fetch_timeout_s, reading at most limits.max_bytes + 1 bytes."""
    shown = storage.display_url(url)
    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout_s) as response:  # noqa: S310 - http(s) only
            data = response.read(limits.max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise RowError("image_fetch_failed", f"{where}: GET {shown} answered HTTP {exc.code} {exc.reason}") from None
    except TimeoutError:
        raise RowError("image_fetch_failed", f"{where}: GET {shown} timed out after {limits.fetch_timeout_s:g} s "
                       "(images.fetch_timeout_s)") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise RowError("image_fetch_failed", f"{where}: GET {shown} timed out after "
                           f"{limits.fetch_timeout_s:g} s (images.fetch_timeout_s)") from None
        raise RowError("image_fetch_failed", f"{where}: GET {shown} failed: {reason}") from None
    _check_size(data, f"{where} ({shown})", limits, at_least=True)
    return data


def _check_size(data: bytes, where: str, limits: ImagesSpec, at_least: bool = False, found: int | None = None) -> None:
    """RowError when the encoded image is over limits.max_bytes (`at_least`: `data` was cut at max_bytes + 1)."""
    size = len(data) if found is None else found
    if size > limits.max_bytes:
        shown = f"over {limits.max_bytes:,}" if at_least else f"{size:,}"
        raise RowError("image_too_large", f"{where}: the image is {shown} bytes, over images.max_bytes "
                       f"({limits.max_bytes:,}); shrink it or raise the limit")
    if not size:
        raise RowError("invalid_image", f"{where}: the image is empty (0 bytes)")


def _decoded(data: bytes, source: str, where: str, limits: ImagesSpec) -> LoadedImage:
    """Open, check and fully decode the image, so a corrupt one fails here rather than in the engine."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise RowError("image_too_large", f"{where}: the image's pixel count is far over images.max_pixels "
                       f"({limits.max_pixels:,})") from None
    except (UnidentifiedImageError, OSError, ValueError):
        kind = next((name for signature, name in _UNSUPPORTED_SIGNATURES.items() if signature in data[:32]), None)
        if kind is not None or data.lstrip()[:5] in (b"<svg ", b"<?xml"):
            raise RowError("unsupported_image_format", f"{where}: the image is {kind or 'SVG'}, which the model's "
                           f"processor cannot read; convert it to one of {', '.join(SUPPORTED_FORMATS)}") from None
        raise RowError("invalid_image", f"{where}: {len(data):,} bytes that are not a readable image (corrupt, or "
                       f"in a format other than {', '.join(SUPPORTED_FORMATS)})") from None
    with image:
        if image.format not in SUPPORTED_FORMATS:
            raise RowError("unsupported_image_format", f"{where}: the image is {image.format}; convert it to one of "
                           f"{', '.join(SUPPORTED_FORMATS)}")
        width, height = image.size
        if width * height > limits.max_pixels:
            raise RowError("image_too_large", f"{where}: the image is {width}x{height} = {width * height:,} pixels, "
                           f"over images.max_pixels ({limits.max_pixels:,}); downscale it or raise the limit")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise RowError("invalid_image", f"{where}: the image is {width}x{height}, an aspect ratio over "
                           f"{MAX_ASPECT_RATIO}:1, which the model's processor refuses; crop or pad it")
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as exc:
            raise RowError("invalid_image", f"{where}: the {image.format} image ({width}x{height}) does not decode: "
                           f"{exc}") from None
        return LoadedImage(data, source, image.format, width, height)
