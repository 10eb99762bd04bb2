"""CTranslate2 → transformers conversion: exact on the bundled model, cached, and the CLI."""

import json
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from hark.cli import main
from pipeline.asr.convert import _weight, read_ct2_model
from pipeline.asr.windowed import WhisperTokens
from pipeline.asr.models import resolve_model
from pipeline.asr.convert import resolve_transformers_model
from pipeline.core.settings import Settings


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "whisper-base-hf"
    assert main(["models", "convert", "whisper-base", str(out)]) == 0
    return out


def test_converted_model_is_exact(converted, clips):
    from pipeline.audio.decode import decode

    source = resolve_model("whisper-base", Settings().asr.resolved_model_cache_dir)
    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    samples = decode(clips["beckett"].path, max_duration_s=60).samples
    features = WhisperFeatureExtractor.from_pretrained(converted)(
        samples, sampling_rate=16000, return_tensors="pt"
    ).input_features
    ct2 = ctranslate2.models.Whisper(source, compute_type="float32")
    storage = ctranslate2.StorageView.from_array(features.numpy())
    with torch.inference_mode():
        ours = model.model.encoder(features).last_hidden_state.numpy()
    theirs = np.array(ct2.encode(storage))
    assert np.abs(ours - theirs).max() < 2e-3
    # Greedy decoding gives the same tokens (every suppression off on both sides).
    tokens = WhisperTokens(converted / "tokenizer.json", model.config.vocab_size)
    prompt = tokens.prompt("en", None)
    expected = ct2.generate(storage, [prompt], beam_size=1, suppress_tokens=[], suppress_blank=False)[0].sequences_ids[0]
    with torch.inference_mode():
        got = model.generate(
            features, decoder_input_ids=torch.tensor([prompt]), num_beams=1, do_sample=False,
            max_new_tokens=100, suppress_tokens=None, begin_suppress_tokens=None,
        )[0].tolist()
    got = got[len(prompt):] if got[: len(prompt)] == prompt else got
    assert tokens.text_only(got) == expected and len(expected) > 10
    config = json.loads((converted / "generation_config.json").read_text())
    assert config["alignment_heads"] and config["lang_to_id"]["<|en|>"] == 50259
    assert config["no_timestamps_token_id"] == 50363


def test_tied_projection_and_shapes(converted):
    model = WhisperForConditionalGeneration.from_pretrained(converted)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert (model.config.d_model, model.config.encoder_layers, model.config.decoder_layers) == (512, 6, 6)
    assert model.model.encoder.layers[0].self_attn.k_proj.bias is None


def test_english_only_model_gets_its_timestamp_tokens(tmp_path):
    out = Path(resolve_transformers_model("whisper-tiny.en", tmp_path))
    vocab = {t["content"]: t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    assert vocab["<|notimestamps|>"] == 50362 and vocab["<|0.00|>"] == 50363 and vocab["<|30.00|>"] == 51863
    assert not json.loads((out / "generation_config.json").read_text())["is_multilingual"]


def test_int8_weights_are_scaled_back():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    scale = 127.0 / np.abs(w).max(axis=1)  # CTranslate2's per-row int8 quantisation
    q = np.rint(w * scale[:, None]).astype(np.int8)
    back = _weight({"x/weight": q, "x/weight_scale": scale.astype(np.float32)}, "x")
    assert np.abs(back - w).max() <= (0.5 / scale).max() + 1e-6


def test_resolution_converts_once_and_uses_transformers_directories_in_place(tmp_path, converted):
    first = resolve_transformers_model("whisper-tiny.en", tmp_path)
    stamp = (Path(first) / "model.safetensors").stat().st_mtime_ns
    assert resolve_transformers_model("whisper-tiny.en", tmp_path) == first
    assert (Path(first) / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "converted").iterdir()] == [Path(first).name]  # no staging left
    assert resolve_transformers_model(str(converted), tmp_path) == str(converted)
    assert resolve_transformers_model("openai/whisper-small", tmp_path) == "openai/whisper-small"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither"):
        resolve_transformers_model(str(empty), tmp_path)


def test_reader_resolves_the_tied_alias():
    source = Path(resolve_model("whisper-base", Settings().asr.resolved_model_cache_dir))
    spec, variables = read_ct2_model(source / "model.bin")
    assert spec == "WhisperSpec"
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]


def test_cli_refuses_bad_usage(tmp_path, capsys):
    assert main(["models", "convert", "whisper-base"]) == 2
    assert main(["models", "convert", "no-such-model", str(tmp_path / "x")]) == 2
    assert "neither" in capsys.readouterr().err
