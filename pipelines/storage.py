"""The one place qwen-batch touches storage: local paths, s3:// and gs:// through fsspec, with retries.

Transient errors (5xx, throttling, timeouts, refused or reset connections) are retried with backoff; permanent
ones raise at once. Access problems a user must fix (missing bucket, rejected credentials, unreachable endpoint)
raise SpecError naming the URL; a missing object raises FileNotFoundError. No message or log carries a credential.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import posixpath
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import botocore.exceptions
import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from qwen_batch.schemas.errors import SpecError

__all__ = [
    "RETRY_POLICY",
    "FileInfo",
    "RetryPolicy",
    "concatenate",
    "create_only",
    "delete_prefix",
    "exists",
    "filesystem",
    "list_files",
    "list_names",
    "read_bytes",
    "read_file",
    "redact",
    "write_bytes",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a storage call is retried after a transient error."""

    attempts: int
    first_delay_s: float
    max_delay_s: float

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based): doubling, capped, +-25% jitter."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1)) * random.uniform(0.75, 1.25)


RETRY_POLICY = RetryPolicy(attempts=10, first_delay_s=0.2, max_delay_s=10.0)
"""About 45 s of waiting (plus s3fs's and botocore's own quick retries): long enough to outlive an S3 restart."""

_LOCAL_PROTOCOLS = (None, "file", "local")
_GLOB_CHARS = "*?["
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "RequestTimeout",
     "InternalError", "ServiceUnavailable"}
)  # fmt: skip
_CREDENTIAL_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}
)
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_MISSING_CREDENTIALS = (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)
_PERMANENT_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_CONNECTION_ERRORS = (
    botocore.exceptions.ConnectionError,  # refused, connect timeout
    botocore.exceptions.HTTPClientError,  # reset, read timeout, closed mid-response
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
)
_SECRET_KEY = re.compile(r"(?i)(key|secret|token(?!s|izer)|password|credential)")


@dataclass(frozen=True)
class FileInfo:
    """One input file: its full URL, its size in bytes and its path relative to the input root."""

    url: str
    size: int
    relpath: str


def _is_local(url: str) -> bool:
    return split_protocol(url)[0] in _LOCAL_PROTOCOLS


def _causes(error: BaseException) -> list[BaseException]:
    """The error and the errors it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _response(error: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status of the first botocore response in the chain, or ("", 0)."""
    for cause in _causes(error):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", "")), int(
                response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            )
    return "", 0


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, _PERMANENT_ERRORS):
        return False
    code, status = _response(error)
    if code or status:
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    return any(isinstance(cause, _CONNECTION_ERRORS) for cause in _causes(error))


def _is_missing_bucket(error: BaseException) -> bool:
    return _response(error)[0] == "NoSuchBucket"


def _endpoint(error: BaseException) -> str:
    """The scheme://host:port a failed connection was aimed at, or a hint where it is configured."""
    for cause in _causes(error):
        request_url = getattr(cause, "kwargs", {}).get("endpoint_url")
        if request_url:
            parts = urlsplit(request_url)
            return f"{parts.scheme}://{parts.netloc}"
    return "the configured endpoint"


def _access_problem(url: str, error: BaseException) -> SpecError | None:
    """A SpecError for access problems the user must fix on a remote store; None for anything else."""
    if _is_local(url):
        return None
    code, status = _response(error)
    if code == "NoSuchBucket":
        return SpecError(
            f"bucket {urlsplit(url).netloc!r} of {url} does not exist; create it or fix the bucket name in the URL"
        )
    if isinstance(error, _MISSING_CREDENTIALS):
        return SpecError(
            f"no usable credentials for {url} ({error}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or storage_options key and secret)"
        )
    if code in _CREDENTIAL_CODES or status == 403 or isinstance(error, PermissionError):
        return SpecError(
            f"access to {url} was refused ({code or type(error).__name__}): the credentials were rejected; check "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (or storage_options key / secret / token) "
            "and that they grant access to this bucket"
        )
    if not (code or status) and _is_transient(error):
        return SpecError(
            f"cannot reach the storage endpoint {_endpoint(error)} for {url} ({type(error).__name__}) after "
            f"{RETRY_POLICY.attempts} attempts; check AWS_ENDPOINT_URL (or storage_options endpoint_url) "
            "and that the server is running"
        )
    return None


def _retried(function: Callable[..., T]) -> Callable[..., T]:
    """Retry `function(url, ...)` on transient errors as RETRY_POLICY says; explain access problems as SpecError."""

    @functools.wraps(function)
    def call(url: str, *args: Any, **kwargs: Any) -> T:
        attempt = 1
        while True:
            try:
                return function(url, *args, **kwargs)
            except SpecError:
                raise
            except Exception as error:
                if attempt >= RETRY_POLICY.attempts or not _is_transient(error):
                    problem = _access_problem(url, error)
                    if problem is None:
                        raise
                    raise problem from error
                delay_s = RETRY_POLICY.delay_s(attempt)
                logger.warning(
                    "%s(%s) failed with %s (attempt %d of %d); retrying in %.1f s",
                    function.__name__, url, type(error).__name__, attempt, RETRY_POLICY.attempts, delay_s,
                )  # fmt: skip
                time.sleep(delay_s)
                attempt += 1

    return call


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The (cached) fsspec filesystem for `url` and the path in it without protocol; local paths made absolute."""
    options = dict(storage_options or {})
    if not _is_local(url):
        options.setdefault("use_listings_cache", False)  # other writers change the store under us
    try:
        return url_to_fs(url, **options)
    except (ImportError, ValueError) as error:
        raise SpecError(
            f"cannot open {url}: {error}; use an s3://, gs://, file:// URL or a local path, "
            "and install the matching fsspec package (s3fs for s3://, gcsfs for gs://)"
        ) from error


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _is_file(name: str, entry: dict[str, Any]) -> bool:
    """A real file, not a folder nor a zero-byte "folder/" marker object."""
    return entry["type"] == "file" and not name.endswith("/")


def _is_visible(relpath: str) -> bool:
    return not any(part.startswith(("_", ".")) for part in relpath.split("/"))


def _static_prefix(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: `b/in/*/x*.jsonl` -> `b/in`."""
    parts = pattern.split("/")
    first_glob = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    return "/".join(parts[:first_glob])


@_retried
def list_files(url: str, storage_options: dict[str, Any] | None = None) -> list[FileInfo]:
    """The input files at `url` (a file, a folder searched recursively, or a glob), sorted by URL.

    Names starting with `_` or `.` (and everything under such folders) and folder marker objects are skipped.
    """
    fs, path = filesystem(url, storage_options)
    if any(c in path for c in _GLOB_CHARS):
        root, found = _static_prefix(path), fs.glob(path, detail=True)
        nothing = f"no input files match {url}; check input.path and its pattern"
    else:
        try:
            info = fs.info(path)
        except FileNotFoundError as error:
            if _is_missing_bucket(error):
                raise
            raise SpecError(f"no input files at {url}: the path does not exist; check input.path") from error
        if info["type"] != "directory":
            return [FileInfo(url=_url(fs, info["name"]), size=info["size"], relpath=posixpath.basename(info["name"]))]
        root, found = path, fs.find(path, detail=True)
        nothing = (
            f"no input files at {url}: the folder is empty or holds only names starting with _ or .; "
            "check input.path"
        )
    files = [
        FileInfo(url=_url(fs, name), size=entry["size"], relpath=posixpath.relpath(name, root))
        for name, entry in found.items()
        if _is_file(name, entry)
    ]
    visible = sorted((file for file in files if _is_visible(file.relpath)), key=lambda file: file.url)
    if not visible:
        raise SpecError(nothing)
    return visible


@_retried
def read_file(url: str, reader: Callable[[IO[bytes]], T], storage_options: dict[str, Any] | None = None) -> T:
    """`reader(handle)` on the open object, the whole read retried on transient errors (for seeking readers)."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as handle:
        return reader(handle)


@_retried
def read_bytes(
    url: str, storage_options: dict[str, Any] | None = None, start: int | None = None, end: int | None = None
) -> bytes:
    """The bytes of one object, or of its range [start, end) when given (negative start: from the end)."""
    if start is not None and end is not None and 0 <= end <= start:
        return b""  # s3fs would return the whole object for (0, 0) and fail on other empty ranges
    fs, path = filesystem(url, storage_options)
    return fs.cat_file(path, start=start, end=end)


@_retried
def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write (or overwrite) one object, never leaving a partial one: an S3 PUT is atomic, a local file is written
    beside its name and renamed over it. Local parent folders are created."""
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        _publish_local(path, data, os.replace)
    else:
        fs.pipe_file(path, data)


@_retried
def concatenate(url: str, sources: list[str], storage_options: dict[str, Any] | None = None) -> None:
    """Write the objects `sources`, one after another, as the object `url`, streaming: memory is one source."""
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as out:
        for source in sources:
            out.write(read_bytes(source, storage_options))


@_retried
def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether an object or folder exists at `url`."""
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


@_retried
def list_names(prefix_url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Full URLs of all files under a folder or prefix, recursively, sorted; [] when there is none."""
    fs, path = filesystem(prefix_url, storage_options)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError as error:
        if _is_missing_bucket(error):
            raise
        return []
    return sorted(_url(fs, name) for name, entry in found.items() if _is_file(name, entry))


@_retried
def delete_prefix(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove everything under a folder or prefix; nothing there is fine."""
    fs, path = filesystem(url, storage_options)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError as error:
        if _is_missing_bucket(error):
            raise


@_retried
def create_only(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> bool:
    """Write the object only if it does not exist yet; True if this call created it, False if it existed.

    Atomic locally (hard link of a temp file) and on S3 (conditional put). On other stores it is a best effort:
    check, then write, so two writers may both get True. If a put's reply is lost and the call is retried, the
    retry may report False for the object this call itself created.
    """
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return _create_only_local(path, data)
    if "s3" in fs.protocol:
        bucket, key, _ = fs.split_path(path)
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except OSError as error:
            code, status = _response(error)
            if isinstance(error, FileExistsError) or code in _PRECONDITION_CODES or status in (409, 412):
                return False
            raise
        return True
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def _create_only_local(path: str, data: bytes) -> bool:
    try:
        _publish_local(path, data, os.link)
        return True
    except FileExistsError:
        return False


def _publish_local(path: str, data: bytes, publish: Callable[[str, str], None]) -> None:
    """Write `data` beside `path`, then `publish(temporary, path)`: os.replace to overwrite, os.link to create only.

    Either way no reader ever sees a partly written file under `path`."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".write-")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        publish(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def redact(obj: Any) -> Any:
    """A copy of a dict/list structure with the values of secret-looking keys (key, secret, token...) as "***".

    `max_tokens`, `prompt_tokens` and `tokenizer` are not secrets and are kept.
    """
    if isinstance(obj, dict):
        return {
            name: "***" if isinstance(name, str) and _SECRET_KEY.search(name) else redact(value)
            for name, value in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(value) for value in obj]
    return obj
