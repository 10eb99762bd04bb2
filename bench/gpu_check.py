"""Check a GPU box in one command: the device, then each installed ASR engine through Hark's own code.

For each engine (``ctranslate2``, ``transformers``, ``vllm``; those whose package is missing are
skipped) and two models:

- ``whisper-base``, the bundled model (offline; converted for transformers and vLLM as Hark does):
  real speech transcribed and its WER checked against a loose bound, and the same speech decoded
  at float16 and float32 (CTranslate2's compute type, transformers' dtype) to show they agree;
- a model of large-v3's shape (``--shape``) with random weights: speed and memory, not text. Its
  decoder may never say end-of-text, so every window is capped at ``RANDOM_TOKENS`` new tokens,
  without temperature fallback.

Each engine is built with ``build_engine`` (load + warm-up decode) and timed on ~``--minutes`` of
speech sent as several requests in one ``transcribe`` call: windows/s, RTFx (audio seconds / wall
seconds), peak GPU memory. Greedy decoding everywhere (vLLM decodes greedily); other engine
settings are Hark's defaults, or ``HARK_ASR__*`` where set (``HARK_ASR__WINDOW_BATCH_SIZE=24``:
the 80 GB profile's batch). Each engine runs in a process of its own, so that its memory figures
are its own and a crash is reported, not fatal. Nothing is downloaded.

Usage, from a checkout (cluster/README.md, "Checking a GPU box"):

    python bench/gpu_check.py --engines ctranslate2,transformers   # the [cuda,transformers] env
    python bench/gpu_check.py --engines vllm                       # the vLLM env
    python bench/gpu_check.py --device cpu --shape tiny            # a CPU smoke run (~2 min on 2 cores)

Exit status: 0 when every engine × model passed, 1 when one failed (the others still ran), 2 when
there is no usable device, no engine to run, or no speech.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Self

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's pipeline, and tests/assets.py

from bench_engines import CLIPS, load_clips

from pipeline.core.settings import AsrSettings
from pipeline.core.types import SAMPLE_RATE, AsrOptions, Audio

# The modules each engine needs: without them it is skipped.
ENGINES = {"ctranslate2": ("ctranslate2", "faster_whisper"), "transformers": ("torch", "transformers"), "vllm": ("vllm",)}
BUNDLED = "whisper-base"
# Whisper's dimensions. large-v3's vocabulary has 51866 tokens (one more language, yue); the random
# model keeps the bundled model's 51865 and its tokenizer, so that Hark's token handling applies.
SHAPES = {
    "large-v3": {"d_model": 1280, "encoder_layers": 32, "decoder_layers": 32, "encoder_attention_heads": 20,
                 "decoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120, "num_mel_bins": 128},
    "large-v3-turbo": {"d_model": 1280, "encoder_layers": 32, "decoder_layers": 4, "encoder_attention_heads": 20,
                       "decoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120,
                       "num_mel_bins": 128},
    "tiny": {"d_model": 384, "encoder_layers": 4, "decoder_layers": 4, "encoder_attention_heads": 6,
             "decoder_attention_heads": 6, "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536, "num_mel_bins": 80},
}
WER_BOUND = 0.35  # whisper-base, greedy, on the default clips: 0.17-0.19 (CPU, int8 and float32)
# New tokens a window at most with random weights: about what 30 s of speech takes (2.5 words/s ×
# 1.3 tokens a word), so that the figure is that of speech, not of 448-token loops.
RANDOM_TOKENS = 100
REQUEST_S = 60.0  # the speed run's audio is cut into requests this long
TIME_LIMIT_S = 600.0
MEMORY_POLL_S = 0.1


@dataclass
class Row:
    """One engine × model: what was measured, and whether it passed."""

    engine: str
    model: str
    load_s: float | None = None  # build_engine: load + warm-up decode
    audio_s: float | None = None  # of the speed run
    windows: int | None = None  # ≤ 30 s windows of the speed run, as the engine cut them
    wall_s: float | None = None  # the speed run's transcribe call
    peak_memory_gb: float | None = None
    memory: str = ""  # where the memory figure comes from, or why there is none
    wer: float | None = None
    agreement: float | None = None  # fp16 vs fp32: 1 − WER between their texts
    agreement_note: str = ""
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


# --- the device ------------------------------------------------------------------------------------
def check_device(device: str) -> bool:
    """Print what the device is, as each library sees it; whether a CUDA device is usable."""
    if device == "cpu":
        print(f"device: cpu ({os.cpu_count()} cores): peak GPU memory and fp16 vs fp32 are not applicable")
        return True
    print("device: cuda")
    seen: list[str] = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total,memory.used", "--format=csv,noheader"],
            check=False, capture_output=True, text=True, timeout=60,
        )
        lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
        for line in lines:
            print(f"  nvidia-smi: {line}")
        if not lines:
            print(f"  nvidia-smi: no GPU listed ({(out.stderr or out.stdout).strip()[:300]})")
    else:
        print("  nvidia-smi: not found")
    usable = False
    if importlib.util.find_spec("torch"):
        import torch

        if torch.cuda.is_available():
            usable = True
            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}): device {i} "
                      f"{torch.cuda.get_device_name(i)}, compute capability {major}.{minor}")
        else:
            built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            print(f"  torch {torch.__version__} ({built}): no CUDA device available")
            seen.append("torch sees none")
    else:
        print("  torch: not installed")
    if importlib.util.find_spec("ctranslate2"):
        import ctranslate2

        count = ctranslate2.get_cuda_device_count()
        types = f": compute types {', '.join(sorted(ctranslate2.get_supported_compute_types('cuda')))}" if count else ""
        print(f"  ctranslate2 {ctranslate2.__version__}: {count} CUDA device(s){types}")
        usable = usable or count > 0
        if not count:
            seen.append("ctranslate2 sees none")
    if not usable:
        print(f"No usable CUDA device ({', '.join(seen) or 'neither torch nor ctranslate2 is installed'}): "
              "check the driver with `nvidia-smi` (cluster/README.md, \"Install on a GPU box\"), "
              "or run with --device cpu")
    return usable


class UsedMemory:
    """The device's memory in use (every process's) at its highest while the block runs, polled
    in a thread: through pynvml where importable (vLLM brings it), else ``nvidia-smi``; neither:
    ``source`` is None and nothing is measured. Reported above what was in use when the block
    started."""

    def __init__(self) -> None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        self._index = int(visible) if visible.isdigit() else 0
        self._read: Callable[[], int] | None = None
        self.source: str | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self._index)
            self._read = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            self.source = "pynvml"
        except Exception:  # noqa: BLE001 - not installed, or no NVML: nvidia-smi instead
            if shutil.which("nvidia-smi"):
                self._read = self._smi
                self.source = "nvidia-smi"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.baseline = self.peak = 0

    def _smi(self) -> int:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(self._index)],
            capture_output=True, text=True, timeout=30, check=True,
        )
        return int(out.stdout.split()[0]) * 2**20  # MiB

    def _poll(self) -> None:
        while not self._stop.wait(MEMORY_POLL_S):
            self.peak = max(self.peak, self._read())

    def __enter__(self) -> Self:
        if self._read is not None:
            self.baseline = self.peak = self._read()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._read is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._read())

    @property
    def above_baseline_gb(self) -> float:
        return (self.peak - self.baseline) / 1e9


# --- speech ------------------------------------------------------------------------------------------
def speech(args: argparse.Namespace) -> list[tuple[str, Audio, str]]:
    """(name, audio, reference text) of the speech to transcribe: ``--audio``/``--text``, else the
    clips of tests/assets.py, which must be on this machine already: nothing is downloaded."""
    if args.audio:
        from pipeline.audio.decode import decode

        return [(Path(args.audio).name, decode(Path(args.audio), max_duration_s=7200), args.text)]
    os.environ["PIP_NO_INDEX"] = "1"  # tests/assets.py fetches missing wheels with pip: not from here
    try:
        return load_clips()
    except Exception as exc:
        raise NoSpeech(
            f"The default speech (tests/assets.py: {', '.join(CLIPS)}; pyannote's and moonshine's "
            f"wheels cached under ~/.cache/hark-test-assets, espeak-ng) is not on this machine "
            f"({type(exc).__name__}: {exc}). Pass --audio FILE --text 'what is said in it', or "
            "fetch it once where there is network: python -c 'import sys; sys.path.insert(0, \"tests\"); "
            "import assets; assets.prepare()'"
        ) from exc


class NoSpeech(RuntimeError):
    pass


def speed_batch(clips: list[tuple[str, Audio, str]], minutes: float) -> list[Audio]:
    """~``minutes`` of the clips' speech (tiled, half a second of silence between clips), cut into
    requests of ``REQUEST_S``. Each request gets its own faint noise (−80 dBFS), so that no two are
    identical: vLLM caches the encoder output of audio it has seen."""
    gap = np.zeros(SAMPLE_RATE // 2, np.float32)
    track = np.concatenate([part for _, audio, _ in clips for part in (audio.samples, gap)])
    tiled = np.resize(track, max(SAMPLE_RATE, int(minutes * 60 * SAMPLE_RATE)))  # repeats the track
    step = int(REQUEST_S * SAMPLE_RATE)
    rng = np.random.default_rng(0)
    batch = []
    for start in range(0, len(tiled), step):
        piece = tiled[start : start + step]
        if batch and len(piece) < SAMPLE_RATE:
            break  # a sliver at the end: left out
        noisy = piece + rng.normal(0.0, 1e-4, len(piece)).astype(np.float32)
        batch.append(Audio(samples=np.clip(noisy, -1.0, 1.0)))
    return batch


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """Word errors over all the texts together / reference words."""
    try:
        from textnorm import (
            corpus_wer as scored,  # tests/textnorm.py: jiwer, light normalisation
        )
    except ImportError:  # no jiwer (the vLLM environment): the same count, by hand
        from pipeline.transcription.render import strip_punctuation

        def words(text: str) -> list[str]:
            return strip_punctuation(text).replace("-", " ").split()

        errors = total = 0
        for ref, hyp in zip(references, hypotheses, strict=True):
            r, h = words(ref), words(hyp)
            row = list(range(len(h) + 1))  # Levenshtein distance over words, one row at a time
            for i, a in enumerate(r, 1):
                diagonal, row[0] = row[0], i
                for j, b in enumerate(h, 1):
                    diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (a != b))
            errors, total = errors + row[-1], total + len(r)
        return errors / max(1, total)
    return float(scored(references, hypotheses))


# --- the random model --------------------------------------------------------------------------------
def random_model(shape: str, work_dir: Path, for_ctranslate2: bool) -> dict:
    """A transformers Whisper directory of ``shape`` with random weights (float16) and the bundled
    model's tokenizer, processor and generation config; with ``for_ctranslate2``, its CTranslate2
    conversion (float16) too. Built once into ``work_dir`` by the first engine's process, reused
    by the others and by later runs (torch and transformers are imported only to build)."""
    from pipeline.asr.convert import resolve_transformers_model
    from pipeline.asr.models import build_atomically
    from pipeline.core.settings import Settings

    base = Path(resolve_transformers_model(BUNDLED, Settings().asr.resolved_model_cache_dir))

    def build(staging: Path) -> None:
        import torch
        from transformers import (
            GenerationConfig,
            WhisperConfig,
            WhisperFeatureExtractor,
            WhisperForConditionalGeneration,
            WhisperProcessor,
            WhisperTokenizerFast,
        )

        config = WhisperConfig.from_pretrained(base, max_source_positions=1500, max_target_positions=448, **SHAPES[shape])
        generation = GenerationConfig.from_pretrained(base)
        # The bundled model's alignment heads do not all exist in other shapes: OpenAI's fallback,
        # every head of the decoder's top half (word timing only; the speed run asks for none).
        layers, heads = config.decoder_layers, config.decoder_attention_heads
        generation.alignment_heads = [[layer, h] for layer in range(layers // 2, layers) for h in range(heads)]
        torch.manual_seed(0)
        # On the CPU, so that no GPU memory of this process is left behind to blur the figures.
        model = WhisperForConditionalGeneration(config).to(torch.float16)
        model.generation_config = generation
        model.save_pretrained(staging)
        features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        WhisperProcessor(feature_extractor=features, tokenizer=WhisperTokenizerFast.from_pretrained(base)).save_pretrained(staging)
        features.save_pretrained(staging)  # vLLM looks for the feature extractor on its own

    def convert(staging: Path) -> None:
        from ctranslate2.converters import TransformersConverter

        converter = TransformersConverter(str(hf_dir), copy_files=["tokenizer.json", "preprocessor_config.json"],
                                          load_as_float16=True)
        converter.convert(str(staging), quantization="float16", force=True)

    started = time.perf_counter()
    hf_dir = build_atomically(work_dir / f"random-{shape}-{base.name}", "config.json", build)
    ct2_dir = build_atomically(hf_dir.with_name(hf_dir.name + "-ct2"), "model.bin", convert) if for_ctranslate2 else None
    parameters = sum(int(np.prod(s)) for s in _safetensors_shapes(hf_dir))
    return {"hf": str(hf_dir), "ct2": str(ct2_dir) if ct2_dir else None,
            "seconds": time.perf_counter() - started, "parameters": parameters}


def _safetensors_shapes(directory: Path) -> list[list[int]]:
    from safetensors import safe_open

    shapes = []
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "np") as f:
            shapes += [f.get_slice(name).get_shape() for name in f.keys()]  # noqa: SIM118 - not a dict
    return shapes


# --- one engine × model, in a process of its own -----------------------------------------------------
def engine_settings(engine: str, model: str, device: str, precision: str | None = None) -> AsrSettings:
    """Hark's settings (``HARK_ASR__*`` where set) for ``engine`` on ``device``: float16 on CUDA
    unless ``precision`` says otherwise, greedy."""
    from pipeline.core.settings import Settings

    values = Settings().asr.model_dump(exclude_unset=True)
    values.update(engine=engine, model=model, device=device, beam_size=1)
    precision = precision or ("float16" if device == "cuda" else None)
    if precision:
        values["compute_type" if engine == "ctranslate2" else "dtype"] = precision
    return AsrSettings(**values)


def windows_of(engine: object, audio: Audio) -> int:
    """The ≤ 30 s windows ``engine`` decodes ``audio`` in (its VAD runs: not timed)."""
    cut = getattr(engine, "cut", None) or engine.spans
    return len(cut(audio))


def batching(engine: object, settings: AsrSettings) -> str:
    """How ``engine`` batches windows, as built."""
    from pipeline.asr.scheduler import step_audio_s

    sizing = getattr(engine, "sizing", None)
    if sizing is not None:  # vLLM's, derived from the GPU share unless HARK_ASR__VLLM_* set them
        return (f"vLLM max_num_seqs {sizing.max_num_seqs}, max_num_batched_tokens {sizing.max_num_batched_tokens}, "
                f"gpu_memory_utilization {sizing.memory_utilization}")
    if hasattr(engine, "cut"):  # CTranslate2: the window scheduler's steps
        return f"window_batch_size {settings.window_batch_size}, ≤ {step_audio_s(settings, engine):g} s of audio a step"
    return f"window_batch_size {settings.window_batch_size}"


def shut_down(engine: object) -> None:
    """vLLM's engine core holds its memory until it is shut down (it runs in a process of its
    own); the other engines free theirs when dropped (then ``collect``)."""
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:
        shutdown()


def collect() -> None:
    """Free the memory of engines no longer referenced before the next one is built."""
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_engine(engine_name: str, args: argparse.Namespace) -> None:
    """Measure ``engine_name`` on each model, printing one JSON line a model as it finishes (and
    one for the random model, built here if no earlier process did). The random model goes first,
    on a device nothing else has used yet: CTranslate2 keeps freed memory cached in the process,
    which would hide part of its figure."""
    import traceback

    clips = speech(args)
    batch = speed_batch(clips, args.minutes)
    todo = [("bundled", BUNDLED)]
    if not args.skip_random:
        try:
            built = random_model(args.shape, args.work_dir, "ctranslate2" in args.engines.split(","))
        except Exception as exc:  # noqa: BLE001 - reported; the bundled model still runs
            traceback.print_exc()
            row = Row(engine_name, model_label("random", args.shape), failures=[f"building it: {type(exc).__name__}: {exc}"])
            print(json.dumps(asdict(row)), flush=True)
        else:
            print(json.dumps({"random_model": built}), flush=True)
            todo.insert(0, ("random", built["ct2" if engine_name == "ctranslate2" else "hf"]))
    for which, model in todo:
        try:
            row = measure(engine_name, which, model, args, clips, batch)
        except Exception as exc:  # noqa: BLE001 - reported; the next model still runs
            traceback.print_exc()
            row = Row(engine_name, model_label(which, args.shape), failures=[f"{type(exc).__name__}: {exc}"])
        print(json.dumps(asdict(row)), flush=True)


def model_label(which: str, shape: str) -> str:
    return BUNDLED if which == "bundled" else f"random {shape}"


def measure(engine_name: str, which: str, model: str, args: argparse.Namespace,
            clips: list[tuple[str, Audio, str]], batch: list[Audio]) -> Row:
    """One engine × model: built, warmed, timed on ``batch``; on the bundled model, WER on
    ``clips`` and float16 vs float32."""
    from pipeline.asr.factory import build_engine
    from pipeline.asr.warmup import WARM_UP_TOKENS
    from pipeline.asr.windowed import resolve_dtype

    device = args.device
    row = Row(engine_name, model_label(which, args.shape))
    if which == "bundled":
        options = AsrOptions(beam_size=1, temperature_fallback=False)
    else:
        options = AsrOptions(beam_size=1, temperature_fallback=False, max_new_tokens=RANDOM_TOKENS)
        row.notes.append(f"random weights: text not checked; ≤ {RANDOM_TOKENS} new tokens a window and no "
                         "temperature fallback, so the figures are speed and memory")
    settings = engine_settings(engine_name, model, device)
    precision = settings.compute_type if engine_name == "ctranslate2" else resolve_dtype(settings.dtype, device)
    row.notes.append(f"{precision}, greedy")

    torch_peak = device == "cuda" and engine_name == "transformers"
    if torch_peak:
        import torch

        torch.cuda.reset_peak_memory_stats()
    sampler = UsedMemory() if device == "cuda" and not torch_peak else None
    texts: list[str] = []
    asr = None
    try:
        with sampler or contextlib.nullcontext():
            started = time.perf_counter()
            asr = build_engine(settings)
            row.load_s = time.perf_counter() - started
            row.notes.append(batching(asr, settings))
            if which == "bundled":  # real speech: its text is checked, and it warms the engine up
                texts = [t.text for t in asr.transcribe([a for _, a, _ in clips], [options] * len(clips))]
                row.wer = corpus_wer([ref for _, _, ref in clips], texts)
                if row.wer > WER_BOUND:
                    row.failures.append(f"WER {row.wer:.3f} above {WER_BOUND}")
            else:
                # Warm, past the factory's one short decode: the first batch of real windows.
                asr.transcribe(batch[:1], [replace(options, max_new_tokens=WARM_UP_TOKENS)])
            row.windows = sum(windows_of(asr, a) for a in batch)
            row.audio_s = sum(a.duration_s for a in batch)
            started = time.perf_counter()
            results = asr.transcribe(batch, [options] * len(batch))
            row.wall_s = time.perf_counter() - started
    finally:
        if asr is not None:
            shut_down(asr)
    del asr
    collect()
    if len(results) != len(batch):
        row.failures.append(f"{len(results)} transcripts for {len(batch)} requests")
    if device != "cuda":
        row.memory = "n/a on cpu"
    elif torch_peak:
        row.peak_memory_gb = torch.cuda.max_memory_allocated() / 1e9
        row.memory = "torch.cuda.max_memory_allocated"
    elif sampler.source is None:
        row.memory = "not measured: neither pynvml nor nvidia-smi is here"
    else:
        row.peak_memory_gb = sampler.above_baseline_gb
        row.memory = f"{sampler.source}: in use on the device, above the {sampler.baseline / 1e9:.2f} GB before load"
        if engine_name == "vllm":
            row.memory += "; vLLM takes vllm_memory_utilization of the card up front"

    if which == "bundled":
        if device != "cuda":
            row.agreement_note = "n/a on cpu (float16 needs CUDA)"
        elif engine_name == "vllm":
            row.agreement_note = "not compared for vLLM (a second engine start)"
        else:  # the same speech at float32: how far float16 moves the text
            fp32 = build_engine(engine_settings(engine_name, model, device, "float32"))
            again = [t.text for t in fp32.transcribe([a for _, a, _ in clips], [options] * len(clips))]
            del fp32
            collect()
            row.agreement = max(0.0, 1.0 - corpus_wer(again, texts))
            row.agreement_note = "1 − WER between the float16 and float32 texts"
    return row


# --- the whole check -----------------------------------------------------------------------------------
def child(step: str, args: argparse.Namespace, deadline: float, extra: list[str] = ()) -> tuple[list[dict], str]:
    """Run ``--step step`` in a process of its own (a session of its own: a vLLM engine core dies
    with it): the JSON lines it printed, and what went wrong (its stderr's tail) or ""."""
    remaining = deadline - time.monotonic()
    if remaining < 5:
        return [], f"not run: the {args.time_limit_s:.0f} s limit was reached"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PIP_NO_INDEX": "1"}
    command = [sys.executable, __file__, *sys.argv[1:], "--step", step, *extra]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    problem = ""
    try:
        out, err = proc.communicate(timeout=remaining)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        problem = f"stopped at the {args.time_limit_s:.0f} s limit"
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not problem:
        problem = f"exit status {proc.returncode}: {last_line(err)}"
    failed = problem or any(a.get("failures") for a in answers)
    return answers, "\n".join(part for part in (problem, err[-3000:].strip()) if part) if failed else ""


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def describe(row: Row) -> None:
    print(f"{row.engine} × {row.model}: {'ok' if row.ok else 'FAILED: ' + '; '.join(row.failures)}")
    if row.wall_s is not None:
        print(f"  load {row.load_s:.1f} s (warm-up decode included); {row.windows} window(s), {row.audio_s:.1f} s "
              f"of audio in {row.wall_s:.2f} s: {row.windows / row.wall_s:.2f} windows/s, RTFx {row.audio_s / row.wall_s:.1f}")
    if row.peak_memory_gb is not None:
        print(f"  peak GPU memory {row.peak_memory_gb:.2f} GB ({row.memory})")
    elif row.memory:
        print(f"  peak GPU memory: {row.memory}")
    if row.wer is not None:
        print(f"  WER {row.wer:.3f} (bound {WER_BOUND})")
    if row.agreement is not None:
        print(f"  fp16 vs fp32 agreement {row.agreement:.3f} ({row.agreement_note})")
    elif row.agreement_note:
        print(f"  fp16 vs fp32: {row.agreement_note}")
    for note in row.notes:
        print(f"  {note}")
    sys.stdout.flush()


def table(rows: list[Row]) -> None:
    def num(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    print("| engine | model | windows/s | RTFx | wall s | load s | peak GPU GB | WER | fp16 vs fp32 | result |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        timed = r.wall_s is not None and r.wall_s > 0
        memory = f"{r.peak_memory_gb:.2f} ({r.memory.split(':')[0]})" if r.peak_memory_gb is not None else (r.memory or "-")
        agreement = num(r.agreement, 3) if r.agreement is not None else ("n/a" if r.agreement_note else "-")
        print(f"| {r.engine} | {r.model} | {num(r.windows / r.wall_s if timed else None, 2)} "
              f"| {num(r.audio_s / r.wall_s if timed else None, 1)} | {num(r.wall_s, 2)} | {num(r.load_s, 1)} "
              f"| {memory} | {num(r.wer, 3)} | {agreement} | {'ok' if r.ok else 'FAILED'} |")


def check(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.time_limit_s
    print(f"Hark GPU check: device {args.device}, shape {args.shape}, {args.minutes:g} min of speech a run, "
          f"at most {args.time_limit_s:.0f} s in all")
    if not check_device(args.device):
        return 2
    engines = []
    for name in args.engines.split(","):
        missing = [m for m in ENGINES[name] if importlib.util.find_spec(m) is None]
        print(f"{name}: " + (f"skipped, not installed (no {', '.join(missing)})" if missing else "installed"))
        if not missing:
            engines.append(name)
    if not engines:
        print("No engine to check: install one (cluster/README.md, \"Install on a GPU box\")")
        return 2
    try:
        clips = speech(args)
    except NoSpeech as exc:
        print(exc)
        return 2
    batch = speed_batch(clips, args.minutes)
    print(f"speech: {len(clips)} clip(s), {sum(a.duration_s for _, a, _ in clips):.1f} s, for WER; the same tiled to "
          f"{sum(a.duration_s for a in batch):.1f} s in {len(batch)} request(s) of ≤ {REQUEST_S:g} s for speed")
    sys.stdout.flush()

    models = ["bundled"]
    extra = ["--engines", ",".join(engines)]  # the installed ones: the CTranslate2 copy is built for them only
    can_build = importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")
    if not args.skip_random and can_build:
        models.append("random")
    elif not args.skip_random:
        print(f"random {args.shape} model: not built, it needs torch and transformers (pip install 'hark-asr[transformers]')")
        extra.append("--skip-random")

    rows: list[Row] = []
    built_shown = False
    # CTranslate2 last: the first engine's process builds the random model, which imports
    # transformers, and the transformers and vLLM engines import it anyway.
    for engine in sorted(engines, key=lambda e: e == "ctranslate2"):
        print(f"running {engine} on {', '.join(model_label(m, args.shape) for m in models)} ...", flush=True)
        answers, err = child(engine, args, deadline, extra)
        for built in (a["random_model"] for a in answers if "random_model" in a):
            if not built_shown:
                print(f"random {args.shape} model: {built['parameters'] / 1e6:.0f} M parameters, float16, ready in "
                      f"{built['seconds']:.0f} s: {built['hf']}" + (f" (CTranslate2: {built['ct2']})" if built["ct2"] else ""))
                built_shown = True
        if err:
            print(err)
        done = {a["model"]: Row(**a) for a in answers if "model" in a}
        for which in models:
            label = model_label(which, args.shape)
            row = done.get(label) or Row(engine, label, failures=[(err.strip().splitlines() or ["no answer"])[0]])
            describe(row)
            rows.append(row)

    print()
    table(rows)
    failed = [r for r in rows if not r.ok]
    names = ", ".join(f"{r.engine} × {r.model}" for r in failed)
    print(f"\n{len(rows) - len(failed)} of {len(rows)} passed" + (f"; failed: {names}" if failed else ""))
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, of: " + ", ".join(ENGINES))
    parser.add_argument("--shape", choices=list(SHAPES), default="large-v3", help="of the random-weight model")
    parser.add_argument("--skip-random", action="store_true", help="the bundled model only")
    parser.add_argument("--audio", help="speech to use instead of tests/assets.py's (any format PyAV decodes)")
    parser.add_argument("--text", help="what is said in --audio (the WER reference)")
    parser.add_argument("--minutes", type=float, default=5.0, help="of speech in each speed run")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "hark" / "gpu-check",
                        help="where the random model is built (large-v3: 6 GB with its CTranslate2 copy)")
    parser.add_argument("--time-limit-s", type=float, default=TIME_LIMIT_S, help="for the whole check")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(sorted(unknown))}: choose from {', '.join(ENGINES)}")
    if bool(args.audio) != bool(args.text):
        parser.error("--audio and --text go together: the text is the reference its WER is measured against")
    if args.step:
        run_engine(args.step, args)
    else:
        sys.exit(check(args))


if __name__ == "__main__":
    main()
