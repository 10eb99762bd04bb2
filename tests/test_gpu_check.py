"""bench/gpu_check.py, the one command a GPU owner runs (issue #16), as CI can run it: on the CPU
with the CTranslate2 and transformers engines, the random-weight model at Whisper tiny's shape and
short speech; and asked for CUDA on a machine without it, a refusal that names what is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ctranslate2
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def summary(stdout: str) -> dict[tuple[str, str], dict[str, str]]:
    """The summary table: (engine, model) → {column: cell}."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[1:]]
    return {(row["engine"], row["model"]): row for row in rows}


def test_a_cpu_run_measures_each_engine_on_the_bundled_and_a_random_model(clips, tmp_path):
    beckett = clips["beckett"]
    out = gpu_check(
        "--device", "cpu", "--engines", "ctranslate2,transformers", "--shape", "tiny", "--minutes", "0.25",
        "--audio", str(beckett.path), "--text", beckett.text, "--work-dir", str(tmp_path),
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    table = summary(out.stdout)
    assert set(table) == {(e, m) for e in ("ctranslate2", "transformers") for m in ("whisper-base", "random tiny")}
    for (engine, model), row in table.items():
        assert row["result"] == "ok", (engine, model)
        assert float(row["windows/s"]) > 0 and float(row["RTFx"]) > 0 and float(row["wall s"]) > 0
        assert float(row["load s"]) > 0
        assert row["peak GPU GB"] == "n/a on cpu"
        if model == "whisper-base":
            assert float(row["WER"]) <= 0.35
            assert row["fp16 vs fp32"] == "n/a"
        else:
            assert row["WER"] == "-"  # random weights: no text to check
    assert out.stdout.count("fp16 vs fp32: n/a on cpu (float16 needs CUDA)") == 2
    assert "≤ 100 new tokens a window and no temperature fallback" in out.stdout

    # The random model: tiny's dimensions, the bundled model's vocabulary, float16, and its
    # CTranslate2 conversion beside it.
    [hf_dir] = [p for p in tmp_path.glob("random-tiny-*") if not p.name.endswith("-ct2")]
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["d_model"], config["encoder_layers"], config["decoder_layers"], config["num_mel_bins"]) == (384, 4, 4, 80)
    assert config["vocab_size"] == 51865 and config["dtype"] == "float16"
    assert (hf_dir.with_name(hf_dir.name + "-ct2") / "model.bin").is_file()


def test_an_engine_that_fails_its_check_is_reported_and_the_exit_status_is_1(clips):
    beckett = clips["beckett"]
    out = gpu_check(
        "--device", "cpu", "--engines", "ctranslate2", "--skip-random", "--minutes", "0.1",
        "--audio", str(beckett.path), "--text", "Something else entirely was said in this recording",
    )
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    assert "ctranslate2 × whisper-base: FAILED: WER" in out.stdout
    [row] = summary(out.stdout).values()
    assert row["result"] == "FAILED" and float(row["WER"]) > 0.35 and float(row["RTFx"]) > 0  # still measured
    assert "0 of 1 passed; failed: ctranslate2 × whisper-base" in out.stdout


@pytest.mark.skipif(ctranslate2.get_cuda_device_count() > 0, reason="this machine has a CUDA device")
def test_asked_for_cuda_without_a_gpu_it_says_so_and_fails():
    out = gpu_check("--engines", "ctranslate2,transformers", "--skip-random")  # --device cuda: the default
    assert out.returncode == 2, out.stdout + out.stderr[-3000:]
    assert "No usable CUDA device (torch sees none, ctranslate2 sees none)" in out.stdout
    assert "running" not in out.stdout  # no engine was started
