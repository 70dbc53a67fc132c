"""Query-side adaptation of the encoder: a LoRA on MiniLM trained on the adapters' own examples (issue 11).

A frozen MiniLM with learned keys tops out near 95 % top-1 on CLINC150; the router learns further by adapting the
encoder itself. smoa's own LoRA machinery hosts it: :func:`smoa.inject.attach` wraps MiniLM's linear layers in
:class:`~smoa.inject.layer.MixtureLinear`, the factors are a :class:`~smoa.adapter.weights.LoraWeights`
(``init_lora``), trained by a plain loop that reuses :mod:`smoa.train.loop`'s batch order and warmup/cosine
schedule (its ``train_adapter_weights`` is a causal-LM loop; this objective is a sentence-level one)::

    examples of adapter a ──MiniLM layers 0..S-1 (frozen, run once, states cached)──► h_x
    h_x ──layers S..5 with LoRA (rank 8 on q, k, v, attention out, FFN in/out)──► mean pool ──► e(x), unit
    loss = cross-entropy over adapters of  cos(e(x), w_a) / tau      (NormFace; w_a trained too, from centroids)

The training runs in a child interpreter at a lower CPU priority (:func:`train_query_lora`, ``in_subprocess``): in
the serving process it would share the GIL with the routes (a thread that wants it back waits up to Python's switch
interval, 5 ms, while another runs Python). With routes served back to back beside it, a training in a thread of
the serving process took 1.3x as long as alone and raised the routes' p99 from 0.45 to 0.55 ms; in the child it
takes about as long as alone and the p99 does not move (``benchmarks/bench_adapt_load.py``, ``docs/bench_routing.md``).
The child then encodes the library's examples with the new encoder too (:func:`adapt_encoder`), so the serving
process only builds the encoder, refits the keys and swaps.

Inference: the factors are merged into the fp32 weights (:meth:`MixtureHandle.merge`), and those linears are
stored in the base encoder's own int8 graph (:func:`~smoa.routing.encoders.onnx_int8.requantized_model`), whose
every linear then runs as onnxruntime's ``MatMulNBits``: 8-bit weights per block of 32 inputs, int8 products
with each token's activations quantised per block (``block_int8``), for texts up to :data:`BLOCK_INT8_CHARS`
characters; longer ones, where those products are slower, run through the same weights with fp32 products. So an
:class:`AdaptedEncoder` releases the GIL while it computes, gives a text the same embedding whatever batch it is
encoded in, and costs less per query than the base graph, which computes in fp32 over its int8-stored weights
(``benchmarks/bench_query_encoder.py``).
Before, torch's dynamic int8 quantisation (``quantize_dynamic``) ran the merged model: its activations were scaled
per batch, so the same text in another batch gave another vector, it was 0.94 in mean cosine from the fp32 model
it approximates (this graph: 0.9992), and its keys and queries ranked CLINC150 val 0.5-0.6 points worse
(``docs/bench_routing.md``). Its ``name`` carries the version (a content hash of the factors), so every embedding cached
or persisted under one version is never mixed with another.

Persistence (:func:`save_adapted` / :func:`load_adapted`): the factors as safetensors (smoa's strict writer and
reader, :meth:`LoraWeights.to_bytes`) with a JSON sidecar; the version is the sha256 of the bytes and is also
recorded in the router's checksummed learner state. Anything that does not match (missing, truncated, other
version, other modules or shapes, non-finite) raises :class:`AdaptedEncoderError` and nothing is loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smoa.routing.child import CHILD_NICE, NoChild, child_failed, run_child  # CHILD_NICE: benchmarks set it here
from smoa.routing.encoders import l2_normalize

logger = logging.getLogger(__name__)

# the block-int8 graph (MatMulNBits, int8 products) is faster for short texts and slower for long ones (one text,
# 2-core box, `benchmarks/bench_query_encoder.py`: 48 characters 3.2 against 5.2 ms, 168: 9.3 against 10.9, 430:
# 23.3 against 22.1, 814: 47.8 against 43.7): texts up to this many characters take it, longer ones the fp32
# products (AdaptedEncoder.encode)
BLOCK_INT8_CHARS = 320
SPLIT = 3  # layers below are frozen (their states are cached once per training); LoRA on layers SPLIT..5
N_LAYERS = 6
SUFFIXES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
            "intermediate.dense", "output.dense")  # fmt: skip
RANK = 8
ALPHA = 16.0
TEMPERATURE = 0.05
LR = 2e-3  # LoRA factors; the class weights use KEY_LR
KEY_LR = 5e-3
BATCH = 64
EPOCHS = 2.0
MIN_STEPS = 100  # a small library (the main job's 5 topics x 128 stored examples: 16 steps at 2 epochs) still gets
# this many updates (BBC routing-only top-1 after the refit: 16 steps 84 %, 100 steps 90-94 %, 160 steps 92 %) ...
MAX_EPOCHS = 16.0  # ... but never more passes than this over its examples (a tiny library over-fits)
MAX_TOKENS = 64  # routing queries are short; training examples are cut here (inference keeps 256)
MIN_ADAPTERS = 2
IN_SUBPROCESS = True  # train in a child interpreter (train_query_lora): neither it nor the routes wait for the GIL
FORMAT = "smoa-query-lora-v3"  # v1: torch dynamic int8, v2: fp32 products (other embeddings): refused, retrained
ADAPTED_FILE = "query_lora.safetensors"


class AdaptedEncoderError(ValueError):
    """A learned query-encoder file is refused (missing, corrupt, other version or shape)."""


def target_modules() -> list[str]:
    """MiniLM module names that carry the query LoRA."""
    return [f"encoder.layer.{i}.{s}" for i in range(SPLIT, N_LAYERS) for s in SUFFIXES]


@contextlib.contextmanager
def _threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Backbone:
    """fp32 MiniLM (transformers) with smoa mixture layers on :func:`target_modules`."""

    def __init__(self) -> None:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        from smoa.inject.attach import attach
        from smoa.routing.encoders._paths import minilm_dir, set_offline
        from smoa.routing.encoders.onnx_int8 import load_minilm_tokenizer

        set_offline()
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
        try:
            self.model = AutoModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
        self.handle = attach(self.model, target_modules())
        self.tokenizer = load_minilm_tokenizer(MAX_TOKENS)

    def tokens(self, texts: Sequence[str]):
        import torch

        enc = self.tokenizer.encode_batch(list(texts))
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])  # [n, t] each

    def layers(self, hs, mask, lo: int, hi: int):
        """Run encoder layers ``lo..hi-1`` on states ``hs`` ``[n, t, 384]`` with attention mask ``[n, t]``."""
        from transformers.masking_utils import create_bidirectional_mask

        full = create_bidirectional_mask(config=self.model.config, inputs_embeds=hs, attention_mask=mask)
        for i in range(lo, hi):
            out = self.model.encoder.layer[i](hs, attention_mask=full)
            hs = out[0] if isinstance(out, tuple) else out
        return hs

    def bottom(self, texts: Sequence[str]) -> list:
        """Frozen states after layer ``SPLIT`` of each text: list of float16 ``[t_i, 384]`` (no padding)."""
        import torch

        order = np.argsort([len(t) for t in texts], kind="stable")
        out: list = [None] * len(texts)
        with torch.inference_mode():
            for s in range(0, len(texts), 256):
                idx = order[s : s + 256]
                ids, mask = self.tokens([texts[i] for i in idx])
                hs = self.layers(self.model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids)), mask, 0, SPLIT)
                for r, i in enumerate(idx):
                    out[i] = hs[r, : int(mask[r].sum())].to(torch.float16).clone()
        return out


def _pad(states: list, idx: Sequence[int]):
    import torch

    width = max(len(states[i]) for i in idx)
    hs = torch.zeros(len(idx), width, states[idx[0]].shape[1])
    mask = torch.zeros(len(idx), width, dtype=torch.long)
    for r, i in enumerate(idx):
        hs[r, : len(states[i])] = states[i].float()
        mask[r, : len(states[i])] = 1
    return hs, mask  # [b, t, d], [b, t]


def _pool(hs, mask):
    import torch

    m = mask.unsqueeze(-1).to(hs.dtype)
    return torch.nn.functional.normalize((hs * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)  # [b, d]


@dataclass
class AdaptHistory:
    """What a query-LoRA training did: steps, seconds (states cached + steps), examples, adapters, final loss."""

    steps: int = 0
    seconds: float = 0.0
    examples: int = 0
    adapters: int = 0
    final_loss: float = float("nan")
    stopped: bool = False


@dataclass
class Adapted:
    """What :func:`adapt_encoder` returns: the factors (``None``: stopped), the training's history, the
    ``encode`` groups' embeddings by the adapted encoder (``None`` where they were not computed: the caller
    encodes them itself) and the encoder's graphs (:func:`encoder_graphs`; ``None``: the caller builds them)."""

    weights: object  # LoraWeights | None
    history: AdaptHistory
    vectors: list[np.ndarray] | None = None
    graphs: tuple[bytes, bytes | None] | None = None  # encoder_graphs(weights), built by the training child


def train_query_lora(
    texts: Sequence[str],
    labels: Sequence[int],
    epochs: float = EPOCHS,
    seed: int = 0,
    threads: int = 1,
    stop: threading.Event | None = None,
    in_subprocess: bool | None = None,
):  # -> tuple[LoraWeights | None, AdaptHistory]
    """Train the query LoRA on example ``texts`` labelled by adapter (``labels``, ints) (module docstring).

    The result does not depend on the order of the examples (they are sorted by text and the adapters
    relabelled by their first example before training). ``stop`` set: return ``(None, history)`` early
    (``history.stopped``).

    ``in_subprocess`` (default :data:`IN_SUBPROCESS`): train in a child interpreter (:func:`_train_in_child`), so
    that the training and the routes served meanwhile do not take the GIL from each other; the same factors as
    in this thread, bit for bit. Where no child can be started (``OSError``), it trains in this thread.
    """
    out = adapt_encoder(texts, labels, (), epochs, seed, threads, stop, in_subprocess)
    return out.weights, out.history


def adapt_encoder(
    texts: Sequence[str],
    labels: Sequence[int],
    encode: Sequence[Sequence[str]] = (),
    epochs: float = EPOCHS,
    seed: int = 0,
    threads: int = 1,
    stop: threading.Event | None = None,
    in_subprocess: bool | None = None,
    base: str = "minilm-int8",
    encode_threads: int | None = None,
) -> Adapted:
    """:func:`train_query_lora`, then each group of texts in ``encode`` embedded by the adapted encoder
    (:class:`AdaptedEncoder` of ``base``, ``encode_threads`` intra-op threads), one
    :meth:`~smoa.routing.encoders.CachedEncoder.encode_batch` call per group: the vectors a router's fresh
    :class:`AdaptedEncoder` gives for the same call, bit for bit (the same graph, weights and batches).

    In the training child the encoding runs there too: re-encoding a library's examples (CLINC150: 15,000 texts,
    ~25 s) in the serving process made the whole adaptation 15-30 s longer and the routes' p99 beside it 0.08-0.14
    ms higher (``benchmarks/bench_adapt_load.py --whole``, ``docs/bench_routing.md``). Without a child (``in_subprocess`` false, or none can be started),
    ``vectors`` is ``None`` and the caller encodes.
    """
    from smoa.routing.encoders._paths import encoder_threads

    groups = [list(g) for g in encode]
    if IN_SUBPROCESS if in_subprocess is None else in_subprocess:
        try:
            return _train_in_child(texts, labels, epochs, seed, threads, stop, groups, base,
                                   encode_threads or encoder_threads())  # fmt: skip
        except NoChild as exc:
            logger.warning("smoa routing: no child process for the query LoRA (%s): training in this thread", exc)
    weights, history = _train_here(texts, labels, epochs, seed, threads, stop)
    return Adapted(weights, history)


def _train_in_child(
    texts: Sequence[str], labels: Sequence[int], epochs: float, seed: int, threads: int, stop: threading.Event | None,
    encode: list[list[str]], base: str, encode_threads: int,
) -> Adapted:
    """:func:`_train_here` in a child interpreter (:func:`smoa.routing.child.run_child`), then the ``encode`` groups
    embedded there (:func:`adapt_encoder`). The request as JSON (texts, labels, groups, the training knobs of this
    module as they are now), the factors back as safetensors, read by the strict reader
    (:meth:`LoraWeights.from_bytes`), the embeddings as one float32 ``.npy`` (no pickle), checked for shape and
    finiteness. ``stop`` set: the child is killed. A child that fails raises ``RuntimeError`` with the end of its
    output; one that cannot be started, :class:`~smoa.routing.child.NoChild`."""
    import tempfile

    from smoa.adapter.weights import LoraWeights

    with tempfile.TemporaryDirectory(prefix="smoa-qlora-") as tmp:
        out = Path(tmp)
        request = {"texts": list(texts), "labels": [int(x) for x in labels], "epochs": float(epochs), "seed": int(seed),
                   "threads": int(threads), "knobs": {k: globals()[k] for k in _CHILD_KNOBS},
                   "encode": encode, "base": base, "encode_threads": int(encode_threads)}  # fmt: skip
        (out / "request.json").write_text(json.dumps(request))
        rc = run_child(_CHILD_ENTRY, out, threads, stop, nice=CHILD_NICE)
        if rc is None:
            return Adapted(None, AdaptHistory(examples=len(texts), adapters=len(set(labels)), stopped=True))
        if rc != 0 or not (out / "weights.safetensors").is_file():
            raise child_failed("query-LoRA training", out, rc)
        history = AdaptHistory(**json.loads((out / "history.json").read_text()))
        weights = LoraWeights.from_bytes((out / "weights.safetensors").read_bytes(), name="query LoRA from its trainer")
        vectors = _read_vectors(out / "embeddings.npy", [len(g) for g in encode]) if encode else None
        graphs = _read_graphs(out, version_of(weights.to_bytes()))
    return Adapted(weights, history, vectors, graphs)


def _read_graphs(out: Path, version: str) -> tuple[bytes, bytes | None] | None:
    """The child's encoder graphs (:data:`GRAPH_FILES`) if it wrote them for the factors of ``version``, else
    ``None`` (the caller builds them; a graph onnxruntime refuses is refused when its session is built)."""
    try:
        made_for = json.loads((out / "graphs.json").read_text()).get("version")
        if made_for != version:
            logger.warning("smoa routing: the training child's encoder graphs are for factors %r, not %r: "
                           "building them here", made_for, version)  # fmt: skip
            return None
        long_, short = (out / GRAPH_FILES[0]).read_bytes(), out / GRAPH_FILES[1]
        return long_, short.read_bytes() if short.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def _read_vectors(path: Path, sizes: list[int]) -> list[np.ndarray]:
    """The child's embeddings split into groups of ``sizes``; ``RuntimeError`` unless float32 ``[sum(sizes), 384]``
    and finite (never unpickled)."""
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"query-LoRA training process gave unreadable embeddings ({type(exc).__name__}: {exc})"
        ) from None
    if x.dtype != np.float32 or x.shape != (sum(sizes), AdaptedEncoder.dim) or not np.isfinite(x).all():
        raise RuntimeError(f"query-LoRA training process gave embeddings {x.dtype} {x.shape}, expected float32 "
                           f"({sum(sizes)}, {AdaptedEncoder.dim}), finite")  # fmt: skip
    return np.split(x, np.cumsum(sizes)[:-1])


_CHILD_KNOBS = ("MIN_STEPS", "MAX_EPOCHS", "BATCH", "LR", "KEY_LR", "TEMPERATURE", "MAX_TOKENS")
_CHILD_ENTRY = "smoa.routing.adapt:_child_main"
GRAPH_FILES = ("encoder.onnx", "encoder_block_int8.onnx")  # the child's encoder_graphs, in that order


def _child_main(directory: str) -> None:
    """The training child's entry point (:func:`_train_in_child`; started at nice :data:`CHILD_NICE`)."""
    out = Path(directory)
    request = json.loads((out / "request.json").read_text())
    globals().update({k: request["knobs"][k] for k in _CHILD_KNOBS})
    weights, history = _train_here(request["texts"], request["labels"], request["epochs"], request["seed"],
                                   request["threads"], None)  # fmt: skip
    graphs = encoder_graphs(weights)  # before the factors: their file is what the parent checks for
    for name, graph in zip(GRAPH_FILES, graphs):
        if graph is not None:
            (out / f"{name}.tmp").write_bytes(graph)
            (out / f"{name}.tmp").replace(out / name)
    (out / "graphs.json").write_text(json.dumps({"version": version_of(weights.to_bytes())}))
    if request["encode"]:
        from smoa.routing.encoders import CachedEncoder

        enc = CachedEncoder(AdaptedEncoder(weights, request["base"], request["encode_threads"], graphs=graphs),
                            max_size=0)  # fmt: skip
        vecs = [enc.encode_batch(g) for g in request["encode"]]
        with (out / "embeddings.tmp").open("wb") as f:
            np.save(f, np.concatenate(vecs).astype(np.float32))
        (out / "embeddings.tmp").replace(out / "embeddings.npy")
    tmp = out / "weights.tmp"
    tmp.write_bytes(weights.to_bytes())
    (out / "history.json").write_text(json.dumps(history.__dict__))
    tmp.replace(out / "weights.safetensors")


def _train_here(
    texts: Sequence[str], labels: Sequence[int], epochs: float, seed: int, threads: int, stop: threading.Event | None
):  # -> tuple[LoraWeights | None, AdaptHistory]
    """:func:`train_query_lora` in this thread."""
    import torch

    from smoa.adapter.weights import init_lora
    from smoa.train.loop import batch_order, lr_at

    F = torch.nn.functional
    t0 = time.perf_counter()
    order = sorted(range(len(texts)), key=lambda i: (texts[i], labels[i]))
    texts = [texts[i] for i in order]
    raw = [int(labels[i]) for i in order]
    first: dict[int, int] = {}
    for lab in raw:
        first.setdefault(lab, len(first))
    y = torch.tensor([first[lab] for lab in raw])
    n_cls = len(first)
    history = AdaptHistory(examples=len(texts), adapters=n_cls)
    with _threads(threads):
        bb = _Backbone()
        gen = torch.Generator().manual_seed(seed)
        w = init_lora(bb.handle.profile, target_modules(), RANK, ALPHA, gen)
        states = bb.bottom(texts)
        with torch.inference_mode():
            base = torch.cat([_pool(bb.layers(*_padded(states, s), SPLIT, N_LAYERS), _padded(states, s)[1])
                              for s in _chunks(len(states))])  # fmt: skip
        cent = torch.zeros(n_cls, base.shape[1]).index_add_(0, y, base)
        keys = torch.nn.Parameter(F.normalize(cent, dim=1))
        factors = {m: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for m, (a, b) in w.factors.items()}
        from smoa.adapter.weights import LoraWeights

        live = LoraWeights(factors, w.alpha, w.rank)
        params = [t for pair in factors.values() for t in pair]
        opt = torch.optim.AdamW([{"params": params, "lr": LR}, {"params": [keys], "lr": KEY_LR}], weight_decay=0.0)
        steps = max(1, int(epochs * len(texts) / BATCH), min(MIN_STEPS, int(MAX_EPOCHS * len(texts) / BATCH)))
        warm = max(1, steps // 20)
        losses: list[float] = []
        with bb.handle.use([(live, 1.0)]):
            for step, idx in enumerate(batch_order(len(texts), BATCH, steps, gen)):
                if stop is not None and stop.is_set():
                    history.stopped = True
                    history.seconds = time.perf_counter() - t0
                    return None, history
                f = lr_at(step, steps, 1.0, warm)
                opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = LR * f, KEY_LR * f
                hs, mask = _pad(states, idx)
                q = _pool(bb.layers(hs, mask, SPLIT, N_LAYERS), mask)  # [b, d]
                loss = F.cross_entropy(q @ F.normalize(keys, dim=1).T / TEMPERATURE, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        history.steps = len(losses)
        history.final_loss = float(np.mean(losses[-max(1, len(losses) // 10) :])) if losses else float("nan")
    history.seconds = time.perf_counter() - t0
    out = {m: (a.detach().clone(), b.detach().clone()) for m, (a, b) in factors.items()}
    return LoraWeights(out, w.alpha, w.rank), history


def _chunks(n: int, size: int = 256) -> list[range]:
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


def _padded(states: list, rows: range):
    return _pad(states, list(rows))


def version_of(data: bytes) -> str:
    """The version id of serialised factors: their sha256 (hex, first 16 digits)."""
    from smoa.adapter.weights import checksum

    return checksum(data)[:16]


def encoder_graphs(weights, block_int8: bool = True) -> tuple[bytes, bytes | None]:
    """The serialised onnxruntime graphs of MiniLM with the query LoRA ``weights`` merged in (module docstring,
    "Inference"): the base int8 graph with the merged weights written in (fp32 products), and the same with every
    linear in block int8 (``None`` unless ``block_int8``)."""
    from smoa.routing.encoders.onnx_int8 import block_int8_model, requantized_model

    with _threads(1):
        bb = _Backbone()
        layers = [bb.handle.layers[m].base_layer for m in target_modules()]
        before = [layer.weight.detach().numpy().copy() for layer in layers]
        bb.handle.set_mixtures([(weights, 1.0)])
        bb.handle.merge()  # W <- W + s B A in place, as a training forward applies the factors
        changes = [(old, layer.weight.detach().numpy()) for old, layer in zip(before, layers)]
    model = requantized_model(changes)
    return model, block_int8_model(model) if block_int8 else None


class AdaptedEncoder:
    """MiniLM with a query LoRA merged into its weights, run as the base encoder runs (int8 weights, onnxruntime);
    an :class:`Encoder` (module docstring, "Inference").

    Args:
        weights: the trained factors (:func:`train_query_lora`).
        base: name of the encoder the adaptation started from (recorded, and part of :attr:`name`).
        threads: intra-op threads per encode call (default ``$SMOA_ENCODER_THREADS`` or 1).
        block_int8: texts up to :data:`BLOCK_INT8_CHARS` characters through a graph whose every linear is a
            ``MatMulNBits`` (module docstring); ``False``: every text through the base graph's fp32 products over
            int8-stored weights (slower per query; kept for ``benchmarks/bench_query_encoder.py``).
        graphs: the two graphs :func:`encoder_graphs` built for ``weights`` elsewhere (the training child writes
            them, so that the serving process does not build them: ~1 s of graph work, ~4 s with the imports of
            the first build in a process); ``None``: built here.
    """

    dim = 384
    cancellable = True  # encode takes onnxruntime RunOptions (smoa.routing.deadline)

    def __init__(self, weights, base: str = "minilm-int8", threads: int | None = None, block_int8: bool = True,
                 graphs: tuple[bytes, bytes | None] | None = None) -> None:  # fmt: skip
        from smoa.routing.encoders.onnx_int8 import OnnxInt8Encoder

        self.weights = weights
        self.version = version_of(weights.to_bytes())
        self.base = base
        self.name = f"{base}+q{self.version}"
        model, short = encoder_graphs(weights, block_int8) if graphs is None else graphs
        self._long = OnnxInt8Encoder(threads, model=model)  # the fp32 backbone is not kept
        self._short = self._long
        if block_int8 and short is not None:
            try:
                self._short = OnnxInt8Encoder(threads, model=short)
                self._short.encode(["warm up"])  # an onnxruntime without an 8-bit MatMulNBits kernel fails here
            except Exception as exc:  # noqa: BLE001 -- onnxruntime's errors have no common base but Exception
                logger.warning("smoa routing: block int8 query encoder refused by onnxruntime (%s: %s); using the "
                               "int8-stored graph with fp32 products", type(exc).__name__, exc)  # fmt: skip
                self._short = self._long
        self.threads = self._long.session.get_session_options().intra_op_num_threads
        self.cpu_bound = self._long.cpu_bound  # its cost is the calling thread's CPU time (costs.EncoderCost.probe)

    def encode(self, texts: list[str], run_options: Any = None) -> np.ndarray:
        """Encode ``texts`` ``[n]`` -> float32 ``[n, 384]``, unit norm (mean pool, as the base encoder). A text of
        up to :data:`BLOCK_INT8_CHARS` characters goes through the block-int8 graph, a longer one through the fp32
        products: which one is a function of the text alone, so its vector still does not depend on its batch.
        ``run_options``: onnxruntime ``RunOptions`` for every run (:mod:`smoa.routing.deadline`)."""
        texts = list(texts)
        if self._short is self._long or all(len(t) <= BLOCK_INT8_CHARS for t in texts):
            return self._short.encode(texts, run_options)
        long_ = np.fromiter((len(t) > BLOCK_INT8_CHARS for t in texts), bool, len(texts))
        out = np.empty((len(texts), self.dim), np.float32)
        for rows, session in ((np.flatnonzero(~long_), self._short), (np.flatnonzero(long_), self._long)):
            if len(rows):
                out[rows] = session.encode([texts[i] for i in rows], run_options)
        return out


def release(holder: list) -> None:
    """Free a replaced query encoder (the one item of ``holder``, a :class:`CachedEncoder
    <smoa.routing.encoders.CachedEncoder>` of an :class:`AdaptedEncoder`) a part at a time, handing the GIL to a
    waiting route between the parts.

    Freed at once, its two onnxruntime sessions (~4 ms each, with the GIL held) and, before the tokenizer was
    shared (:func:`~smoa.routing.encoders.onnx_int8.shared_minilm_tokenizer`), two tokenizers (~3.5 ms each)
    stalled every route for ~16-25 ms after an adaptation's swap (``benchmarks/bench_adapt_timeline.py``). A part
    still held elsewhere (an escalation of a route still encoding with it) is left whole: it goes with its last
    user.
    """
    from smoa.routing.learner import yield_gil

    cached = holder.pop()
    inner = getattr(cached, "inner", None)
    if not isinstance(inner, AdaptedEncoder) or sys.getrefcount(cached) > 2:  # 2: this name and the call's argument
        return
    del cached  # its embedding cache; ``inner`` is now held by this frame and whoever else uses it
    if sys.getrefcount(inner) > 2:
        return
    graphs = [g for g in (inner.__dict__.pop("_short", None), inner.__dict__.pop("_long", None)) if g is not None]
    while graphs:
        graph = graphs.pop()
        if graph in graphs or sys.getrefcount(graph) > 2:  # the same graph twice, or in use: dropped whole
            continue
        for part in ("session", "tokenizer"):
            graph.__dict__.pop(part, None)
            yield_gil()
        del graph


def save_adapted(directory: Path, weights, base: str, history: AdaptHistory | None = None) -> str:
    """Write the factors and their sidecar into ``directory`` atomically; returns the version."""
    data = weights.to_bytes()
    version = version_of(data)
    meta = {"format": FORMAT, "version": version, "base": base, "split": SPLIT, "rank": weights.rank,
            "modules": target_modules(), "history": history.__dict__ if history is not None else {}}  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    for name, payload in ((ADAPTED_FILE, data), (ADAPTED_FILE + ".json", json.dumps(meta).encode())):
        tmp = directory / f".{name}.tmp"
        with tmp.open("wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(directory / name)
    return version


def load_adapted(directory: Path, version: str, base: str):  # -> LoraWeights
    """Read the factors of ``version`` from ``directory``; :class:`AdaptedEncoderError` on any mismatch."""
    from smoa.adapter.weights import LoraWeights
    from smoa.errors import SmoaError

    path = directory / ADAPTED_FILE
    try:
        data = path.read_bytes()
        meta = json.loads((directory / (ADAPTED_FILE + ".json")).read_text())
    except (OSError, ValueError) as exc:
        raise AdaptedEncoderError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    problems = []
    if version_of(data) != version:
        problems.append(f"content hash {version_of(data)} is not the recorded version {version}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != version:
        problems.append("sidecar does not describe this version")
    elif meta.get("base") != base or meta.get("split") != SPLIT:
        problems.append(f"made for base {meta.get('base')!r} split {meta.get('split')}, not {base!r} split {SPLIT}")
    if problems:
        raise AdaptedEncoderError(f"{path}: " + "; ".join(problems))
    try:
        weights = LoraWeights.from_bytes(data, name=str(path))
        weights.check_values(name=str(path))
    except (SmoaError, ValueError) as exc:
        raise AdaptedEncoderError(f"{path}: {exc}") from None
    shapes = {m: (384, 384) if "attention" in m else (384, 1536) if "intermediate" in m else (1536, 384)
              for m in target_modules()}  # (d_in, d_out)  # fmt: skip
    for m, (d_in, d_out) in shapes.items():
        ab = weights.factors.get(m)
        if ab is None or tuple(ab[0].shape) != (weights.rank, d_in) or tuple(ab[1].shape) != (d_out, weights.rank):
            raise AdaptedEncoderError(f"{path}: module {m!r} missing or of the wrong shape")
    if set(weights.factors) != set(shapes):
        raise AdaptedEncoderError(f"{path}: unexpected modules {sorted(set(weights.factors) - set(shapes))}")
    return weights


__all__ = ["ADAPTED_FILE", "AdaptHistory", "Adapted", "AdaptedEncoder", "AdaptedEncoderError", "adapt_encoder", "release",
           "load_adapted", "save_adapted", "target_modules", "train_query_lora", "version_of"]  # fmt: skip
