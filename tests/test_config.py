from pathlib import Path

import pytest

from kvdb.config import CONFIG_DIR, Config, Home, load_config
from kvdb.errors import ConfigError


def test_shipped_configs_load_with_seed_defaults():
    cfg = load_config(CONFIG_DIR / "default.yaml")
    assert cfg.model.source == "embedded:smollm2"
    assert cfg.embedder.source == "embedded:minilm"
    assert cfg.draft.num_sampled_layers == 3
    # lr 3e-4 rather than the seed's 3e-5: measured better by benchmarks/bench_draft.py (see configs/default.yaml)
    assert (cfg.training.batch_size, cfg.training.learning_rate, cfg.training.num_epochs) == (8, 3e-4, 5)
    assert cfg.training.save_every == 5
    qwen = load_config(CONFIG_DIR / "qwen3_0.6b.yaml")
    assert qwen.model.source == "Qwen/Qwen3-0.6B"
    assert qwen.model.chat_template_kwargs == {"enable_thinking": False}
    mpnet = load_config(CONFIG_DIR / "mpnet.yaml")  # the opt-in embedder; all else the default
    assert mpnet.embedder.source == "embedded:mpnet" and mpnet.model == cfg.model and mpnet.index == cfg.index


def test_shipped_configs_live_in_the_package_and_are_the_default():
    """kvdb/configs is a link to the top-level configs/ (one source) that a wheel carries as a real folder."""
    import kvdb

    package = Path(kvdb.__file__).resolve().parent
    assert CONFIG_DIR == package / "configs"
    assert CONFIG_DIR.resolve() == (package.parent / "configs").resolve()  # the checkout's folder, not a copy
    assert load_config().source == str(CONFIG_DIR / "default.yaml")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model:\n  sorce: x\n", "unknown key 'model.sorce'"),
        ("modle:\n  source: x\n", "unknown key 'modle'"),
        ("training:\n  batch_size: eight\n", "'training.batch_size' should be int"),
        ("training:\n  batch_size: true\n", "'training.batch_size' should be int"),
        ("build:\n  layers: 3\n", "'build.layers' should be a list"),
        ("build:\n  layers: [3, x]\n", "'build.layers[1]' should be int"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("model: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_yaml_cannot_construct_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['touch /tmp/kvdb-pwned']\n")
    with pytest.raises(ConfigError):
        load_config(path)
    assert not Path("/tmp/kvdb-pwned").exists()


def test_missing_config_and_env(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  num_epochs: 2\n  learning_rate: 1e-4\n")
    monkeypatch.setenv("KVDB_CONFIG", str(path))
    cfg = load_config()
    assert cfg.training.num_epochs == 2 and cfg.training.learning_rate == 1e-4
    assert cfg.training.batch_size == Config().training.batch_size


def test_home_and_database_url(tmp_path, monkeypatch):
    home = Home.resolve(tmp_path / "h")
    assert home.root == (tmp_path / "h").resolve()
    assert home.database_url(Config()) == f"sqlite:///{home.root}/kvdb.sqlite"
    monkeypatch.setenv("KVDB_HOME", str(tmp_path / "env"))
    assert Home.resolve().root == (tmp_path / "env").resolve()
    monkeypatch.setenv("KVDB_DATABASE_URL", "sqlite:////tmp/other.sqlite")
    assert home.database_url(Config()) == "sqlite:////tmp/other.sqlite"


def test_embedder_dtype_choice():
    import torch

    from kvdb.embed import embedder_dtype
    from kvdb.errors import ModelError

    cpu = torch.device("cpu")
    assert embedder_dtype("float32", cpu) == torch.float32
    assert embedder_dtype("bf16", cpu) == torch.bfloat16
    assert embedder_dtype("auto", torch.device("cuda")) == torch.bfloat16  # a device object needs no GPU
    assert embedder_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    with pytest.raises(ModelError, match="unknown dtype"):
        embedder_dtype("int3", cpu)
