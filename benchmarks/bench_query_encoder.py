"""What does the learned query encoder cost per query, and how faithful is it to the model it was trained as?

The router's learned query encoder (:mod:`smoa.routing.adapt`) is MiniLM with a query LoRA merged into its weights.
It is trained in fp32; what serves the queries is an int8 approximation. Side by side, on the CLINC150 val queries
(3,000) and the train examples (15,000, the keys), one thread:

* ``base int8 (onnxruntime)``: the default encoder, the packaged int8 ONNX graph;
* ``adapted, block int8`` (the router's, since 2026-12-07 00:45 UTC): the merged weights stored in that same graph
  (:func:`smoa.routing.encoders.onnx_int8.requantized_model`), every linear run as onnxruntime's ``MatMulNBits``
  (8-bit weights per block of 32 inputs, int8 products, each token's activations quantised per block);
* ``adapted, int8-stored, fp32 products`` (the router's from 2026-12-06 23:45 UTC to 2026-12-07 00:45 UTC): the same
  graph computing as the base one does, fp32 products over int8-per-column weights;
* ``adapted, torch dynamic int8`` (the router's before): the merged fp32 model through
  ``torch.ao.quantization.quantize_dynamic`` (weights int8 per tensor, activations int8 scaled per batch),
  rebuilt here as it was, for the comparison.

Columns: mean / min cosine of each query's embedding to the fp32 merged model's (transformers, the LoRA added to
each target weight by hand: ``W + alpha / r * B @ A``; for the base row, the fp32 MiniLM); top-1 on val of the
nearest centroid and of the nearest example (keys = the train examples encoded by the same encoder); one query at a
time p50 / p99 ms (rounds of 500 queries per encoder, rotating, after a warm-up); train examples encoded per
second in batches. A second table: one text at a time through the block-int8 graph alone and the fp32 products at
four text lengths (what ``BLOCK_INT8_CHARS`` rests on). The query LoRA is the router's own: the defaults' router over the 150 intents, refitted as
``optimize_library()`` does (trained once, then read from the benchmark cache, as ``eval_clinc.py`` does).

Run: ``python benchmarks/bench_query_encoder.py`` (~5 min on 2 cores, once the query LoRA is cached).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

import bench_routing
import eval_clinc
from smoa.data.clinc import clinc150
from smoa.routing import adapt as qa
from smoa.routing.encoders import get_encoder, l2_normalize


def _mean_pooled(model, tokenizer, texts: list[str]) -> np.ndarray:
    """A transformers MiniLM's unit-norm mean-pooled embeddings of ``texts``, in batches of 64 (the training's
    pooling, :func:`smoa.routing.adapt._pool`)."""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), 64):
            enc = tokenizer.encode_batch(list(texts[s : s + 64]))
            ids = torch.tensor([e.ids for e in enc])
            mask = torch.tensor([e.attention_mask for e in enc])
            hs = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            out.append(qa._pool(hs, mask).numpy())
    return np.concatenate(out)


class TorchDynamicInt8:
    """The adapted encoder as it was before 2026-12-06 23:45 UTC: the merged fp32 model, torch dynamic int8."""

    def __init__(self, weights) -> None:
        import torch

        from smoa.routing.encoders.onnx_int8 import load_minilm_tokenizer

        with qa._threads(1):
            bb = qa._Backbone()
            bb.handle.set_mixtures([(weights, 1.0)])
            bb.handle.merge()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = torch.ao.quantization.quantize_dynamic(bb.model, {torch.nn.Linear}, dtype=torch.qint8)
        self._handle = bb.handle
        self.tokenizer = load_minilm_tokenizer()

    def encode(self, texts: list[str]) -> np.ndarray:
        with qa._threads(1):
            return _mean_pooled(self.model, self.tokenizer, texts)


class Fp32Reference:
    """fp32 MiniLM (transformers, no smoa code on the forward) with ``W + alpha / r * B @ A`` written into each
    target linear (``weights`` None: the base model)."""

    def __init__(self, weights=None) -> None:
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        from smoa.routing.encoders._paths import minilm_dir
        from smoa.routing.encoders.onnx_int8 import load_minilm_tokenizer

        hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
        self.model = AutoModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()
        if weights is not None:
            with torch.no_grad():
                for m, (a, b) in weights.factors.items():
                    self.model.get_submodule(m).weight += weights.scaling * b.float() @ a.float()
        self.tokenizer = load_minilm_tokenizer()

    def encode(self, texts: list[str]) -> np.ndarray:
        return _mean_pooled(self.model, self.tokenizer, texts)


def router_weights():  # -> LoraWeights
    """The query LoRA the defaults' router learns over the 150 CLINC150 intents (``optimize_library()``'s refit)."""
    eval_clinc.memo_adaptation()
    router, _ = bench_routing.budget_router(150, np.random.default_rng(0))
    if router._adapted is None:
        raise SystemExit("the router adopted no learned query encoder")
    return router._adapted.inner.weights


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds of 500 single-query encodes per encoder")
    args = ap.parse_args(argv)
    weights = router_weights()
    train, val = clinc150("train"), clinc150("val")
    intents = sorted({e.intent for e in train})
    ix = {k: i for i, k in enumerate(intents)}
    y_tr, y_va = np.array([ix[e.intent] for e in train]), np.array([ix[e.intent] for e in val])
    tr_texts, va_texts = [e.text for e in train], [e.text for e in val]

    encoders = {"base int8 (onnxruntime)": get_encoder("minilm-int8"),
                "adapted, block int8 (now)": qa.AdaptedEncoder(weights),
                "adapted, int8-stored, fp32 products": qa.AdaptedEncoder(weights, block_int8=False),
                "adapted, torch dynamic int8 (before)": TorchDynamicInt8(weights)}  # fmt: skip
    refs = {"base": Fp32Reference().encode(va_texts), "adapted": Fp32Reference(weights).encode(va_texts)}
    rows = {}
    for name, enc in encoders.items():
        t = time.perf_counter()
        keys = enc.encode(tr_texts)
        per_s = len(tr_texts) / (time.perf_counter() - t)
        q = enc.encode(va_texts)
        cos = (q * refs["base" if name.startswith("base") else "adapted"]).sum(1)
        cents = l2_normalize(np.stack([keys[y_tr == c].mean(0) for c in range(len(intents))]))
        s = q @ keys.T
        nearest = np.stack([s[:, y_tr == c].max(1) for c in range(len(intents))], axis=1)
        rows[name] = {"cos": (float(cos.mean()), float(cos.min())), "per_s": per_s,
                      "centroid": 100 * float(np.mean((q @ cents.T).argmax(1) == y_va)),
                      "nearest": 100 * float(np.mean(nearest.argmax(1) == y_va)), "ms": []}  # fmt: skip
    for enc in encoders.values():
        for text in va_texts[:20]:
            enc.encode([text])
    names = list(encoders)
    for r in range(args.rounds):
        for j in range(len(names)):
            name = names[(j + r) % len(names)]
            chunk = va_texts[(r * 500) % len(va_texts) :][:500]
            for text in chunk:
                t = time.perf_counter()
                encoders[name].encode([text])
                rows[name]["ms"].append((time.perf_counter() - t) * 1e3)
    print("| encoder | cosine to its fp32 model, mean / min | top-1 nearest centroid % | top-1 nearest example % | "
          "one query p50 / p99 ms | batch texts/s |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        p50, p99 = np.percentile(r["ms"], [50, 99])
        print(f"| {name} | {r['cos'][0]:.4f} / {r['cos'][1]:.4f} | {r['centroid']:.2f} | {r['nearest']:.2f} | "
              f"{p50:.2f} / {p99:.2f} | {r['per_s']:.0f} |")
    by_length(encoders["adapted, block int8 (now)"]._short, encoders["adapted, int8-stored, fp32 products"], va_texts)
    return 0


def by_length(block, fp32, texts: list[str], per_size: int = 60) -> None:
    """One text at a time, the block-int8 graph alone against the fp32 products, at four lengths (val queries joined
    by 1, 4, 10 and 20): where ``smoa.routing.adapt.BLOCK_INT8_CHARS`` draws the line between them."""
    print("\n| val queries joined | tokens (mean) | characters (mean) | block int8 p50 ms | fp32 products p50 ms |\n"
          "|---|---|---|---|---|")
    for join in (1, 4, 10, 20):
        group = [" ".join(texts[i : i + join]) for i in range(0, per_size * join, join)]
        tokens = np.mean([len(block.tokenizer.encode(t).ids) for t in group])
        ms = {}
        for name, enc in (("block", block), ("fp32", fp32)):
            for text in group[:5]:
                enc.encode([text])
            times = []
            for text in group:
                t = time.perf_counter()
                enc.encode([text])
                times.append((time.perf_counter() - t) * 1e3)
            ms[name] = float(np.median(times))
        print(f"| {join} | {tokens:.0f} | {np.mean([len(t) for t in group]):.0f} | {ms['block']:.2f} | {ms['fp32']:.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
