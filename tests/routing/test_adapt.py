"""Issue 11: the learned query encoder (a LoRA on MiniLM trained on the adapters' examples, smoa.routing.adapt).

Small real checks (CLINC150 subsets, fractions of an epoch, one CPU thread): the adaptation separates held-out
texts better than the base encoder; the router trains it off its lock and swaps it in (routes go on meanwhile),
persists it beside the index with its version, and refuses a corrupt or mismatched file as a whole (falls back
to the base encoder, rebuilds the index from the catalog, retrains at the next refit).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from smoa.config import SMoAConfig
from smoa.routing import adapt as qa
from smoa.routing.router import KeyEntry, Router, RoutingText

DOMAINS = {"banking"}


def clinc_or_skip(per_intent: int = 24, intents: int = 8):  # -> (train texts by intent, val pairs, domain)
    from smoa.data.clinc import clinc150

    try:
        train, val = clinc150("train"), clinc150("val")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    names = sorted({e.intent for e in train if e.domain in DOMAINS})[:intents]
    by = {i: [e.text for e in train if e.intent == i][:per_intent] for i in names}
    return by, [(e.text, e.intent) for e in val if e.intent in by], {e.intent: e.domain for e in train}


def build(index_dir: Path | None, by: dict, domain: dict, **cfg: object) -> tuple[Router, dict[int, str]]:
    names: dict[int, str] = {}
    router = Router(SMoAConfig(enable_caching=False, **cfg), index_dir, lambda ks: [names.get(k, "") for k in ks])
    for j, (intent, texts) in enumerate(sorted(by.items())):
        it = RoutingText([domain[intent]], [intent], "", texts)
        names[j + 1] = intent
        router.apply([KeyEntry(j + 1, router.encode_keys([it])[0], it.domain_tags, it.skill_tags)], [], j + 1)
    return router, names


def top1(router: Router, val: list[tuple[str, str]], fast: bool = True) -> float:
    keep = router._fast
    router._fast = keep if fast else None
    try:
        return float(np.mean([router.route(t, strategy="semantic").adapter_ids[:1] == [i] for t, i in val]))
    finally:
        router._fast = keep


def test_adaptation_separates_held_out_texts_better(monkeypatch) -> None:
    monkeypatch.setattr(qa, "MIN_STEPS", 0)  # the epochs given, not the small-library floor (CI time)
    by, val, _ = clinc_or_skip(per_intent=30, intents=10)
    texts = [t for i in sorted(by) for t in by[i]]
    labels = [j for j, i in enumerate(sorted(by)) for _ in by[i]]
    weights, hist = qa.train_query_lora(texts, labels, epochs=3.0)
    assert hist.steps >= 10 and hist.final_loss < 1.0, hist
    from smoa.routing.encoders import get_encoder

    base, adapted = get_encoder("minilm-int8"), qa.AdaptedEncoder(weights)
    names = sorted(by)
    y = np.array([names.index(i) for _, i in val])

    def margin(enc) -> tuple[float, float]:  # held-out: centroid top-1 and mean (own - best other) cosine
        cents = np.stack([enc.encode(by[i]).mean(0) for i in names])
        cents /= np.linalg.norm(cents, axis=1, keepdims=True)
        s = enc.encode([t for t, _ in val]) @ cents.T
        own = s[np.arange(len(y)), y]
        s[np.arange(len(y)), y] = -np.inf
        return float((own > s.max(1)).mean()), float((own - s.max(1)).mean())

    (acc0, m0), (acc1, m1) = margin(base), margin(adapted)
    assert m1 > m0 + 0.02, (m0, m1)
    assert acc1 >= acc0 - 0.02, (acc0, acc1)


def _random_factors(seed: int, scale: float = 0.05) -> dict:
    """Query-LoRA factors ``(A [r, d_in], B [d_out, r])`` for every target module, random (seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = {m: (384, 384) if "attention" in m else (384, 1536) if "intermediate" in m else (1536, 384)
              for m in qa.target_modules()}  # (d_in, d_out)  # fmt: skip
    return {m: (torch.randn(qa.RANK, i, generator=g) * scale, torch.randn(o, qa.RANK, generator=g) * scale)
            for m, (i, o) in shapes.items()}  # fmt: skip


def test_the_adapted_encoder_is_the_merged_fp32_model_within_int8_rounding() -> None:
    """The learned query encoder against an independent reference: MiniLM in fp32 (transformers, no smoa code) with
    ``W + alpha / r * B @ A`` written into each target linear by hand. The block-int8 graph the router runs must give
    the same embeddings within int8 rounding (>= 0.998 cosine for every text; the fp32-computing int8 graph is held
    to 0.999 in ``test_encoders``); torch's dynamic int8 path it replaced was 0.76 at worst on CLINC150 val (mean
    0.94, ``benchmarks/bench_query_encoder.py``)."""
    import torch
    from transformers import AutoModel

    from smoa.adapter.weights import LoraWeights
    from smoa.routing.encoders._paths import minilm_dir
    from smoa.routing.encoders.onnx_int8 import load_minilm_tokenizer

    factors = _random_factors(seed=0)
    weights = LoraWeights(factors=factors, alpha=qa.ALPHA, rank=qa.RANK)
    enc = qa.AdaptedEncoder(weights)
    ref = AutoModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()
    with torch.no_grad():
        for m, (a, b) in factors.items():
            ref.get_submodule(m).weight += (qa.ALPHA / qa.RANK) * b @ a
    texts = ["what is my account balance", "book me a table for two at an italian place tonight",
             "how do i say thank you in french", "a much longer text about a hold on my checking account " * 6]
    tok = load_minilm_tokenizer()
    with torch.no_grad():
        e = tok.encode_batch(texts)
        ids, mask = torch.tensor([x.ids for x in e]), torch.tensor([x.attention_mask for x in e])
        hs = ref(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        want = torch.nn.functional.normalize((hs * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=1).numpy()
    got = enc.encode(texts)
    cos = (got * want).sum(1)
    assert cos.min() >= 0.998, cos
    # the adaptation changed something: the base encoder is further from the reference than the adapted one
    from smoa.routing.encoders import get_encoder

    base = (get_encoder("minilm-int8").encode(texts) * want).sum(1)
    assert base.max() < 0.995 and (cos > base).all(), (base, cos)
    one = np.concatenate([enc.encode([t]) for t in texts])  # one text at a time: the same vectors as in a batch
    np.testing.assert_allclose(one, got, atol=1e-6)
    # short texts take the block-int8 graph, the long one (past BLOCK_INT8_CHARS) the fp32 products
    assert [len(t) > qa.BLOCK_INT8_CHARS for t in texts] == [False, False, False, True]
    fp32 = qa.AdaptedEncoder(weights, block_int8=False).encode(texts)
    np.testing.assert_array_equal(got[3], fp32[3])
    assert not np.array_equal(got[:3], fp32[:3]) and ((got[:3] * fp32[:3]).sum(1) > 0.998).all()


def test_an_onnxruntime_without_the_block_int8_kernel_falls_back_to_fp32_products(monkeypatch, caplog) -> None:
    """Where onnxruntime cannot run the block-int8 graph (no 8-bit ``MatMulNBits`` kernel on that platform, here a
    node it refuses), the learned encoder is built on the int8-stored graph with fp32 products instead, with a
    warning: the same vectors as asked for directly, not an adaptation that fails."""
    import logging

    from onnx import helper

    from smoa.adapter.weights import LoraWeights
    from smoa.routing.encoders import onnx_int8

    real = onnx_int8._block_int8

    def broken(model) -> None:
        real(model)
        for node in model.graph.node:
            if node.op_type == "MatMulNBits":
                node.attribute.append(helper.make_attribute("no_such_attribute", 1))
                node.op_type = "NoSuchOp"

    monkeypatch.setattr(onnx_int8, "_block_int8", broken)
    weights = LoraWeights(factors=_random_factors(seed=1), alpha=qa.ALPHA, rank=qa.RANK)
    with caplog.at_level(logging.WARNING, logger="smoa.routing.adapt"):
        enc = qa.AdaptedEncoder(weights)
    assert "block int8 query encoder refused" in caplog.text
    texts = ["what is my account balance", "book a table for two"]
    np.testing.assert_array_equal(enc.encode(texts), qa.AdaptedEncoder(weights, block_int8=False).encode(texts))


def test_requantized_model_refuses_a_weight_the_graph_does_not_hold() -> None:
    from smoa.routing.encoders.onnx_int8 import requantized_model

    w = np.random.default_rng(0).standard_normal((384, 384)).astype(np.float32)
    with pytest.raises(ValueError, match=r"changes\[0\]: no int8 weight of the graph matches"):
        requantized_model([(w, w)])


def test_router_adapts_off_its_lock_persists_and_refuses_a_corrupt_file(tmp_path: Path, monkeypatch) -> None:
    from smoa.routing import router as router_mod

    monkeypatch.setattr(qa, "EPOCHS", 6.0)  # a tiny library: more passes than the default's 2 over 15K examples
    monkeypatch.setattr(qa, "MIN_STEPS", 0)  # (CI time: 14 steps are enough to show the mechanism)
    monkeypatch.setattr(router_mod, "ADAPT_MIN_EXAMPLES", 100)  # (the defaults wait for 500 examples)
    by, val, domain = clinc_or_skip()
    router, _ = build(tmp_path, by, domain)
    assert router.wait_fast_path(300)
    before = top1(router, val, fast=False)
    assert router.query_encoder is router.encoder
    served, stop = [], threading.Event()

    def serve() -> None:  # routes keep being answered while the LoRA trains
        while not stop.wait(0.001):  # up to ~1,000 routes a second: back to back (a Python loop that never lets go of
            # the GIL) the work that stays in this process (building the adapted encoder, refitting the keys) took
            # minutes (docs/bench_routing.md, "Training the query LoRA beside the routes")
            t = time.perf_counter()
            router.route(val[len(served) % len(val)][0])
            served.append(time.perf_counter() - t)

    from smoa.routing.encoders import CachedEncoder

    batches = []  # example batches the adapted encoder encodes in this process (the child encodes them)
    encode_batch = CachedEncoder.encode_batch

    def spy(self, texts):
        if isinstance(self.inner, qa.AdaptedEncoder):
            batches.append(len(texts))
        return encode_batch(self, texts)

    monkeypatch.setattr(CachedEncoder, "encode_batch", spy)
    built = []  # the encoder's graphs built in this process (the child builds them)
    encoder_graphs = qa.encoder_graphs
    monkeypatch.setattr(qa, "encoder_graphs", lambda *a, **kw: built.append(1) or encoder_graphs(*a, **kw))
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        report = router.refit()  # first refit with enough examples: trains the query encoder
    finally:
        stop.set()
        thread.join()
    assert report["adopted"] == 1.0 and report["adapt_seconds"] > 0 and len(served) >= 10, (report, len(served))
    assert batches == [], batches  # the examples came back encoded from the training child
    assert built == [], built  # and the encoder's graphs built there
    st0 = router._learner.stored[1]  # ... as this process' adapted encoder encodes them, bit for bit
    assert np.array_equal(st0.examples, router.query_encoder.encode_batch(list(st0.texts)).astype(st0.examples.dtype))
    assert max(served) < report["adapt_seconds"] / 2  # no route waited for the training
    st = router.statistics()
    assert st["adaptations"] == 1 and st["query_encoder"].startswith("minilm-int8+q"), st
    version = router._learner.adapted_version
    assert st["query_encoder"].endswith(version)
    after = top1(router, val, fast=False)  # the query encoder itself (the other test checks it separates better)
    assert after >= before - 0.05, (before, after)
    assert not router._should_adapt()  # nothing changed since: the next refit does not retrain
    router.save()
    assert (tmp_path / qa.ADAPTED_FILE).is_file()

    # reopened: the same version, the same routes
    again = Router(SMoAConfig(enable_caching=False), tmp_path, router._resolve)
    assert again.load(router.generation) == router.generation
    assert again.query_encoder.name == st["query_encoder"]
    again.wait_fast_path(300)
    router._fast = again._fast = None  # compare the query encoders themselves (the fast path depends on caches)
    q = [t for t, _ in val[:20]]
    # top-1 (the persisted keys are float16: near-ties may swap)
    same = [again.route(t).adapter_ids[:1] == router.route(t).adapter_ids[:1] for t in q]
    assert np.mean(same) >= 0.9, same

    # a flipped byte: the whole learned encoder is refused, the index rebuilt, the learner back in the base space
    raw = bytearray((tmp_path / qa.ADAPTED_FILE).read_bytes())
    raw[-5] ^= 0xFF
    (tmp_path / qa.ADAPTED_FILE).write_bytes(bytes(raw))
    with pytest.raises(qa.AdaptedEncoderError):
        qa.load_adapted(tmp_path, version, "minilm-int8")
    third = Router(SMoAConfig(enable_caching=False), tmp_path, router._resolve)
    assert third.load(router.generation) is None  # the core rebuilds the index from the catalog
    assert third.query_encoder is third.encoder and third._learner.adapted_version == ""
    assert len(third._learner.with_examples()) == len(by) and third._should_adapt()  # retrained at the next refit


def test_truncated_or_foreign_files_are_refused(tmp_path: Path) -> None:
    from smoa.adapter.weights import init_lora
    from smoa.adapter.profile import BaseProfile

    mods = qa.target_modules()
    shapes = tuple((m, 384, 384) if "attention" in m else (m, 384, 1536) if "intermediate" in m else (m, 1536, 384)
                   for m in mods)  # fmt: skip
    w = init_lora(BaseProfile(name="minilm", modules=shapes), mods, qa.RANK, qa.ALPHA)
    version = qa.save_adapted(tmp_path, w, "minilm-int8")
    assert qa.load_adapted(tmp_path, version, "minilm-int8").rank == qa.RANK
    with pytest.raises(qa.AdaptedEncoderError, match="base"):
        qa.load_adapted(tmp_path, version, "minilm")
    with pytest.raises(qa.AdaptedEncoderError, match="version"):
        qa.load_adapted(tmp_path, "0" * 16, "minilm-int8")
    data = (tmp_path / qa.ADAPTED_FILE).read_bytes()
    (tmp_path / qa.ADAPTED_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(qa.AdaptedEncoderError):
        qa.load_adapted(tmp_path, version, "minilm-int8")
    (tmp_path / qa.ADAPTED_FILE).unlink()
    with pytest.raises(qa.AdaptedEncoderError, match="unreadable"):
        qa.load_adapted(tmp_path, version, "minilm-int8")


def test_the_training_child_gives_the_factors_of_this_thread_bit_for_bit(monkeypatch) -> None:
    monkeypatch.setattr(qa, "MIN_STEPS", 0)  # knobs set here reach the child (it trains 3 steps, not 100)
    by, _, _ = clinc_or_skip(per_intent=16, intents=4)
    texts = [t for i in sorted(by) for t in by[i]]
    labels = [j for j, i in enumerate(sorted(by)) for _ in by[i]]
    here, h_here = qa.train_query_lora(texts, labels, epochs=3.0, in_subprocess=False)
    child, h_child = qa.train_query_lora(texts, labels, epochs=3.0, in_subprocess=True)
    assert h_child.steps == h_here.steps == 3 and not h_child.stopped, (h_here, h_child)
    assert child.to_bytes() == here.to_bytes()
    assert h_child.final_loss == h_here.final_loss


def test_the_training_child_encodes_the_groups_as_this_process_would_bit_for_bit(monkeypatch, tmp_path: Path) -> None:
    """``adapt_encoder``'s child embeds each group as one ``encode_batch`` call of a fresh adapted encoder here
    would; a bad embeddings file from a child is refused, never unpickled."""
    from smoa.routing.encoders import CachedEncoder

    monkeypatch.setattr(qa, "MIN_STEPS", 0)
    by, _, _ = clinc_or_skip(per_intent=8, intents=3)
    texts = [t for i in sorted(by) for t in by[i]]
    labels = [j for j, i in enumerate(sorted(by)) for _ in by[i]]
    groups = [by[i] for i in sorted(by)] + [["a routing text"], texts[:3] + ["a much longer text " * 20]]
    done = qa.adapt_encoder(texts, labels, groups, epochs=2.0, in_subprocess=True)
    assert done.weights is not None and done.vectors is not None and len(done.vectors) == len(groups)
    assert done.graphs is not None and done.graphs[1] is not None  # the encoder's two graphs, built there too
    here = CachedEncoder(qa.AdaptedEncoder(done.weights), max_size=0)
    theirs = CachedEncoder(qa.AdaptedEncoder(done.weights, graphs=done.graphs), max_size=0)
    for g, v in zip(groups, done.vectors):
        assert v.dtype == np.float32 and np.array_equal(v, here.encode_batch(g))
        assert np.array_equal(theirs.encode_batch(g), v)
    # a text's embedding does not depend on the batch it came in (torch's dynamic int8 scaled activations per batch)
    np.testing.assert_allclose(done.vectors[-1][:3], here.encode_batch(texts[:3]), atol=1e-6)
    alone = qa.adapt_encoder(texts, labels, groups, epochs=2.0, in_subprocess=False)
    assert alone.vectors is None and alone.graphs is None  # the caller encodes and builds

    # graphs the child wrote for other factors are not used (the caller builds them)
    for name, graph in zip(qa.GRAPH_FILES, done.graphs):
        (tmp_path / name).write_bytes(graph)
    (tmp_path / "graphs.json").write_text(json.dumps({"version": "0123456789abcdef"}))
    assert qa._read_graphs(tmp_path, qa.version_of(done.weights.to_bytes())) is None
    (tmp_path / "graphs.json").write_text(json.dumps({"version": qa.version_of(done.weights.to_bytes())}))
    assert qa._read_graphs(tmp_path, qa.version_of(done.weights.to_bytes())) == done.graphs

    bad = tmp_path / "embeddings.npy"
    for x in (np.zeros((4, 384), np.float64), np.zeros((3, 384), np.float32), np.full((4, 384), np.nan, np.float32)):
        np.save(bad, x)
        with pytest.raises(RuntimeError, match="expected float32"):
            qa._read_vectors(bad, [1, 3])
    np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RuntimeError, match="unreadable"):
        qa._read_vectors(bad, [1])


def test_a_stopped_training_child_is_killed_and_reports_stopped() -> None:
    by, _, _ = clinc_or_skip(per_intent=16, intents=4)
    texts = [t for i in sorted(by) for t in by[i]]
    labels = [j for j, i in enumerate(sorted(by)) for _ in by[i]]
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()  # the child is still importing torch or training its 100 steps
    t = time.perf_counter()
    weights, hist = qa.train_query_lora(texts, labels, epochs=50.0, stop=stop)
    assert weights is None and hist.stopped and hist.steps == 0, hist
    assert time.perf_counter() - t < 10.0


def test_a_failing_training_child_raises_with_its_output(monkeypatch) -> None:
    monkeypatch.setattr(qa, "_CHILD_ENTRY", "sys:exit")  # exits 1, printing its argument (the request's directory)
    with pytest.raises(RuntimeError, match=r"exit 1\): \S*smoa-qlora-"):
        qa.train_query_lora(["a b", "c d"], [0, 1], epochs=1.0)


def test_without_a_child_process_it_trains_in_this_thread(monkeypatch, caplog: pytest.LogCaptureFixture) -> None:
    import subprocess

    def refuse(*a, **k):
        raise PermissionError("no processes in this sandbox")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(qa, "MIN_STEPS", 0)
    by, _, _ = clinc_or_skip(per_intent=8, intents=3)
    texts = [t for i in sorted(by) for t in by[i]]
    labels = [j for j, i in enumerate(sorted(by)) for _ in by[i]]
    with caplog.at_level("WARNING", logger="smoa.routing.adapt"):
        weights, hist = qa.train_query_lora(texts, labels, epochs=2.0)
    assert weights is not None and hist.steps == 1 and "training in this thread" in caplog.text


def test_release_frees_a_replaced_encoder_unless_still_in_use() -> None:
    import gc
    import weakref

    from smoa.adapter.weights import LoraWeights
    from smoa.routing.encoders import CachedEncoder

    weights = LoraWeights(factors=_random_factors(seed=3), alpha=qa.ALPHA, rank=qa.RANK)
    texts = ["what is my account balance", "a much longer text about a hold on my checking account " * 8]
    holder = [CachedEncoder(qa.AdaptedEncoder(weights), 16)]
    want = holder[0].encode(texts)
    gc.collect()  # transformers' loading leaves a cycle through the constructor's frame (collected at once when on)
    gc.disable()  # only reference counts free it here: the check is that release drops the last ones
    try:
        parts = [weakref.ref(holder[0]), weakref.ref(holder[0].inner), weakref.ref(holder[0].inner._long),
                 weakref.ref(holder[0].inner._short)]  # fmt: skip
        assert parts[2]() is not parts[3]()  # two graphs: the block int8 one and the fp32 products
        qa.release(holder)
        assert holder == [] and all(p() is None for p in parts)

        # one still in use (a route's escalation encoding with it): left whole, and it still encodes
        holder = [CachedEncoder(qa.AdaptedEncoder(weights), 16)]
        user = holder[0]
        gc.collect()
        qa.release(holder)
        assert holder == [] and user.inner._long.session is not None
        np.testing.assert_array_equal(user.encode(texts), want)
    finally:
        gc.enable()
