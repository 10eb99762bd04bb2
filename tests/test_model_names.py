"""The model names users type map to a source for every engine (offline: the mapping, not the
download); an unknown name fails at start with the list of known ones."""

import pytest

from pipeline.asr.convert import resolve_transformers_model
from pipeline.asr.models import BUNDLED, check_model, hub_source, resolve_model
from pipeline.asr.names import MODEL_NAMES

# What the README promises: the sizes, large-v3, large-v3-turbo, distil-large-v3, the .en variants.
TYPED = ["tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en",
         "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo", "distil-large-v3"]


@pytest.mark.parametrize("engine", ["ctranslate2", "transformers", "vllm"])
@pytest.mark.parametrize("name", TYPED)
def test_every_name_resolves_for_every_engine(name, engine, tmp_path):
    source = hub_source(name, engine)
    org, model = source.split("/")
    assert org and model
    assert name.split("-")[0].split(".")[0] in source  # tiny, base, …, large, turbo, distil
    assert source.endswith(".en") == name.endswith(".en")
    check_model(name)
    resolve = resolve_model if engine == "ctranslate2" else resolve_transformers_model
    assert resolve(name, tmp_path) == source  # nothing downloaded: the replicas do that
    assert not any(tmp_path.iterdir())


def test_the_table_agrees_with_faster_whisper():
    """faster-whisper's own names → CTranslate2 hub ids: the table must not drift from them."""
    from faster_whisper.utils import _MODELS

    assert {n: m.ctranslate2 for n, m in MODEL_NAMES.items()} == _MODELS


def test_engines_get_their_own_format():
    large = MODEL_NAMES["large-v3"]
    assert large.source("ctranslate2") == "Systran/faster-whisper-large-v3"
    assert large.source("transformers") == large.source("vllm") == "openai/whisper-large-v3"
    assert hub_source("large-v3-turbo", "vllm") == "openai/whisper-large-v3-turbo"
    assert hub_source("distil-large-v3", "transformers") == "distil-whisper/distil-large-v3"
    assert MODEL_NAMES["medium.en"].english_only and not MODEL_NAMES["large-v3"].english_only


@pytest.mark.parametrize("typo", ["large-v4", "whisper-large-v3", "tiny-en", "base.EN"])
def test_an_unknown_name_fails_with_the_known_ones(typo, tmp_path):
    for fail in (lambda: check_model(typo), lambda: resolve_model(typo, tmp_path),
                 lambda: resolve_transformers_model(typo, tmp_path), lambda: hub_source(typo, "vllm")):
        with pytest.raises(ValueError) as info:
            fail()
        message = str(info.value)
        assert repr(typo) in message and "Known names" in message
        for known in ("large-v3", "large-v3-turbo", "distil-large-v3", "tiny.en", *BUNDLED):
            assert known in message


def test_hub_ids_and_bundled_names_pass_as_before(tmp_path):
    assert hub_source("Systran/faster-whisper-small", "ctranslate2") == "Systran/faster-whisper-small"
    assert resolve_transformers_model("openai/whisper-small", tmp_path) == "openai/whisper-small"
    check_model("whisper-base")
    with pytest.raises(ValueError, match="unknown name"):
        hub_source("a/b/c", "ctranslate2")
