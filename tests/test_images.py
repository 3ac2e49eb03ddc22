"""pipelines.images: images from bytes, local files, the S3 server, http(s) and data: URLs; every bad image a RowError."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from qwen_batch.pipelines import storage
from qwen_batch.pipelines.images import decode, load_image
from qwen_batch.schemas.errors import RowError
from qwen_batch.schemas.spec import ImagesSpec
from s3server import S3Server

LIMITS = ImagesSpec(max_bytes=200_000, max_pixels=1_000_000, fetch_timeout_s=0.5)


def encoded(width: int, height: int, format: str = "PNG", color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format=format)
    return out.getvalue()


PNG = encoded(300, 200)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path == "/slow.png":
            time.sleep(2)
        if self.path in ("/photo.png", "/slow.png"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(PNG)
            return
        self.send_error(404, "Not Found")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_root() -> Iterator[str]:
    """An http server on loopback: /photo.png, a /slow.png that answers after 2 s, 404 for the rest."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def failure(value: object, **kwargs: object) -> RowError:
    with pytest.raises(RowError) as caught:
        load_image(value, "column 'photo'", LIMITS, {}, **kwargs)  # type: ignore[arg-type]
    return caught.value


def test_bytes_decode_with_their_size_and_format() -> None:
    image = load_image(PNG, "column 'photo'", LIMITS, {})
    assert (image.format, image.width, image.height, image.data) == ("PNG", 300, 200, PNG)
    assert image.info(tokens=77) == {"source": "column 'photo'", "format": "PNG", "width": 300, "height": 200,
                                     "bytes": len(PNG), "tokens": 77}
    assert decode(image.data).size == (300, 200) and decode(image.data).mode == "RGB"


def test_local_paths_absolute_and_relative_to_the_input_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(encoded(64, 48, "JPEG"))
    absolute = load_image(str(tmp_path / "images" / "a.jpg"), "column 'photo'", LIMITS, {})
    assert (absolute.format, absolute.width, absolute.source) == ("JPEG", 64, str(tmp_path / "images" / "a.jpg"))
    relative = load_image("images/a.jpg", "column 'photo'", LIMITS, {}, source_file=str(tmp_path / "rows.parquet"))
    assert relative.data == absolute.data
    missing = failure(str(tmp_path / "nope.png"))
    assert missing.error_type == "image_fetch_failed" and "nope.png" in str(missing)


@pytest.mark.s3
def test_s3_urls_read_from_the_store(s3: S3Server) -> None:
    url = f"s3://{s3.bucket}/{uuid.uuid4().hex}/defect.webp"
    storage.write_bytes(url, encoded(120, 90, "WEBP"))
    image = load_image(url, "column 'photo'", LIMITS, {})
    assert (image.format, image.width, image.height, image.source) == ("WEBP", 120, 90, url)
    assert failure(url.replace("defect", "absent")).error_type == "image_fetch_failed"


def test_http_urls_and_their_failures(http_root: str) -> None:
    assert load_image(f"{http_root}/photo.png", "column 'photo'", LIMITS, {}).data == PNG
    not_found = failure(f"{http_root}/gone.png")
    assert not_found.error_type == "image_fetch_failed" and "HTTP 404" in str(not_found)
    started = time.monotonic()
    slow = failure(f"{http_root}/slow.png")
    assert slow.error_type == "image_fetch_failed" and "timed out after 0.5 s" in str(slow)
    assert time.monotonic() - started < 1.5


def test_data_urls() -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    image = load_image(url, "message 1 content part 0", LIMITS, {})
    assert (image.source, image.width) == ("data:image/png", 300)
    assert failure("data:image/png;base64,@@@").error_type == "invalid_image"
    assert "must be base64" in str(failure("data:image/png,rawbytes"))


def test_limits_on_bytes_and_pixels(tmp_path: Path) -> None:
    big = encoded(1200, 1000, "BMP")  # 3.6 MB, 1.2 MP
    too_many_bytes = failure(big)
    assert too_many_bytes.error_type == "image_too_large" and "images.max_bytes (200,000)" in str(too_many_bytes)
    (tmp_path / "big.bmp").write_bytes(big)
    assert "over 200,000 bytes" in str(failure(str(tmp_path / "big.bmp")))  # read no further than the limit
    wide = encoded(2000, 600, "PNG")  # small file, 1.2 MP
    too_many_pixels = failure(wide)
    assert too_many_pixels.error_type == "image_too_large" and "2000x600 = 1,200,000 pixels" in str(too_many_pixels)


def test_corrupt_unsupported_and_wrong_values() -> None:
    assert failure(b"not an image at all").error_type == "invalid_image"
    truncated = failure(encoded(300, 200, "JPEG")[:400])
    assert truncated.error_type == "invalid_image" and "JPEG" in str(truncated)
    heic = failure(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    assert heic.error_type == "unsupported_image_format" and "HEIC" in str(heic)
    svg = failure(b'<svg xmlns="http://www.w3.org/2000/svg"/>')
    assert svg.error_type == "unsupported_image_format"
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="ICO")
    ico = failure(out.getvalue())
    assert ico.error_type == "unsupported_image_format" and "ICO" in str(ico)
    assert failure(b"").error_type == "invalid_image"
    assert failure(12).error_type == "invalid_field"
    assert failure("  ").error_type == "invalid_field"
