"""The model names users type (``HARK_ASR__MODEL=large-v3``), and where each engine gets them.

One table for every engine: CTranslate2 loads a CTranslate2 conversion (faster-whisper's own
hub ids, ``faster_whisper.utils._MODELS``), transformers and vLLM load OpenAI's or
distil-whisper's transformers weights. A name not in the table, not bundled, not a path and not
an ``org/name`` hub id is refused at start with the list of names that work.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelName:
    """Where one Whisper model comes from, per engine (hub ids; downloading needs internet)."""

    name: str
    ctranslate2: str  # a CTranslate2 conversion
    transformers: str  # transformers weights: the transformers and vLLM engines
    english_only: bool

    def source(self, engine: str) -> str:
        """The hub id ``engine`` loads: ``ctranslate2``, ``transformers`` or ``vllm``."""
        if engine == "ctranslate2":
            return self.ctranslate2
        if engine in ("transformers", "vllm"):
            return self.transformers
        raise ValueError(f"Unknown ASR engine: {engine!r}")


def _openai(size: str) -> ModelName:
    return ModelName(size, f"Systran/faster-whisper-{size}", f"openai/whisper-{size}", size.endswith(".en"))


MODEL_NAMES: dict[str, ModelName] = {
    m.name: m
    for m in (
        *(_openai(size) for size in ("tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en")),
        # OpenAI's first large model is "openai/whisper-large" on the hub.
        ModelName("large-v1", "Systran/faster-whisper-large-v1", "openai/whisper-large", False),
        _openai("large-v2"),
        _openai("large-v3"),
        ModelName("large", "Systran/faster-whisper-large-v3", "openai/whisper-large-v3", False),
        ModelName("large-v3-turbo", "mobiuslabsgmbh/faster-whisper-large-v3-turbo", "openai/whisper-large-v3-turbo", False),
        ModelName("turbo", "mobiuslabsgmbh/faster-whisper-large-v3-turbo", "openai/whisper-large-v3-turbo", False),
        ModelName("distil-large-v2", "Systran/faster-distil-whisper-large-v2", "distil-whisper/distil-large-v2", False),
        ModelName("distil-large-v3", "Systran/faster-distil-whisper-large-v3", "distil-whisper/distil-large-v3", False),
        ModelName("distil-large-v3.5", "distil-whisper/distil-large-v3.5-ct2", "distil-whisper/distil-large-v3.5", False),
        ModelName("distil-medium.en", "Systran/faster-distil-whisper-medium.en", "distil-whisper/distil-medium.en", True),
        ModelName("distil-small.en", "Systran/faster-distil-whisper-small.en", "distil-whisper/distil-small.en", True),
    )
}


def is_hub_id(spec: str) -> bool:
    """``org/name``: a Hugging Face hub id, used as it is."""
    org, slash, name = spec.partition("/")
    return bool(slash and org and name and "/" not in name)


def unknown_model(spec: str, bundled: list[str]) -> ValueError:
    """The start-time error for a name that is none of the known ones."""
    return ValueError(
        f"model {spec!r}: unknown name. Known names: {', '.join([*bundled, *MODEL_NAMES])} "
        "(the bundled ones work offline; the others download from the Hugging Face hub); "
        "or a local model directory, or a hub id such as openai/whisper-small"
    )
