"""Offline batch transcription with Ray Data: a real corpus, local and on S3, resumable."""

import csv
import os
import signal
import subprocess
import sys

import pytest

from conftest import S3_BUCKET, wait_until
from media import encode
from pipeline.audio.decode import decode
from hark.batch import discover, read_results, run_batch
from pipeline.core.settings import Settings

pytestmark = pytest.mark.serve  # shares the session's Ray instance with the Serve app

# Three clips in five encodings (and three broken files): enough for a run to be interrupted
# after its first part file and resumed, small enough for CI.
CLIPS = ["beckett", "fox", "meeting"]
ENCODINGS = ["wav", "mp3", "flac", "ogg-opus", "m4a-aac"]
CORRUPT = {"corrupt.mp3": b"ID3\x04\x00\x00\x00\x00\x00\x00not an mp3", "empty.wav": b"", "readme.txt": b"hello"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, clips):
    root = tmp_path_factory.mktemp("corpus")
    for name in CLIPS:
        samples = decode(clips[name].path, max_duration_s=600).samples
        for enc in ENCODINGS:
            sub = root / enc
            sub.mkdir(exist_ok=True)
            (sub / f"{name}.{enc.split('-')[0]}").write_bytes(encode(samples, enc))
    for name, data in CORRUPT.items():
        (root / name).write_bytes(data)
    return root


def by_uri(rows):
    out = {}
    for row in rows:
        assert row["uri"] not in out, f"duplicate row for {row['uri']}"
        out[row["uri"]] = row
    return out


def test_local_corpus_resumes_after_an_interrupted_run(serve_app, corpus, tmp_path, clips, api):
    items = discover(str(corpus))
    assert len(items) == len(CLIPS) * len(ENCODINGS) + len(CORRUPT) == 18
    out = tmp_path / "out"
    # A run interrupted after its first part file: the CLI in its own process (a driver of the
    # session's Ray cluster, so it does not start a Ray of its own), killed.
    import ray

    env = {**os.environ, "HARK_LICENSE_KEYS": "x"}
    proc = subprocess.Popen([sys.executable, "-m", "hark.cli", "batch", str(corpus), str(out), "--max-actors", "1",
                             "--address", ray.get_runtime_context().gcs_address],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: out.exists() and any(p.name.startswith("part-") for p in out.iterdir()), 300, what="a first part file")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    first = read_results(str(out))
    assert 0 < len(first) < len(items)
    summary = run_batch(str(corpus), str(out), Settings(), progress=False)
    assert summary.skipped == len(first) and summary.done + summary.failed == len(items) - len(first)
    rows = by_uri(read_results(str(out)))
    assert set(rows) == {it.uri for it in items}
    failed = {os.path.basename(u): r["error"]["code"] for u, r in rows.items() if r["error"]}
    assert failed == {"corrupt.mp3": "INVALID_AUDIO", "empty.wav": "INVALID_AUDIO", "readme.txt": "UNSUPPORTED_FORMAT"}
    # The same file through the API gives the same result.
    for name in ("beckett", "fox"):
        uri = str(corpus / "flac" / f"{name}.flac")
        api_body = api.post("/v1/listen", files={"audio": open(uri, "rb").read()}).json()
        row = rows[uri]
        assert {k: row[k] for k in ("text", "confidence", "duration", "language")} == {
            k: api_body[k] for k in ("text", "confidence", "duration", "language")
        }
        assert row["words"] is None and row["speakers"] is None
    # Nothing left to do: a third run skips everything.
    again = run_batch(str(corpus), str(out), Settings(), progress=False)
    assert again.skipped == len(items) and again.done == again.failed == 0


def test_manifest_with_per_item_options_and_parquet(serve_app, corpus, tmp_path, clips):
    manifest = tmp_path / "list.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["uri", "timestamps", "punctuate"])
        w.writeheader()
        w.writerow({"uri": str(corpus / "wav" / "beckett.wav"), "timestamps": "true", "punctuate": ""})
        w.writerow({"uri": str(corpus / "mp3" / "fox.mp3"), "timestamps": "", "punctuate": "false"})
    out = tmp_path / "pq"
    summary = run_batch(str(manifest), str(out), Settings(), fmt="parquet", progress=False)
    assert (summary.done, summary.failed) == (2, 0)
    assert all(p.suffix == ".parquet" for p in out.iterdir())
    rows = by_uri(read_results(str(out)))
    beckett = rows[str(corpus / "wav" / "beckett.wav")]
    assert beckett["text"].startswith("Ever tried.") and beckett["words"][0]["word"] == "Ever"
    fox = rows[str(corpus / "mp3" / "fox.mp3")]
    assert fox["words"] is None and fox["text"] == fox["text"].lower() and "." not in fox["text"]


def test_s3_prefix_in_and_out(serve_app, s3_server, corpus):
    for name in ("beckett.wav", "fox.wav", "meeting.wav"):
        s3_server.put_object(Bucket=S3_BUCKET, Key=f"corpus/{name}", Body=(corpus / "wav" / name).read_bytes())
    s3_server.put_object(Bucket=S3_BUCKET, Key="corpus/bad.wav", Body=b"RIFF....WAVEjunk")
    summary = run_batch(f"s3://{S3_BUCKET}/corpus", f"s3://{S3_BUCKET}/results", Settings(), {"language": "en"}, progress=False)
    assert (summary.items, summary.done, summary.failed) == (4, 3, 1)
    rows = by_uri(read_results(f"s3://{S3_BUCKET}/results"))
    assert rows[f"s3://{S3_BUCKET}/corpus/beckett.wav"]["text"].startswith("Ever tried")
    assert rows[f"s3://{S3_BUCKET}/corpus/bad.wav"]["error"]["code"] == "INVALID_AUDIO"


def test_bad_manifest_lines_become_error_items(tmp_path):
    """Regression (bad-input corpus): one line that was not JSON, not an object or without a uri
    stopped the whole manifest (an exception before anything ran); each is now an item of its own
    that fails with INVALID_PARAMETER, named by its place in the manifest."""
    from hark.batch import read_manifest

    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"uri": "a.wav", "language": "en"}\n{"uri": "b.wav"\n\n[1, 2]\n{"language": "en"}\n{"uri": 42}\n{"uri": "c.wav"}\n')
    items = read_manifest(str(manifest))
    assert [(it.uri, it.options, (it.error or {}).get("code"), (it.error or {}).get("param")) for it in items] == [
        ("a.wav", {"language": "en"}, None, None),
        (f"{manifest}:2", {}, "INVALID_PARAMETER", "manifest"),
        (f"{manifest}:4", {}, "INVALID_PARAMETER", "manifest"),
        (f"{manifest}:5", {}, "INVALID_PARAMETER", "uri"),
        (f"{manifest}:6", {}, "INVALID_PARAMETER", "uri"),
        ("c.wav", {}, None, None),
    ]
    table = tmp_path / "list.csv"
    table.write_text("uri,language\na.wav,en\n,fr\nc.wav,\n")
    items = read_manifest(str(table))
    assert [(it.uri, (it.error or {}).get("code")) for it in items] == [("a.wav", None), (f"{table}:3", "INVALID_PARAMETER"), ("c.wav", None)]


def test_subtitle_format_writes_one_file_per_input(serve_app, corpus, tmp_path):
    import webvtt

    out = tmp_path / "subs"
    pattern = str(corpus / "wav" / "[bf]*.wav")  # beckett and fox
    summary = run_batch(pattern, str(out), Settings(), fmt="vtt", progress=False)
    assert (summary.done, summary.failed) == (2, 0)
    assert sorted(p.name for p in out.glob("*.vtt")) == ["beckett.wav.vtt", "fox.wav.vtt"]
    rows = by_uri(read_results(str(out)))  # the JSONL rows are kept: they hold errors and resume runs
    for name in ("beckett", "fox"):
        captions = webvtt.WebVTT.from_string((out / f"{name}.wav.vtt").read_text(), strict=True)
        row = rows[str(corpus / "wav" / f"{name}.wav")]
        assert " ".join(c.text.replace("\n", " ") for c in captions) == row["text"]
        assert captions[-1].end_in_seconds <= row["duration"]
    assert len(webvtt.WebVTT.from_string((out / "beckett.wav.vtt").read_text())) >= 3
    again = run_batch(pattern, str(out), Settings(), fmt="vtt", progress=False)
    assert again.skipped == 2 and again.done == 0
