"""``hark``: small command-line tools around the pipeline (no server needed)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.core.settings import Settings


def _models(args: argparse.Namespace) -> int:
    from pipeline.asr.models import BUNDLED, resolve_model

    settings = Settings()
    if args.name == "convert":
        return _convert(args.args, settings)
    if args.args:
        print("hark models: one model name, or: hark models convert SOURCE DEST", file=sys.stderr)
        return 2
    if args.name:
        print(resolve_model(args.name, settings.asr.resolved_model_cache_dir))
    else:
        for name, model in BUNDLED.items():
            kind = "multilingual" if model.multilingual else "English-only"
            print(f"{name}\t{kind}\tpackages: {', '.join(model.distributions)}")
    return 0


def _convert(args: list[str], settings: Settings) -> int:
    """CTranslate2 Whisper (a directory or a bundled name) → a transformers directory, for the
    transformers and vLLM engines (``HARK_ASR__MODEL=DEST``)."""
    from pathlib import Path

    from pipeline.asr.convert import convert_ct2_to_transformers
    from pipeline.asr.models import resolve_model

    if len(args) != 2:
        print("usage: hark models convert SOURCE DEST  (SOURCE: a CTranslate2 directory or a bundled name)", file=sys.stderr)
        return 2
    try:
        source = resolve_model(args[0], settings.asr.resolved_model_cache_dir)
    except ValueError as exc:  # an unknown name
        source, reason = "", f" ({exc})"
    else:
        reason = ""
    if not source or not Path(source).is_dir():
        print(f"hark models convert: {args[0]!r} is neither a directory nor a bundled model{reason}", file=sys.stderr)
        return 2
    print(convert_ct2_to_transformers(Path(source), Path(args[1])))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from pipeline.service.auth import key_id

    print(key_id(args.key))
    return 0


def _transcribe(args: argparse.Namespace) -> int:
    import asyncio

    from pipeline.asr.factory import build_engine
    from pipeline.audio.loader import AudioLoader
    from pipeline.transcription.flow import local_flow
    from pipeline.transcription.schemas import ListenParams

    settings = Settings()
    params = ListenParams.parse({"language": args.language, "timestamps": args.timestamps, "punctuate": not args.no_punctuate})
    flow = local_flow(build_engine(settings.asr), settings.asr.engine, settings.diarization)
    loader = AudioLoader(settings, any_s3_object=True)  # the operator's own command

    async def run() -> dict:
        await flow.check(params)
        # Off the event loop: fetching and decoding block (and a fetch runs an event loop of its own).
        load = loader.from_url if "://" in args.source else loader.from_path
        audio = await asyncio.to_thread(load, args.source)
        return (await flow.run(audio, params, request_id="local")).body

    json.dump(asyncio.run(run()), sys.stdout, ensure_ascii=False, indent=2)
    print()
    return 0


def _batch(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from hark.batch import run_batch

    settings = Settings()
    defaults = {"punctuate": not args.no_punctuate, "timestamps": args.timestamps, "diarize": args.diarize}
    if args.language:
        defaults["language"] = args.language
    if args.num_speakers:
        defaults["num_speakers"] = args.num_speakers
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    summary = run_batch(
        args.input, args.output, settings, defaults, fmt=args.format, retry_failed=args.retry_failed,
        max_actors=args.max_actors, num_gpus_per_actor=args.gpus_per_actor,
    )
    print(summary)
    return 0


def _stream(args: argparse.Namespace) -> int:
    import asyncio

    from pipeline.tools.stream_client import play

    query = f"?language={args.language}" if args.language else ""
    return asyncio.run(play(f"{args.url.rstrip('/')}/v1/listen/stream{query}", args.key, args.file, args.speed))


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from deployments.launch import serve_config

    return serve_config(Path(args.config), address=args.address, ready_timeout_s=args.ready_timeout_s,
                        dashboard=args.dashboard)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hark", description="Hark speech-to-text tools")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser(
        "serve",
        help="run the service from a Serve config (default serve_config.yaml); exits non-zero, with the "
        "cause, when the app cannot be built or deployed",
    )
    srv.add_argument("config", nargs="?", default="serve_config.yaml")
    srv.add_argument("--address", help="Ray cluster to deploy to (default: RAY_ADDRESS, else a new local Ray)")
    srv.add_argument("--ready-timeout-s", type=float, default=900.0,
                     help="give up (exit non-zero) when not running after this long")
    srv.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True,
                     help="start the Ray dashboard with a new local Ray")
    srv.set_defaults(func=_serve)
    models = sub.add_parser(
        "models",
        help="list bundled models; prepare one and print its path; "
        "or `models convert SOURCE DEST`: CTranslate2 → transformers (for the transformers/vLLM engines)",
    )
    models.add_argument("name", nargs="?")
    models.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    models.set_defaults(func=_models)
    keys = sub.add_parser("keys", help="key utilities")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    key_id_cmd = keys_sub.add_parser("id", help="print the id of a key (for HARK_LIMITS__PER_KEY, logs)")
    key_id_cmd.add_argument("key")
    key_id_cmd.set_defaults(func=_keys)
    tr = sub.add_parser("transcribe", help="transcribe a file or URL in this process")
    tr.add_argument("source")
    tr.add_argument("--language")
    tr.add_argument("--timestamps", action="store_true")
    tr.add_argument("--no-punctuate", action="store_true")
    tr.set_defaults(func=_transcribe)
    batch = sub.add_parser("batch", help="transcribe a corpus with Ray Data")
    batch.add_argument("input", help="directory, glob, s3:// prefix, or manifest (.csv / .jsonl with a uri column)")
    batch.add_argument("output", help="directory (local or s3://) for part files of result rows")
    batch.add_argument("--format", choices=["jsonl", "parquet", "srt", "vtt"], default="jsonl",
                       help="part files of result rows; srt/vtt: also one subtitle file per input")
    batch.add_argument("--language")
    batch.add_argument("--timestamps", action="store_true")
    batch.add_argument("--no-punctuate", action="store_true")
    batch.add_argument("--diarize", action="store_true")
    batch.add_argument("--num-speakers", type=int)
    batch.add_argument("--retry-failed", action="store_true", help="run items whose earlier row is an error again")
    batch.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    batch.add_argument("--max-actors", type=int, help="most ASR actors (default: cluster CPUs / 2, or GPUs)")
    batch.add_argument("--gpus-per-actor", type=float, default=0.0)
    batch.set_defaults(func=_batch)
    st = sub.add_parser("stream", help="play a file into a running server's stream endpoint, print results")
    st.add_argument("file")
    st.add_argument("--url", default="ws://127.0.0.1:7100")
    st.add_argument("--key", default=os.environ.get("HARK_KEY", ""), help="license key (or HARK_KEY)")
    st.add_argument("--language")
    st.add_argument("--speed", type=float, default=1.0, help="1 = real time")
    st.set_defaults(func=_stream)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not trace back
        from pipeline.core.errors import HarkError

        if isinstance(exc, HarkError):
            print(json.dumps(exc.to_body()), file=sys.stderr)
            return 2
        if isinstance(exc, OSError):
            print(f"hark: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
