"""The scheduler alone (no HTTP): per-row mixtures under continuous batching equal each request run alone;
cancellation, fairness, budgets and draining, step by step."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from smoa.inject.engine import InferenceEngine
from smoa.serve.scheduler import (
    QueueFullError,
    SamplingParams,
    Scheduler,
    SchedulerClosedError,
    Sequence,
    SequenceState,
    filter_logits,
)

from .helpers import random_lora


def tiny_engine(dtype: torch.dtype = torch.float64) -> tuple[InferenceEngine, list]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval().to(dtype)
    loras = [random_lora(model, seed=i, scale=0.5, every=2) for i in range(10)]
    return InferenceEngine(model, None), loras


class Collector:
    def __init__(self, n: int) -> None:
        self.tokens: dict[int, list[int]] = {i: [] for i in range(n)}
        self.reasons: dict[int, str | None] = {}
        self.done = threading.Event()
        self.n = n

    def sink(self, i: int):
        def f(ev) -> None:
            if ev.token_id is not None:
                self.tokens[i].append(ev.token_id)
            if ev.finished:
                self.reasons[i] = ev.finish_reason
                if len(self.reasons) == self.n:
                    self.done.set()

        return f


def test_continuous_batching_equals_each_request_alone() -> None:
    engine, loras = tiny_engine()
    g = torch.Generator().manual_seed(3)
    reqs = []
    for i in range(16):
        prompt = torch.randint(3, 256, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
        mix = [] if i % 5 == 0 else [((f"a{i % 10}", 1), loras[i % 10], 0.8), ((f"a{(3 * i + 1) % 10}", 1),
                                                                             loras[(3 * i + 1) % 10], 0.1 * (i % 4))]
        reqs.append((prompt, mix, 4 + i % 11))
    alone = [engine.generate([p], mix, max_new_tokens=n, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
             for p, mix, n in reqs]  # fmt: skip
    sched = Scheduler(engine, max_batch=6, max_queue=64, per_client_cap=4)
    sched.start()
    col = Collector(len(reqs))
    for i, (p, mix, n) in enumerate(reqs):  # arrivals spread over time: rows join and leave mid-flight
        sched.submit(Sequence(p, mix, SamplingParams(max_tokens=n), col.sink(i), client=f"c{i % 3}"))
        if i % 4 == 3:
            time.sleep(0.005)
    assert col.done.wait(60)
    sched.stop()
    assert sched.error is None
    assert [col.tokens[i] for i in range(len(reqs))] == alone
    assert set(col.reasons.values()) == {"length"}
    assert sched.steps < sum(n for *_, n in reqs)  # batched: fewer steps than tokens


def test_cancel_frees_the_row_and_others_go_on() -> None:
    engine, loras = tiny_engine(torch.float32)
    sched = Scheduler(engine, max_batch=4)
    col = Collector(2)
    long = Sequence([5, 6, 7], [((0, 1), loras[0], 1.0)], SamplingParams(max_tokens=200), col.sink(0))
    short = Sequence([8, 9], [], SamplingParams(max_tokens=5), col.sink(1))
    sched.start()
    sched.submit_many([long, short])
    time.sleep(0.05)
    long.cancel()
    assert col.done.wait(30)
    sched.stop()
    assert long.state is SequenceState.CANCELLED and col.reasons[0] == "cancelled"
    assert len(col.tokens[0]) < 200
    assert short.state is SequenceState.FINISHED and len(col.tokens[1]) == 5


def test_schedule_is_fifo_with_a_cap_per_client_and_a_token_budget() -> None:
    engine, _ = tiny_engine(torch.float32)
    sched = Scheduler(engine, max_batch=3, per_client_cap=2, max_batch_tokens=100)
    noop = lambda ev: None
    a1, a2, a3 = (Sequence([1, 2], [], SamplingParams(max_tokens=10), noop, client="a") for _ in range(3))
    b1 = Sequence([1, 2], [], SamplingParams(max_tokens=10), noop, client="b")
    sched.submit_many([a1, a2, a3, b1])
    assert sched._schedule() == [a1, a2, b1]  # a3 waits: client a has 2 running rows
    sched.running = [a1, a2, b1]
    assert list(sched.waiting) == [a3]
    sched.running = []
    big = Sequence([1] * 50, [], SamplingParams(max_tokens=60), noop, client="c")
    small = Sequence([1], [], SamplingParams(max_tokens=1), noop, client="d")
    sched.waiting.clear()
    sched.submit_many([a3, big, small])
    assert sched._schedule() == [a3]  # big (110 tokens) does not fit beside a3; small may not overtake it
    assert list(sched.waiting) == [big, small]


def test_queue_bound_and_drain() -> None:
    engine, _ = tiny_engine(torch.float32)
    sched = Scheduler(engine, max_batch=2, max_queue=2)
    col = Collector(2)
    seqs = [Sequence([1, 2, 3], [], SamplingParams(max_tokens=3), col.sink(i)) for i in range(2)]
    sched.submit_many(seqs)
    with pytest.raises(QueueFullError):
        sched.submit(Sequence([1], [], SamplingParams(), lambda ev: None))
    sched.start()
    assert sched.drain(timeout=30)
    assert all(s.state is SequenceState.FINISHED for s in seqs)
    with pytest.raises(SchedulerClosedError):
        sched.submit(Sequence([1], [], SamplingParams(), lambda ev: None))
    sched.stop()


def test_eos_and_stop_strings_finish_a_sequence() -> None:
    engine, _ = tiny_engine(torch.float32)
    first = engine.generate([[4, 5, 6]], [], max_new_tokens=3, eos_token_id=None, pad_token_id=0)[0, 3:].tolist()
    sched = Scheduler(engine, eos_token_ids=[first[1]])
    col = Collector(1)
    sched.start()
    sched.submit(Sequence([4, 5, 6], [], SamplingParams(max_tokens=10), col.sink(0)))
    assert col.done.wait(30)
    sched.stop()
    assert col.tokens[0] == first[: first.index(first[1]) + 1] and col.reasons[0] == "eos"


def test_top_p_and_top_k_filter() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=2)))
    assert kept.tolist() == [True, True, False, False]
    p = torch.softmax(logits, 0)
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_p=float(p[0]) + 1e-3)))
    assert kept.tolist() == [True, True, False, False]
