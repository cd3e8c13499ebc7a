"""Re-rank retrieved pairs with the base model: how likely is the user's question, given a pair's answer?

The embedder finds candidates fast but misses paraphrases that describe a concept without naming it; the base model
reading the candidate answer and scoring the question token by token (query likelihood) catches most of them. The
score is the mean log-probability of the question's tokens after ``Text: <answer>\\nA question this text answers:``,
and the same without the text; their difference (pointwise mutual information) says how much the answer explains
the question, which is also what separates answerable questions from the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvdb.lm import pad_right

CONTEXT = ("Text: ", "\nA question this text answers: ")
NULL_CONTEXT = "A question: "


class LMReranker:
    def __init__(self, lm, max_answer_tokens: int = 64):
        self.lm = lm
        self.max_answer_tokens = max_answer_tokens

    @torch.inference_mode()
    def _mean_logprob(self, contexts: list[list[int]], query: list[int]) -> np.ndarray:
        seqs = [c + query for c in contexts]
        ids, mask = pad_right(seqs, self.lm.eos_ids[0])  # [B, T] each
        hidden = self.lm.decoder(input_ids=ids.to(self.lm.device), attention_mask=mask.to(self.lm.device),
                                 use_cache=False).last_hidden_state  # [B, T, H]
        # The LM head only where the query's tokens are predicted: the head is the widest matrix of a small model.
        width = len(query)
        rows = torch.stack([hidden[i, len(c) - 1 : len(c) - 1 + width] for i, c in enumerate(contexts)])  # [B, Q, H]
        logprobs = self.lm.model.get_output_embeddings()(rows).float().log_softmax(-1)  # [B, Q, V]
        target = torch.tensor(query, device=logprobs.device).expand(len(contexts), -1)  # [B, Q]
        out = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).mean(-1).tolist()
        return np.array(out)

    def score(self, query: str, answers: Sequence[str]) -> tuple[np.ndarray, float]:
        """(mean log p(query | answer) per answer, mean log p(query) without one)."""
        q = self.lm.encode(" " + query.strip())[:64] or [self.lm.eos_ids[0]]
        head, tail = self.lm.encode(CONTEXT[0]), self.lm.encode(CONTEXT[1])
        contexts = [head + self.lm.encode(a)[: self.max_answer_tokens] + tail for a in answers]
        scores = self._mean_logprob(contexts + [self.lm.encode(NULL_CONTEXT)], q)  # one batch, null context last
        return scores[:-1], float(scores[-1])
