"""Tiny random models built in-process (a few-layer Llama or Qwen3) with a small BPE tokenizer and a ChatML
template, saved as a local model folder so tests exercise the same loading path as a real model."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    from kvdb.examples import example_pairs

    lines = []
    for p in example_pairs():
        lines += [p.question, p.answer]
    return lines


def make_tokenizer(folder: Path, vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def make_model(folder: Path, arch: str = "llama", layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """Save a seeded random model + tokenizer into ``folder`` and return it."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen3Config

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=False)
    config = LlamaConfig(**common) if arch == "llama" else Qwen3Config(head_dim=hidden // 4, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random weights give near-uniform logits; scale them up so greedy choices are decisive, as in a trained model.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 1.0)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    model.save_pretrained(folder)
    return folder


# The config the tiny-model tests share: two sampled layers of four, a small draft vocabulary, short answers.
TINY_SETTINGS = {
    "build": {"batch_size": 2, "layers": [2, -1]},
    "draft": {"num_sampled_layers": 2, "vocab_frequent": 64},
    "training": {"batch_size": 4, "learning_rate": 1.0e-3, "num_epochs": 2, "save_every": 1,
                 "holdout_fraction": 0.25},
    "generation": {"max_new_tokens": 12},
}


def write_tiny_config(path: Path, model: Path, **sections: dict) -> Path:
    """Write a kvdb config for ``model``: ``TINY_SETTINGS`` with each of ``sections`` merged into its section."""
    import yaml

    settings = {"model": {"source": str(model)}}
    for name in TINY_SETTINGS.keys() | sections.keys():
        settings[name] = {**TINY_SETTINGS.get(name, {}), **sections.get(name, {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path
