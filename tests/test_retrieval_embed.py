"""Query embeddings on one CPU thread: the thread count comes back after (nested, concurrent) use, and a query
embeds to the same vector alone (one thread) as inside a large batch (the configured threads)."""

from __future__ import annotations

import threading

import numpy as np
import torch

from kvdb.embed import ONE_THREAD_TOKENS, one_cpu_thread
from kvdb.retrieve import Retriever
from kvdb.runtime import Runtime


def test_one_cpu_thread_restores_the_count_and_leaves_other_threads_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        with one_cpu_thread():
            seen.append(torch.get_num_threads())
            with one_cpu_thread():
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
        inside, leave = threading.Event(), threading.Event()

        def hold():
            with one_cpu_thread():
                inside.set()
                leave.wait(10)

        t = threading.Thread(target=hold)
        t.start()
        inside.wait(10)
        assert torch.get_num_threads() == 2  # another thread's block leaves this thread's count alone
        with one_cpu_thread():
            assert torch.get_num_threads() == 1
        leave.set()
        t.join()
        assert torch.get_num_threads() == 2
        with one_cpu_thread(enabled=False):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_query_embeds_alike_alone_and_in_a_large_batch(tmp_path):
    rt = Runtime.open(tmp_path / "home")
    embedder = Retriever(rt.config, rt.home, rt.store).embedder()
    query = "Why is the sky blue?"
    filler = ["a long sentence about nothing in particular " * 8] * (ONE_THREAD_TOKENS // 40 + 2)
    alone = embedder.embed([query])[0]
    batched = embedder.embed(filler + [query])[-1]
    assert float(alone @ batched) > 0.999
    assert np.linalg.norm(alone) == np.float32(1.0) or abs(np.linalg.norm(alone) - 1) < 1e-5
