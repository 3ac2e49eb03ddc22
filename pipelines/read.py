"""Read stage: plan deterministic shards from cheap metadata, then read each shard into one Arrow block.

A shard is an input file plus a row range. Its id hashes the file's relative path, size and range, so a rerun of
the same job over the same input plans the same ids, which is what resume and exactly-once rest on. Reading is
lenient per row: a line that is not JSON, a CSV record with the wrong field count, bytes that are not UTF-8 or a row
over MAX_ROW_BYTES become rows with `_error_type` set, never a failed file. Planning and reading find record ends
with one scanner (_RecordEnds), so they always agree on where each record starts.
"""

from __future__ import annotations

import base64
import csv
import functools
import hashlib
import io
import json
import logging
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from qwen_batch.pipelines import storage
from qwen_batch.pipelines.openai_batch import parse_request
from qwen_batch.schemas.errors import RowError, SpecError
from qwen_batch.schemas.spec import InputSpec, arrow_type

log = logging.getLogger(__name__)

SCAN_CHUNK_BYTES = 16 << 20
# A shard travels as one Arrow block, which Ray slices when it is far over its target size: a shard must stay well
# below the block size the pipeline sets (pipelines.pipeline.MAX_BLOCK_BYTES).
MAX_SHARD_BYTES = 512 << 20
# The cross-shard id check (start_repeated_ids): rows one reading task takes, and rows one grouping task holds.
ID_CHECK_ROWS_PER_TASK = 50_000
ID_CHECK_ROWS_PER_PARTITION = 1_000_000
# The most bytes one JSONL line or CSV record may hold; a longer one becomes a `row_too_large` error row, read past
# chunk by chunk and never held whole. Python's csv module refuses fields over 128 KiB unless told otherwise.
MAX_ROW_BYTES = 16 << 20
csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_BYTES))
# Planning checks the columns of a JSONL file, and infers the types of its carried ones, on the JSON objects among
# its first lines.
COLUMN_SAMPLE_ROWS = 100
COLUMN_SAMPLE_BYTES = 1 << 20

# A row's own request fields (OpenAI batch), typed once at read time; null fields take the job's values.
REQUEST_TYPE = pa.struct([
    ("max_tokens", pa.int64()), ("temperature", pa.float64()), ("top_p", pa.float64()), ("seed", pa.int64()),
    ("stop", pa.list_(pa.string())), ("presence_penalty", pa.float64()), ("frequency_penalty", pa.float64()),
    ("repetition_penalty", pa.float64()),
    ("response_format", pa.string()),  # pipelines.structured.StructuredOutput.to_json()
    ("logprobs", pa.int64()),  # alternatives listed per generated token (0: the chosen one only); null: no logprobs
])

# Columns every block carries besides the carried input columns.
BLOCK_SCHEMA = pa.schema(
    [
        ("_shard", pa.string()),
        ("_shard_rows", pa.int64()),
        ("id", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("_prompt", pa.string()),
        ("_error_type", pa.string()),
        ("_error", pa.string()),
        ("_request", REQUEST_TYPE),
    ]
)


class _BadFile(Exception):
    """The file cannot be parsed, or changed since it was planned: `input.on_bad_file` decides what happens.

    Only parsing raises it; a storage error (an outage after storage's retries) is never a bad file."""


def _parsing(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` with the errors a parser raises on a corrupt file turned into _BadFile."""

    def parse(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise _BadFile(str(exc)) from exc

    return parse


@dataclass(frozen=True)
class Shard:
    """A row range of one input file: the unit of output, commit and resume."""

    shard_id: str
    file: str
    relpath: str
    row_start: int
    row_count: int
    byte_start: int
    byte_end: int
    header_end: int = 0
    input_bytes: int = 0
    repeats: tuple[tuple[int, str], ...] = ()
    """Rows (source_row) whose id a row of another shard, earlier in the input, has: each with where that row is.
    Found by start_repeated_ids' check before the run reads the shard."""


# By shard id, the Shard.repeats of each shard that has any: what the cross-shard id check finds.
Repeats = dict[str, tuple[tuple[int, str], ...]]


@dataclass(frozen=True)
class ReadConfig:
    """What a read task needs to know about the input."""

    format: str
    id_column: str | None
    prompt_columns: tuple[str, ...]
    carried: pa.Schema
    """The carried columns with the types the job's output gives them (carried_schema)."""
    on_bad_file: str
    storage_options: dict[str, Any]

    @classmethod
    def of(cls, spec: InputSpec, prompt_columns: list[str], carried: pa.Schema | None = None) -> ReadConfig:
        """The config of a job's reads; `carried` is the plan's carried_schema, worked out from the input when None."""
        id_column = spec.id_column or ("custom_id" if spec.format == "openai-batch" else None)
        if carried is None:
            carried = carried_schema(spec, [input_schema(spec, info)
                                            for info in storage.list_files(spec.path, spec.storage_options)])
        return cls(spec.format, id_column, tuple(prompt_columns), carried, spec.on_bad_file, spec.storage_options)

    @property
    def carry_columns(self) -> list[str]:
        return self.carried.names


def shard_id(relpath: str, size: int, row_start: int, row_count: int) -> str:
    """Stable id of a row range of a file."""
    return hashlib.sha256(f"{relpath}\0{size}\0{row_start}\0{row_count}".encode()).hexdigest()[:20]


def plan_shards(spec: InputSpec, files: list[storage.FileInfo]) -> tuple[list[Shard], list[str]]:
    """Shards for every input file, and the files skipped as unreadable (only with `on_bad_file: skip`)."""
    shards: list[Shard] = []
    bad_files: list[str] = []
    for info in files:
        try:
            planned = list(_plan_file(spec, info))
        except (_BadFile, FileNotFoundError) as exc:
            if spec.on_bad_file == "fail":
                raise SpecError(
                    f"input file {storage.display_url(info.url)} cannot be read as {spec.format}: {exc}. Fix or "
                    "remove the file, or set input.on_bad_file: skip to record it in the manifest and go on."
                ) from None
            log.warning("skipping unreadable input file %s: %s", storage.display_url(info.url), exc)
            bad_files.append(storage.display_url(info.url))
            continue
        _check_shard_sizes(spec, info, planned)
        shards.extend(planned)
    return shards, bad_files


def _check_shard_sizes(spec: InputSpec, info: storage.FileInfo, shards: list[Shard]) -> None:
    """Refuse a file whose shards would not fit in one Ray block, naming a rows_per_shard that would."""
    largest = max(shards, key=lambda s: s.input_bytes, default=None)
    if largest is None or largest.input_bytes <= MAX_SHARD_BYTES:
        return
    per_row = largest.input_bytes / largest.row_count
    fits = max(1, int(MAX_SHARD_BYTES / per_row))
    raise SpecError(
        f"input file {storage.display_url(info.url)}: rows {largest.row_start}-{largest.row_start + largest.row_count - 1} make a shard "
        f"of {largest.input_bytes / (1 << 20):.0f} MiB, over the {MAX_SHARD_BYTES >> 20} MiB a shard may hold (it "
        f"travels as one Ray block). Set input.rows_per_shard to {fits} or less (today {spec.rows_per_shard})."
    )


def _plan_file(spec: InputSpec, info: storage.FileInfo) -> Iterator[Shard]:
    per_shard = spec.rows_per_shard
    if spec.format == "parquet":
        metadata = storage.read_file(info.url, _parsing(lambda handle: pq.ParquetFile(handle).metadata),
                                     spec.storage_options)
        rows = metadata.num_rows
        # Uncompressed bytes per row, the size a shard's columns take once decoded.
        per_row = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)) / max(rows, 1)
        for start in range(0, rows, per_shard):
            count = min(per_shard, rows - start)
            yield Shard(shard_id(info.relpath, info.size, start, count), info.url, info.relpath, start, count, 0, 0,
                        input_bytes=int(per_row * count))
        return
    header_end = _csv_header_end(info, spec.storage_options) if spec.format == "csv" else 0
    chunks = _chunks(info, spec.storage_options, header_end)
    row_start, byte_start = 0, header_end
    for rows_so_far, byte_end in _record_boundaries(chunks, header_end, per_shard, quoted=spec.format == "csv"):
        count = rows_so_far - row_start
        yield Shard(shard_id(info.relpath, info.size, row_start, count), info.url, info.relpath, row_start, count,
                    byte_start, byte_end, header_end, input_bytes=byte_end - byte_start)
        row_start, byte_start = rows_so_far, byte_end


def _chunks(info: storage.FileInfo, options: dict[str, Any], start: int) -> Iterator[bytes]:
    for offset in range(start, info.size, SCAN_CHUNK_BYTES):
        yield storage.read_bytes(info.url, options, start=offset, end=min(offset + SCAN_CHUNK_BYTES, info.size))


_QUOTE, _COMMA, _NEWLINE = ord('"'), ord(","), ord("\n")
_CSV_EVENT = re.compile(rb'\n|,"')


class _RecordEnds:
    """Finds where records end in a file read chunk by chunk: at each newline, and with CSV rules (`quoted`) only
    at one outside a quoted field.

    The CSV rules are Python csv module's: a field is quoted only when it starts with `"`; inside it `""` is a
    literal quote and the first other `"` closes it; a `"` anywhere else (`5" screen`) is a literal character.
    """

    def __init__(self, quoted: bool):
        self.quoted = quoted
        self.in_quotes = False
        self.field_start = True
        self.quote_pending = False  # the last chunk ended on a `"` in a quoted field; the next byte says which kind

    def countable(self, chunk: bytes) -> bool:
        """Whether every newline in `chunk` ends a record, so a caller may count them instead (then call skip)."""
        return not self.quoted or not (self.in_quotes or self.quote_pending or b'"' in chunk)

    def skip(self, chunk: bytes) -> None:
        """Move past a countable chunk without looking for its record ends."""
        if self.quoted and chunk:
            self.field_start = chunk[-1] in (_NEWLINE, _COMMA)

    def ends(self, chunk: bytes) -> Iterator[int]:
        """Offsets in `chunk` just after each record that ends in it."""
        pos, size = 0, len(chunk)
        if not self.quoted:
            while (newline := chunk.find(b"\n", pos)) >= 0:
                pos = newline + 1
                yield pos
            return
        if self.quote_pending and size:
            self.quote_pending = False
            if chunk[0] == _QUOTE:
                pos = 1
            else:
                self.in_quotes = False
        while pos < size:
            if self.in_quotes:
                quote = chunk.find(b'"', pos)
                if quote < 0:
                    return
                if quote + 1 == size:
                    self.quote_pending = True
                    return
                pos = quote + 2 if chunk[quote + 1] == _QUOTE else quote + 1
                self.in_quotes = chunk[quote + 1] == _QUOTE
            elif self.field_start and chunk[pos] == _QUOTE:
                self.in_quotes, self.field_start = True, False
                pos += 1
            elif (event := _CSV_EVENT.search(chunk, pos)) is None:
                self.field_start = chunk[-1] == _COMMA
                return
            else:
                pos = event.end()
                self.in_quotes, self.field_start = event.group() != b"\n", event.group() == b"\n"
                if self.field_start:
                    yield pos


def _record_boundaries(chunks: Iterable[bytes], start: int, every: int, quoted: bool) -> Iterator[tuple[int, int]]:
    """(records so far, byte offset after the record) after every `every`-th record and after the last one.

    Records end as _RecordEnds says; a final line without a newline is a record too.
    """
    offset, records, last_end, scanner = start, 0, start, _RecordEnds(quoted)
    for chunk in chunks:
        if scanner.countable(chunk):
            newlines = chunk.count(b"\n")
            if newlines < every - records % every:
                records += newlines
                last_end = offset + chunk.rindex(b"\n") + 1 if newlines else last_end
                offset += len(chunk)
                scanner.skip(chunk)
                continue
        for end in scanner.ends(chunk):
            records += 1
            last_end = offset + end
            if records % every == 0:
                yield records, last_end
        offset += len(chunk)
    if offset > last_end:
        yield records + 1, offset
    elif records % every:
        yield records, last_end


def _records(shard: Shard, config: ReadConfig) -> Iterator[bytes | int]:
    """The shard's records, each as its bytes (line end included) or, when over MAX_ROW_BYTES, as its size.

    The shard is read a chunk at a time and an oversized record is counted past, never held whole."""
    scanner = _RecordEnds(quoted=config.format == "csv")
    pieces: list[bytes] = []
    held = 0  # bytes of the record read so far
    for offset in range(shard.byte_start, shard.byte_end, SCAN_CHUNK_BYTES):
        chunk = storage.read_bytes(shard.file, config.storage_options, offset,
                                   min(offset + SCAN_CHUNK_BYTES, shard.byte_end))
        start = 0
        for end in scanner.ends(chunk):
            size = held + end - start
            yield size if size > MAX_ROW_BYTES else b"".join([*pieces, chunk[start:end]])
            pieces, held, start = [], 0, end
        held += len(chunk) - start
        pieces = [*pieces, chunk[start:]] if held <= MAX_ROW_BYTES else []
    if held:
        yield held if held > MAX_ROW_BYTES else b"".join(pieces)


def _csv_header_end(info: storage.FileInfo, options: dict[str, Any]) -> int:
    head = storage.read_bytes(info.url, options, start=0, end=min(info.size, 1 << 20))
    for _, end in _record_boundaries([head], 0, 1, quoted=True):
        if head[end - 1 : end] == b"\n" or end == info.size:  # not a header cut off at the end of `head`
            return end
        break
    raise SpecError(f"CSV file {storage.display_url(info.url)} has no header line; the first line must name the "
                    "columns")


def input_schema(spec: InputSpec, info: storage.FileInfo) -> pa.Schema | None:
    """Columns and types of one input file: its Parquet footer's; its CSV header's, every column a string; or the keys
    of the JSON objects among its first COLUMN_SAMPLE_ROWS lines, typed from their values there (null where a key
    only ever held null, string where its values were of mixed types). None for a JSONL file with no object in that
    sample and for a file that cannot be parsed (plan_shards refuses or skips it, as input.on_bad_file says). An
    OpenAI batch file is sampled as JSONL: its columns are its request lines' own keys (custom_id, method, url, body
    and any a user adds), which is what a job can carry."""
    try:
        if spec.format == "parquet":
            return storage.read_file(info.url, _parsing(lambda handle: pq.ParquetFile(handle).schema_arrow),
                                     spec.storage_options)
        if spec.format == "csv":
            header = storage.read_bytes(info.url, spec.storage_options, 0, _csv_header_end(info, spec.storage_options))
            names = next(csv.reader(io.StringIO(header.decode("utf-8", "replace"), newline="")))
            return pa.schema([(name, pa.string()) for name in dict.fromkeys(names)])
        if spec.format in ("jsonl", "openai-batch"):
            return _sampled_schema(storage.read_bytes(info.url, spec.storage_options, 0,
                                                      min(info.size, COLUMN_SAMPLE_BYTES)), info.size)
    except (_BadFile, FileNotFoundError):
        return None
    return None


def _sampled_schema(head: bytes, size: int) -> pa.Schema | None:
    """Keys of the JSON objects among the first whole lines of `head` (the start of a file of `size` bytes), typed
    from the values they hold there."""
    lines = head.split(b"\n")
    if len(head) < size:
        lines.pop()  # cut off at the end of the sample
    values: dict[str, list[Any]] = {}
    for line in lines[:COLUMN_SAMPLE_ROWS]:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            for key, value in record.items():
                values.setdefault(key, []).append(value)
    return pa.schema([(key, _inferred_type(sample)) for key, sample in values.items()]) if values else None


def _inferred_type(sample: list[Any]) -> pa.DataType:
    """Arrow's type for JSON values; string for values of mixed types, or holding objects (a struct type would drop
    the keys later rows add)."""
    try:
        found = pa.array(sample).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.string()
    return pa.string() if _holds_struct(found) else found


def _holds_struct(arrow: pa.DataType) -> bool:
    return pa.types.is_struct(arrow) or any(_holds_struct(arrow.field(i).type) for i in range(arrow.num_fields))


def carried_schema(spec: InputSpec, schemas: list[pa.Schema | None]) -> pa.Schema:
    """The type of each carried column in the job's output, fixed once at planning: input.schema's where it names
    one, else the input files' (`schemas`, from input_schema) unified, widening where Arrow can (int32 to int64, a
    decimal to one of more digits, null to anything); a JSONL column whose files disagree, or that held only nulls,
    is a string. SpecError for Parquet files whose types for a column have no common type."""
    fields = []
    for column in spec.carry_columns:
        if column in spec.schema_:
            fields.append(pa.field(column, arrow_type(spec.schema_[column])))
            continue
        found = [schema.field(column) for schema in schemas if schema is not None and column in schema.names]
        try:
            unified = pa.unify_schemas([pa.schema([f]) for f in found], promote_options="permissive").field(0).type \
                if found else pa.null()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            if spec.format == "parquet":
                types = sorted({str(f.type) for f in found})
                raise SpecError(f"input.carry_columns: column {column!r} has types {types} in different Parquet files, "
                                f"with no common type; declare the one to convert to, e.g. input.schema: {{{column}: "
                                "string}") from None
            unified = pa.string()
        fields.append(pa.field(column, pa.string() if pa.types.is_null(unified) else unified))
    return pa.schema(fields)


class ShardDatasource(Datasource):
    """Ray Data source with one read task per shard, whatever parallelism Ray asks for.

    A read task's output blocks are coalesced by Ray up to its target block size, so a task that yielded several
    shards could hand them downstream as one block; one shard per task cannot be merged with another. With `repeats`
    (start_repeated_ids' reference), each task waits for the id check and flags its shard's repeated ids.
    """

    def __init__(self, shards: list[Shard], config: ReadConfig, repeats: ray.ObjectRef | None):
        self._shards = shards
        self._config = config
        self._repeats = repeats

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(s.input_bytes for s in self._shards) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(partial(_read_one, shard, self._config, self._repeats),
                         BlockMetadata(num_rows=shard.row_count, size_bytes=shard.input_bytes or None,
                                       exec_stats=None, input_files=[shard.file]))
                for shard in self._shards]


def _read_one(shard: Shard, config: ReadConfig, repeats: ray.ObjectRef | None) -> Iterator[pa.Table]:
    if repeats is not None:
        shard = replace(shard, repeats=_repeats_of(repeats).get(shard.shard_id, ()))
    yield read_shard(shard, config)


@functools.lru_cache(maxsize=1)
def _repeats_of(repeats: ray.ObjectRef) -> Repeats:
    """The id check's result, fetched once per worker process rather than once per shard it reads."""
    return ray.get(repeats)


def read_shard(shard: Shard, config: ReadConfig) -> pa.Table:
    """One shard as a block: one row per input row, bad rows flagged, none dropped."""
    try:
        rows, carried = _READERS[config.format](shard, config)
    except (_BadFile, FileNotFoundError) as exc:
        if config.on_bad_file == "fail":
            raise RuntimeError(
                f"input file {_shown(shard)} (rows {shard.row_start}-{shard.row_start + shard.row_count - 1}) cannot "
                f"be read: {exc}. Fix the file, or set input.on_bad_file: skip to turn its rows into error rows."
            ) from exc
        message = f"input file {_shown(shard)} could not be read: {exc}"
        rows, carried = [_error_row(shard, shard.row_start + i, "bad_file", message)
                         for i in range(shard.row_count)], None
    if config.id_column is not None:
        _flag_duplicate_ids(shard, rows)
    return _to_block(shard, rows, config, carried)


def _flag_duplicate_ids(shard: Shard, rows: list[dict[str, Any]]) -> None:
    """Rows that repeat the id of an earlier row, of the shard or (shard.repeats) of an earlier shard, become
    `duplicate_id` error rows."""
    elsewhere = dict(shard.repeats)
    first_row: dict[str, int] = {}
    for row in rows:
        if row["_error_type"] is not None:
            continue
        first = first_row.setdefault(row["id"], row["source_row"])
        earlier = elsewhere.get(row["source_row"]) or (f"row {first}" if first != row["source_row"] else None)
        if earlier is not None:
            row.update(_prompt=None, _error_type="duplicate_id",
                       _error=f"{_shown(shard)} row {row['source_row']}: id {row['id']!r} was already used by "
                              f"{earlier}, which is answered; make the ids in the id column unique")


def start_repeated_ids(shards: list[Shard], config: ReadConfig) -> ray.ObjectRef:
    """The cross-shard id check, started: a reference to, by shard id, the rows of each shard whose id a row of an
    earlier shard has (Shard.repeats; shards with none are left out). The run's read tasks wait on it
    (ShardDatasource), so it runs while the engines start.

    A map-reduce on Ray: tasks read runs of whole shards (ID_CHECK_ROWS_PER_TASK rows or so, and at least two tasks
    per CPU of the cluster) and split their rows' ids by a hash of the id into partitions of about
    ID_CHECK_ROWS_PER_PARTITION rows; one task per partition groups its ids with Arrow and keeps those used more than
    once. No process holds all the ids, and only the repeated ones reach the last task. Rows that are error rows
    anyway, or repeat an id earlier in their own shard, take no part (read_shard flags those itself)."""
    rows = sum(shard.row_count for shard in shards)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    tasks = min(len(shards), max(math.ceil(rows / ID_CHECK_ROWS_PER_TASK), 2 * cpus))
    partitions = max(1, math.ceil(rows / ID_CHECK_ROWS_PER_PARTITION))
    ids_only = replace(config, prompt_columns=(), carried=pa.schema([]))
    size = math.ceil(len(shards) / tasks)
    mapped = [_id_partitions.options(num_returns=partitions).remote(shards[start:start + size], ids_only, partitions)
              for start in range(0, len(shards), size)]
    by_partition = zip(*mapped) if partitions > 1 else [mapped]
    found = [_repeated_ids.remote(*parts) for parts in by_partition]
    return _repeats_by_shard.remote([(shard.shard_id, _shown(shard)) for shard in shards], *found)


@ray.remote(num_cpus=0.25)
def _id_partitions(shards: list[Shard], config: ReadConfig, partitions: int) -> pa.Table | list[pa.Table]:
    """The ids of these shards' rows with their places, split into `partitions` by a hash of the id (crc32: the same
    in every process, unlike Python's str hash)."""
    table = pa.concat_tables([_id_places(read_shard(shard, config)) for shard in shards])
    if partitions == 1:
        return table
    buckets = pa.array([zlib.crc32(row_id.encode()) % partitions for row_id in table.column("id").to_pylist()])
    return [table.filter(pc.equal(buckets, partition)) for partition in range(partitions)]


@ray.remote(num_cpus=0.25)
def _repeated_ids(*parts: pa.Table) -> pa.Table:
    """Of one partition's ids, those used more than once, each with the list of its places."""
    grouped = pa.concat_tables(parts).group_by("id").aggregate([("place", "count"), ("place", "list")])
    return grouped.filter(pc.greater(grouped.column("place_count"), 1))


@ray.remote(num_cpus=0.25)
def _repeats_by_shard(shards: list[tuple[str, str]], *found: pa.Table) -> Repeats:
    """Shard.repeats by shard id, from the partitions' repeated ids; `shards` are (id, file shown) in input order,
    which decides the first use of an id."""
    order = {shard_id: index for index, (shard_id, _) in enumerate(shards)}
    repeats: dict[str, list[tuple[int, str]]] = {}
    for table in found:
        for group in table.column("place_list").to_pylist():
            places = sorted((order[shard], int(row)) for shard, row in (place.split(":") for place in group))
            first_shard, first_row = places[0]
            first = f"row {first_row} of {shards[first_shard][1]}"
            for index, row in places[1:]:
                repeats.setdefault(shards[index][0], []).append((row, first))
    return {shard: tuple(sorted(rows)) for shard, rows in repeats.items()}


def _id_places(block: pa.Table) -> pa.Table:
    """The ids of a block's rows that are no error rows, each with its place: `<shard id>:<source row>`."""
    block = block.filter(pc.is_null(block.column("_error_type")))
    return pa.table({"id": block.column("id"), "place": pc.binary_join_element_wise(
        block.column("_shard"), pc.cast(block.column("source_row"), pa.string()), ":")})


def _shown(shard: Shard) -> str:
    """The shard's file as messages name it."""
    return storage.display_url(shard.file)


def _too_large(shard: Shard, row_number: int, where: str, size: int) -> dict[str, Any]:
    return _error_row(shard, row_number, "row_too_large", f"{where} is {size} bytes, over the {MAX_ROW_BYTES >> 20} "
                      "MiB one row may hold; split or shorten it")


def _check_count(shard: Shard, found: int, what: str) -> None:
    if found != shard.row_count:
        raise _BadFile(f"found {found} {what} where the plan counted {shard.row_count}: the file changed since the job "
                       "was planned")


def _read_jsonl(shard: Shard, config: ReadConfig) -> tuple[list[dict[str, Any]], None]:
    rows = []
    for offset, raw in enumerate(_records(shard, config)):
        row_number = shard.row_start + offset
        where = f"{_shown(shard)} line {row_number + 1}"
        if isinstance(raw, int):
            rows.append(_too_large(shard, row_number, where, raw))
            continue
        try:
            rows.append(_jsonl_row(shard, row_number, where, raw, config))
        except RecursionError:
            rows.append(_error_row(shard, row_number, "invalid_json", f"{where}: expected one JSON object per line, "
                                   "found JSON nested too deeply to read; flatten it"))
    _check_count(shard, len(rows), "lines")
    return rows, None


def _jsonl_row(shard: Shard, row_number: int, where: str, raw: bytes, config: ReadConfig) -> dict[str, Any]:
    """One JSONL line as a row, or as an error row saying why it is not one."""
    line = raw[:-1] if raw.endswith(b"\n") else raw
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return _error_row(shard, row_number, "invalid_utf8", f"{where} is not valid UTF-8 ({exc.reason} at byte "
                          f"{exc.start}); re-encode the file as UTF-8")
    except json.JSONDecodeError as exc:
        found = "an empty line" if not line.strip() else f"invalid JSON ({exc.msg} at column {exc.colno})"
        return _error_row(shard, row_number, "invalid_json", f"{where}: expected one JSON object per line, found "
                          f"{found}")
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        return _error_row(shard, row_number, "invalid_json", f"{where}: expected one JSON object per line, found "
                          f"JSON Python cannot read ({exc})")
    if not isinstance(record, dict):
        return _error_row(shard, row_number, "invalid_json", f"{where}: expected a JSON object, found "
                          f"{type(record).__name__}")
    overrides: dict[str, Any] = {}
    if config.format == "openai-batch":
        try:
            columns, overrides = parse_request(record)
            record = {**record, **columns}  # the line's own keys stay carriable
        except RowError as exc:
            error = _error_row(shard, row_number, exc.error_type, f"{where}: {exc}")
            if isinstance(record.get("custom_id"), str):
                error["id"] = record["custom_id"]
            return error
    row = _data_row(shard, row_number, record, config)
    row["_request"] = overrides or None
    return row


def _read_csv(shard: Shard, config: ReadConfig) -> tuple[list[dict[str, Any]], None]:
    header_bytes = storage.read_bytes(shard.file, config.storage_options, 0, shard.header_end)
    header = next(csv.reader(io.StringIO(header_bytes.decode("utf-8", "replace"), newline="")))
    rows = []
    for offset, raw in enumerate(_records(shard, config)):
        row_number = shard.row_start + offset
        where = f"{_shown(shard)} record {row_number + 1} (after the header)"
        rows.append(_too_large(shard, row_number, where, raw) if isinstance(raw, int) else
                    _csv_row(shard, row_number, where, raw, header, config))
    _check_count(shard, len(rows), "CSV records")
    return rows, None


def _csv_row(shard: Shard, row_number: int, where: str, raw: bytes, header: list[str],
             config: ReadConfig) -> dict[str, Any]:
    """One CSV record as a row, or as an error row saying why it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _error_row(shard, row_number, "invalid_utf8", f"{where} is not valid UTF-8 ({exc.reason} at byte "
                          f"{exc.start} of the record); re-encode the file as UTF-8")
    try:
        records = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        return _error_row(shard, row_number, "invalid_csv", f"{where}: {exc}")
    if len(records) != 1:
        return _error_row(shard, row_number, "invalid_csv", f"{where}: expected one record, found {len(records)}: a "
                          "carriage return outside quotes ends a record; quote the field or end lines with \\n")
    if len(records[0]) != len(header):
        return _error_row(shard, row_number, "invalid_csv", f"{where}: expected {len(header)} fields as in the "
                          f"header, found {len(records[0])}")
    return _data_row(shard, row_number, dict(zip(header, records[0])), config)


def _read_parquet(shard: Shard, config: ReadConfig) -> tuple[list[dict[str, Any]], pa.Table]:
    """The shard's rows, with the carried columns apart as Arrow columns: a round trip through Python would change
    their types (nanoseconds, decimals)."""
    wanted = list(dict.fromkeys(c for c in (config.id_column, *config.prompt_columns, *config.carry_columns) if c))
    table = storage.read_file(shard.file, _parsing(partial(_parquet_rows, shard=shard, columns=wanted)),
                              config.storage_options)
    records = table.select([c for c in (config.id_column, *config.prompt_columns) if c]).to_pylist()
    return [_data_row(shard, shard.row_start + i, record, config) for i, record in enumerate(records)], \
        table.select(config.carry_columns)


def _parquet_rows(handle: Any, shard: Shard, columns: list[str]) -> pa.Table:
    """The shard's rows, reading only the row groups that overlap it."""
    parquet = pq.ParquetFile(handle)
    groups, first_row, seen = [], 0, 0
    for index in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(index).num_rows
        if seen + size > shard.row_start and seen < shard.row_start + shard.row_count:
            first_row = seen if not groups else first_row
            groups.append(index)
        seen += size
    table = parquet.read_row_groups(groups, columns=columns)
    return table.slice(shard.row_start - first_row, shard.row_count)


_READERS = {"jsonl": _read_jsonl, "openai-batch": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}


def _position_id(shard: Shard, row_number: int) -> str:
    return f"{shard.relpath}:{row_number}"


def _error_row(shard: Shard, row_number: int, error_type: str, message: str) -> dict[str, Any]:
    return {"id": _position_id(shard, row_number), "source_row": row_number, "_prompt": None,
            "_error_type": error_type, "_error": message}


def _data_row(shard: Shard, row_number: int, record: dict[str, Any], config: ReadConfig) -> dict[str, Any]:
    row: dict[str, Any] = {"source_row": row_number, "_error_type": None, "_error": None}
    row["_prompt"] = json.dumps({c: record.get(c, _MISSING) for c in config.prompt_columns}, default=_describe_value)
    for column in config.carry_columns:
        row[column] = record.get(column)
    if config.id_column is None:
        row["id"] = _position_id(shard, row_number)
    elif record.get(config.id_column) is None:
        row.update(_error_row(shard, row_number, "missing_id",
                              f"{_shown(shard)} row {row_number}: id column {config.id_column!r} is missing or null"))
    else:
        row["id"] = str(record[config.id_column])
    return row


class _Missing:
    pass


_MISSING = _Missing()


def _describe_value(value: Any) -> dict[str, str]:
    """JSON stand-in for a value JSON cannot hold: bytes (an image column's) as base64, else its type, so the prompt
    stage can name it."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    return {"$missing": "column"} if value is _MISSING else {"$type": type(value).__name__}


def _typed_request(overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    """A request's overrides in REQUEST_TYPE's shape."""
    if overrides is None:
        return None
    response_format = overrides.get("response_format")
    return {**overrides, "response_format": None if response_format is None else response_format.to_json()}


def _to_block(shard: Shard, rows: list[dict[str, Any]], config: ReadConfig, carried: pa.Table | None) -> pa.Table:
    """The rows as a block; carried columns of the output's types (from `carried`, else from the rows), where a value
    that does not fit its type makes its row an `invalid_field` error row."""
    count = len(rows)
    typed: dict[str, pa.Array] = {}
    for field in config.carried:
        values = carried.column(field.name) if carried is not None else [r.get(field.name) for r in rows]
        typed[field.name], misfits = typed_column(values, field.type)
        for position, found in misfits.items():
            row = rows[position]
            if row["_error_type"] is None:
                row.update(_prompt=None, _error_type="invalid_field",
                           _error=f"{_shown(shard)} row {row['source_row']}: carried column {field.name!r} expected "
                                  f"{field.type} (its type in the job's output, fixed when the job was planned), "
                                  f"found {found}; fix the value, or declare the column's type in input.schema")
    columns: dict[str, pa.Array] = {
        "_shard": pa.array([shard.shard_id] * count, pa.string()),
        "_shard_rows": pa.array([shard.row_count] * count, pa.int64()),
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "source_file": pa.array([storage.display_url(shard.file)] * count, pa.string()),
        "source_row": pa.array([r["source_row"] for r in rows], pa.int64()),
        "_prompt": pa.array([r["_prompt"] for r in rows], pa.string()),
        "_error_type": pa.array([r["_error_type"] for r in rows], pa.string()),
        "_error": pa.array([r["_error"] for r in rows], pa.string()),
        "_request": pa.array([_typed_request(r.get("_request")) for r in rows], REQUEST_TYPE),
    }
    return pa.table({**columns, **typed})


_MISFIT = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError)


def typed_column(values: list[Any] | pa.ChunkedArray, target: pa.DataType) -> tuple[pa.Array, dict[int, str]]:
    """`values` as an array of `target`, null where a value does not fit it, and what was found at those positions.

    A value fits when converting it loses nothing: a number of another width or kind that holds it exactly, text that
    parses as the type (an empty string is null), a timestamp of another unit. A string column takes other JSON
    values as their JSON text."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    elif _is_text(target):
        values = [v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values]
    try:
        return _converted(values, target), {}
    except _MISFIT:
        pass
    pieces, misfits = [], {}
    for position in range(len(values)):
        one = values[position : position + 1]
        try:
            pieces.append(_converted(one, target))
        except _MISFIT:
            pieces.append(pa.nulls(1, target))
            misfits[position] = _described(one)
    return pa.concat_arrays(pieces), misfits


def _converted(values: list[Any] | pa.Array, target: pa.DataType) -> pa.Array:
    array = values if isinstance(values, pa.Array) else pa.array(values)
    found = array.type
    if _is_text(found) and not _is_text(target):
        array = pc.if_else(pc.equal(array, ""), pa.scalar(None, found), array)
    elif not (found == target or pa.types.is_null(found) or _is_text(target) or any(
            kind(found) and kind(target) for kind in (_is_number, pa.types.is_temporal, pa.types.is_list))):
        raise pa.ArrowTypeError(f"{found} is not {target}")
    return array.cast(target)  # a safe cast: it refuses to truncate or overflow


def _is_text(arrow: pa.DataType) -> bool:
    return pa.types.is_string(arrow) or pa.types.is_large_string(arrow)


def _is_number(arrow: pa.DataType) -> bool:
    return pa.types.is_integer(arrow) or pa.types.is_floating(arrow) or pa.types.is_decimal(arrow)


def _described(one: list[Any] | pa.Array) -> str:
    """A value that did not fit, as a message shows it: its type and the start of its text."""
    if isinstance(one, pa.Array):
        return f"{one.type} {str(one[0].as_py())[:60]!r}"
    return f"{type(one[0]).__name__} {json.dumps(one[0], default=str)[:60]}"
