"""Offline batch transcription of a corpus with Ray Data.

Plan: the list of items is a small dataset; reading and decoding run as parallel Ray tasks
(``map``); recognition runs in a pool of actors (``map_batches`` with a concurrency range), each
loading the model once; results stream back to the driver, which appends them to part files in
the output directory (local or s3) and so always knows what is done. A re-run skips the URIs the
output already holds. Adding cores or nodes adds decode tasks and ASR actors: throughput grows
with the cluster while each actor keeps its threads busy.
"""

from __future__ import annotations

import asyncio
import csv
import glob
import io
import json
import math
import os
import posixpath
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import HarkError, InvalidParameter
from pipeline.core.settings import Settings
from pipeline.core.types import Audio
from pipeline.transcription.schemas import ListenParams

MANIFEST_SUFFIXES = (".csv", ".jsonl")
# The API's result fields, plus the source, the error, and the seconds the ASR actor spent.
ROW_FIELDS = ("uri", "request_id", "text", "confidence", "duration", "language", "words", "speakers",
              "utterances", "paragraphs", "error", "processing_s")
# Fields that hold lists or objects: JSON text in Ray Data's columns and in Parquet.
JSON_FIELDS = ("words", "speakers", "utterances", "paragraphs", "error")


@dataclass(frozen=True)
class BatchItem:
    uri: str
    options: dict[str, Any] = field(default_factory=dict)  # API option names: language, diarize, ...
    # A manifest line that could not be read: its row is this error (``uri`` is "manifest:line").
    error: dict[str, Any] | None = None


@dataclass
class BatchSummary:
    items: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0

    @property
    def audio_hours_per_hour(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s else 0.0

    def __str__(self) -> str:
        return (
            f"{self.items} items: {self.done} transcribed, {self.failed} failed, {self.skipped} already done; "
            f"{self.audio_s / 3600:.3f} audio hours in {self.wall_s:.1f} s "
            f"({self.audio_hours_per_hour:.1f} audio hours per hour)"
        )


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


# ---- what to transcribe --------------------------------------------------------------------------

def discover(source: str) -> list[BatchItem]:
    """Items from a directory, a glob, an s3:// prefix, a manifest (.csv/.jsonl) or one file."""
    if source.lower().endswith(MANIFEST_SUFFIXES):
        return read_manifest(source)
    if source.startswith("s3://"):
        fs, root = _fs(source)
        if fs.isfile(root):
            return [BatchItem(source)]
        return [BatchItem(f"s3://{p}") for p in sorted(fs.find(root)) if not Path(p).name.startswith(".")]
    if any(ch in source for ch in "*?["):
        return [BatchItem(p) for p in sorted(glob.glob(source, recursive=True)) if os.path.isfile(p)]
    path = Path(source)
    if path.is_dir():
        return [
            BatchItem(str(p)) for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
    if path.is_file():
        return [BatchItem(str(path))]
    raise FileNotFoundError(f"No such input: {source}")


def read_manifest(uri: str) -> list[BatchItem]:
    """CSV with a ``uri`` column, or JSONL objects with ``uri``; other columns are options.

    A line that cannot be read (not JSON, not an object, no uri) does not stop the others: it
    becomes an item that fails with ``INVALID_PARAMETER``, named ``<manifest>:<line>``.
    """
    fs, path = _fs(uri)
    with fs.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    rows: list[tuple[int, Any]] = []  # (line number, parsed row or the error that line gets)
    if uri.lower().endswith(".jsonl"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except (json.JSONDecodeError, RecursionError) as exc:
                rows.append((number, InvalidParameter(f"Line {number} is not JSON: {exc}", param="manifest")))
    else:
        reader = csv.DictReader(io.StringIO(text))
        rows = [(reader.line_num, row) for row in reader]
    items = []
    for number, row in rows:
        if isinstance(row, dict) and isinstance(row.get("uri"), str) and row["uri"]:
            options = {k: v for k, v in row.items() if k != "uri" and v not in (None, "")}
            items.append(BatchItem(row["uri"], options))
            continue
        if isinstance(row, HarkError):
            error = row
        elif not isinstance(row, dict):
            error = InvalidParameter(f"Line {number} is not a JSON object", param="manifest")
        else:
            error = InvalidParameter(f"Line {number} has no 'uri' string", param="uri")
        items.append(BatchItem(f"{uri}:{number}", error=error.to_body()))
    return items


# ---- the Ray Data stages ---------------------------------------------------------------------

def decode_row(row: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Fetch and decode one item. A failure becomes the row's error, never an exception."""
    from pipeline.audio.loader import AudioLoader

    # "" rather than None: a column of nulls would not keep its type through Ray Data.
    out = {"uri": row["uri"], "options": row["options"], "pcm": b"", "error": row.get("error", "")}
    if out["error"]:  # a manifest line that could not be read: nothing to fetch
        return out
    try:
        # The operator's own job; 16-bit PCM, as the rows carry it.
        loader = AudioLoader(settings, any_s3_object=True, pcm16=True)
        uri = row["uri"]
        audio = loader.from_url(uri) if "://" in uri else loader.from_path(uri)
        out["pcm"] = audio.samples.tobytes()  # 16-bit PCM bytes: one binary column for any length
    except HarkError as exc:
        out["error"] = json.dumps(exc.to_body())
    except OSError as exc:
        out["error"] = json.dumps({"error": str(exc), "code": "FETCH_FAILED"})
    return out


class TranscribeActor:
    """One per ASR worker: loads the engine once (the diarizer on first use) and runs each row
    through the same ``TranscriptionFlow`` as the service, on an event loop of its own."""

    def __init__(self, settings: Settings) -> None:
        from pipeline.asr.factory import build_engine
        from pipeline.transcription.flow import local_flow

        from deployments.asr import assigned_gpu_share

        # --gpus-per-actor 0.5: two engines on one card, each sized to its half.
        engine = build_engine(settings.asr, gpu_share=assigned_gpu_share())
        self._flow = local_flow(engine, settings.asr.engine, settings.diarization)
        self._loop = asyncio.new_event_loop()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [self.transcribe_row(uri, opts, pcm, err)
                for uri, opts, pcm, err in zip(batch["uri"], batch["options"], batch["pcm"], batch["error"])]
        return {name: [json.dumps(r[name]) if name in JSON_FIELDS else r[name] for r in rows]
                for name in ROW_FIELDS}

    def transcribe_row(self, uri: str, options_json: str, pcm: bytes, error: str | None) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
        row["uri"] = uri
        if error:
            row["error"] = json.loads(error)
            return row
        started = time.perf_counter()
        try:
            params = ListenParams.parse(json.loads(options_json))
            audio = Audio(np.frombuffer(pcm, dtype=np.int16))
            row.update(self._loop.run_until_complete(self._transcribe(audio, params)))
        except HarkError as exc:
            row["error"] = exc.to_body()
        row["processing_s"] = round(time.perf_counter() - started, 3)
        return row

    async def _transcribe(self, audio: Audio, params: ListenParams) -> dict[str, Any]:
        await self._flow.check(params)
        return (await self._flow.run(audio, params, request_id=f"req_{uuid.uuid4().hex}")).body


def transcribe_dataset(items: Iterable[BatchItem], settings: Settings, defaults: dict[str, Any] | None = None,
                       *, max_actors: int | None = None, num_gpus_per_actor: float = 0.0, batch_size: int = 4):
    """A Ray Dataset of result rows (``ROW_FIELDS``; words, speakers and error as JSON text).

    ``defaults`` are API options for every item; an item's own options win.
    """
    import ray

    defaults = defaults or {}
    records = [{"uri": it.uri, "options": json.dumps({**defaults, **it.options}), "error": json.dumps(it.error) if it.error else ""}
               for it in items]
    if max_actors is None:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        max_actors = max(1, cpus // 2) if not num_gpus_per_actor else max(1, int(ray.cluster_resources().get("GPU", 1) / num_gpus_per_actor))
    ds = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 64)))
    ds = ds.map(decode_row, fn_kwargs={"settings": settings}, num_cpus=0.25)
    return ds.map_batches(
        TranscribeActor,
        fn_constructor_kwargs={"settings": settings},
        batch_size=batch_size,
        concurrency=(1, max_actors),
        num_cpus=0 if num_gpus_per_actor else 1,
        num_gpus=num_gpus_per_actor,
        batch_format="numpy",
    )


# ---- output and resume -----------------------------------------------------------------------

def _decode_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.loads(v) if k in JSON_FIELDS and isinstance(v, str) else v) for k, v in row.items()}


def read_results(output: str) -> list[dict[str, Any]]:
    """Every row of every part file under ``output`` (JSONL or Parquet)."""
    fs, root = _fs(output)
    if not fs.exists(root):
        return []
    rows: list[dict[str, Any]] = []
    for path in sorted(fs.find(root)):
        name = path.rsplit("/", 1)[-1]
        if not name.startswith("part-"):
            continue
        if name.endswith(".jsonl"):
            with fs.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a torn last line of an interrupted local write
        elif name.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as f:
                rows += [_decode_row(r) for r in pq.read_table(f).to_pylist()]
    return rows


class PartWriter:
    """Appends result rows as small part files; each part appears whole (temp + rename, or one
    S3 PUT), so an interrupted run loses at most the rows not yet flushed."""

    def __init__(self, output: str, fmt: str, flush_rows: int = 16, flush_s: float = 10.0) -> None:
        if fmt not in ("jsonl", "parquet"):
            raise ValueError(f"Unknown output format: {fmt}")
        self.fs, self.root = _fs(output)
        self.fs.makedirs(self.root, exist_ok=True)
        self.fmt, self.flush_rows, self.flush_s = fmt, flush_rows, flush_s
        self._last_flush = time.monotonic()
        self.run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.pending: list[dict[str, Any]] = []
        self.parts = 0

    def add(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.flush_rows or time.monotonic() - self._last_flush > self.flush_s:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{self.run}-{self.parts:05d}.{self.fmt}"
        if self.fmt == "jsonl":
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.pending).encode()
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist([
                {k: (json.dumps(v) if k in JSON_FIELDS and v is not None else v) for k, v in r.items()}
                for r in self.pending
            ])
            buf = io.BytesIO()
            pq.write_table(table, buf)
            data = buf.getvalue()
        final = f"{self.root}/{name}"
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(self.fs, LocalFileSystem):
            tmp = f"{self.root}/.{name}.tmp"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, final)
        else:
            with self.fs.open(final, "wb") as f:
                f.write(data)
        self.parts += 1
        self.pending = []
        self._last_flush = time.monotonic()


class SubtitleWriter:
    """One subtitle file per transcribed input (``--format srt|vtt``), named by the input's path
    below the inputs' common folder plus the format's suffix (``wav/call.wav.srt``), so that no two
    inputs share a file. Written by ``pipeline.transcription.subtitles``, the API's renderer."""

    def __init__(self, output: str, fmt: str, uris: Sequence[str]) -> None:
        self.fs, self.root = _fs(output)
        self.fmt = fmt
        paths = [_without_scheme(u) for u in uris]
        self._common = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths) if paths else ""

    def name(self, uri: str) -> str:
        path = _without_scheme(uri)
        rel = posixpath.relpath(path, self._common) if self._common else path.lstrip("/")
        return f"{rel}.{self.fmt}"

    def write(self, row: dict[str, Any]) -> None:
        from pipeline.transcription.subtitles import render_body

        target = f"{self.root}/{self.name(row['uri'])}"
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        with self.fs.open(target, "w", encoding="utf-8") as f:
            f.write(render_body(row, self.fmt))


def _without_scheme(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else os.path.abspath(uri).replace(os.sep, "/")


SUBTITLE_FORMATS = ("srt", "vtt")


def run_batch(source: str, output: str, settings: Settings, defaults: dict[str, Any] | None = None, *,
              fmt: str = "jsonl", retry_failed: bool = False, max_actors: int | None = None,
              num_gpus_per_actor: float = 0.0, progress: bool = True, limit: int | None = None) -> BatchSummary:
    """Transcribe everything ``source`` names into ``output``; skips what ``output`` already holds.

    ``fmt`` srt or vtt: also one subtitle file per transcribed input (word times are asked for);
    the rows still go to JSONL part files, which hold the errors and let a re-run resume."""
    started = time.perf_counter()
    items = discover(source)
    subtitle_writer = None
    if fmt in SUBTITLE_FORMATS:
        subtitle_writer = SubtitleWriter(output, fmt, [it.uri for it in items])
        defaults = {**(defaults or {}), "timestamps": True}
        fmt = "jsonl"
    previous = read_results(output)
    done_ok = {r["uri"] for r in previous if not r.get("error")}
    done_any = {r["uri"] for r in previous}
    skip = done_ok if retry_failed else done_any
    todo = [it for it in items if it.uri not in skip]
    if limit is not None:
        todo = todo[:limit]
    summary = BatchSummary(items=len(items), skipped=len(items) - len([it for it in items if it.uri not in skip]))
    if todo:
        writer = PartWriter(output, fmt)
        bar = _progress(len(todo), progress)
        try:
            for row in _rows(transcribe_dataset(todo, settings, defaults, max_actors=max_actors,
                                                num_gpus_per_actor=num_gpus_per_actor)):
                writer.add(row)
                if subtitle_writer is not None and not row.get("error"):
                    subtitle_writer.write(row)
                if row.get("error"):
                    summary.failed += 1
                else:
                    summary.done += 1
                    summary.audio_s += row.get("duration") or 0.0
                bar.update(1)
                bar.set_postfix_str(f"{summary.audio_s / 3600:.3f} audio h, {summary.failed} failed")
        finally:
            writer.flush()
            bar.close()
    summary.wall_s = time.perf_counter() - started
    return summary


def _plain(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    # Ray Data turns a missing number into NaN; the row says null.
    return None if isinstance(value, float) and math.isnan(value) else value


def _rows(ds) -> Iterator[dict[str, Any]]:
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=4):
        for i in range(len(batch["uri"])):
            yield _decode_row({k: _plain(v[i]) for k, v in batch.items()})


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="item", disable=not enabled, desc="transcribing")
