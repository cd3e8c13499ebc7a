"""The prompt format shared by training, recorded base-model answers and `kvdb query --generate`.

One format, versioned by ``PROMPT_FORMAT``: the retrieved pairs go into the system turn as references, the question
is the user turn, and the model's own chat template renders it (Qwen3 with thinking off via the config's
``chat_template_kwargs``). Anything that changes the rendered ids must change ``PROMPT_FORMAT``, because recorded
answers and trained drafts are keyed by it.

The wording matters for speed, since decoding is lossless against greedy decoding of this very prompt: a model that
repeats the reference can be copied. benchmarks/prompt_format.py measured four wordings and a chat-history layout on
SmolLM2-135M, and the model's own answer to the top pair's question as an earlier exchange; none moved the copyable
share of paraphrase answers beyond noise (oracle copy bound 1.28-1.43x).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROMPT_FORMAT = "ref-v1"

INSTRUCTION = "Answer the user's question. The reference below may help; use it when it is relevant."


@dataclass(frozen=True)
class Reference:
    question: str
    answer: str


def build_messages(question: str, references: Sequence[Reference]) -> list[dict[str, str]]:
    if references:
        refs = "\n\n".join(f"Q: {r.question}\nA: {r.answer}" for r in references)
        system = f"{INSTRUCTION}\n\nReference:\n{refs}"
    else:
        system = "Answer the user's question."
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def prompt_ids(lm, question: str, references: Sequence[Reference]) -> list[int]:
    """Token ids the base model is given (ends with the assistant generation prompt)."""
    return lm.chat_ids(build_messages(question, references), add_generation_prompt=True)


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of ``seqs`` share."""
    n = min((len(s) for s in seqs), default=0)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def prefix_boundaries(lm, question: str, references: Sequence[Reference], ids: Sequence[int]) -> tuple[int, ...]:
    """Where the recurring parts of the prompt ``ids`` end: the instruction (shared by every prompt with
    references), the top pair's reference block (shared by every question whose best match is that pair) and the
    whole system turn (shared by every question that retrieves the same pairs). Each is the common prefix of ``ids``
    with that part rendered alone, so a tokenizer that merges tokens across a boundary only moves it; an engine
    restores the state of such a prefix instead of recomputing it."""
    systems = [f"{INSTRUCTION}\n\nReference:\n"] if references else []
    systems += [build_messages(question, references[:n])[0]["content"] for n in sorted({1, len(references)}) if n]
    if not references:
        systems.append(build_messages(question, references)[0]["content"])
    cuts = set()
    for content in systems:
        try:
            rendered = lm.chat_ids([{"role": "system", "content": content}], add_generation_prompt=False)
        except Exception:  # a chat template that refuses a lone system turn: no boundary there
            continue
        cuts.add(common_prefix_length([rendered, ids]))
    return tuple(sorted(c for c in cuts if 0 < c < len(ids)))
