"""The wheel: built from a copy of the source tree, installed into a folder of its own and run from outside the
checkout, it finds its migrations and configs inside itself and runs `init --examples`, `build` and `db status`."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.tiny import make_model, write_tiny_config

ROOT = Path(__file__).resolve().parent.parent
# What a wheel is built from; the tree is copied so the build's own build/ and *.egg-info stay out of the checkout.
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "kvdb", "migrations", "configs")


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel's contents, installed with ``pip install --target`` (its dependencies are those of this venv)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"), str(src)], root)
    (wheel,) = (root / "dist").glob("kvdb-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(root / "site"), str(wheel)], root)
    return root


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVDB_")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    return env


def test_wheel_ships_migrations_and_configs(installed: Path):
    (wheel,) = (installed / "dist").glob("kvdb-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"kvdb/migrations/{p.relative_to(ROOT / 'migrations')}" for p in (ROOT / "migrations").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    expected |= {f"kvdb/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert "kvdb/migrations/env.py" in expected and "kvdb/configs/default.yaml" in expected
    assert expected <= names, sorted(expected - names)
    assert not any("__pycache__" in n for n in names)


def test_installed_wheel_runs_outside_the_checkout(installed: Path, tmp_path):
    site, elsewhere = installed / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(site)
    where = json.loads(_run([sys.executable, "-c", (
        "import json, kvdb, kvdb.config, kvdb.store.db; print(json.dumps([kvdb.__file__, "
        "str(kvdb.store.db.MIGRATIONS_DIR), str(kvdb.config.CONFIG_DIR), kvdb.config.load_config().source]))")],
        elsewhere, env))
    # The installed copy is what runs, and it reads its own migrations and default config, not the checkout's.
    for path in where:
        assert Path(path).resolve().is_relative_to(site.resolve()), where
        assert not Path(path).resolve().is_relative_to(ROOT), where
    assert Path(where[3]).name == "default.yaml"

    config = write_tiny_config(tmp_path / "tiny.yaml", make_model(tmp_path / "model", layers=4, hidden=64))
    kvdb = [sys.executable, "-m", "kvdb", "--home", str(tmp_path / "home"), "--config", str(config)]
    init = json.loads(_run([*kvdb, "init", "--examples", "--json"], elsewhere, env))
    shipped = (ROOT / "kvdb" / "data" / "default_faq.jsonl").read_text(encoding="utf-8").splitlines()
    assert init["examples"]["added"] == len([line for line in shipped if line.strip()]) > 0
    built = json.loads(_run([*kvdb, "build", "--json"], elsewhere, env))
    assert built["failed"] == 0 and built["built"] == init["examples"]["added"] == built["indexed_pairs"]
    # The console script the wheel declares, on the same home.
    script = site / "bin" / "kvdb"
    status = json.loads(_run([str(script), "--home", str(tmp_path / "home"), "--config", str(config), "db", "status",
                              "--json"], elsewhere, env))
    assert status["up_to_date"] and status["current"] == status["head"] == init["revision"]


# Declared but never imported by kvdb, on purpose: transformers reads a GGUF only with gguf and accelerate installed;
# `kvdb serve` runs on FastAPI, uvicorn and the Prometheus client.
NOT_IMPORTED = {"gguf", "accelerate", "fastapi", "uvicorn", "prometheus-client"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    """(install_requires, every extra) of setup.cfg, as normalised distribution names."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    names = lambda text: {_normal(re.split(r"[\s\[<>=!~;]", line.strip(), maxsplit=1)[0])  # noqa: E731
                          for line in text.splitlines() if line.strip()}
    extras = set().union(*(names(v) for v in cfg["options.extras_require"].values()))
    return names(cfg["options"]["install_requires"]), extras


def _imported_modules() -> set[str]:
    """Top-level modules that kvdb's code and migrations import (lazy imports inside functions too)."""
    found: set[str] = set()
    for top in (ROOT / "kvdb", ROOT / "migrations"):
        for folder, _dirs, files in os.walk(top):  # not into kvdb/migrations: the link to migrations/
            for name in files:
                if not name.endswith(".py"):
                    continue
                for node in ast.walk(ast.parse((Path(folder) / name).read_text(encoding="utf-8"))):
                    if isinstance(node, ast.Import):
                        found |= {alias.name.split(".")[0] for alias in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "kvdb"}


def test_imports_are_declared_and_declared_dependencies_used():
    required, extras = _declared()
    owners = importlib.metadata.packages_distributions()
    imported: set[str] = set()
    for module in _imported_modules():
        assert module in owners, f"kvdb imports {module}, which no installed distribution provides"
        imported |= {_normal(d) for d in owners[module]}
    assert imported <= required | extras, f"undeclared: {sorted(imported - required - extras)}"
    assert "huggingface-hub" in required and "psycopg" in extras and "psycopg" not in required
    assert required - imported <= NOT_IMPORTED, f"declared but unused: {sorted(required - imported - NOT_IMPORTED)}"
