"""The router: encoder + indexes + strategy -> :class:`~smoa.routing.route.Route`.

::

    query ──normalise/cap──► route cache (query, metadata terms, strategy, k, generation) ──hit──► Route
       │ miss
       ├─ encode (LRU of query embeddings) ──► q [dim]
       ├─ search: SEMANTIC      ANN top-C by cos(q, key)  ∪  members of small groups near q, scored exactly
       │          TASK_BASED    tag index (metadata terms, else query words found among the tags)
       │          HYBRID        SEMANTIC's candidates  ∪  tag top-C among the adapters holding the query's
       │                        rarest terms (at most TAG_SCAN_LIMIT postings), each candidate scored on both
       │          HIERARCHICAL  best groups by centroid cos, then ANN restricted to their members
       └─ fuse: scores -> threshold -> top-k (ties by id) -> softmax(score / temperature) weights

Bad input: a non-string query or non-mapping metadata, a metadata value that is not a string (or list of
strings) -> :class:`~smoa.errors.InvalidInputError` naming it; unknown metadata keys are ignored. An empty (or
all-blank) query routes by its metadata alone (TASK_BASED); with no usable metadata either it returns the empty
route (the base model alone). A query longer than ``MAX_QUERY_CHARS`` is cut to that length and the route says
so (``query_truncated``); the encoder further truncates to 256 tokens.

Small groups (the ANN's blind spot): an HNSW graph built over a million keys can leave a small group of keys
that sits apart from the rest (a new domain's handful of adapters among a million others) with no edge leading
into it, so the greedy walk never reaches it. When the index is approximate, SEMANTIC and HYBRID therefore also
take, among the groups (domain tags, or clusters of untagged keys) with at most ``SMALL_GROUP_LIMIT`` members,
the ``RESCUE_GROUPS`` whose centroids are nearest to the query, and the next nearest while all the rescued groups
hold at most ``RESCUE_MEMBERS`` adapters, and score every member exhaustively (on its 8-bit code, like the graph).
Large groups are dense enough for the graph. Cost: one ``[groups, dim]`` product and at most
``max(RESCUE_GROUPS * SMALL_GROUP_LIMIT, RESCUE_MEMBERS)`` adapters' keys per query (decoded keys cached). A group
centroid is a blunt guide: on CLINC150 among 1M distractors, with only the 3 nearest of its 10 domain groups
rescued, 0.17 point of in-scope accuracy was lost (0.8 point at a 1 ms budget) to intents whose domain's centroid
ranked 4th or lower.

Latency budget: the HNSW beam is chosen before the walk starts. An online cost model (ms per unit of efSearch,
and the time the rescue and tag side take after it, 90th percentiles of recent routes) predicts whether the full beam
(:func:`~smoa.routing.index.vector.auto_ef_search`) fits in what is left of ``routing_latency_budget_ms``, less
what recent plans under-predicted (their 99.5th percentile, measured to each route's end); if not, the walk uses the
widest beam that fits (at least :data:`smoa.routing.costs.EF_MIN`) and the route is marked ``degraded`` (less
recall than the default; :mod:`smoa.routing.costs` holds both cost models). HYBRID's tag side runs only when its
measured cost and the steps after it fit what is left (else cosine only); HIERARCHICAL falls back to plain ANN
when encode + search took the whole budget; either way the route is marked ``degraded`` and counted.

Side thread (:mod:`smoa.routing.side`, ``routing_parallel_side``): over an HNSW index at the full beam, HYBRID's
steps that do not need the walk's result (the rescue, the query's words, the rarest terms' adapters scored exactly,
their tag scores) run on a helper thread while the route's thread walks (faiss releases the GIL); the scores are
the serial path's. ``"auto"`` (default) takes whichever mode :class:`~smoa.routing.costs.SideChoice` measured
faster: at 1M keys the side thread (search+fuse p50 / p99 0.84 / 1.26 against 1.00 / 1.49 ms one-threaded), at
10K keys one thread (a short walk leaves the hand-over exposed); ``benchmarks/bench_routing.py --sizes``,
``docs/bench_routing.md``.

Learning (issue 11, :mod:`smoa.routing.learner`): adapters have up to P keys (slot ids ``key << 4 | j`` in the
vector index; an adapter scores its best key); keys are refitted on the adapters' examples as they arrive
(:meth:`Router.apply`) and in full by :meth:`Router.refit`. ``routing_threshold="auto"`` gates a route on its best
cosine against the threshold calibrated from held-out folds (:mod:`smoa.routing.calibrate`), which also gives
``Route.confidence``. HYBRID's weight of tags matched from the query's own words is learned with the keys
(:meth:`Router._tune_tag_weight`: 0.05 once keys are learned, another when the examples clearly favour it).
Cascade (MiniLM key spaces): the static encoder projected into the key space answers when
its top-1 leads by ``CASCADE_MARGIN``; otherwise MiniLM re-scores if the online cost model says it fits in the
remaining budget with the search after it, else the fast answer stands and the route is ``degraded`` (a real loss
of quality). An escalation still running at the budget's deadline is stopped (:mod:`smoa.routing.deadline`; counted
``cancelled``) and the fast answer stands, ``degraded`` as above; one refused escalation in ``COST_EXPLORE_EVERY``
runs anyway under that deadline, so the cost model re-measures the encoder on the routes themselves. The margin
the fast path needs is at least ``CASCADE_MARGIN`` (``ADAPTED_MARGIN_FACTOR`` times it once the query encoder is
learned; ``degraded`` still means unsure by ``CASCADE_MARGIN`` itself) and at least the one at which its
projection routes the stored examples 99.5 % right (:func:`~smoa.routing.learner.sure_margin`, set at each refit).

Learned query encoder (:mod:`smoa.routing.adapt`): with a MiniLM encoder and ``routing_adapt_encoder`` (default
on), :meth:`Router.refit` (``optimize_library()`` and the background optimiser) first trains a LoRA on MiniLM
over the adapters' stored example texts when there are >= ``ADAPT_MIN_ADAPTERS`` adapters and
>= ``ADAPT_MIN_EXAMPLES`` examples and it never ran, or >= ``ADAPT_RETRAIN_SHARE`` of the examples changed since
(never on a create: creating adapters never trains MiniLM). Training runs off the lock (routes are served by
the encoder in use); then every stored example, routing text and negative is re-encoded in the new space, the
keys are refitted there, and encoder + learner + keys are swapped in at once. One example in five
(:func:`~smoa.routing.learner.held_out_mask`) is kept out of the training: the calibration evidence of those
adapters comes only from them, and a new encoder that routes them worse than the one in use is not adopted.
The catalog keeps base-space keys (``encoder`` = the base's name); the index holds the adapted ones (adapters
without examples keep their base key). Persisted beside the index (``query_lora.safetensors``, its version in
the checksummed learner state); a file that does not match is refused as a whole: routing falls back to the
base encoder, the learner is re-encoded from its stored texts, the index is rebuilt from the catalog and the
adaptation retrains at the next refit.
"""

from __future__ import annotations

import dataclasses
import heapq
import io
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from smoa.config import RoutingStrategy, SMoAConfig, coerce_enum
from smoa.errors import ConfigError, InvalidInputError
from smoa.routing.encoders import CachedEncoder, Encoder, get_encoder, l2_normalize
from smoa.routing.index import GroupIndex, IndexParams, StaleIndexError, TagIndex, VectorIndex
from smoa.routing.index.vector import Compactor
from smoa.routing.index.groups import GroupPlan, row_sums
from smoa.routing.index.store import load_indexes, save_indexes
from smoa.routing.index.tags import TagPlan, query_terms_from_metadata
from smoa.routing.keys import TEXT_WEIGHT, blend_keys, example_centroids, refine_keys, routing_text
from smoa.routing import learner as learner_mod
from smoa.routing.learner import (
    FIXED_NEIGHBOURS,
    LOCAL_EPOCHS,
    MAX_KEYS,
    NEIGHBOURS,
    REFIT_EPOCHS,
    KeyLearner,
    Stored,
    digest,
    held_out_mask,
    initial_keys,
    owner_of,
    slots_of,
    yield_gil,
)  # fmt: skip
from smoa.routing.costs import EncoderCost, SideChoice, WalkCost
from smoa.routing.deadline import EncodeCancelled, Watchdog
from smoa.routing.route import Route
from smoa.routing.side import SideThread, usable_cpus
from smoa.routing.strategies import (
    METADATA_TAG_WEIGHT,
    TEXT_TAG_WEIGHT,
    contenders,
    fuse,
    select_top,
    softmax_weights,
)
from smoa.textcheck import validate_query_text

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 2048
N_GROUPS = 3
EXACT_GROUP_LIMIT = 20_000  # HIERARCHICAL scores the chosen groups' members exactly up to this many
LEARN_TEMPERATURE = 0.05  # refine_keys' softmax temperature, chosen on a held-out fifth of CLINC150 train
TAG_SCAN_LIMIT = 500  # postings HYBRID's tag side scans for extra candidates (rarest query terms first)
RESCUE_GROUPS = 3  # SEMANTIC / HYBRID: nearest small groups whose members are scored exactly (at least) ...
RESCUE_MEMBERS = 1024  # ... and the next nearest while all the rescued groups hold at most this many adapters
SMALL_GROUP_LIMIT = 256
RESCUE_CACHE_ROWS = 4096  # decoded key rows of rescued small groups kept (6 MB), dropped on any index change
SAME_KEY_COS = 0.995  # two keys this close are the same key to any encoder (Router._separable)
SAME_KEY_MARGIN = float(np.sqrt(2 - 2 * SAME_KEY_COS))  # |q.a - q.b| <= |a - b|: the best keys of a wider lead differ
CASCADE_MARGIN = 0.08  # fast path answers when top-1 leads top-2 by this much (CLINC150 val: 12 % escalate)
ADAPTED_MARGIN_FACTOR = 2.0  # ... times this once the query encoder is learned: it is then far better than the fast
# path (CLINC150 val, after optimise, auto threshold: in-scope 95.8 % at 0.08 (14 % escalate), 96.1 % at 0.16 (29 %),
# 96.2 % with MiniLM on every query)
FAST_ENCODERS = ("minilm", "minilm-int8")
REFIT_GROWTH = 1.25  # apply(): full key refit when the adapters with examples grew by this factor since the last
REFIT_MIN_ADAPTERS = 8
ADAPTED_KEYS = 1  # keys per adapter in the learned encoder's space: its examples form one tight cluster there
# (CLINC150 val, pure adapted encoder: 1 key 96.3 % in-scope / 80 % OOS at auto, 4 keys 95.9 % / 83 %)
ADAPT_MIN_ADAPTERS = 5  # adapters with example texts before the query encoder is adapted
ADAPT_MIN_EXAMPLES = 500  # below this a LoRA over-fits (8 x 24 CLINC examples: top-1 -2.5 points); keys alone learn
# (the main job's 5 BBC topics store 5 x 128 examples: routing-only top-1 84 % -> 90-94 % once adapted)
ADAPT_RETRAIN_SHARE = 0.1  # retrain when this share of the stored examples (at least ADAPT_RETRAIN_MIN) changed
ADAPT_RETRAIN_MIN = 200
TAG_WEIGHTS = (0.0, 0.05, TEXT_TAG_WEIGHT)  # HYBRID's weights for tags matched from a query's words, learned
LEARNED_TAG_WEIGHT = 0.05  # the choice for adapters with learned keys unless their examples clearly favour another
# (their keys already carry the examples' words; CLINC150 val as created, hybrid top-1: 0.1 94.6 %, 0.05 95.0 %,
# semantic 94.9 %; the main job's BBC routing: 95 % at 0.05 and 0.1, 94 % at 0)
TAG_TUNE_EXAMPLES = 2000  # example texts the choice is made on (a deterministic subsample beyond)
TAG_TUNE_MIN = 50
TAG_TUNE_CHUNK = 8  # example routes per hold of the router's lock (64: a route waited ~120 ms, scratch timeline)
TAG_TUNE_GAIN = 0.02  # another weight must route this share (and >= 5) more of them right than LEARNED_TAG_WEIGHT
MAX_FIXED = 1024  # fixed rival keys in one fit (the nearest first)
INSTALL_ADAPTERS = 8  # adapters whose learned keys are installed per hold of the router's lock (_install_learned)
STAGE_ROWS = 32  # at most this many keys inserted hidden per hold of the router's lock (_stage)
STAGE_HOLD_MS = 4.0  # _stage: rows per hold sized to this at the measured cost per row (0: STAGE_ROWS per hold)
STAGE_FIRST_ROWS = 4  # _stage's first hold, before any cost is measured
STAGE_MIN_ROWS = 64  # a change set with this many keys for an HNSW index is staged first (apply)
RIVAL_ROWS = 16  # probe rows searched for rivals per hold of the router's lock (Router._rivals)
COMPACT_IN_BACKGROUND = True  # an HNSW index past a quarter of dead positions is compacted on a copy (compact_index)
DISTURB_MAX_ADAPTERS = 5_000  # learned adapters checked against each change set's new example-less rivals
DISTURB_EXAMPLES = 8  # weakest stored examples per learned adapter a rival is checked on
DISTURB_MARGIN = 0.05  # a rival within this of the adapter's own score on one of them triggers a refit
DISTURB_DENSE_LIMIT = 50_000_000  # new keys x weak examples up to which the check is one dense product
NULL_EXAMPLES = 512  # held-out examples the example-less adapters' null is measured on (calibrate.free_threshold)
NULL_SEARCH_K = 64  # key slots searched per example for its best example-less adapter
NULL_REMEASURE = 0.1  # measured again when the index or the adapters with examples changed by this share
LEARNER_FILE = "learner.npz"  # key spaces the static fast path is projected into


@dataclass
class RoutingText:
    """What an adapter is routed by (its key is computed from this by :meth:`Router.routing_keys`)."""

    domain_tags: list[str]
    skill_tags: list[str]
    description: str = ""
    examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class KeyEntry:
    """One adapter as the core hands it to the router (``/work/notes/keys_contract.md``).

    Attributes:
        key: the catalog key.
        vectors: float32 ``[P, dim]`` routing keys (P >= 1), unit rows.
        domain_tags, skill_tags: its tags.
    """

    key: int
    vectors: np.ndarray
    domain_tags: list[str]
    skill_tags: list[str]


@dataclass(frozen=True)
class _AddPlan:
    """:meth:`Router._plan`: an add's work that needs no lock, done before its hold: the adapters' ``mats`` it was
    planned for, their unit ``means`` (their groups' vectors), their tag index rows and group names' tags, the
    tag index's merged postings and the groups' sums (``None``: worked out in the hold)."""

    mats: list[np.ndarray]
    means: np.ndarray
    tag_rows: list[tuple[int, list[str], list[str]]]
    domains: list[list[str]]
    tags: TagPlan | None
    groups: GroupPlan | None


def _candidates(k: int, strategy: RoutingStrategy) -> int:
    return max(2 * k, 10) if strategy is RoutingStrategy.SEMANTIC else max(4 * k, 32)


class Router:
    """Routes queries over a library of adapter keys (see the module docstring).

    Args:
        config: routing fields of :class:`SMoAConfig` (strategy, k, threshold, temperature, budget, caches).
        index_dir: where the indexes persist (beside the catalog); ``None`` = memory only.
        resolve_ids: catalog keys -> adapter ids (same order).
        encoder: an :class:`Encoder` to use instead of ``get_encoder(config.encoder)``.
        params: vector-index knobs.
        fast_encoder: the cascade's fast encoder instead of the static one (loaded in the background when the
            main encoder is MiniLM and no ``encoder`` is given).
    """

    def __init__(
        self,
        config: SMoAConfig,
        index_dir: Path | None,
        resolve_ids: Callable[[Sequence[int]], list[str]],
        encoder: Encoder | None = None,
        params: IndexParams | None = None,
        fast_encoder: Encoder | None = None,
    ) -> None:
        self.config = config
        inner = encoder or get_encoder(config.encoder)
        self.encoder = CachedEncoder(inner, config.embedding_cache_size)  # the catalog's key space (base encoder)
        self._adapted: CachedEncoder | None = None  # the learned query encoder (smoa.routing.adapt), once trained
        self._adapt_lock = threading.Lock()  # one adaptation at a time
        self._rebuild_needed = False  # a refused learned encoder: the loaded vectors are in its space
        self.adapt_history: Any = None
        self.adaptations = 0
        self.adapt_rejected = 0  # trained but not adopted (worse on held-out examples than the encoder in use)
        self._refit_size = 0  # adapters with examples at the last full key refit
        self._null: tuple[tuple, float] | None = None  # (what it was measured on, the free threshold's null quantile)
        self._can_adapt = bool(getattr(config, "routing_adapt_encoder", True)) and inner.name in FAST_ENCODERS
        self.dim = int(inner.dim)
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._resolve = resolve_ids
        self._params = params or IndexParams()
        self._vectors = VectorIndex(self.dim, self._params)
        self._tags = TagIndex()
        self._groups = GroupIndex(self.dim)
        self._generation = 0
        self._dirty = False
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple, Route] = OrderedDict()
        self._latencies: deque[float] = deque(maxlen=10_000)
        self._counts = {"queries": 0, "cache_hits": 0, "cache_misses": 0, "degraded": 0, "truncated": 0,
                        "escalated": 0, "fast": 0, "empty": 0, "cancelled": 0}  # fmt: skip
        self._learner = KeyLearner(self.dim, int(getattr(config, "routing_keys_per_adapter", 4)))
        self._max_p = 1  # most keys any adapter holds (bounds slot lookups)
        self._pending: OrderedDict[bytes, tuple] = OrderedDict()  # encode_keys output -> its embeddings
        self._main_cost = EncoderCost()  # predicted main-encoder ms per text (the budget's escalation decision)
        self._main_ms = 0.0  # the last _encode_main's ms
        self._watchdog = Watchdog()  # stops an escalation's encoder run at the budget's deadline
        weakref.finalize(self, self._watchdog.close)
        self._walk_cost = WalkCost()  # HNSW ms per efSearch unit and the steps after a walk (the budget's beam)
        self._compactor = Compactor(self, "_lock", "_vectors", "_adopt_compacted",
                                    lambda: yield_gil())  # (looked up per call: tests replace yield_gil)
        self._side_choice = SideChoice()  # HYBRID's walk-free steps beside the walk or after it (routing_parallel_side)
        self._rescue: OrderedDict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()  # groups -> rows
        self._rescue_at: tuple = ()  # the index / groups versions the rescue cache holds
        self._rescue_rows = 0
        self._tag_end: float | None = None  # perf_counter at the end of this route's tag side (WalkCost.tail_done)
        # this route's last free-gate drops: (cosines, their count, terms, drops) (_free_drops; HYBRID's tag side and
        # the route's gate ask for the same cosines)
        self._drops_memo: tuple[Mapping[int, float], int, list[tuple[str, int]], set[int]] | None = None
        # the walk-free steps of a route beside its HNSW walk (smoa.routing.side, while ``routing_parallel_side``);
        # its thread starts at the first such route; one core would only interleave them
        self._side = SideThread() if usable_cpus() >= 2 else None
        if self._side is not None:
            weakref.finalize(self, self._side.close)
        self._weak: dict[int, tuple] = {}  # learned adapter -> (its learned entry, weakest examples, their levels)
        self._fast: Encoder | None = None
        self._fast_error: str | None = None
        self._fast_ready = threading.Event()
        if fast_encoder is not None:
            self._fast = fast_encoder
            self._fast_ready.set()
        elif inner.name in FAST_ENCODERS and encoder is None:
            threading.Thread(target=self._load_fast, name="smoa-fast-encoder", daemon=True).start()
        else:
            self._fast_ready.set()

    def _load_fast(self) -> None:
        """Load (distilling once if needed) the static encoder of the fast path, off the caller's thread."""
        try:
            self._fast = get_encoder("static")
        except Exception as exc:  # noqa: BLE001 -- the fast path is an optimisation: without it every route uses the main encoder
            self._fast_error = f"{type(exc).__name__}: {exc}"
            logger.warning("smoa routing: static fast path unavailable (%s)", self._fast_error)
        finally:
            self._fast_ready.set()

    def wait_fast_path(self, timeout: float | None = None) -> bool:
        """Block until the static fast-path encoder is loaded (or failed); returns whether it is available."""
        self._fast_ready.wait(timeout)
        return self._fast is not None

    # ------------------------------------------------------------------ keys
    def routing_keys(self, items: Sequence[RoutingText], learn: bool = False) -> np.ndarray:
        """Routing keys of ``items`` (batch encoded), float32 ``[n, dim]``, unit norm (see :mod:`.keys`).

        ``learn=True`` (bulk ingestion of adapters with examples): the keys of the items that have examples are
        then trained jointly to separate each other's examples (:func:`~smoa.routing.keys.refine_keys`); on
        CLINC150 this lifts top-1 from ~91.5 % to ~95.8 % (``docs/bench_routing.md``). Cost ~O(examples x items).
        """
        n = len(items)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        texts = [routing_text(it.domain_tags, it.skill_tags, it.description) for it in items]
        text_vecs = self.encoder.encode_batch(texts)
        examples = [ex for it in items for ex in it.examples]
        owner = np.repeat(np.arange(n), [len(it.examples) for it in items])
        has = np.array([bool(it.examples) for it in items])
        ex_vecs = self.encoder.encode_batch(examples)
        cents = example_centroids(ex_vecs, owner, n) if examples else text_vecs
        keys = blend_keys(text_vecs, cents, has, TEXT_WEIGHT)
        if learn and has.sum() >= 2:
            keys = refine_keys(keys, ex_vecs, owner, temperature=LEARN_TEMPERATURE)
        self._stash(items, text_vecs, ex_vecs, owner, [k[None, :] for k in keys])
        return keys

    def encode_keys(self, items: Sequence[RoutingText]) -> list[np.ndarray]:
        """Multi-vector routing keys of ``items``: float32 ``[P_i, dim]`` each, unit rows (module :mod:`.learner`).

        An item with examples gets ``min(P, ceil(n / 40))`` k-means prototypes of its examples blended with its
        tags/description text; without examples, one key from its text. The embeddings are remembered (by the
        keys' content) so that :meth:`apply` can learn from the examples when the core indexes these keys.
        """
        n = len(items)
        if n == 0:
            return []
        texts = [routing_text(it.domain_tags, it.skill_tags, it.description) for it in items]
        text_vecs = self.encoder.encode_batch(texts)
        owner = np.repeat(np.arange(n), [len(it.examples) for it in items])
        ex_vecs = self.encoder.encode_batch([ex for it in items for ex in it.examples])
        p = self._learner.max_keys
        keys = [initial_keys(text_vecs[i], ex_vecs[owner == i], p) for i in range(n)]
        self._stash(items, text_vecs, ex_vecs, owner, keys)
        return keys

    def _stash(self, items: Sequence[RoutingText], text_vecs: np.ndarray, ex_vecs: np.ndarray, owner: np.ndarray,
               keys: Sequence[np.ndarray]) -> None:
        """Remember the embeddings behind ``keys`` until :meth:`apply` indexes them (bounded, oldest dropped);
        with a learned query encoder, its embeddings too (the adapter is indexed in its space)."""
        fast = self._fast
        texts = [routing_text(it.domain_tags, it.skill_tags, it.description) for it in items]
        flat = [ex for it in items for ex in it.examples]
        ft = fast.encode(texts) if fast is not None else None
        fe = fast.encode(flat) if fast is not None and len(ex_vecs) else None
        adapted, version = self._adapted, self._learner.adapted_version
        at = adapted.encode_batch(texts) if adapted is not None else None
        ae = adapted.encode_batch(flat) if adapted is not None else None
        with self._lock:
            for i, k in enumerate(keys):
                rows = owner == i
                self._pending[digest(k)] = (text_vecs[i], ex_vecs[rows], None if ft is None else ft[i],
                                            None if fe is None else fe[rows], tuple(items[i].examples), texts[i],
                                            None if at is None else (version, at[i], ae[rows]))  # fmt: skip
            while len(self._pending) > 4096:
                self._pending.popitem(last=False)

    # ------------------------------------------------------------------ library changes
    def add(
        self,
        keys: np.ndarray,
        vectors: np.ndarray | Sequence[np.ndarray],
        tags: Sequence[tuple[list[str], list[str]]],
        generation: int,
        staged: tuple[int, dict] | None = None,
        plan: _AddPlan | None = None,
    ) -> None:
        """Insert or replace adapters: ``keys`` int64 ``[n]``, ``vectors`` ``[n, dim]`` (one key each) or a list of
        ``[P_i, dim]`` (multi-vector keys, ``1 <= P_i <= 16``), ``(domain, skill)`` tags. ``staged``: what
        :meth:`_stage` already inserted hidden, made live here instead of inserted; ``plan``: :meth:`_plan` of the
        same adapters, made by a caller that holds the lock here (else it is made here, before the hold)."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        mats = _as_key_list(vectors, len(keys), self.dim)
        if len(tags) != len(keys) or len(mats) != len(keys):
            raise InvalidInputError(f"`keys` [{len(keys)}], `vectors` [{len(mats)}] and `tags` [{len(tags)}] must agree")
        if plan is None or len(plan.mats) != len(mats) or any(a is not b for a, b in zip(plan.mats, mats)):
            plan = self._plan(keys, mats, tags)  # (off the lock unless the caller holds it)
        with self._lock:
            rest = self._show(keys, mats, staged) if staged is not None else np.arange(len(keys))
            self._drop(keys[rest])
            self._put(keys[rest], [mats[i] for i in rest.tolist()])
            self._tags.add_many(plan.tag_rows, plan.tags)
            self._groups.add_many(keys, plan.means, plan.domains, plan.groups)
            if staged is not None:
                self._vectors.settle(compact=not COMPACT_IN_BACKGROUND)
            self._changed(generation)

    def _plan(self, keys: np.ndarray, mats: list[np.ndarray], tags: Sequence[tuple[list[str], list[str]]]) -> _AddPlan:
        """What an add of these adapters can work out before its hold of the lock (:class:`_AddPlan`): at 200K keys
        the tag and group inserts of 10K new adapters took ~60 ms of an apply's one hold (106-150 ms in all; with
        the plan 41-43 ms, ``benchmarks/bench_refit_lock.py --apply``). The plans only read the tag index (a write
        replaces a posting, never changes it); the hold takes what is still current and works out the rest again."""
        means, domains = _means(mats), [list(d) for d, _ in tags]
        rows = [(k, d, s) for k, (d, s) in zip(keys.tolist(), tags)]
        groups = self._groups.plan_add(keys, means, domains)
        return _AddPlan(mats, means, rows, domains, self._tags.plan_add(rows), groups)

    def _show(self, keys: np.ndarray, mats: list[np.ndarray], staged: tuple[int, dict]) -> np.ndarray:
        """Reveal the adapters among ``keys`` whose ``mats`` were staged as they are (:meth:`_stage`); returns the
        indices of the others, to insert (caller holds the lock)."""
        generation, hidden = staged
        if len(np.unique(keys)) != len(keys):  # a key twice: inserted in order, the last one wins
            return np.arange(len(keys))
        ready = [i for i, k in enumerate(keys.tolist())
                 if k in hidden and (hidden[k][0] is mats[i] or np.array_equal(hidden[k][0], mats[i]))]  # fmt: skip
        if not ready:
            return np.arange(len(keys))
        if not self._reveal(generation, keys[ready].tolist(), [hidden[int(keys[i])][1] for i in ready]):
            return np.arange(len(keys))
        rest = np.ones(len(keys), bool)
        rest[ready] = False
        return np.flatnonzero(rest)

    def _put(self, keys: np.ndarray, mats: Sequence[np.ndarray]) -> None:
        """Index each adapter's ``[P, dim]`` keys under its slot ids (caller holds the lock, old slots dropped)."""
        if not len(keys):
            return
        counts = np.fromiter((len(m) for m in mats), np.int64, len(mats))
        self._max_p = max(self._max_p, int(counts.max()))
        self._vectors.add(_slots(keys, counts), np.concatenate(mats))

    def _drop(self, keys: np.ndarray) -> None:
        """Take ``keys``' slots out of the vector index and the groups (caller holds the lock)."""
        if not len(keys):
            return
        found, vecs = self._vectors.vectors_of(slots_of(keys, self._max_p))
        if len(found):
            self._ungroup(found, vecs)
            self._vectors.remove(found, compact=not COMPACT_IN_BACKGROUND)
            self._compact_when_due()

    def _ungroup(self, slots: np.ndarray, vecs: np.ndarray) -> None:
        """Take the owners of ``slots`` (their keys ``vecs``) out of the groups (caller holds the lock)."""
        owners = owner_of(slots)
        own, at = np.unique(owners, return_inverse=True)
        if len(own) == len(slots):  # one key each: the rows are their sums, made unit in row_sums' blocks
            self._groups.remove_many(owners, vecs, unit=True)  # (no [n, dim] copy: ~0.3 s of page faults at 50K)
        else:
            self._groups.remove_many(own, _unit(row_sums(vecs, at, len(own))))

    def _reveal(self, generation: int, keys: list[int], positions: list[np.ndarray]) -> bool:
        """Make ``keys``' staged keys (:meth:`_stage`, at ``positions``) live in place of their current ones, out of
        the groups too (caller holds the lock, adds the groups); ``False``, changing nothing, if the staged positions
        are gone."""
        arr = np.asarray(keys, np.int64)
        pos = np.concatenate(positions)
        found, vecs = self._vectors.vectors_of(slots_of(arr, self._max_p))
        if not self._vectors.reveal(generation, pos, found):
            return False
        self._compact_when_due()
        self._max_p = max(self._max_p, max(len(p) for p in positions))
        if len(found):
            self._ungroup(found, vecs)
        return True

    def key_vectors(self, key: int) -> np.ndarray:
        """The ``[P, dim]`` keys adapter ``key`` is routed by now (learned ones included), ``[0, dim]`` if none."""
        with self._lock:
            return self._vectors.vectors_of(slots_of(np.asarray([key]), self._max_p))[1]

    def remove(self, keys: Sequence[int], generation: int) -> None:
        """Remove adapters by key (unknown keys are ignored)."""
        keys = np.asarray(list(keys), np.int64).reshape(-1)
        with self._lock:
            self._drop(keys)
            self._tags.remove_many(keys)
            self._learner.forget(keys)
            for k in keys.tolist():
                self._weak.pop(int(k), None)
            self._changed(generation)

    def _changed(self, generation: int) -> None:
        self._generation = int(generation)
        self._cache.clear()
        self._dirty = True
        if self._learner.evidence and self._null_stale():  # many adapters came or went: their null moved
            self._recalibrate()

    # ------------------------------------------------------------------ the core's catch-up interface
    def apply(self, upserts: Sequence[KeyEntry], removes: Sequence[int], generation: int) -> None:
        """One change set from the core: drop ``removes`` (unknown keys ignored), insert or replace ``upserts``;
        afterwards :attr:`generation` is ``generation`` and the route cache is empty.

        Atomic for the routes: they see all of it or none of it. A big change set for an HNSW index (from
        :data:`STAGE_MIN_ROWS` keys) is first inserted hidden, a few keys per hold of the lock (:meth:`_stage`);
        the one hold that applies it then only makes those keys live. Inserted in that hold, 10K keys into a big
        graph held it for seconds (``benchmarks/bench_refit_lock.py --apply``)."""
        learn: list[int] = []
        firsts = [_first_vector(e, self.dim) for e in upserts]
        digests = [digest(f) for f in firsts]
        tags = [(list(e.domain_tags), list(e.skill_tags)) for e in upserts]
        staged = plan = None
        if self._vectors.kind != "flat" and sum(len(f) for f in firsts) >= STAGE_MIN_ROWS:
            staged = self._stage({e.key: f for e, f in zip(upserts, firsts)})
        if upserts:
            plan = self._plan(np.array([e.key for e in upserts], np.int64), firsts, tags)
        with self._lock:
            if removes:
                self.remove(sorted({int(k) for k in removes}), generation)
            if upserts:
                keys = np.array([e.key for e in upserts], np.int64)
                adopted = [self._adopt(e, f, d) for e, f, d in zip(upserts, firsts, digests)]
                learn = [e.key for e, (_, fit) in zip(upserts, adopted) if fit]
                if any(m is not None for m, _ in adopted):  # learned keys kept: their groups' vectors differ
                    mats = [f if m is None else m for f, (m, _) in zip(firsts, adopted)]
                    plan = replace(plan, mats=mats, means=_means(mats), groups=None)
                mats = plan.mats
                self.add(keys, mats, tags, generation, staged, plan)
            self._changed(generation)
            _ = self._learner.projection  # the fast projection's one ridge solve for this change set
        if upserts:  # after the hold: its product of the weakest examples and the new keys grows with both
            skip = set(learn)
            fresh = [(e.key, m) for e, m in zip(upserts, mats) if e.key not in skip]
            learn += self._disturbed([m for _, m in fresh], [k for k, _ in fresh], skip)
        if learn:
            if self._refit_due():  # amortised: a full refit each time the library grew by REFIT_GROWTH
                self.refit_keys()
            else:
                self._local_update(learn)

    def _disturbed(self, mats: list[np.ndarray], new_keys: list[int], skip: set[int]) -> list[int]:
        """Learned adapters that new keys without examples (``mats``, ``[P_i, dim]`` each) threaten: their keys were
        fitted before these rivals existed, so they are refitted against them.

        A rival threatens adapter ``a`` when it scores one of ``a``'s weakest stored examples (the
        :data:`DISTURB_EXAMPLES` that ``a``'s own keys score lowest) within :data:`DISTURB_MARGIN` of ``a`` itself:
        a query like that example could be stolen. This is what makes a library keyed by examples first and by
        text later route like one built in the other order (issue 11: the result must not depend on the order of
        arrival). Cost: ``[weak examples, new keys]`` dense for small change sets, else one index search per weak
        example; skipped above :data:`DISTURB_MAX_ADAPTERS` learned adapters (the background refit still sees
        every rival). Takes the lock for the learner's state and each block of searches; the product runs without
        it (:meth:`apply` calls it after the change set's hold).
        """
        with self._lock:
            lrn = self._learner
            learned = [k for k in lrn.learned if k not in skip and k in lrn.stored and len(lrn.stored[k].examples)]
            if not mats or not learned or len(learned) > DISTURB_MAX_ADAPTERS:
                return []
            weak, level, owner = [], [], []
            for i, k in enumerate(learned):
                memo = self._weak.get(k)
                if memo is None or memo[0] is not lrn.learned[k]:  # keys refitted since: recompute
                    ex = lrn.stored[k].examples.astype(np.float32)  # [m, dim]
                    own = (ex @ lrn.current_keys(k).T).max(1)  # [m] the adapter's own score of each example
                    idx = np.argsort(own, kind="stable")[:DISTURB_EXAMPLES]
                    memo = (lrn.learned[k], ex[idx], own[idx] - DISTURB_MARGIN)
                    self._weak[k] = memo
                weak.append(memo[1])
                level.append(memo[2])
                owner.append(np.full(len(memo[1]), i))
            new_slots = slots_of(np.asarray(sorted(new_keys), np.int64), self._max_p)
        weak_x, lv, own_of = np.concatenate(weak), np.concatenate(level), np.concatenate(owner)
        probe = np.concatenate([np.asarray(m, np.float32).reshape(-1, self.dim) for m in mats])  # [M, dim]
        if len(probe) * len(weak_x) <= DISTURB_DENSE_LIMIT:  # few arrivals: one dense product
            best = (weak_x @ probe.T).max(1)
        else:  # a big change set: the weak examples' nearest keys in the index, kept if they are new ones
            best = np.full(len(weak_x), -np.inf, np.float32)
            for lo in range(0, len(weak_x), RIVAL_ROWS):  # a few rows per hold of the lock, as _rivals
                with self._lock:
                    sims, slots = self._vectors.search(weak_x[lo : lo + RIVAL_ROWS], min(32, len(self._vectors)))
                best[lo : lo + RIVAL_ROWS] = np.where(np.isin(slots, new_slots), sims, -np.inf).max(1)
                yield_gil()
        return sorted({learned[i] for i in np.unique(own_of[best >= lv])})

    def _adopt(self, entry: KeyEntry, vecs: np.ndarray, d: bytes) -> tuple[np.ndarray | None, bool]:
        """Link ``entry`` to what the learner knows (caller holds the lock).

        Returns ``(keys to index instead of the catalog's, whether to learn)``: the learned keys when this
        adapter's catalog keys are unchanged since they were learned (e.g. a tag update); else ``None`` (index the
        catalog keys; learn if it has examples: the embeddings :meth:`encode_keys` remembered are attached to the
        adapter here). With a learned query encoder, the keys to index are in its space (from its embeddings).
        ``vecs``, ``d``: the entry's catalog keys (:func:`_first_vector`) and their :func:`digest`, computed off the
        lock by the caller.
        """
        learned = self._learner.learned.get(entry.key)
        if learned is not None and learned[0] == d:
            return learned[1].astype(np.float32), False
        hit = self._pending.pop(d, None)
        if hit is None:
            if entry.key in self._learner.stored:
                self._learner.initial[entry.key] = (d, vecs)
            return None, entry.key in self._learner.stored and bool(len(self._learner.stored[entry.key].examples))
        text, ex, text_fast, ex_fast, ex_texts, rtext, adapted = hit
        index = None
        if self._learner.adapted_version and len(ex):  # index and learn in the learned encoder's space
            # (an adapter without examples keeps its catalog key: its text vector in the base space)
            if adapted is None or adapted[0] != self._learner.adapted_version:
                at, ae = self._adapted.encode_batch([rtext]), self._adapted.encode_batch(list(ex_texts))
                adapted = ("", at[0], ae)
            text, ex = adapted[1], adapted[2]
            index = initial_keys(text, ex, ADAPTED_KEYS)
        self._learner.remember(entry.key, text, ex, text_fast, ex_fast, ex_texts, rtext)
        if len(ex):
            self._learner.initial[entry.key] = (d, vecs if index is None else index)
        return index, bool(len(ex))

    def rebuild(self, entries: Iterable[KeyEntry], generation: int) -> int:
        """Replace both indexes with ``entries``; returns how many adapters were indexed."""
        with self._lock:
            n = self._rebuild(((e.key, _first_vector(e, self.dim), e.domain_tags, e.skill_tags) for e in entries),
                              generation)  # fmt: skip
            if self._adapted is not None:  # catalog keys are in the base space: index the learned ones again
                lrn = self._learner
                keep = {k: lrn.current_keys(k) for k in lrn.with_examples()}
                found, _ = self._vectors.vectors_of(slots_of(np.asarray(sorted(keep), np.int64), 1))
                self._install_learned({int(k): keep[int(k)] for k in owner_of(found)}, {})
            return n

    # ------------------------------------------------------------------ learning (module smoa.routing.learner)
    def _neighbourhood(self, new: list[int]) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Trainable adapters (``new`` + nearest adapters with examples), fixed neighbour keys ``[f, dim]`` and their
        adapters ``[f]``."""
        lrn = self._learner
        with self._lock:
            ex_keys = lrn.with_examples()
            if not ex_keys:
                return [], np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
            means = np.stack([_means([lrn.current_keys(k)])[0] for k in ex_keys])  # [E, dim]
            new_set = {k for k in new if k in lrn.stored and len(lrn.stored[k].examples)}
            if not new_set:
                return [], np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
            q = np.stack([_means([lrn.current_keys(k)])[0] for k in sorted(new_set)])
            near = np.argsort(-(q @ means.T), axis=1)[:, : NEIGHBOURS + 1]
            trainable = sorted(new_set | {ex_keys[i] for i in near.reshape(-1)})
            # rivals near the learned keys and near the prototypes (where the adapters' examples are)
            probe = np.concatenate([lrn.current_keys(k) for k in trainable] + [lrn.initial_keys_of(k) for k in trainable])
        # the nearest keys outside the trainable set are fixed classes (their adapters are not refitted now)
        found, fixed = self._rivals(probe, trainable)
        return trainable, fixed, owner_of(found)

    def _rivals(self, probe: np.ndarray, trainable: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(slot ids [f], vectors [f, dim])`` of the :data:`MAX_FIXED` indexed keys nearest to the ``probe`` rows
        whose adapters are not ``trainable`` (:func:`_nearest_rivals`). Searched :data:`RIVAL_ROWS` rows per hold of
        the lock: one search of a full refit's probe (two rows per key of every adapter with examples) held it for
        the whole search, and every route waited."""
        best_slots, best_sims = [], []
        for lo in range(0, len(probe), RIVAL_ROWS):
            with self._lock:
                block = probe[lo : lo + RIVAL_ROWS]
                sims, slots = self._vectors.search(block, min(FIXED_NEIGHBOURS, len(self._vectors)))
            got, near = _nearest_rivals(sims, slots, trainable, MAX_FIXED)
            best_slots.append(got)
            best_sims.append(near)
            yield_gil()
        merged = np.concatenate(best_sims)[None, :], np.concatenate(best_slots)[None, :]
        chosen, _ = _nearest_rivals(*merged, (), MAX_FIXED)
        with self._lock:  # a key removed since its block was searched is left out, as by one search then
            return self._vectors.vectors_of(chosen)

    def _local_update(self, new: list[int]) -> None:
        """Refit the keys of ``new`` adapters and their neighbourhood (runs outside the lock; routes go on)."""
        trainable, fixed, fixed_owner = self._neighbourhood(new)
        if not trainable:
            return
        lrn = self._learner
        with self._lock:
            start = {k: lrn.initial_keys_of(k) if k in new else lrn.current_keys(k) for k in trainable}
        keys, evidence = lrn.fit(trainable, start, fixed, LOCAL_EPOCHS, fixed_owner=fixed_owner)
        self._install_learned(keys, evidence)

    def refit(self) -> dict[str, float]:
        """Full refit: every adapter with examples, from its initial keys (so arrival order does not matter),
        against the nearest keys of the others; then the fast projection and the calibration. Called by
        ``optimize_library()`` and the background optimiser; routes keep being served meanwhile."""
        got = self.adapt() if self._should_adapt() else None
        if got is None:
            got = self.refit_keys(in_child=learner_mod.FIT_IN_CHILD)
        self.lay_out_index()
        return got

    def _compact_when_due(self) -> None:
        """Start :meth:`compact_index` on a background thread when the HNSW index is past a quarter of dead
        positions and no compaction is under way in this process (caller holds the lock)."""
        if COMPACT_IN_BACKGROUND:
            self._compactor.when_due()

    def compact_index(self) -> bool:
        """Compact the HNSW index (drop its dead positions) on a copy, beside the routes
        (:class:`~smoa.routing.index.vector.Compactor`); returns whether the copy was adopted. Started by the
        router once over a quarter of the positions are dead (removed adapters, keys replaced by updates, refits,
        swaps): compacting in place rebuilt the whole graph inside the hold of the lock that removed the last key,
        and every route waited for it (44-57 s at 200K keys, ``benchmarks/bench_refit_lock.py --remove``; minutes at
        1M). The copy is dropped if the index is replaced meanwhile (a layout, a swap, a reload)."""
        return self._compactor.run()

    def _adopt_compacted(self, fresh: VectorIndex) -> None:
        self._vectors = fresh
        self._dirty = True

    def lay_out_index(self) -> bool:
        """Lay the vector index out by locality (:func:`~smoa.routing.index.vector._locality_order`) when keys added
        a few at a time since its last build or layout make over a quarter of it (:meth:`VectorIndex.layout_due`;
        a bulk build or a compaction lays it out anyway). The index is copied under the lock (~1 s at 1M keys),
        laid out without it (~15 s) and adopted only if it did not change meanwhile. Returns whether it was."""
        with self._lock:
            vectors = self._vectors
            if not vectors.layout_due():
                return False
            snapshot = vectors.layout_snapshot()
        t = time.perf_counter()
        laid = vectors.laid_out(snapshot)
        with self._lock:
            if self._vectors is not vectors or vectors.version != snapshot[0]:
                logger.info("smoa routing: the index changed while it was laid out; kept as it is")
                return False
            self._vectors = laid
            self._dirty = True
        logger.info("smoa routing: laid the index of %d keys out by locality in %.1f s", len(laid),
                    time.perf_counter() - t)
        return True

    def _refit_due(self) -> bool:
        """Whether the adapters with examples grew by ``REFIT_GROWTH`` since the last full key refit (so that a
        library built one adapter at a time gets full refits at geometric sizes: total cost a few full refits)."""
        with self._lock:
            n = len(self._learner.with_examples())
        return n >= REFIT_MIN_ADAPTERS and n >= REFIT_GROWTH * self._refit_size

    def refit_keys(self, in_child: bool = False) -> dict[str, float]:
        """The full key refit of :meth:`refit`, without training the query encoder. ``in_child``: the fit and the fast
        projection's tuning run in child interpreters (:func:`~smoa.routing.learner.fit_keys_many`): :meth:`refit`
        runs beside the routes, and there torch in this process waits for the GIL after each operator. A create's
        refit (:meth:`apply`) stays here: it is part of the create, and most are small."""
        t = time.perf_counter()
        lrn = self._learner
        with self._lock:
            trainable = lrn.with_examples()
            self._refit_size = len(trainable)
        if trainable:
            _, fixed, _ = self._neighbourhood(trainable)
            with self._lock:
                start = {k: lrn.initial_keys_of(k) for k in trainable}
            keys, evidence = lrn.fit(trainable, start, fixed, REFIT_EPOCHS, in_child=in_child)
            self._install_learned(keys, evidence)
            with self._lock:
                ks = [k for k in trainable if k in keys]
            if ks and self._fast is not None:
                lrn.tune_projection(np.concatenate([keys[k] for k in ks]),
                                    np.concatenate([[k] * len(keys[k]) for k in ks]), in_child=in_child)  # fmt: skip
                with self._lock:
                    self._cache.clear()
        self._tune_tag_weight()
        lrn.refits += 1
        return {"adapters": float(len(trainable)), "seconds": time.perf_counter() - t}

    # ------------------------------------------------------------------ the learned query encoder (smoa.routing.adapt)
    @property
    def query_encoder(self) -> CachedEncoder:
        """The encoder queries go through: the learned one once trained, else the base encoder."""
        return self._adapted if self._adapted is not None else self.encoder

    def _adapt_data(self) -> tuple[list[str], list[int]]:
        """Example texts and their adapter keys, of every adapter whose texts the learner holds."""
        texts, labels = [], []
        with self._lock:
            for k in self._learner.with_examples():
                own = self._learner.stored[k].texts
                train = ~held_out_mask(own)  # the held-out ones calibrate the threshold (learner.fit)
                texts += [t for t, use in zip(own, train) if use]
                labels += [k] * int(train.sum())
        return texts, labels

    def _should_adapt(self) -> bool:
        """Train (again) when the library has enough examples and enough of them changed since the last time."""
        if not self._can_adapt or self._adapt_lock.locked():
            return False
        with self._lock:
            lrn = self._learner
            ks = [k for k in lrn.with_examples() if len(lrn.stored[k].texts)]
            total = sum(len(lrn.stored[k].texts) for k in ks)
            if len(ks) < ADAPT_MIN_ADAPTERS or total < ADAPT_MIN_EXAMPLES:
                return False
            if not lrn.adapted_version:
                return True
            return lrn.changed_examples >= max(ADAPT_RETRAIN_MIN, ADAPT_RETRAIN_SHARE * total)

    def adapt(self, epochs: float | None = None, stop: threading.Event | None = None) -> dict[str, float] | None:
        """Train the query LoRA on the stored examples, re-encode what the learner holds in the new space, refit
        the keys there and swap it all in at once (module :mod:`smoa.routing.adapt`).

        Runs outside the router's lock (routes keep being served by the previous encoder, minutes on CPU); only
        the final swap takes it. Returns the refit report (``adapt_seconds`` = training time), or ``None`` when
        another adaptation is running, there is too little data, or ``stop`` was set.
        """
        from smoa.routing import adapt as qa

        if not self._adapt_lock.acquire(blocking=False):
            return None
        try:
            t0 = time.perf_counter()
            texts, labels = self._adapt_data()
            if len(set(labels)) < ADAPT_MIN_ADAPTERS:
                return None
            groups = self._reencode_groups(set(labels))
            done = qa.adapt_encoder(texts, labels, groups, qa.EPOCHS if epochs is None else epochs, stop=stop,
                                    base=self.encoder.name)  # fmt: skip
            weights, hist = done.weights, done.history
            if hist.stopped:
                return None
            enc = CachedEncoder(qa.AdaptedEncoder(weights, self.encoder.name, graphs=done.graphs),
                                self.config.embedding_cache_size)  # the child's graphs: no graph work here
            enc.inner.encode(["warm up"])  # a model's first forward pays one-off set-up: here, not in a route
            known = {} if done.vectors is None else dict(zip(map(tuple, groups), done.vectors))
            fresh = self._reencoded(enc, set(labels), known)
            fresh.adapted_version = enc.inner.version
            fresh.encoder_seen = set(labels)
            # the fast projection's ridge solved here: left stale, the first route after the swap solved it (90 ms
            # beside the projection's own solve in this thread, both in multithreaded BLAS; a scratch timeline)
            _ = fresh.projection
            keys, evidence = self._fit_fresh(fresh)
            new, old = _held_out_accuracy(evidence.values()), _held_out_accuracy(self._learner.evidence.values())
            if new is not None and old is not None and new < old:  # worse on held-out examples: keep the old one
                logger.info("smoa routing: learned query encoder not adopted (held-out top-1 %.3f < %.3f)", new, old)
                with self._lock:
                    self._learner.changed_examples = 0
                self.adapt_rejected += 1
                return {"adapters": float(len(keys)), "seconds": time.perf_counter() - t0, "adapt_seconds": hist.seconds,
                        "adapt_steps": float(hist.steps), "adopted": 0.0}  # fmt: skip
            if self.index_dir is not None:  # file first: the learner state names its version only when saved
                qa.save_adapted(self.index_dir, weights, self.encoder.name, hist)
            self._swap(enc, fresh, keys, evidence)
            self.adapt_history = hist
            self.adaptations += 1
            if self._fast is not None:
                ks = sorted(keys)
                if ks:
                    fresh.tune_projection(np.concatenate([keys[k] for k in ks]),
                                          np.concatenate([[k] * len(keys[k]) for k in ks]),
                                          in_child=learner_mod.FIT_IN_CHILD)  # fmt: skip
            with self._lock:
                self._cache.clear()
                self._dirty = True
            self._tune_tag_weight()
            fresh.refits += 1
            return {"adapters": float(len(keys)), "seconds": time.perf_counter() - t0, "adapt_seconds": hist.seconds,
                    "adapt_steps": float(hist.steps), "adopted": 1.0}  # fmt: skip
        finally:
            self._adapt_lock.release()

    def _reencode_groups(self, keys: set[int]) -> list[list[str]]:
        """The text batches :meth:`_reencoded` will encode for ``keys`` as the library stands now (each adapter's
        routing text, its example texts; the negatives): the training child encodes them (:func:`adapt_encoder
        <smoa.routing.adapt.adapt_encoder>`), so that the serving process does not."""
        with self._lock:
            lrn = self._learner
            groups = [g for k in sorted(keys) if k in lrn.stored for g in _text_batches(lrn.stored[k])]
            return groups + ([list(lrn.negative_texts)] if lrn.negative_texts else [])

    def _reencoded(
        self, enc: CachedEncoder, keys: set[int], known: Mapping[tuple[str, ...], np.ndarray] | None = None
    ) -> KeyLearner:
        """A new learner holding ``keys``' (and the negatives') texts encoded by ``enc`` (outside the lock); a batch
        found in ``known`` (the training child's embeddings of :meth:`_reencode_groups`) is not encoded again: an
        adapter whose texts changed meanwhile is."""
        known = known or {}

        def batch(texts: list[str]) -> np.ndarray:
            vecs = known.get(tuple(texts))
            return enc.encode_batch(texts) if vecs is None else vecs

        with self._lock:
            old = self._learner
            snap = {k: old.stored[k] for k in keys if k in old.stored}
            negs = list(old.negative_texts)
            neg_fast = old.negatives_fast
        fresh = KeyLearner(self.dim, old.max_keys)
        for k, st in sorted(snap.items()):
            routing, texts = _text_batches(st)
            tv, ev = batch(routing)[0], batch(texts)
            fresh.remember(k, tv, ev, st.text_fast, st.examples_fast, st.texts, st.routing)
            fresh.initial[k] = (old.initial[k][0], initial_keys(tv, ev, ADAPTED_KEYS))
            yield_gil()  # ~1 ms per adapter alone (the fast projection's Gram sums): routes wait less
        fresh.negative_texts = negs
        fresh.negatives = batch(negs).astype(np.float16) if negs else np.zeros((0, self.dim), np.float16)
        fresh.negatives_fast = neg_fast
        fresh.changed_examples = 0
        return fresh

    def _fit_fresh(self, fresh: KeyLearner) -> tuple[dict[int, np.ndarray], dict]:
        """Fit every adapter of ``fresh`` from its initial keys against the nearest other indexed keys."""
        trainable = fresh.with_examples()
        if not trainable:
            return {}, {}
        start = {k: fresh.initial_keys_of(k) for k in trainable}
        _, fixed = self._rivals(np.concatenate(list(start.values())), trainable)
        return fresh.fit(trainable, start, fixed, REFIT_EPOCHS, in_child=learner_mod.FIT_IN_CHILD)

    def _swap(self, enc: CachedEncoder, fresh: KeyLearner, keys: dict[int, np.ndarray], evidence: dict) -> None:
        """Install the new encoder, learner and keys at once (under the lock); adapters that arrived meanwhile are
        encoded in the new space here, the ones removed meanwhile are left out.

        The keys are first inserted into the index hidden (:meth:`_stage`, a few keys per hold of the lock), so
        that the swap's one hold only makes them live: inserting them there held it 0.57-0.73 s for 600 adapters
        among 200K keys, and every route waited (``benchmarks/bench_refit_lock.py --swap``: ~20 ms now).

        The replaced encoder and learner are released after the lock, the encoder a part at a time
        (:func:`smoa.routing.adapt.release`): freed at once under the lock, its onnxruntime sessions and tokenizers
        held it ~24 ms, which a route arriving at the swap waited for (``bench_adapt_timeline.py``).
        """
        from smoa.routing import adapt as qa

        retired = [] if self._adapted is None else [self._adapted]
        staged = self._stage(keys)
        with self._lock:
            old = self._learner
            for k in [k for k in fresh.stored if k not in old.stored]:
                fresh.forget([k])
                keys.pop(k, None)
            for k in [k for k in old.stored if k not in fresh.stored and len(old.stored[k].texts)]:
                st = old.stored[k]
                tv, ev = enc.encode_batch([st.routing])[0], enc.encode_batch(list(st.texts))
                fresh.remember(k, tv, ev, st.text_fast, st.examples_fast, st.texts, st.routing)
                if k in old.initial:
                    fresh.initial[k] = (old.initial[k][0], initial_keys(tv, ev, ADAPTED_KEYS))
                    keys[k] = fresh.initial[k][1]
            fresh.refits = old.refits
            self._learner = fresh
            self._adapted = enc
            self._install_learned(keys, evidence, staged, block=len(keys))
            self._pending.clear()  # embeddings stashed for the old space
        del old  # the last reference: freed here, off the lock
        if retired:
            qa.release(retired)

    def _rebase(self, lrn: KeyLearner) -> KeyLearner | None:
        """The learner's texts re-encoded by the base encoder (its learned encoder was refused), or ``None`` when
        it holds no texts to re-encode. Its catalog-key digests stay valid: the base keys are recomputed exactly."""
        if any(not len(st.texts) and len(st.examples) for st in lrn.stored.values()):
            return None
        out = KeyLearner(self.dim, lrn.max_keys)
        for k, st in sorted(lrn.stored.items()):
            tv, ev = self.encoder.encode_batch([st.routing])[0], self.encoder.encode_batch(list(st.texts))
            out.remember(k, tv, ev, st.text_fast, st.examples_fast, st.texts, st.routing)
            if k in lrn.initial:
                out.initial[k] = (lrn.initial[k][0], initial_keys(tv, ev, out.max_keys))
        out.negative_texts = list(lrn.negative_texts)
        if out.negative_texts:
            out.negatives = self.encoder.encode_batch(out.negative_texts).astype(np.float16)
            out.negatives_fast = lrn.negatives_fast
        out.changed_examples = sum(len(st.texts) for st in out.stored.values())  # retrain at the next refit
        return out

    def _stage(self, keys: dict[int, np.ndarray]) -> tuple[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
        """``keys`` inserted into the vector index hidden (:meth:`VectorIndex.stage`), a few rows per hold of the
        lock: ``(the index's staged generation, {adapter: (its keys, their positions)})`` for :meth:`_reveal` to make
        live in one hold. Stops early if the index is replaced or rebuilt meanwhile (the rest is then inserted the
        slow way, in that hold).

        A hold inserts as many rows as fit in :data:`STAGE_HOLD_MS` at the rate the previous holds measured (one
        graph insert costs ~0.33 ms per row at 200K keys, whatever the batch), at most :data:`STAGE_ROWS`, at least
        one; an adapter's rows may span holds. Blocks of a fixed 32 rows held the lock ~10 ms each at 200K keys,
        and a route that came during one waited for it: beside a 10K-adapter change set, routes' p99 15.9-16.7 ms
        and ~310 routes over 10 ms, now 6.5-6.7 ms and 3-7, while the change set takes 7.1-7.9 s instead of
        5.1-5.2 s under routes back to back (``benchmarks/bench_refit_lock.py --apply``; a 2 ms budget: p99
        4.2-4.6 ms but 13-16 s)."""
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        order = list(keys)
        if not order:
            with self._lock:
                return self._vectors.staged_generation, out
        mats = [keys[k] for k in order]
        counts = np.fromiter((len(m) for m in mats), np.int64, len(mats))
        slots, rows = _slots(np.asarray(order, np.int64), counts), np.concatenate(mats)
        pos = np.empty(len(rows), np.int64)
        with self._lock:
            vectors = self._vectors
            generation = vectors.staged_generation
        at, take, rates = 0, min(STAGE_ROWS, STAGE_FIRST_ROWS) if STAGE_HOLD_MS > 0 else STAGE_ROWS, deque(maxlen=8)
        while at < len(rows):
            with self._lock:
                if self._vectors is not vectors or vectors.staged_generation != generation:
                    break
                t = time.perf_counter()
                pos[at : at + take] = vectors.stage(slots[at : at + take], rows[at : at + take])
                rates.append((time.perf_counter() - t) / take)
            at += take
            if STAGE_HOLD_MS > 0:  # rows that fit the hold at the median recent cost per row
                take = int(min(STAGE_ROWS, max(1, STAGE_HOLD_MS / 1e3 // max(float(np.median(rates)), 1e-9))))
            else:
                take = STAGE_ROWS
            yield_gil()
        ends = np.cumsum(counts)
        for i in range(int(np.searchsorted(ends, at, side="right"))):  # the adapters staged whole
            out[order[i]] = (mats[i], pos[ends[i] - counts[i] : ends[i]])
        return generation, out

    def _install_learned(
        self,
        keys: dict[int, np.ndarray],
        evidence: dict,
        staged: tuple[int, dict[int, tuple[np.ndarray, np.ndarray]]] | None = None,
        block: int | None = None,
    ) -> None:
        """Swap learned keys in for the adapters still as they were when the fit started; recalibrate.

        :data:`INSTALL_ADAPTERS` adapters per hold of the lock, each adapter's keys replaced at once: inserting a
        full refit's keys into a big HNSW index held it for the whole insertion, and every route waited (with the
        rivals' search, :meth:`_rivals`: up to ~210 ms for 150 adapters among 200K keys,
        ``benchmarks/bench_refit_lock.py``). Between two blocks a route sees some
        adapters with their new keys and some with their old ones, all in the same space. A caller that already
        holds the lock (an adaptation's swap, whose keys are in a new space) installs them all in that one hold, in
        one ``block``; the keys it ``staged`` (:meth:`_stage`) are only made live there. Stops if the learner is
        replaced meanwhile (its keys would be stale)."""
        lrn = self._learner
        order = list(keys)
        block = block or INSTALL_ADAPTERS
        for lo in range(0, len(order), block):
            with self._lock:
                if self._learner is not lrn:
                    return
                live = [k for k in order[lo : lo + block] if k in lrn.stored and k in lrn.initial]
                if live:
                    arr, mats = np.asarray(live, np.int64), [keys[k] for k in live]
                    rest = self._show(arr, mats, staged) if staged is not None else np.arange(len(live))
                    self._drop(arr[rest])
                    self._put(arr[rest], [mats[i] for i in rest.tolist()])
                    tags = [self._tags.tags_of(k) or ((), ()) for k in live]
                    self._groups.add_many(arr, _means(mats), [list(d) for d, _ in tags])
                    for k in live:
                        lrn.learned[k] = (lrn.initial[k][0], keys[k].astype(np.float16))
                        lrn.evidence[k] = evidence.get(k, lrn.evidence.get(k))
                    self._cache.clear()
                    self._dirty = True
            yield_gil()
        with self._lock:
            if staged is not None:
                # (a compaction between two reveals would have dropped the later ones' keys)
                self._vectors.settle(compact=not COMPACT_IN_BACKGROUND)
                self._compact_when_due()
            if self._learner is lrn:
                self._recalibrate()
                self._cache.clear()
                self._dirty = True

    def _recalibrate(self) -> None:
        """Re-pool the calibration evidence and score the user's negatives against the current keys."""
        lrn = self._learner
        neg = None
        if len(lrn.negatives) and len(self._vectors):
            sims, _ = self._vectors.search(lrn.negatives.astype(np.float32), 2)
            best = sims[:, 0]
            neg = (best, best - np.where(np.isfinite(sims[:, 1]), sims[:, 1], best - 1.0))
        cal = lrn.recalibrate(neg)
        lrn.calibration = replace(cal, free_threshold=max(cal.threshold, self._free_null()))

    def _null_stale(self, n: int | None = None, n_backed: int | None = None) -> bool:
        """Whether the free threshold's null was measured on a different enough library (:data:`NULL_REMEASURE`)."""
        if self._null is None:
            return True
        (was_n, was_b, was_space), _ = self._null
        n = len(self._vectors) if n is None else n
        n_backed = len(self._learner.with_examples()) if n_backed is None else n_backed
        return was_space != self._learner.adapted_version or any(
            abs(now - was) > NULL_REMEASURE * max(was, 1) for now, was in ((n, was_n), (n_backed, was_b)))  # fmt: skip

    def _free_null(self) -> float:
        """The example-less adapters' null quantile (:func:`~smoa.routing.calibrate.free_threshold`): per sampled
        held-out example of an adapter with examples, its best score on an adapter without examples (among its
        :data:`NULL_SEARCH_K` nearest key slots). Measured again only when the index, the adapters with examples
        or the encoder's space changed enough (one search of :data:`NULL_EXAMPLES` queries: ~0.5 s at 1M)."""
        from smoa.routing.calibrate import free_threshold

        lrn = self._learner
        backed = lrn.with_examples()
        n = len(self._vectors)
        if not backed or n == 0:
            return -np.inf
        if not self._null_stale(n, len(backed)):
            return self._null[1]  # type: ignore[index]
        per = max(1, -(-NULL_EXAMPLES // len(backed)))
        rows = []
        for k in backed:
            st = lrn.stored[k]
            ex = st.examples
            if k in lrn.encoder_seen and len(st.texts) == len(ex):  # the encoder trained on all but these
                ex = ex[held_out_mask(st.texts)]
            rows.append(ex[:per])
        x = l2_normalize(np.concatenate(rows).astype(np.float32))[:NULL_EXAMPLES]
        sims, slots = self._vectors.search(x, min(NULL_SEARCH_K, n * self._max_p))
        owners = owner_of(slots)
        free = (slots >= 0) & ~np.isin(owners, np.asarray(backed, np.int64))
        null = np.where(free.any(1), np.where(free, sims, -np.inf).max(1), -np.inf)
        value = free_threshold(null)
        self._null = ((n, len(backed), lrn.adapted_version), value)
        return value

    def negative_texts(self) -> list[str]:
        """The registered negatives' texts, in order."""
        with self._lock:
            return list(self._learner.negative_texts)

    @staticmethod
    def clean_negatives(texts: Sequence[str]) -> list[str]:
        """Negatives as stored: validated, capped at ``MAX_QUERY_CHARS``, whitespace-normalised, empty ones dropped.

        Raises :class:`InvalidInputError` on a non-string (naming ``texts[i]`` on invalid Unicode)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InvalidInputError(f"`texts` must be a list of strings, got {texts!r:.100}")
        clean = [" ".join(validate_query_text(t, f"texts[{i}]")[:MAX_QUERY_CHARS].split()) for i, t in enumerate(texts)]
        return [t for t in clean if t]

    def set_negative_examples(self, texts: Sequence[str]) -> int:
        """Replace the registered negatives by ``texts`` (the catalog's copy, at open); returns how many."""
        with self._lock:
            lrn = self._learner
            lrn.negatives = np.zeros((0, self.dim), np.float16)
            lrn.negatives_fast = np.zeros((0, self.dim), np.float16)
            lrn.negative_texts = []
            self._recalibrate()
        return self.add_negative_examples(list(texts)) if texts else 0

    def add_negative_examples(self, texts: Sequence[str]) -> int:
        """Register out-of-scope texts (queries no adapter should serve): they tune the ``"auto"`` threshold.

        Returns how many negatives are registered in all. Raises :class:`InvalidInputError` on a non-string.
        """
        clean = self.clean_negatives(texts)
        if not clean:
            return len(self._learner.negatives)
        vecs = self.query_encoder.encode_batch(clean).astype(np.float16)
        fast = self._fast.encode(clean).astype(np.float16) if self._fast is not None else np.zeros((0, self.dim), np.float16)
        with self._lock:
            lrn = self._learner
            lrn.negatives = np.concatenate([lrn.negatives, vecs])
            lrn.negative_texts.extend(clean)
            if len(fast):
                lrn.negatives_fast = np.concatenate([lrn.negatives_fast, fast])
            self._recalibrate()
            self._cache.clear()
            self._dirty = True
            return len(lrn.negatives)

    @property
    def calibration(self):  # -> smoa.routing.calibrate.Calibration
        """The current ``"auto"`` threshold and confidence model."""
        return self._learner.calibration

    def threshold(self) -> float:
        """The threshold in force: the configured number, or the calibrated one when ``"auto"``."""
        t = self.config.routing_threshold
        return self._learner.calibration.threshold if isinstance(t, str) else float(t)

    def load(self, max_generation: int) -> int | None:
        """Load the persisted indexes if they were built with this encoder and reflect a generation
        ``<= max_generation``; returns that generation (the core catches up from there), else None."""
        if self.index_dir is None:
            return None
        try:
            import json

            saved = int(json.loads((self.index_dir / "meta.json").read_text()).get("generation", -1))
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        if not 0 <= saved <= max_generation:
            return None
        with self._lock:
            try:
                vectors, tags, groups = load_indexes(self.index_dir, saved, self.encoder.name, self.dim, self._params)
            except StaleIndexError as exc:
                logger.info("smoa routing: persisted index not used (%s)", exc)
                return None
            self._install(vectors, tags, saved, groups)
            self._dirty = False
            self._load_learner()
            if self._rebuild_needed:  # vectors made in a refused encoder's space: the core rebuilds from the catalog
                self._rebuild_needed = False
                return None
        return saved

    def sync(
        self,
        rows: Callable[[], Iterable[tuple[int, np.ndarray, list[str], list[str]]]],
        generation: int,
    ) -> None:
        """At open: load the persisted indexes if they reflect ``generation``, else rebuild from ``rows()``."""
        with self._lock:
            if self.index_dir is not None:
                try:
                    vectors, tags, groups = load_indexes(self.index_dir, generation, self.encoder.name, self.dim,
                                                         self._params)  # fmt: skip
                except StaleIndexError as exc:
                    reason = str(exc)
                else:
                    self._install(vectors, tags, generation, groups)
                    self._dirty = False
                    self._load_learner()
                    reason = "learned query encoder refused"
                    if not self._rebuild_needed:
                        return
                    self._rebuild_needed = False
            else:
                reason = ""
            n = self._rebuild(rows(), generation)
            if self.index_dir is not None and (n or not reason.startswith("no index")):
                logger.warning("smoa routing: rebuilt the index of %d adapters from the catalog (%s)", n, reason)
            if self.index_dir is not None:
                self.save()

    def _rebuild(self, rows: Iterable[tuple[int, np.ndarray, list[str], list[str]]], generation: int) -> int:
        keys: list[int] = []
        vecs: list[np.ndarray] = []
        tag_rows: list[tuple[int, list[str], list[str]]] = []
        for key, vec, domain, skill in rows:
            mat = np.asarray(vec, np.float32).reshape(-1, self.dim)[:MAX_KEYS]
            keys.append(int(key))
            vecs.append(mat)
            tag_rows.append((int(key), domain, skill))
        tags = TagIndex()
        tags.add_many(tag_rows)
        del tag_rows
        matrix = np.concatenate(vecs) if vecs else np.zeros((0, self.dim), np.float32)
        counts = np.fromiter((len(m) for m in vecs), np.int64, len(vecs))
        del vecs
        owners = np.repeat(np.asarray(keys, np.int64), counts)  # [slots]
        slots = _slots(np.asarray(keys, np.int64), counts)
        groups = None
        uniq, inverse = np.unique(owners, return_inverse=True)
        if len(uniq) == len(keys):  # groups from the exact keys (no decoding); a repeated key: let _install do it
            sums = row_sums(matrix, inverse, len(uniq))
            groups = GroupIndex(self.dim)
            groups.add_many(uniq, _unit(sums), [list(t[0]) if t else [] for t in tags.tags_of_many(uniq)])
        self._install(VectorIndex.build(self.dim, slots, matrix, self._params), tags, generation, groups)
        return len(keys)

    def _install(self, vectors: VectorIndex, tags: TagIndex, generation: int, groups: GroupIndex | None = None) -> None:
        """Adopt loaded / rebuilt indexes; ``groups`` (persisted with them) saves decoding every key."""
        self._vectors, self._tags = vectors, tags
        _, counts = np.unique(owner_of(vectors.live_ids()), return_counts=True)
        self._max_p = int(counts.max()) if len(counts) else 1
        if groups is None:
            slots, vecs = vectors.items()
            groups = GroupIndex(self.dim)
            keys, inverse = np.unique(owner_of(slots), return_inverse=True)
            sums = row_sums(vecs, inverse, len(keys))
            domains = [list(t[0]) if t else [] for t in tags.tags_of_many(keys)]
            groups.add_many(keys, _unit(sums), domains)
        self._groups = groups
        self._changed(generation)
        self._compact_when_due()  # saved with a quarter dead (the process ended during its compaction)

    # ------------------------------------------------------------------ routing
    def route(
        self,
        query: str,
        metadata: Mapping[str, Any] | None = None,
        strategy: RoutingStrategy | str | None = None,
        k: int | None = None,
    ) -> Route:
        """Route one query (see the module docstring for strategies, scores, bad input and the budget)."""
        t0 = time.perf_counter()
        text, truncated, terms, strat, k = self._validate(query, metadata, strategy, k)
        with self._lock:
            self._counts["queries"] += 1
            self._counts["truncated"] += truncated
            cache_key = (text, tuple(sorted(terms)), strat, k, self._generation)
            cached = self._cache.get(cache_key) if self.config.enable_caching else None
            if cached is not None:
                self._cache.move_to_end(cache_key)
                self._counts["cache_hits"] += 1
                ms = (time.perf_counter() - t0) * 1e3
                self._latencies.append(ms)
                return replace(cached, cache_hit=True, routing_latency_ms=ms, timings_ms={"total": ms})
            self._counts["cache_misses"] += 1
            route = self._compute(text, terms, strat, k, t0)
            if truncated:
                route = replace(route, query_truncated=True)
            if self.config.enable_caching and self.config.route_cache_size > 0:
                self._cache[cache_key] = route
                while len(self._cache) > self.config.route_cache_size:
                    self._cache.popitem(last=False)
            self._latencies.append(route.routing_latency_ms)
            self._counts["degraded"] += route.degraded
            return route

    def _validate(
        self, query: Any, metadata: Any, strategy: Any, k: Any
    ) -> tuple[str, bool, list[tuple[str, int]], RoutingStrategy, int]:
        query = validate_query_text(query, "query")  # str, no lone surrogate (issue 10, finding 11)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidInputError(f"`metadata` must be a mapping or None, got {metadata!r}")
        terms = query_terms_from_metadata(metadata or {})
        try:
            strat = coerce_enum(RoutingStrategy, strategy or self.config.routing_strategy, "strategy")
        except ConfigError as exc:
            raise InvalidInputError(str(exc)) from None
        k = self.config.max_active_adapters if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1024:
            raise InvalidInputError(f"`k` must be an int in [1, 1024], got {k!r}")
        truncated = len(query) > MAX_QUERY_CHARS
        text = " ".join(query[:MAX_QUERY_CHARS].split())
        return text, truncated, terms, strat, k

    def _compute(self, text: str, terms: list[tuple[str, int]], strat: RoutingStrategy, k: int, t0: float) -> Route:
        timings = {"encode": 0.0, "search": 0.0, "fuse": 0.0}
        degraded = escalated = False
        auto = isinstance(self.config.routing_threshold, str)
        if not text or len(self._vectors) == 0:
            if not text and terms and len(self._tags):
                strat = RoutingStrategy.TASK_BASED
            else:
                return self._finish([], strat, timings, False, t0)
        best = margin = None
        if strat is RoutingStrategy.TASK_BASED:
            t = time.perf_counter()
            use = terms or self._tags.match_text(text)
            scores = self._tags.score(use)
            timings["search"] = (time.perf_counter() - t) * 1e3
            threshold = 1e-9 if auto else float(self.config.routing_threshold)  # auto: any tag match
        else:
            scores, cos, degraded, escalated = self._cascade(text, terms, strat, k, timings, t0)
            best, margin = _best_margin(cos)
            threshold = -np.inf if auto else float(self.config.routing_threshold)
        t = time.perf_counter()
        if best is not None:
            scores, cos = self._free_gate(scores, cos, terms)
            best, margin = _best_margin(cos)
        if auto and best is not None and best < self._learner.calibration.threshold:
            chosen: list[tuple[str, float]] = []  # no adapter fits: the base model alone
        else:
            chosen = select_top(scores, k, threshold, self._resolve)
        timings["fuse"] += (time.perf_counter() - t) * 1e3
        if best is None:
            conf = float(min(1.0, max(0.0, chosen[0][1]))) if chosen else 0.0
        else:
            conf = self._learner.calibration.confidence(best, margin)
        self._counts["escalated"] += escalated
        self._counts["empty"] += not chosen
        route = self._finish(chosen, strat, timings, degraded, t0, confidence=conf, escalated=escalated)
        self._walk_cost.settle()  # the last beam plan's error, up to the route's end (WalkCost)
        self._main_cost.settle()  # and the deadline plan's (EncoderCost.deadline)
        if self._tag_end is not None:
            self._walk_cost.tail_done((time.perf_counter() - self._tag_end) * 1e3)
            self._tag_end = None
        self._drops_memo = None  # holds this route's cosines: let them go
        return route

    def _free_gate(
        self, scores: dict[int, float], cos: dict[int, float], terms: list[tuple[str, int]]
    ) -> tuple[dict[int, float], dict[int, float]]:
        """Drop the candidates without examples whose cosine is under the free threshold (:meth:`_free_drops`)."""
        gone = self._free_drops(cos, terms)
        if not gone:
            return scores, cos
        return ({k: v for k, v in scores.items() if k not in gone}, {k: v for k, v in cos.items() if k not in gone})

    def _free_drops(self, cos: Mapping[int, float], terms: list[tuple[str, int]]) -> set[int]:
        """The candidates in ``cos`` that the auto threshold's free gate drops (empty when it is off): those without
        examples whose cosine is under the free threshold (module docstring of :mod:`smoa.routing.calibrate`): they
        would serve an unrelated query. A candidate carrying a tag the query's metadata ``terms`` name is kept: the
        caller said what the query is about. HYBRID's tag side skips them (they are never fused: at 1M keys about
        half of a route's ~190 candidates). Worked out once per route: the tag side and the route's gate ask for
        the same cosines."""
        cal = self._learner.calibration
        if not cos or not isinstance(self.config.routing_threshold, str) or cal.free_threshold <= cal.threshold:
            return set()
        memo = self._drops_memo  # the cosines are not changed once gated: the same dict and count, the same drops
        if memo is not None and memo[0] is cos and memo[1] == len(cos) and memo[2] is terms:
            return memo[3]
        self._drops_memo = (cos, len(cos), terms, self._gated_out(cos, terms, cal.free_threshold))
        return self._drops_memo[3]

    def _gated_out(self, cos: Mapping[int, float], terms: list[tuple[str, int]], free: float) -> set[int]:
        """:meth:`_free_drops`' work, for a free threshold ``free`` that is on."""
        stored = self._learner.stored
        drop = [k for k, c in cos.items() if c < free and not (k in stored and len(stored[k].examples))]
        if drop and terms:
            named = self._tags.carrying(drop, {t for t, _ in terms})
            drop = [k for k, keep in zip(drop, named) if not keep]
        return set(drop)

    def _cascade(
        self, text: str, terms: list[tuple[str, int]], strat: RoutingStrategy, k: int, timings: dict[str, float],
        t0: float,
    ) -> tuple[dict[int, float], dict[int, float], bool, bool]:
        """Encode and score, cheapest path first: the static fast path (projected into the key space) answers
        when its top-1 leads clearly; else the main encoder, if the latency budget predicts it fits with the search
        after it (or, now and then, to re-measure it: :meth:`EncoderCost.explore`), stopped at the budget's
        deadline if it runs late (:mod:`smoa.routing.deadline`). Returns ``(scores, cosines, degraded,
        escalated)``; ``degraded``: the fast answer was unsure and the budget forbade or stopped the main encoder
        (a real loss of quality)."""
        budget = self.config.routing_latency_budget_ms
        fast = self._fast
        projected = None
        if fast is not None and self._learner.projection is not None:
            t = time.perf_counter()
            cached = self.query_encoder.peek(text)
            if cached is None:
                projected = self._learner.project(fast.encode([text]))[0]  # [dim], key space
            timings["encode"] = (time.perf_counter() - t) * 1e3
            if cached is not None:  # the main encoder's embedding is already known: no need for the fast path
                scores, cos, degraded = self._semantic_side(cached, text, terms, strat, k, timings, t0)
                return scores, cos, degraded, False
        if projected is not None:
            t_side = time.perf_counter()
            scores, cos, degraded = self._semantic_side(projected, text, terms, strat, k, timings, t0)
            side_ms = (time.perf_counter() - t_side) * 1e3  # what the escalated route's own search will take, about
            best, margin = _best_margin(cos)
            thr = self._learner.calibration.threshold if isinstance(self.config.routing_threshold, str) else None
            factor = ADAPTED_MARGIN_FACTOR if self._adapted is not None else 1.0
            # whether the two best have different keys: asked once, only when the lead is low at the wider margin
            separable = best is not None and margin < self._margin_floor(factor) and (
                margin > SAME_KEY_MARGIN or self._separable(cos))
            if not self._unsure(best, margin, separable, thr, factor):
                self._counts["fast"] += 1
                return scores, cos, degraded, False
            spent = (time.perf_counter() - t0) * 1e3
            left = budget - spent - side_ms - self._main_cost.hold()  # for the encoder (EncoderCost.deadline)
            fits = self._main_cost.predict(len(text)) <= left or (  # explored only where a deadline can stop it
                self.query_encoder.cancellable and self._main_cost.explore(left, len(text)))
            q = self._encode_main(text, self._main_cost.deadline(t0 + budget / 1e3, side_ms)) if fits else None
            if q is None:  # refused, or stopped at its deadline (smoa.routing.deadline)
                self._counts["fast"] += 1
                if not fits:
                    # a refused escalation must not rest on a stale (e.g. warm-up) cost; not through the embedding
                    # cache (the filler must not be cached); on its thread's CPU clock unless an adaptation runs
                    # beside the routes: its steps in this process share the GIL and its training child a core, so
                    # an escalation really waits, as the wall clock says
                    inner = getattr(self.query_encoder, "inner", self.query_encoder)
                    cpu_clock = bool(getattr(inner, "cpu_bound", False)) and not self._adapt_lock.locked()
                    self._main_cost.probe(inner.encode, len(text), cpu_clock=cpu_clock)
                else:
                    timings["encode"] += self._main_ms
                # degraded: unsure even by the base margin (between it and the wider one the fast answer is
                # usually right: escalating there is worth it when the budget allows, not a loss when it does not)
                return scores, cos, degraded or factor == 1.0 or self._unsure(best, margin, separable, thr, 1.0), False
        else:
            q = self._encode_main(text, math.inf)
        timings["encode"] += self._main_ms
        assert q is not None  # only a finite deadline stops the encoder
        scores, cos, degraded = self._semantic_side(q, text, terms, strat, k, timings, t0)
        return scores, cos, degraded, projected is not None

    def _encode_main(self, text: str, deadline: float) -> np.ndarray | None:
        """The main (query) encoder's vector of ``text`` ``[dim]``, or ``None`` when its run was stopped at
        ``deadline`` (``time.perf_counter()`` seconds; :mod:`smoa.routing.deadline`: a cancellable encoder and a
        finite deadline only). Its cost is learned either way (a stopped run's, a lower bound, too); the ms spent
        are left in ``self._main_ms``."""
        enc = self.query_encoder
        t = time.perf_counter()
        try:
            if math.isfinite(deadline) and enc.cancellable:
                q = self._watchdog.run(lambda options: enc.encode([text], run_options=options), deadline)[0]
            else:
                q = enc.encode([text])[0]
        except EncodeCancelled:
            q = None
            self._counts["cancelled"] += 1
        self._main_ms = (time.perf_counter() - t) * 1e3
        if self._main_ms > 0.05:  # a stopped run that never started (deadline passed) says nothing
            self._main_cost.learn(len(text), self._main_ms, stopped=q is None)
        return q

    def _margin_floor(self, factor: float) -> float:
        """The top-1 lead under which a fast answer is unsure at ``factor`` x :data:`CASCADE_MARGIN`."""
        return max(CASCADE_MARGIN * factor, self._learner.cascade_margin)

    def _unsure(self, best: float | None, margin: float, separable: bool, thr: float | None, factor: float) -> bool:
        """Whether a fast answer (``best`` cosine, top-1 lead ``margin``) is unsure at ``factor`` x
        :data:`CASCADE_MARGIN`: a low lead between two different keys (``separable``, see :meth:`_separable`),
        or a best score near the auto threshold."""
        return best is not None and (
            (margin < self._margin_floor(factor) and separable)
            or (thr is not None and abs(best - thr) < CASCADE_MARGIN * factor / 2)
        )  # fmt: skip

    def _separable(self, cos: Mapping[int, float]) -> bool:
        """Whether the two best adapters have different keys (identical keys: no encoder can tell them apart,
        so a low margin between them is no reason to escalate nor a loss of quality)."""
        top = heapq.nlargest(2, cos, key=cos.__getitem__)  # ties: the first in cos, as a stable sort gives
        if len(top) < 2:
            return False
        found, vecs = self._vectors.vectors_of(slots_of(np.asarray(top, np.int64), self._max_p))
        own = owner_of(found)
        a, b = vecs[own == top[0]], vecs[own == top[1]]
        return not (len(a) and len(b) and float((a @ b.T).max()) > SAME_KEY_COS)

    def _over_budget(self, t0: float) -> bool:
        return (time.perf_counter() - t0) * 1e3 > self.config.routing_latency_budget_ms

    def _semantic_side(
        self,
        q: np.ndarray,
        text: str,
        terms: list[tuple[str, int]],
        strat: RoutingStrategy,
        k: int,
        timings: dict[str, float],
        t0: float,
    ) -> tuple[dict[int, float], dict[int, float], bool]:
        """Scores of the candidate adapters for SEMANTIC / HYBRID / HIERARCHICAL, their cosines, and whether it
        degraded (multi-vector keys: an adapter scores its best key)."""
        n_cand = _candidates(k, strat)
        t = time.perf_counter()
        allowed = None
        degraded = False
        if strat is RoutingStrategy.HIERARCHICAL and len(self._groups) > 1:
            if self._over_budget(t0):
                degraded = True
            else:
                groups = self._groups.top_groups(q, N_GROUPS)
                allowed = np.concatenate([self._groups.members(g) for g, _ in groups])
        walk = self._vectors.kind != "flat" and not (allowed is not None and len(allowed) <= EXACT_GROUP_LIMIT)
        ef = self._budget_ef(t0) if walk else None
        degraded |= ef is not None
        # HYBRID's walk-free steps may run beside an unrestricted walk of the full beam (SEMANTIC's, the rescue alone
        # at ~20 us, costs less than the hand-over; so does HYBRID's beside a beam a budget narrowed: 1M keys, 1 ms
        # budget, p50 0.85 against 0.62 ms); whether they do is measured (SideChoice), so both modes are timed
        timed = walk and ef is None and allowed is None and strat is RoutingStrategy.HYBRID and self._side is not None
        if timed and self._beside():
            return self._beside_walk(q, text, terms, n_cand, k, timings, t0, degraded)
        t_phase = time.perf_counter()
        if allowed is not None and len(allowed) <= EXACT_GROUP_LIMIT:
            # few members: score them exactly (a filtered HNSW walk can miss a small, remote group)
            cos = self._exact_scores(allowed, q)
        else:
            cos = self._search_cos(q, n_cand, allowed, ef)
        t_walk = time.perf_counter()
        timings["search"] += (t_walk - t) * 1e3
        if strat is not RoutingStrategy.HYBRID:
            return cos, cos, degraded
        out = self._tag_after_walk(q, text, terms, cos, n_cand, k, walk, timings, t0, degraded)
        if timed:
            self._side_choice.record(False, (time.perf_counter() - t_phase) * 1e3)
        return out

    def _tag_after_walk(
        self, q: np.ndarray, text: str, terms: list[tuple[str, int]], cos: dict[int, float], n_cand: int, k: int,
        walk: bool, timings: dict[str, float], t0: float, degraded: bool,
    ) -> tuple[dict[int, float], dict[int, float], bool]:
        """HYBRID's tag side after the search, on this thread: the scores fused with the cosines ``cos`` (of the
        candidates that can still be among the route's ``k``: :func:`~smoa.routing.strategies.contenders`)."""
        t = time.perf_counter()
        lam = METADATA_TAG_WEIGHT if terms else self.text_tag_weight
        use = terms or self._tags.match_text(text)
        if not use:
            timings["fuse"] += (time.perf_counter() - t) * 1e3
            return cos, cos, degraded
        if not self._tag_side_fits(t0):
            timings["fuse"] += (time.perf_counter() - t) * 1e3
            return cos, cos, True
        tag = self._tag_side(q, use, cos, n_cand, gate=terms, top=(k, lam))
        scores = fuse(cos if len(tag) == len(cos) else {key: cos[key] for key in tag}, tag, lam)
        self._tag_end = time.perf_counter()
        ms = (self._tag_end - t) * 1e3
        timings["fuse"] += ms
        self._walk_cost.tag_done(ms)
        if walk:
            self._walk_cost.add_after(ms)
        return scores, cos, degraded

    def _beside(self) -> bool:
        """Whether this HYBRID route runs its walk-free steps beside the walk (:meth:`_beside_walk`), as
        ``routing_parallel_side`` says (read per route, so it can be switched on a live router): ``"auto"``: the
        mode :class:`~smoa.routing.costs.SideChoice` measured faster."""
        mode = getattr(self.config, "routing_parallel_side", "auto")
        if isinstance(mode, bool):
            return mode
        return self._side_choice.pick()

    def _beside_walk(
        self, q: np.ndarray, text: str, terms: list[tuple[str, int]], n_cand: int, top_k: int,
        timings: dict[str, float], t0: float, degraded: bool,
    ) -> tuple[dict[int, float], dict[int, float], bool]:
        """HYBRID's :meth:`_semantic_side` over an unrestricted full-beam HNSW walk, with the steps that do not need the walk's
        result on the side thread (:mod:`smoa.routing.side`) while this thread walks (faiss releases the GIL): the
        small-group rescue, the query's words, the adapters holding its rarest terms (scored exactly) and the tag
        scores of both. After the walk only the walk's own candidates are tag-scored, of those that can still be among
        the route's ``top_k`` (:func:`~smoa.routing.strategies.contenders`). The scores are those of the serial path
        (:meth:`_search_cos` then :meth:`_tag_side`), float for float."""
        lam = METADATA_TAG_WEIGHT if terms else self.text_tag_weight
        k = n_cand * min(self._max_p, 4)  # as _search_cos asks at the full beam

        def side() -> tuple[dict[int, float], list[tuple[str, int]], dict[int, float], dict[int, float]]:
            rescue = self._small_group_scores(q, k)
            use = terms or self._tags.match_text(text)
            if not use:
                return rescue, use, {}, {}
            rare = self._rare_candidates(q, use, n_cand, rescue)
            return rescue, use, rare, self._tags.score_keys(use, [*rescue, *rare])

        t = time.perf_counter()
        pending = self._side.start(side)  # type: ignore[union-attr]
        try:
            sims, slots = self._vectors.search(q[None, :], k)
            t_walk = time.perf_counter()  # the walk's cost (the beam's model) without the wait for the side
        finally:
            pending.wait()  # the side reads the index: it must end before this route can release the lock
        rescue, use, rare, tag = pending.result()
        cos = _max_by_owner(slots[0], sims[0])
        cos.update(rescue)
        t_end = time.perf_counter()
        self._walk_cost.record((t_walk - t) * 1e3, max(k, self._vectors.ef_search), (t_end - t_walk) * 1e3)
        timings["search"] += (t_end - t) * 1e3
        if not use:
            self._side_choice.record(True, (t_end - t) * 1e3)
            return cos, cos, degraded
        if not self._tag_side_fits(t0):
            timings["fuse"] += (time.perf_counter() - t_end) * 1e3
            self._side_choice.record(True, (time.perf_counter() - t) * 1e3)
            return cos, cos, True
        for key, score in rare.items():  # an adapter the walk found keeps the walk's score, as in _tag_side
            cos.setdefault(key, score)
        drop = self._free_drops(cos, terms)  # as _tag_side: the free gate's drops are neither scored nor fused
        keep = contenders(cos, top_k, lam, drop)  # nor those beaten by top_k others whatever their tags
        if keep is None:
            keep = [key for key in cos if key not in drop] if drop else list(cos)
        rest = [key for key in keep if key not in tag]
        if rest:
            tag.update(self._tags.score_keys(use, rest))
        scores = fuse({key: cos[key] for key in keep}, {key: tag[key] for key in keep}, lam)
        self._tag_end = time.perf_counter()
        ms = (self._tag_end - t_end) * 1e3
        timings["fuse"] += ms
        self._walk_cost.tag_done(ms)
        self._walk_cost.add_after(ms)
        self._side_choice.record(True, (self._tag_end - t) * 1e3)
        return scores, cos, degraded

    def _tag_side_fits(self, t0: float) -> bool:
        """Whether HYBRID's tag side and the steps after it (:meth:`WalkCost.tag_reserve`) still fit the budget;
        else the route keeps its cosines and is ``degraded``. Before, the tag side was skipped only once the budget
        was already spent, so routes that came near it overran it (1M keys, 1 ms budget: p99 1.22 ms, where routes
        that skipped it at 0.5 ms ended by 0.98 ms at the same top-1)."""
        return self._walk_cost.tag_fits(self.config.routing_latency_budget_ms - (time.perf_counter() - t0) * 1e3)

    def _budget_ef(self, t0: float) -> int | None:
        """The HNSW beam that fits what is left of the latency budget (:meth:`WalkCost.beam`), ``None``: the full one."""
        left = self.config.routing_latency_budget_ms - (time.perf_counter() - t0) * 1e3
        return self._walk_cost.beam(left, self._vectors.ef_search)

    def _search_cos(self, q: np.ndarray, n_cand: int, allowed: np.ndarray | None = None, ef: int | None = None
                    ) -> dict[int, float]:  # fmt: skip
        """``{adapter key: best cosine of its keys}`` of the ``n_cand``-odd nearest adapters to ``q`` (optionally
        among ``allowed`` adapter keys; ``ef``: a narrower HNSW beam than the default, see :meth:`_budget_ef`); an
        unrestricted approximate search also scores the small groups near ``q`` exactly (the graph's blind spot,
        module docstring). HNSW walks feed the beam's cost model."""
        slots_allowed = None if allowed is None else slots_of(allowed, self._max_p)
        k = n_cand * min(self._max_p, 4) if ef is None else min(n_cand * min(self._max_p, 4), ef)
        t = time.perf_counter()
        sims, slots = self._vectors.search(q[None, :], k, allowed=slots_allowed, ef_search=ef)
        t_walk = time.perf_counter()
        cos = _max_by_owner(slots[0], sims[0])
        if self._vectors.kind != "flat":
            if allowed is None:
                cos.update(self._small_group_scores(q, k))
            self._walk_cost.record((t_walk - t) * 1e3, max(k, ef or self._vectors.ef_search),
                                   (time.perf_counter() - t_walk) * 1e3)  # fmt: skip
        return cos

    def _tag_side(
        self, q: np.ndarray, terms: list[tuple[str, int]], cos: dict[int, float], n_cand: int,
        gate: list[tuple[str, int]] | None = None, top: tuple[int, float] | None = None,
    ) -> dict[int, float]:
        """HYBRID's tag scores of the candidates in ``cos``, which first gains (scored exactly against ``q``) the
        adapters holding the query's rarest terms (at most ``TAG_SCAN_LIMIT`` postings scanned). ``gate``: a route's
        metadata terms; the candidates its free gate will drop (:meth:`_free_drops`) are then not scored (nor
        fused: the scores hold the others only). ``top``: the route's ``(k, tag weight)``; the candidates that
        ``k`` others beat whatever their tags (:func:`~smoa.routing.strategies.contenders`) are not scored either.
        Both ``None``: every candidate is scored."""
        cos.update(self._rare_candidates(q, terms, n_cand, cos))
        drop = self._free_drops(cos, gate) if gate is not None else ()
        keys = contenders(cos, *top, drop) if top is not None else None
        if keys is None:
            keys = [key for key in cos if key not in drop] if drop else cos
        return self._tags.score_keys(terms, keys)  # one pass over the candidates (the numpy cost is per term)

    def _rare_candidates(
        self, q: np.ndarray, terms: list[tuple[str, int]], n_cand: int, known: Mapping[int, float]
    ) -> dict[int, float]:
        """HYBRID's tag-side candidates not in ``known``, scored exactly against ``q``: the ``n_cand`` best adapters
        holding the query's rarest terms (at most ``TAG_SCAN_LIMIT`` postings scanned)."""
        rare, budget = [], TAG_SCAN_LIMIT
        for term in sorted(terms, key=lambda tf: self._tags.posting_total([tf])):
            budget -= self._tags.posting_total([term])
            if budget < 0:
                break
            rare.append(term)
        if not rare:
            return {}
        extra = [key for key in self._tags.score(rare, limit=n_cand) if key not in known]
        return self._exact_scores(np.asarray(extra, np.int64), q) if extra else {}

    @property
    def text_tag_weight(self) -> float:
        """HYBRID's weight of the tags matched from the query's own words (learned by :meth:`_tune_tag_weight`)."""
        w = self._learner.text_tag_weight
        return TEXT_TAG_WEIGHT if w is None else w

    def _tune_tag_weight(self) -> None:
        """Learn HYBRID's weight of tags matched from the query's own words once adapters have learned keys:
        :data:`LEARNED_TAG_WEIGHT` (their keys already carry their examples' words), or the one of
        :data:`TAG_WEIGHTS` that routes the adapters' example texts (those the query encoder never saw; at most
        :data:`TAG_TUNE_EXAMPLES`) clearly better (:data:`TAG_TUNE_GAIN`). Tags that name what an adapter does
        help a query whose words say it; tags whose words recur across neighbouring adapters mislead one
        (CLINC150's intents). Without examples it stays :data:`~smoa.routing.strategies.TEXT_TAG_WEIGHT`."""
        n_cand = _candidates(self.config.max_active_adapters, RoutingStrategy.HYBRID)
        with self._lock:
            lrn = self._learner
            rows = []
            for k in lrn.with_examples():
                st = lrn.stored[k]
                if len(st.texts) != len(st.examples):
                    continue
                use = held_out_mask(st.texts) if k in lrn.encoder_seen else np.ones(len(st.texts), bool)
                rows += [(k, st, int(i)) for i in np.nonzero(use)[0]]
            if len(rows) < TAG_TUNE_MIN:
                lrn.text_tag_weight = None
                return
        rows = rows[:: -(-len(rows) // TAG_TUNE_EXAMPLES)]
        wins = np.zeros(len(TAG_WEIGHTS))
        for start in range(0, len(rows), TAG_TUNE_CHUNK):  # the lock is taken per chunk: routes go on in between
            with self._lock:
                for k, st, i in rows[start : start + TAG_TUNE_CHUNK]:
                    terms = self._tags.match_text(st.texts[i])
                    if not terms:
                        continue
                    q = st.examples[i].astype(np.float32)
                    cos = self._search_cos(q, n_cand)  # as a route would see it
                    tag = self._tag_side(q, terms, cos, n_cand)
                    for j, lam in enumerate(TAG_WEIGHTS):
                        fused = fuse(cos, tag, lam)
                        wins[j] += max(fused, key=lambda key: (fused[key], -key)) == k
            yield_gil()  # a route waiting for the lock gets it now (a lock released and retaken at once stays here)
        base = TAG_WEIGHTS.index(LEARNED_TAG_WEIGHT)
        best = int(np.argmax(wins))
        if wins[best] - wins[base] < max(5.0, TAG_TUNE_GAIN * len(rows)):  # no clear evidence: the learned default
            best = base
        logger.info("smoa routing: HYBRID query-word tag weight %.2f (of %d example texts, right per weight: %s)",
                    TAG_WEIGHTS[best], len(rows), dict(zip(TAG_WEIGHTS, wins.astype(int).tolist())))  # fmt: skip
        with self._lock:
            if self._learner is lrn:
                lrn.text_tag_weight = float(TAG_WEIGHTS[best])
                self._cache.clear()
                self._dirty = True

    def _exact_scores(self, keys: np.ndarray, q: np.ndarray) -> dict[int, float]:
        """``max_j cos(q, key_j)`` of each adapter in ``keys`` (all its vectors scored exactly)."""
        found, sims = self._vectors.scores_of(slots_of(np.asarray(keys, np.int64), self._max_p), q)
        return _max_by_owner(found, sims)

    def _small_group_scores(self, q: np.ndarray, limit: int) -> dict[int, float]:
        """Exact ``cos(q, key)`` of the members of the small groups nearest to ``q`` (module docstring): the adapters
        of their ``limit`` best keys (as many as the graph walk returns: the others could not make the route, and
        every candidate costs the steps after the search some Python)."""
        if len(self._groups) < 2:
            return {}
        # sorted: the set of rescued groups is what counts, not the order of their centroids' cosines, which changes
        # from query to query (at 1M keys with CLINC150's ten small domains all ten are rescued every time: keyed by
        # that order, the cache missed and the ten groups' rows were concatenated again on most routes)
        small = tuple(sorted(g for g, _ in self._groups.top_groups(q, RESCUE_GROUPS, SMALL_GROUP_LIMIT, RESCUE_MEMBERS)))
        if not small:
            return {}
        slots, vecs = self._group_vectors(small)
        sims = vecs @ q
        if len(sims) > limit:
            best = np.argpartition(-sims, limit - 1)[:limit]
            slots, sims = slots[best], sims[best]
        return _max_by_owner(slots, sims)

    def _group_vectors(self, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """``(slot ids, decoded vectors)`` of the members of the groups ``names``, from a small LRU of recently
        rescued groups and sets of groups (:data:`RESCUE_CACHE_ROWS` rows; emptied whenever the vector index or the
        groups change): looking the slots up and decoding them was two thirds of the rescue's cost at 1M keys, and
        consecutive queries often rescue the same set (CLINC150 among 1M distractors: always the same 10 groups),
        whose rows are then not concatenated again."""
        at = (id(self._vectors), self._vectors.version, id(self._groups), self._groups.version, self._max_p)
        if at != self._rescue_at:
            self._rescue.clear()
            self._rescue_at, self._rescue_rows = at, 0
        hit = self._rescue.get(names)
        if hit is not None:
            self._rescue.move_to_end(names)
            return hit
        if len(names) > 1:
            parts = [self._group_vectors((g,)) for g in names]
            hit = np.concatenate([f for f, _ in parts]), np.concatenate([v for _, v in parts])
        else:
            hit = self._vectors.vectors_of(slots_of(self._groups.members(names[0]), self._max_p))
        self._rescue[names] = hit
        self._rescue_rows += len(hit[0])
        while self._rescue_rows > RESCUE_CACHE_ROWS and len(self._rescue) > 1:
            _, (old, _) = self._rescue.popitem(last=False)
            self._rescue_rows -= len(old)
        return hit

    def _finish(
        self, chosen: list[tuple[str, float]], strat: RoutingStrategy, timings: dict[str, float], degraded: bool, t0: float,
        confidence: float = 0.0, escalated: bool = False,
    ) -> Route:
        scores = [s for _, s in chosen]
        return Route(
            adapter_ids=[i for i, _ in chosen],
            routing_scores=scores,
            weights=softmax_weights(scores, self.config.routing_temperature),
            routing_latency_ms=(time.perf_counter() - t0) * 1e3,
            strategy=strat,
            timings_ms=timings,
            cache_hit=False,
            degraded=degraded,
            library_version=self._generation,
            confidence=confidence,
            escalated=escalated,
        )

    # ------------------------------------------------------------------ bookkeeping
    def statistics(self) -> dict[str, Any]:
        """Counters, latency percentiles (ms, over the last 10,000 routes) and index facts."""
        with self._lock:
            lat = np.asarray(self._latencies) if self._latencies else np.zeros(1)
            return {
                **self._counts,
                "latency_p50_ms": float(np.percentile(lat, 50)),
                "latency_p99_ms": float(np.percentile(lat, 99)),
                "index_kind": self._vectors.kind,
                "index_size": len(self._vectors),
                "index_bytes": self._vectors.memory_bytes(),
                "tag_index_size": len(self._tags),
                "groups": len(self._groups),
                "encoder": self.encoder.name,
                "query_encoder": self.query_encoder.name,
                "adaptations": self.adaptations,
                "embedding_cache": self.encoder.stats(),
                "route_cache_size": len(self._cache),
                "generation": self._generation,
                "max_keys_per_adapter": self._max_p,
                "threshold": self.threshold(),
                "text_tag_weight": self.text_tag_weight,
                "calibration": dataclasses.asdict(self._learner.calibration),
                "fast_path": self._fast is not None and self._learner.projection is not None,
                "learned_adapters": len(self._learner.learned),
                "negatives": len(self._learner.negatives),
                "refits": self._learner.refits,
            }

    @property
    def generation(self) -> int:
        return self._generation

    def save(self) -> None:
        """Persist the indexes (no-op in memory or when nothing changed since the last save)."""
        with self._lock:
            if self.index_dir is not None and self._dirty:
                buf = io.BytesIO()
                np.savez(buf, **self._learner.to_arrays())
                save_indexes(self.index_dir, self._vectors, self._tags, self._generation, self.encoder.name,
                             extra={LEARNER_FILE: buf.getvalue()}, groups=self._groups)  # fmt: skip
                self._dirty = False

    def _load_learner(self) -> None:
        """Read the learner's state beside the loaded index (checksummed with it); refused as a whole if bad."""
        path = self.index_dir / LEARNER_FILE if self.index_dir is not None else None
        self._learner = KeyLearner(self.dim, self._learner.max_keys)
        if path is None or not path.is_file():
            return
        try:
            self._learner = KeyLearner.load(path, self.dim, self._learner.max_keys)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            logger.warning("smoa routing: learned routing state %s refused (%s); it will be relearned", path, exc)
            self._learner = KeyLearner(self.dim, self._learner.max_keys)
            self._dirty = True
            return
        if self._learner.adapted_version:
            self._load_adapted()
        self._refit_size = len(self._learner.with_examples())
        self._recalibrate()

    def _load_adapted(self) -> None:
        """Load the learned query encoder the learner state names; refused as a whole when it does not match:
        then the learner is re-encoded by the base encoder (retrained at the next refit) and the loaded vectors,
        made in the refused space, are rebuilt from the catalog (:attr:`_rebuild_needed`)."""
        from smoa.routing import adapt as qa

        version = self._learner.adapted_version
        try:
            if not self._can_adapt:
                raise qa.AdaptedEncoderError(f"encoder {self.encoder.name!r} cannot host a learned query encoder")
            weights = qa.load_adapted(self.index_dir, version, self.encoder.name)
            enc = qa.AdaptedEncoder(weights, self.encoder.name)
            if enc.version != version:
                raise qa.AdaptedEncoderError(f"rebuilt encoder is version {enc.version}, not {version}")
        except (qa.AdaptedEncoderError, OSError, RuntimeError) as exc:
            logger.warning("smoa routing: learned query encoder %s refused (%s); routing falls back to the base "
                           "encoder and it will be retrained", version, exc)  # fmt: skip
            rebased = self._rebase(self._learner)
            self._learner = rebased if rebased is not None else KeyLearner(self.dim, self._learner.max_keys)
            self._adapted = None
            self._rebuild_needed = True
            self._dirty = True
            return
        self._adapted = CachedEncoder(enc, self.config.embedding_cache_size)

    def close(self) -> None:
        """Save, drop the route cache and stop the side and deadline threads (a later route starts them again)."""
        self.save()
        with self._lock:
            self._cache.clear()
            if self._side is not None:
                self._side.close()
            self._watchdog.close()


def _nearest_rivals(sims: np.ndarray, slots: np.ndarray, trainable: Sequence[int], cap: int
                    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Slot ids ``[<= cap]`` of the ``cap`` most similar keys in a search result (``sims``/``slots`` ``[q, k]``) whose
    adapters are not ``trainable``, each once, most similar first (ties: first found), and their similarities.

    Taken over row blocks of one search and merged (the blocks' results concatenated in row order as ``[1, m]``),
    it gives the same as over the whole: a key among the ``cap`` best overall is among its own block's ``cap``
    best, and the stable sort keeps the rows' order among ties."""
    ok = (slots >= 0) & ~np.isin(owner_of(slots), np.asarray(list(trainable), np.int64))
    flat_s, flat_i = sims[ok], slots[ok]
    order = np.argsort(-flat_s, kind="stable")
    _, first = np.unique(flat_i[order], return_index=True)
    keep = order[np.sort(first)][:cap]
    return flat_i[keep], flat_s[keep]


def _text_batches(st: Stored) -> tuple[list[str], list[str]]:
    """The two batches an adapter's texts are encoded in when the query encoder changes: its routing text alone,
    its example texts (:meth:`Router._reencoded`; the training child encodes the same ones, ``_reencode_groups``)."""
    return [st.routing], list(st.texts)


def _first_vector(entry: KeyEntry, dim: int) -> np.ndarray:
    """All of ``entry``'s key vectors ``[P, dim]`` (at most ``MAX_KEYS``; the name predates multi-vector keys)."""
    vecs = np.asarray(entry.vectors, np.float32).reshape(-1, dim)
    if not len(vecs) or len(vecs) > MAX_KEYS:
        raise InvalidInputError(f"adapter key {entry.key}: `vectors` must hold 1..{MAX_KEYS} keys, got {len(vecs)}")
    return vecs


def _as_key_list(vectors: np.ndarray | Sequence[np.ndarray], n: int, dim: int) -> list[np.ndarray]:
    """``[n, dim]`` or a list of ``[P_i, dim]`` -> list of float32 ``[P_i, dim]`` (1 <= P_i <= MAX_KEYS)."""
    if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
        if vectors.shape != (n, dim):
            raise InvalidInputError(f"`vectors` must be [{n}, {dim}], got {tuple(vectors.shape)}")
        return list(np.ascontiguousarray(vectors, np.float32)[:, None, :])
    out = [v if isinstance(v, np.ndarray) and v.dtype == np.float32 and v.ndim == 2 and v.shape[1] == dim
           and v.flags.c_contiguous else  # as given: a staged change set is recognised by identity (_show)
           np.ascontiguousarray(v, np.float32).reshape(-1, dim) if np.size(v) % dim == 0 else None
           for v in vectors]  # fmt: skip
    if any(m is None or not 1 <= len(m) <= MAX_KEYS for m in out):
        raise InvalidInputError(f"each adapter needs 1..{MAX_KEYS} key vectors of dim {dim}")
    return out  # type: ignore[return-value]


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit norm, as float32, with no ``[n, dim]`` temporary but the result (a bulk change's
    50K rows in float64: four 160 MB temporaries, whose page faults cost ~0.3 s of its hold)."""
    x = np.asarray(x)
    scale = 1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), 1e-12)
    return np.multiply(x, scale[:, None], out=np.empty(x.shape, np.float32), casting="same_kind")


def _means(mats: Sequence[np.ndarray]) -> np.ndarray:
    """Unit mean of each adapter's keys -> ``[n, dim]`` (its vector for the groups)."""
    if not len(mats):
        return np.zeros((0, 0))
    if all(len(m) == 1 for m in mats):  # one key each (bulk ingestion): no per-adapter numpy call
        return _unit(np.concatenate(mats))
    return _unit(np.stack([np.asarray(m, np.float64).mean(0) for m in mats]))


def _slots(keys: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Slot ids of ``counts[i]`` keys of each adapter ``keys[i]``: :func:`slots_of` row by row, concatenated."""
    owners = np.repeat(np.asarray(keys, np.int64), counts)
    return slots_of(owners, 1) + (np.arange(len(owners)) - np.repeat(np.cumsum(counts) - counts, counts))


def _max_by_owner(slots: np.ndarray, sims: np.ndarray) -> dict[int, float]:
    """Vector-index hits -> ``{adapter key: best score}`` (padding ``-1`` slots skipped)."""
    out: dict[int, float] = {}
    for slot, s in zip(slots.tolist(), sims.tolist()):
        if slot >= 0:
            key = slot >> 4
            if s > out.get(key, -np.inf):
                out[key] = s
    return out


def _held_out_accuracy(evidence: Iterable[Any]) -> float | None:
    """Share of held-out examples routed to their own adapter, pooled over calibration evidence (None if none)."""
    got = [e.in_correct for e in evidence if e is not None and len(e.in_correct)]
    return float(np.concatenate(got).mean()) if got else None


def _best_margin(cos: Mapping[int, float]) -> tuple[float | None, float]:
    """Best cosine and its lead over the second (1.0 when alone); ``(None, 0)`` without candidates."""
    if not cos:
        return None, 0.0
    vals = sorted(cos.values(), reverse=True)
    return float(vals[0]), float(vals[0] - vals[1]) if len(vals) > 1 else 1.0


__all__ = ["KeyEntry", "MAX_QUERY_CHARS", "RESCUE_GROUPS", "RESCUE_MEMBERS", "SMALL_GROUP_LIMIT", "Router", "RoutingText"]
