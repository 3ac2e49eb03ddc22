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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import botocore.exceptions
import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from qwen_batch.schemas.errors import SpecError

__all__ = [
    "RETRY_POLICY",
    "FileInfo",
    "Location",
    "RetryPolicy",
    "concatenate",
    "create_only",
    "delete_files",
    "display_url",
    "exists",
    "filesystem",
    "list_files",
    "list_names",
    "location",
    "read_bytes",
    "read_file",
    "redact",
    "redact_text",
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
_SECRET_KEY = re.compile(r"(?i)(key|secret|token(?!s|izer)|password|passwd|credential|authorization|signature)")
# Query parameters of presigned or SAS URLs that carry a signature or a credential.
_SIGNED_PARAMETER = re.compile(r"(?i)^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|"
                               r"signature|sig|awsaccesskeyid|access_token|token)$")
# Secrets recognised by their value wherever they appear in text: credentials in URLs, query-string signatures,
# Authorization headers, key=value pairs of connection strings, and the shapes of common API tokens.
_SECRET_VALUES = [
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:]+(?::[^/\s@]*)?@"), r"\1***@"),
    (re.compile(r"(?i)([?&](?:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)|"
                r"signature|sig|awsaccesskeyid|access_token|token)=)[^&\s#\"']+"), r"\1***"),
    (re.compile(r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic|token)\s+)?[^\s\"',;]+"), r"\1***"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 ***"),
    (re.compile(r"(?i)\b((?:account_?key|shared_?access_?key|shared_?access_?signature|password|passwd|pwd|"
                r"secret|token)\s*=\s*)[^;&\s\"']+"), r"\1***"),
    (re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|"
                r"xox[abprs]-[A-Za-z0-9-]{10,}|(?:AKIA|ASIA)[0-9A-Z]{16}|"
                r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})\b"), "***"),
]


@dataclass(frozen=True)
class FileInfo:
    """One input file: its full URL, its size in bytes and its path relative to the input root.

    `fingerprint` changes when the file's content does, as far as the store tells: its ETag (or md5 / generation),
    else its modification time; it is "" where the store gives neither.
    """

    url: str
    size: int
    relpath: str
    fingerprint: str = field(default="", compare=False)


def _fingerprint(entry: dict[str, Any]) -> str:
    for name in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified"):
        if entry.get(name) not in (None, ""):
            return f"{name}:{str(entry[name]).strip(chr(34))}"
    return ""


@dataclass(frozen=True)
class Location:
    """Where a URL points, normalised for comparison: the store ("" for local files, else `scheme://bucket`) and
    the path's parts. `file://`, relative and absolute local paths, symlinks, trailing or doubled slashes and `.`
    or `..` parts all compare equal when they name the same place; a glob is located at its folder part."""

    store: str
    parts: tuple[str, ...]

    @property
    def is_root(self) -> bool:
        """The root of the store: `/` locally, a bucket's root remotely."""
        return not self.parts

    def contains(self, other: Location) -> bool:
        """Whether `other` is this location or lies under it."""
        return self.store == other.store and other.parts[: len(self.parts)] == self.parts


_SAME_PROTOCOL = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}


def location(url: str) -> Location:
    """The normalised location of a URL or local path (see Location)."""
    protocol, path = split_protocol(url)
    if any(c in path for c in _GLOB_CHARS):
        path = _static_prefix(path)
    if protocol in _LOCAL_PROTOCOLS:
        parts = os.path.realpath(LocalFileSystem._strip_protocol(path or ".")).split("/")
        return Location("", tuple(part for part in parts if part))
    bucket, *rest = [part for part in posixpath.normpath("/" + path).split("/") if part] or [""]
    return Location(f"{_SAME_PROTOCOL.get(protocol, protocol)}://{bucket}", tuple(rest))


def display_url(url: str) -> str:
    """`url` fit to show in messages, logs and output rows: no user:password@ and no presigned query string.

    Local paths are returned unchanged (a `?` is part of a local file name)."""
    if _is_local(url):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query and any(_SIGNED_PARAMETER.match(name) for name, _ in parse_qsl(query, keep_blank_values=True)):
        query = ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """`text` with every secret recognisable by its value masked as `***` (see _SECRET_VALUES)."""
    for pattern, replacement in _SECRET_VALUES:
        text = pattern.sub(replacement, text)
    return text


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
    url = display_url(url)
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
                    function.__name__, display_url(url), type(error).__name__, attempt, RETRY_POLICY.attempts, delay_s,
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
            f"cannot open {display_url(url)}: {redact_text(str(error))}; use an s3://, gs://, file:// URL or a local path, "
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
        nothing = f"no input files match {display_url(url)}; check input.path and its pattern"
    else:
        try:
            info = fs.info(path)
        except FileNotFoundError as error:
            if _is_missing_bucket(error):
                raise
            raise SpecError(f"no input files at {display_url(url)}: the path does not exist; check input.path") \
                from error
        if info["type"] != "directory":
            return [FileInfo(url=_url(fs, info["name"]), size=info["size"], relpath=posixpath.basename(info["name"]),
                             fingerprint=_fingerprint(info))]
        root, found = path, fs.find(path, detail=True)
        nothing = (
            f"no input files at {display_url(url)}: the folder is empty or holds only names starting with _ or .; "
            "check input.path"
        )
    files = [
        FileInfo(url=_url(fs, name), size=entry["size"], relpath=posixpath.relpath(name, root),
                 fingerprint=_fingerprint(entry))
        for name, entry in found.items()
        if _is_file(name, entry)
    ]
    visible = sorted((file for file in files if _is_visible(file.relpath)), key=lambda file: file.url)
    if not visible:
        raise SpecError(nothing)
    return visible


class _WatchedHandle:
    """A file handle that remembers the first error its store raised, whatever a reader then makes of it."""

    def __init__(self, handle: IO[bytes]):
        self._handle = handle
        self.failure: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._handle, name)
        if not callable(attribute):
            return attribute

        def watched(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except Exception as error:
                self.failure = self.failure or error
                raise

        return watched


@_retried
def read_file(url: str, reader: Callable[[IO[bytes]], T], storage_options: dict[str, Any] | None = None) -> T:
    """`reader(handle)` on the open object, the whole read retried on transient errors (for seeking readers).

    When reading the handle failed, that storage error is raised (and retried if transient) even if the reader
    caught it or turned it into its own error (pyarrow reports a lost connection as a corrupt file): an error of
    `reader` itself comes through only when the store served every byte it asked for."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as opened:
        handle = _WatchedHandle(opened)
        try:
            return reader(handle)  # type: ignore[arg-type]
        except Exception:
            if handle.failure is not None:
                raise handle.failure from None
            raise


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
def delete_files(folder_url: str, urls: list[str], storage_options: dict[str, Any] | None = None) -> None:
    """Delete the files `urls` (as list_names gives them), each of which must lie under `folder_url`; files already
    gone are fine. Nothing outside the folder is ever touched: a URL outside it raises ValueError first."""
    fs, folder = filesystem(folder_url, storage_options)
    inside = location(folder_url)
    outside = [url for url in urls if location(url) == inside or not inside.contains(location(url))]
    if outside:
        raise ValueError(f"refusing to delete {len(outside)} file(s) outside {display_url(folder_url)}, e.g. "
                         f"{display_url(outside[0])}")
    paths = [filesystem(url, storage_options)[1] for url in urls]
    if isinstance(fs, LocalFileSystem):
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    elif paths:
        fs.rm(paths)


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

    Either way no reader ever sees a partly written file under `path`. The file gets the mode the umask gives a new
    file (0666 & ~umask), like any file `open` creates; mkstemp's 0600 would hide the output from a job's readers."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".write-{uuid.uuid4().hex}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        publish(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def redact(obj: Any) -> Any:
    """A copy of a dict/list structure with the values of secret-looking keys (key, secret, token...) as "***" and
    secrets recognisable by their value masked in every string (redact_text).

    `max_tokens`, `prompt_tokens` and `tokenizer` are not secrets and are kept.
    """
    if isinstance(obj, dict):
        return {
            name: "***" if isinstance(name, str) and _SECRET_KEY.search(name) else redact(value)
            for name, value in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(value) for value in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def secret_fields(fields: Any) -> list[str]:
    """Dotted paths of the values in a dict/list structure that `redact` hides."""
    return _hidden(fields, redact(fields), "")


def _hidden(fields: Any, redacted: Any, where: str) -> list[str]:
    if fields == redacted:
        return []
    if isinstance(fields, dict) and isinstance(redacted, dict):
        return [path for key, value in fields.items()
                for path in _hidden(value, redacted[key], f"{where}.{key}" if where else key)]
    if isinstance(fields, list) and isinstance(redacted, list):
        return [path for index, value in enumerate(fields) for path in _hidden(value, redacted[index], f"{where}[{index}]")]
    return [where]
