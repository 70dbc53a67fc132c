"""Routing keys that learn as the library grows: multi-vector keys, local updates, full refits, calibration.

Each adapter has up to ``P`` keys (``SMoAConfig.routing_keys_per_adapter``) in the encoder's space. An adapter
with examples starts from ``min(P, ceil(n_examples / EXAMPLES_PER_KEY))`` spherical k-means prototypes of its
examples (each blended with its tags/description text like a single key); an adapter without examples has one
key from its text. An adapter's score is its best key (max cosine).

Keys are then *learned* (NormFace: a cosine-softmax classifier whose class weights are the keys, one
class per adapter pooled over its keys by log-sum-exp)::

    p(a | x) = softmax over adapters and fixed neighbours ( logsumexp_j cos(e(x), key_aj) / tau )

* **on each create** (``Router._local_update``): the new adapters and their ``NEIGHBOURS`` nearest adapters
  with examples (trainable) are refitted on their examples against the nearest other keys (fixed classes: the
  rest of the library the learned keys must stay apart from), each fixed adapter that has examples lending a
  sample of them (``FIXED_EXAMPLES``, at most ``FIXED_EXAMPLES_TOTAL`` in all) so that the refitted keys do not
  grow over its territory. Cost ~O(examples of the neighbourhood + fixed sample), 1-2 s on CPU at 150
  100-example adapters.
* **refit** (``Router.refit``, called by ``optimize_library()`` and the background optimiser): the same
  fit over every adapter with examples at once, so the result no longer depends on the order in which the
  adapters arrived (bulk and one-by-one libraries meet there), then the projection of the fast encoder. Both run
  in child interpreters (:func:`fit_keys_many`, :meth:`KeyLearner.tune_projection`, :mod:`smoa.routing.child`):
  a refit runs beside the routes.

Every fit also runs two folds (keys fitted on one half of each adapter's examples, the other half scored) whose
scores become the calibration evidence of :mod:`smoa.routing.calibrate` (threshold ``"auto"``, confidence).

Fast path (cascade): the static encoder's embedding ``s(x)`` is mapped into the key space by a linear
projection ``A`` (ridge regression of ``e(x)`` on ``s(x)`` over the stored examples and routing texts, kept as
exact Gram sums so that it does not depend on the order of arrival, then fine-tuned in :meth:`refit` by the same
cross-entropy over the keys). RAM: example embeddings are kept as float16, at most ``MAX_STORED_EXAMPLES``
per adapter and ``MAX_STORED_TOTAL`` in all (deterministic subsample beyond).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, TypeVar

import numpy as np

from smoa.routing.calibrate import (
    Calibration,
    Evidence,
    calibrate,
    held_out_evidence,
    merge,
)
from smoa.routing.encoders import l2_normalize

logger = logging.getLogger(__name__)
T = TypeVar("T")

SLOT_BITS = 4
MAX_KEYS = 1 << SLOT_BITS  # keys per adapter the slot ids can hold (16)
EXAMPLES_PER_KEY = 40  # one prototype per this many examples (100 examples -> 3 keys at P >= 3)
TEXT_WEIGHT = 0.1
TEMPERATURE = 0.05
NEIGHBOURS = 16
FIXED_NEIGHBOURS = 64
MAX_STORED_EXAMPLES = 128
MAX_STORED_TOTAL = 200_000  # ~150 MB of float16 for both encoders at dim 384
LOCAL_EPOCHS = 15
REFIT_EPOCHS = 30
PROJECTION_EPOCHS = 4
MIN_PAIRS = 32
FIXED_EXAMPLES = 16  # examples of each fixed neighbour adapter in a local update ...
FIXED_EXAMPLES_TOTAL = 8192  # ... fewer each (at least FIXED_MIN_EXAMPLES) when more fixed adapters have examples
FIXED_MIN_EXAMPLES = 4
FIXED_ADAPTERS = 1024  # fixed adapters (the nearest first) whose examples join a local update: all of them, so the
# refitted neighbours cannot grow over the territory of adapters outside the trainable set (CLINC150 val, one by
# one as created, MiniLM top-1: 32 adapters x 32 examples 93.5 %, 128 x 32 94.9 %, all x 32 95.2 %, all x 16
# 95.6 %; bulk 95.2 %)
MIN_STEPS = 240  # Adam steps of a fit, however few examples (a local update must converge like a bulk one)


def slots_of(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """Vector-index ids of the first ``n_keys`` keys of each adapter: ``key << SLOT_BITS | j`` -> int64 ``[n * n_keys]``."""
    keys = np.asarray(keys, np.int64).reshape(-1)
    return (keys[:, None] * MAX_KEYS + np.arange(n_keys, dtype=np.int64)[None, :]).reshape(-1)


def owner_of(slots: np.ndarray) -> np.ndarray:
    """Adapter key of each vector-index id (inverse of :func:`slots_of`)."""
    return np.asarray(slots, np.int64) >> SLOT_BITS


def spherical_kmeans(x: np.ndarray, m: int, iters: int = 20) -> np.ndarray:
    """``m`` unit centres of the unit rows ``x`` ``[n, d]`` (cosine k-means, deterministic farthest-point init)."""
    n = len(x)
    m = max(1, min(m, n))
    if m == 1:
        return l2_normalize(x.mean(0, keepdims=True))
    first = int(np.argmax(x @ l2_normalize(x.mean(0, keepdims=True))[0]))
    idx = [first]
    for _ in range(m - 1):  # farthest point from the chosen centres (order-free: depends on x only)
        idx.append(int(np.argmin((x @ x[idx].T).max(1))))
    centres = x[idx].astype(np.float64)
    for _ in range(iters):
        assign = (x @ centres.T).argmax(1)
        new = np.stack([x[assign == j].sum(0) if (assign == j).any() else centres[j] for j in range(m)])
        new = l2_normalize(new)
        if np.allclose(new, centres, atol=1e-6):
            break
        centres = new
    return l2_normalize(centres)


def initial_keys(text_vec: np.ndarray, example_vecs: np.ndarray, max_keys: int) -> np.ndarray:
    """An adapter's starting keys ``[P, d]``: k-means prototypes of its examples blended with its text vector."""
    text_vec = np.asarray(text_vec, np.float32).reshape(1, -1)
    if not len(example_vecs):
        return l2_normalize(text_vec)
    m = min(max_keys, max(1, -(-len(example_vecs) // EXAMPLES_PER_KEY)))
    protos = spherical_kmeans(np.asarray(example_vecs, np.float32), m)
    return l2_normalize(TEXT_WEIGHT * text_vec + (1.0 - TEXT_WEIGHT) * protos)


def fit_keys(
    init: np.ndarray,
    owner: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    fixed: np.ndarray | None = None,
    epochs: int = REFIT_EPOCHS,
    temperature: float = TEMPERATURE,
    lr: float = 0.01,
    seed: int = 0,
) -> np.ndarray:
    """NormFace over multi-vector keys (module docstring).

    Args:
        init: float32 ``[K, d]`` initial keys (several rows may belong to one adapter).
        owner: int ``[K]`` adapter column (``0..n-1``) of each key.
        x: float32 ``[m, d]`` unit example embeddings.
        y: int ``[m]`` adapter column of each example.
        fixed: float32 ``[f, d]`` keys of other adapters, extra classes that are not trained (or ``None``).
        epochs: passes over the examples (mini-batches of 256).

    Returns:
        float32 ``[K, d]`` unit keys.
    """
    with one_thread():
        return _fit_keys(init, owner, x, y, fixed, epochs, temperature, lr, seed)


def _fit_keys(init, owner, x, y, fixed, epochs, temperature, lr, seed) -> np.ndarray:
    import torch

    F = torch.nn.functional
    gen = torch.Generator().manual_seed(seed)
    n = int(owner.max()) + 1
    batch = 256 if len(x) < 4096 else 512
    w = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(init, np.float32)).clone())
    pool = F.one_hot(torch.from_numpy(np.asarray(owner, np.int64)), n).float()  # [K, n]
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    ft = torch.from_numpy(np.ascontiguousarray(fixed, np.float32)) if fixed is not None and len(fixed) else None
    multi = len(init) > n
    opt = torch.optim.Adam([w], lr=lr)
    batches = -(-len(xt) // batch)
    for _ in range(max(epochs, -(-MIN_STEPS // batches))):  # a small neighbourhood still gets MIN_STEPS updates
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch):
            idx = perm[start : start + batch]
            s = xt[idx] @ F.normalize(w, dim=1).T / temperature  # [b, K]
            if multi:
                top = s.max(1, keepdim=True).values
                s = torch.log(torch.exp(s - top) @ pool + 1e-30) + top  # [b, n] log-sum-exp per adapter
            if ft is not None:
                s = torch.cat([s, xt[idx] @ ft.T / temperature], 1)
            loss = F.cross_entropy(s, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            yield_gil()
    return F.normalize(w.detach(), dim=1).numpy().astype(np.float32)


class FitJob(NamedTuple):
    """The arguments of one :func:`fit_keys` call (:func:`fit_keys_many`)."""

    init: np.ndarray
    owner: np.ndarray
    x: np.ndarray
    y: np.ndarray
    fixed: np.ndarray | None
    epochs: int


FIT_IN_CHILD = True  # Router.refit's key fits and projection tuning (optimize_library, the background optimiser,
# an adaptation) in child interpreters
_FIT_ENTRY = "smoa.routing.learner:_fit_child_main"
_TUNE_ENTRY = "smoa.routing.learner:_tune_child_main"
_CHILD_KNOBS = ("MIN_STEPS", "TEMPERATURE")
_FIT_ARRAYS = ("init", "owner", "x", "y", "fixed")


def _child_or_here(what: str, in_child: bool, there: Callable[[], T], here: Callable[[], T]) -> T:
    """``there()`` (work in a child interpreter) when ``in_child``; ``here()`` if not, or when the child could not
    be started or failed (logged)."""
    if in_child:
        from smoa.routing.child import NoChild

        try:
            return there()
        except (NoChild, RuntimeError) as exc:
            logger.warning("smoa routing: %s in a child process failed (%s): in this thread instead", what, exc)
    return here()


def _knobs() -> dict:
    return {k: globals()[k] for k in _CHILD_KNOBS}


def _checked(what: str, got: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A child's array, if float32 of ``shape`` and finite; else ``RuntimeError``."""
    if got.dtype != np.float32 or got.shape != shape or not np.isfinite(got).all():
        raise RuntimeError(f"{what} process gave {got.dtype} {got.shape}, expected float32 {shape}, finite")
    return got


def fit_keys_many(jobs: Sequence[FitJob], in_child: bool = False) -> list[np.ndarray]:
    """:func:`fit_keys` of each job, in this thread or (``in_child``) all of them in one child interpreter
    (:mod:`smoa.routing.child`): the same keys bit for bit. Beside routes served back to back, a fit in this
    process waits for the GIL after each of its thousands of torch operators (once 263 s instead of ~2 s in a
    scratch run, ``docs/bench_routing.md``); the child pays ~1.5 s to start, on the other core. A child that cannot be started
    or fails is logged and the jobs run here."""
    def here() -> list[np.ndarray]:
        return [fit_keys(j.init, j.owner, j.x, j.y, j.fixed, epochs=j.epochs) for j in jobs]

    return _child_or_here("key fit", in_child and bool(jobs), lambda: _fit_in_child(jobs), here)


def _fit_in_child(jobs: Sequence[FitJob]) -> list[np.ndarray]:
    """:func:`fit_keys_many` in a child: the jobs' arrays and the knobs of this module as they are now; each job's
    keys checked: float32, its ``init``'s shape, finite."""
    from smoa.routing.child import call_arrays

    arrays = {f"{i}.{name}": np.ascontiguousarray(getattr(j, name))
              for i, j in enumerate(jobs) for name in _FIT_ARRAYS if getattr(j, name) is not None}  # fmt: skip
    got = call_arrays(_FIT_ENTRY, "key fit", arrays, {"epochs": [int(j.epochs) for j in jobs], "knobs": _knobs()})
    if set(got) != {str(i) for i in range(len(jobs))}:
        raise RuntimeError(f"key fit process gave arrays {sorted(got)}, expected one per job ({len(jobs)})")
    return [_checked("key fit", got[str(i)], j.init.shape) for i, j in enumerate(jobs)]


def _fit_child_main(directory: str) -> None:
    """The key-fit child's entry point (:func:`_fit_in_child`; started at a lower CPU priority)."""
    from smoa.routing.child import read_request, write_result

    data, params = read_request(directory)
    globals().update({k: params["knobs"][k] for k in _CHILD_KNOBS})
    jobs = [FitJob(*(data.get(f"{i}.{n}") for n in _FIT_ARRAYS), epochs) for i, epochs in enumerate(params["epochs"])]
    write_result(directory, {str(i): k for i, k in enumerate(fit_keys_many(jobs))})


def tune_projection_weights(x: np.ndarray, y: np.ndarray, keys: np.ndarray, cols: np.ndarray, base: np.ndarray,
                            epochs: int = PROJECTION_EPOCHS) -> tuple[np.ndarray, float]:  # fmt: skip
    """The fast projection fine-tuned from ``base`` (``[d_fast, d]``) by cross-entropy of the projected fast example
    embeddings ``x`` (``[m, d_fast]``, adapter column ``y``) over ``keys`` (``[K, d]``, column ``cols``; an adapter
    scores its best key, pooled by log-sum-exp), Adam, mini-batches of 256; and the fast path's sure margin
    (:func:`sure_margin`) of the tuned projection on the same examples. One torch thread."""
    with one_thread():
        return _tune_projection_weights(x, y, keys, cols, base, epochs)


def _tune_projection_weights(x, y, keys, cols, base, epochs) -> tuple[np.ndarray, float]:
    import torch

    F = torch.nn.functional
    n = int(cols.max()) + 1
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    kt = torch.from_numpy(np.ascontiguousarray(keys, np.float32))
    pool = F.one_hot(torch.from_numpy(np.asarray(cols, np.int64)), n).float()
    a = torch.nn.Parameter(torch.from_numpy(np.array(base, np.float32)))
    opt = torch.optim.Adam([a], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), 256):
            idx = perm[start : start + 256]
            s = F.normalize(xt[idx] @ a, dim=1) @ kt.T / TEMPERATURE  # [b, K]
            top = s.max(1, keepdim=True).values
            s = torch.log(torch.exp(s - top) @ pool + 1e-30) + top
            loss = F.cross_entropy(s, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            yield_gil()
    with torch.no_grad():
        s = (F.normalize(xt @ a, dim=1) @ kt.T).numpy()  # [m, K] projected examples vs keys
    return a.detach().numpy().astype(np.float32), sure_margin(max_by_owner(s, np.asarray(cols), n), np.asarray(y))


def _tune_in_child(x, y, keys, cols, base, epochs) -> tuple[np.ndarray, float]:
    """:func:`tune_projection_weights` in a child interpreter; the projection checked (float32, ``base``'s shape,
    finite) and the margin (finite)."""
    from smoa.routing.child import call_arrays

    arrays = {"x": x, "y": y, "keys": keys, "cols": cols, "base": base}
    got = call_arrays(_TUNE_ENTRY, "projection tuning", arrays, {"epochs": int(epochs), "knobs": _knobs()})
    if "projection" not in got or "margin" not in got:
        raise RuntimeError(f"projection tuning process gave arrays {sorted(got)}, expected projection and margin")
    margin = got["margin"]
    if margin.dtype != np.float64 or margin.shape != (1,) or not np.isfinite(margin).all():
        raise RuntimeError(f"projection tuning process gave margin {margin.dtype} {margin.shape}, "
                           "expected float64 (1,), finite")
    return _checked("projection tuning", got["projection"], base.shape), float(margin[0])


def _tune_child_main(directory: str) -> None:
    """The projection-tuning child's entry point (:func:`_tune_in_child`; started at a lower CPU priority)."""
    from smoa.routing.child import read_request, write_result

    data, params = read_request(directory)
    globals().update({k: params["knobs"][k] for k in _CHILD_KNOBS})
    proj, margin = tune_projection_weights(data["x"], data["y"], data["keys"], data["cols"], data["base"],
                                           params["epochs"])  # fmt: skip
    write_result(directory, {"projection": proj, "margin": np.asarray([margin], np.float64)})


def yield_gil() -> None:
    """Hand the GIL to a thread waiting for it (a route), if any, between the steps of a loop that runs beside the
    routes: such a loop otherwise keeps it for up to Python's switch interval (5 ms) at a time. A route that started
    at an adaptation's swap took 148 ms beside the fast path's projection tuning; with the yields, the slowest routes
    there took 24-68 ms (a scratch timeline, ``docs/bench_routing.md``). Costs ~1 us when nobody waits."""
    time.sleep(0)


@contextlib.contextmanager
def one_thread():
    """Run torch on one intra-op thread inside the block (small matrices: on a busy 2-core machine two threads
    spin against each other and a fit runs ~20-200x slower), restoring the caller's setting after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def max_by_owner(scores: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """``[m, K]`` key scores -> ``[m, n]`` best key per adapter column."""
    out = np.full((scores.shape[0], n), -np.inf, np.float32)
    for j in range(n):
        cols = owner == j
        if cols.any():
            out[:, j] = scores[:, cols].max(1)
    return out


@dataclass
class Stored:
    """What the learner keeps per adapter: its text vectors and a bounded sample of its example embeddings."""

    text: np.ndarray  # float16 [d] (key space)
    text_fast: np.ndarray | None  # float16 [d] (fast encoder space) or None
    examples: np.ndarray  # float16 [m, d]
    examples_fast: np.ndarray | None  # float16 [m, d] or None
    texts: tuple[str, ...] = ()  # the example texts kept (aligned with ``examples``): the encoder adaptation's data
    routing: str = ""  # its routing text (tags + description)


class KeyLearner:
    """Example store, key fitting, calibration evidence and the fast-path projection (module docstring).

    Not thread-safe by itself: the router calls it under its lock (fits run on snapshots, outside it).
    """

    def __init__(self, dim: int, max_keys: int = 4) -> None:
        self.dim = dim
        self.max_keys = max(1, min(int(max_keys), MAX_KEYS))
        self.stored: dict[int, Stored] = {}
        self.evidence: dict[int, Evidence] = {}
        self.negatives = np.zeros((0, dim), np.float16)
        self.negatives_fast = np.zeros((0, dim), np.float16)
        self.calibration = Calibration()
        self._gram = np.zeros((dim, dim), np.float64)  # sum s s^T over (fast, key-space) pairs
        self._cross = np.zeros((dim, dim), np.float64)  # sum s e^T
        self._pairs = 0
        self._projection: np.ndarray | None = None  # float32 [d, d], fast space -> key space
        self._projection_stale = False  # the Gram sums changed since the ridge was solved (solved on first use)
        self._tuned_projection = False
        self.refits = 0
        self.initial: dict[int, tuple[bytes, np.ndarray]] = {}  # catalog keys' digest, catalog keys [P, d]
        self.learned: dict[int, tuple[bytes, np.ndarray]] = {}  # digest of the catalog keys learned from, keys
        self.negative_texts: list[str] = []
        self.adapted_version = ""  # the query LoRA the embeddings were made with ("" = the base encoder)
        self.changed_examples = 0  # examples remembered since the last encoder adaptation
        self.cascade_margin = 0.0  # the fast path answers above this margin (sure_margin of its projection)
        self.encoder_seen: set[int] = set()  # adapters whose (non held-out) examples trained the query encoder
        self.text_tag_weight: float | None = None  # HYBRID's learned weight of query-word tags (None: the default)

    def initial_keys_of(self, key: int) -> np.ndarray:
        """The adapter's catalog keys ``[P, d]`` (the start of every fit)."""
        return np.asarray(self.initial[int(key)][1], np.float32)

    def current_keys(self, key: int) -> np.ndarray:
        """The adapter's keys in use: learned if they match its catalog keys, else the catalog keys."""
        key = int(key)
        got = self.learned.get(key)
        if got is not None and key in self.initial and got[0] == self.initial[key][0]:
            return got[1].astype(np.float32)
        return self.initial_keys_of(key)

    # ------------------------------------------------------------------ store
    def remember(self, key: int, text: np.ndarray, examples: np.ndarray, text_fast: np.ndarray | None = None,
                 examples_fast: np.ndarray | None = None, texts: tuple[str, ...] = (), routing: str = "") -> None:
        """Keep adapter ``key``'s text vector and (a deterministic sample of) its example embeddings (and texts,
        ``texts`` aligned with ``examples``, when given)."""
        self.forget([key])
        if not len(examples):  # nothing to learn from: only its (text, fast text) pair feeds the projection
            if text_fast is not None:
                self._pair_update(Stored(np.asarray(text, np.float16).reshape(-1),
                                         np.asarray(text_fast, np.float16).reshape(-1), np.zeros((0, self.dim),
                                         np.float16), None), +1.0)  # fmt: skip
            return
        keep = _sample(len(examples), MAX_STORED_EXAMPLES, key)
        ex = np.asarray(examples, np.float32)[keep]
        exf = None if examples_fast is None else np.asarray(examples_fast, np.float32)[keep]
        st = Stored(np.asarray(text, np.float16).reshape(-1), None if text_fast is None else
                    np.asarray(text_fast, np.float16).reshape(-1), ex.astype(np.float16),
                    None if exf is None else exf.astype(np.float16),
                    tuple(texts[i] for i in keep) if len(texts) == len(examples) else (), routing)  # fmt: skip
        self.changed_examples += len(ex)
        if sum(len(s.examples) for s in self.stored.values()) + len(ex) > MAX_STORED_TOTAL:
            st.examples, st.examples_fast = st.examples[:0], None if exf is None else st.examples_fast[:0]
            logger.warning("smoa routing: example store full (%d); adapter %d keeps its keys only", MAX_STORED_TOTAL, key)
        self.stored[int(key)] = st
        self._pair_update(st, +1.0)

    def forget(self, keys) -> None:
        for k in keys:
            st = self.stored.pop(int(k), None)
            self.evidence.pop(int(k), None)
            self.initial.pop(int(k), None)
            self.learned.pop(int(k), None)
            if st is not None:
                self._pair_update(st, -1.0)

    def _pair_update(self, st: Stored, sign: float) -> None:
        if st.text_fast is None:
            return
        s = np.concatenate([st.text_fast[None, :], st.examples_fast if st.examples_fast is not None else
                            np.zeros((0, self.dim), np.float16)]).astype(np.float64)  # fmt: skip
        e = np.concatenate([st.text[None, :], st.examples[: len(s) - 1]]).astype(np.float64)
        self._gram += sign * (s.T @ s)
        self._cross += sign * (s.T @ e)
        self._pairs += int(sign) * len(s)
        if not self._tuned_projection:
            self._projection_stale = True  # one O(d^3) solve when the projection is next used, not one per adapter

    @property
    def projection(self) -> np.ndarray | None:
        """float32 ``[d, d]`` fast space -> key space (the ridge solved lazily), or ``None`` below MIN_PAIRS."""
        if self._projection_stale:
            self._projection, self._projection_stale = self._ridge(), False
        return self._projection

    @projection.setter
    def projection(self, value: np.ndarray | None) -> None:
        self._projection, self._projection_stale = value, False

    def _ridge(self) -> np.ndarray | None:
        if self._pairs < MIN_PAIRS:
            return None
        lam = 1.0 + 0.01 * self._pairs / self.dim
        return np.linalg.solve(self._gram + lam * np.eye(self.dim), self._cross).astype(np.float32)

    def with_examples(self) -> list[int]:
        """Keys of the adapters with stored examples and known catalog keys, sorted."""
        return sorted(k for k, s in self.stored.items() if len(s.examples) and k in self.initial)

    # ------------------------------------------------------------------ fitting
    def fit(self, trainable: list[int], current: dict[int, np.ndarray], fixed: np.ndarray, epochs: int,
            fixed_owner: np.ndarray | None = None, in_child: bool = False
            ) -> tuple[dict[int, np.ndarray], dict[int, Evidence]]:  # fmt: skip
        """Fit the keys of ``trainable`` adapters (current keys ``[P, d]`` each) against ``fixed`` keys ``[f, d]``.

        ``fixed_owner`` (adapter key of each fixed row): the fixed adapters that have examples contribute a sample
        of them, labelled with their fixed class, so that the trained keys are pushed out of their territory too
        (without it a new key grows over the examples of neighbours outside the trainable set).

        ``in_child``: both folds' fits in a child interpreter (:func:`fit_keys_many`), the same keys bit for bit.

        Returns the new keys per adapter and the held-out evidence per adapter (two folds).
        """
        init, owner, xs, ys, folds = [], [], [], [], []
        for col, key in enumerate(trainable):
            k = current[key]
            init.append(k)
            owner += [col] * len(k)
            st = self.stored[key]
            ex = st.examples.astype(np.float32)
            xs.append(ex)
            ys += [col] * len(ex)
            fold = _folds(len(ex), key)
            if key in self.encoder_seen and len(st.texts) == len(ex):
                # the query encoder was trained on this adapter's examples except its held-out ones: only those
                # are honest evidence (scores of examples the encoder saw are far tighter than a new query's)
                fold = np.where(held_out_mask(st.texts), fold, -1)
            folds.append(fold)
        if fixed_owner is not None and len(fixed_owner) and fixed is not None:
            rows: dict[int, int] = {}  # fixed adapter with examples -> its first fixed row (nearest first)
            for row, key in enumerate(np.asarray(fixed_owner).tolist()):
                st = self.stored.get(key)
                if key not in rows and st is not None and len(st.examples) and len(rows) < FIXED_ADAPTERS:
                    rows[key] = row
            per = max(FIXED_MIN_EXAMPLES, min(FIXED_EXAMPLES, FIXED_EXAMPLES_TOTAL // max(1, len(rows))))
            for key, row in rows.items():
                st = self.stored[key]
                ex = st.examples[_sample(len(st.examples), per, key)].astype(np.float32)
                xs.append(ex)
                ys += [len(trainable) + row] * len(ex)
                folds.append(np.full(len(ex), -1))  # always trained on, never scored
        init_m, owner_a = np.concatenate(init), np.asarray(owner)
        x, y, fold = np.concatenate(xs), np.asarray(ys), np.concatenate(folds)
        # two half fits (each on one fold, scored on the other) cost one full fit; their mean is the new key
        total = np.zeros_like(init_m)
        evidence: dict[int, list[Evidence]] = {k: [] for k in trainable}
        folds_used = [f for f in (0, 1) if (fold != f).any()]
        jobs = [FitJob(init_m, owner_a, x[fold != f], y[fold != f], fixed, epochs) for f in folds_used]
        for f, kf in zip(folds_used, fit_keys_many(jobs, in_child)):
            total += kf
            te = fold == f
            if te.sum() == 0:
                continue
            sc = max_by_owner(x[te] @ kf.T, owner_a, len(trainable))
            if fixed is not None and len(fixed):
                sc = np.concatenate([sc, x[te] @ fixed.T], 1)
            yt = y[te]
            for col, key in enumerate(trainable):
                rows = yt == col
                if rows.any():
                    evidence[key].append(held_out_evidence(sc[rows], yt[rows]))
        keys = l2_normalize(total) if total.any() else init_m
        out = {key: keys[owner_a == col] for col, key in enumerate(trainable)}
        return out, {k: merge(v) for k, v in evidence.items()}

    def recalibrate(self, neg_scores: tuple[np.ndarray, np.ndarray] | None = None) -> Calibration:
        """Pool the per-adapter evidence (and the negatives' best scores / margins) into the calibration."""
        ev = merge(list(self.evidence.values()))
        nb, nm = neg_scores if neg_scores is not None else (None, None)
        self.calibration = calibrate(ev, nb, nm)
        return self.calibration

    def tune_projection(self, keys: np.ndarray, owner: np.ndarray, epochs: int = PROJECTION_EPOCHS,
                        in_child: bool = False) -> None:  # fmt: skip
        """Fine-tune the fast projection by cross-entropy of the projected fast example embeddings over ``keys``
        (``[K, d]``, ``owner`` = adapter key of each row) — the static encoder learns the library's adapters
        (:func:`tune_projection_weights`; ``in_child``: in a child interpreter, the same result bit for bit)."""
        base = self._ridge() if self._tuned_projection else self.projection  # untuned: the ridge, solved once
        adapters = [k for k in self.with_examples() if self.stored[k].examples_fast is not None]
        if base is None or not adapters:
            return
        col = {k: j for j, k in enumerate(np.unique(owner))}
        xs = [self.stored[k].examples_fast.astype(np.float32) for k in adapters if k in col]
        ys = [np.full(len(self.stored[k].examples_fast), col[k]) for k in adapters if k in col]
        if not xs:
            return
        x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int64)
        keys = np.ascontiguousarray(keys, np.float32)
        cols = np.asarray([col[int(o)] for o in owner], np.int64)
        self.projection, self.cascade_margin = _child_or_here(
            "projection tuning", in_child, lambda: _tune_in_child(x, y, keys, cols, base, epochs),
            lambda: tune_projection_weights(x, y, keys, cols, base, epochs))  # fmt: skip
        self._tuned_projection = True

    def project(self, fast: np.ndarray) -> np.ndarray | None:
        """Fast-encoder rows ``[n, d]`` -> unit rows in the key space, or ``None`` when no projection exists yet."""
        if self.projection is None:
            return None
        return l2_normalize(np.asarray(fast, np.float32) @ self.projection)

    # ------------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        keys = sorted(self.stored)
        counts = np.asarray([len(self.stored[k].examples) for k in keys], np.int64)
        has_fast = bool(keys) and all(self.stored[k].text_fast is not None for k in keys)
        d = self.dim
        out = {
            "keys": np.asarray(keys, np.int64),
            "counts": counts,
            "text": np.stack([self.stored[k].text for k in keys]) if keys else np.zeros((0, d), np.float16),
            "examples": np.concatenate([self.stored[k].examples for k in keys]) if keys else np.zeros((0, d), np.float16),
            "negatives": self.negatives,
            "negatives_fast": self.negatives_fast,
            "projection": self.projection if self.projection is not None else np.zeros((0, d), np.float32),
            "tuned": np.asarray([self._tuned_projection]),
            "adapted_version": np.asarray([self.adapted_version]),
            "changed_examples": np.asarray([self.changed_examples], np.int64),
            "encoder_seen": np.asarray(sorted(self.encoder_seen), np.int64),
            "cascade_margin": np.asarray([self.cascade_margin], np.float64),
            "text_tag_weight": np.asarray([np.nan if self.text_tag_weight is None else self.text_tag_weight], np.float64),
            "negative_texts": np.asarray(self.negative_texts, dtype=str),
            "text_counts": np.asarray([len(self.stored[k].texts) for k in keys], np.int64),
            "example_texts": np.asarray([t for k in keys for t in self.stored[k].texts], dtype=str),
            "routing_texts": np.asarray([self.stored[k].routing for k in keys], dtype=str),
        }
        if has_fast:
            out["text_fast"] = np.stack([self.stored[k].text_fast for k in keys])
            out["examples_fast"] = np.concatenate([self.stored[k].examples_fast for k in keys])
        ev = [(k, e) for k, e in self.evidence.items() if k in self.stored]
        out["ev_keys"] = np.asarray([k for k, e in ev for _ in range(len(e.in_best))], np.int64)
        for name in ("in_best", "in_margin", "in_correct", "proxy_best", "proxy_margin"):
            out[f"ev_{name}"] = np.concatenate([getattr(e, name) for _, e in ev]) if ev else np.zeros(0)
        out["ev_proxy_keys"] = np.asarray([k for k, e in ev for _ in range(len(e.proxy_best))], np.int64)
        for name, table in (("initial", self.initial), ("learned", self.learned)):
            ks = sorted(table)
            out[f"{name}_keys"] = np.asarray(ks, np.int64)
            out[f"{name}_counts"] = np.asarray([len(table[k][1]) for k in ks], np.int64)
            out[f"{name}_digest"] = np.asarray([np.frombuffer(table[k][0], np.uint8) for k in ks], np.uint8).reshape(-1, 16)
            out[f"{name}_vectors"] = (np.concatenate([np.asarray(table[k][1], np.float32) for k in ks]) if ks
                                      else np.zeros((0, d), np.float32))  # fmt: skip
        return out

    def save(self, path: Path) -> None:
        """Write the learner's state to ``path`` (a ``.npz``; no pickles)."""
        with path.open("wb") as f:
            np.savez(f, **self.to_arrays())

    @classmethod
    def load(cls, path: Path, dim: int, max_keys: int) -> KeyLearner:
        """Read what :meth:`save` wrote (raises ``ValueError``/``OSError``/``KeyError`` when inconsistent)."""
        out = cls(dim, max_keys)
        with np.load(path, allow_pickle=False) as z:
            keys, counts = z["keys"], z["counts"]
            bounds = np.concatenate([[0], np.cumsum(counts)])
            if len(z["examples"]) != bounds[-1] or z["text"].shape != (len(keys), dim):
                raise ValueError("learner state: arrays disagree")
            fast = "examples_fast" in z.files
            tc = z["text_counts"] if "text_counts" in z.files else np.zeros(len(keys), np.int64)
            tb = np.concatenate([[0], np.cumsum(tc)])
            texts = [str(t) for t in z["example_texts"]] if "example_texts" in z.files else []
            routing = [str(t) for t in z["routing_texts"]] if "routing_texts" in z.files else [""] * len(keys)
            if len(texts) != tb[-1] or len(routing) != len(keys) or any(c not in (0, n) for c, n in zip(tc, counts)):
                raise ValueError("learner state: texts disagree with the embeddings")
            for i, k in enumerate(keys):
                sl = slice(bounds[i], bounds[i + 1])
                out.stored[int(k)] = Stored(z["text"][i], z["text_fast"][i] if fast else None, z["examples"][sl],
                                            z["examples_fast"][sl] if fast else None, tuple(texts[tb[i] : tb[i + 1]]),
                                            routing[i])  # fmt: skip
                out._pair_update(out.stored[int(k)], +1.0)
            if "adapted_version" in z.files:
                out.adapted_version = str(z["adapted_version"][0])
                out.changed_examples = int(z["changed_examples"][0])
                out.negative_texts = [str(t) for t in z["negative_texts"]]
                out.encoder_seen = {int(k) for k in z["encoder_seen"]}
                out.cascade_margin = float(z["cascade_margin"][0])
            if "text_tag_weight" in z.files and np.isfinite(z["text_tag_weight"][0]):
                out.text_tag_weight = float(z["text_tag_weight"][0])
            out.negatives, out.negatives_fast = z["negatives"], z["negatives_fast"]
            if z["tuned"][0] and z["projection"].shape == (dim, dim):
                out.projection, out._tuned_projection = z["projection"], True
            for name, table in (("initial", out.initial), ("learned", out.learned)):
                ks, cs = z[f"{name}_keys"], z[f"{name}_counts"]
                bd = np.concatenate([[0], np.cumsum(cs)])
                if len(z[f"{name}_vectors"]) != bd[-1]:
                    raise ValueError(f"learner state: {name} arrays disagree")
                for i, k in enumerate(ks):
                    table[int(k)] = (z[f"{name}_digest"][i].tobytes(), z[f"{name}_vectors"][bd[i] : bd[i + 1]])
            ek, epk = z["ev_keys"], z["ev_proxy_keys"]
            for k in np.unique(ek):
                m, p = ek == k, epk == k
                out.evidence[int(k)] = Evidence(z["ev_in_best"][m].astype(np.float32), z["ev_in_margin"][m].astype(
                    np.float32), z["ev_in_correct"][m].astype(bool), z["ev_proxy_best"][p].astype(np.float32),
                    z["ev_proxy_margin"][p].astype(np.float32))  # fmt: skip
        return out


def _sample(n: int, limit: int, key: int) -> np.ndarray:
    """Deterministic subsample of ``range(n)`` of at most ``limit`` rows (seeded by the adapter key)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(int(key) & 0xFFFFFFFF).choice(n, limit, replace=False))


FAST_ACCURACY = 0.995  # the fast path's answers above its margin must be this accurate on the stored examples
# (CLINC150 val in the learned encoder's space: 0.98 -> 9 % escalated, top-1 95.7 %; 0.995 -> 14 %, 96.4 %;
# 0.99 measured on held-out examples with the projection tuned without them -> 12 %, 95.8 %)


def sure_margin(scores: np.ndarray, labels: np.ndarray, target: float = FAST_ACCURACY) -> float:
    """Smallest top-1 lead ``m`` such that the rows of ``scores`` ``[m, n]`` (adapter columns) leading by at
    least ``m`` are routed to ``labels`` with accuracy >= ``target`` (1.0 when no such margin exists)."""
    if scores.shape[1] < 2 or not len(scores):
        return 0.0
    top2 = np.sort(scores, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    order = np.argsort(-margin, kind="stable")
    acc = np.cumsum((scores.argmax(1) == labels)[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(acc >= target)[0]
    return float(margin[order][ok[-1]]) if len(ok) else 1.0


HELD_OUT_SHARE = 5  # one example in this many is kept out of the query encoder's training (calibration evidence)


def held_out_mask(texts) -> np.ndarray:
    """Which of an adapter's example ``texts`` the query encoder does not train on: about one in
    ``HELD_OUT_SHARE``, chosen by a hash of the text (so by content, not by order); none below 5 examples."""
    n = len(texts)
    if n < HELD_OUT_SHARE:
        return np.zeros(n, bool)
    h = np.asarray([int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "little")
                    for t in texts], np.int64)  # fmt: skip
    out = np.zeros(n, bool)
    out[np.argsort(h, kind="stable")[: max(1, n // HELD_OUT_SHARE)]] = True
    return out


def _folds(n: int, key: int) -> np.ndarray:
    """Two balanced folds of ``n`` examples, seeded by the adapter key (so they do not depend on arrival order)."""
    fold = np.arange(n) % 2
    np.random.default_rng((int(key) * 7919) & 0xFFFFFFFF).shuffle(fold)
    return fold


def digest(vectors: np.ndarray) -> bytes:
    """A short content hash of a key matrix (links :meth:`Router.encode_keys` output to the later ``apply``)."""
    return hashlib.blake2b(np.ascontiguousarray(vectors, np.float32).tobytes(), digest_size=16).digest()


__all__ = ["MAX_KEYS", "KeyLearner", "fit_keys", "initial_keys", "owner_of", "slots_of", "spherical_kmeans"]
