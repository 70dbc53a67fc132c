"""Continuous batching at the decode step, every row under its own adapter mixture.

Follow one request (a :class:`Sequence`) from admission to its last token::

    submit() ──► WAITING (FIFO queue, bounded by ``max_queue``)
                   │  _schedule(): the one place that picks who joins the batch — FIFO order, at most
                   │  ``max_batch`` rows, at most ``per_client_cap`` rows per client key, the KV token budget
                   ▼
                 RUNNING  _prefill(): the newcomers' prompts in one forward (left-padded, each row its own
                   │                   mixture) -> their KV cache rows join the batched cache, first tokens out
                   │  _decode_step(): ONE forward for every running row, one new token each; row r applies
                   │                  its own mixture (the per-row SGMV/BGMV kernels of smoa.inject)
                   ▼
                 FINISHED (eos, stop string, max_tokens) or CANCELLED (client gone) — the rows leave the
                 batched cache between two steps; the others go on.

The batched KV cache is an HF ``DynamicCache`` whose rows are left-padded to a common width; the padding is
masked by the 2-D attention mask and every row gets its own ``position_ids``, so a row computes exactly what it
would compute alone. Rows are added (left-pad + concat) and removed (index select, leading all-pad columns
trimmed) only when the batch changes; between changes the cache just grows by one column per step.

The loop runs in one thread that owns the model; callers hand it ready mixtures (weights already loaded, so a
weight load never blocks the loop) and receive :class:`StepOutput` events through a callback. Nothing here knows
about HTTP.
"""

from __future__ import annotations

import collections
import enum
import itertools
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from smoa.errors import SmoaError

__all__ = [
    "QueueFullError",
    "SamplingParams",
    "Scheduler",
    "SchedulerClosedError",
    "SchedulerObserver",
    "Sequence",
    "SequenceState",
    "StepOutput",
]


class QueueFullError(SmoaError):
    """The waiting queue holds ``max_queue`` sequences already."""


class SchedulerClosedError(SmoaError):
    """The scheduler is draining or stopped: no new sequences."""


class SequenceState(str, enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens.

    Attributes:
        max_tokens: new tokens at most.
        temperature: 0 = greedy (argmax); otherwise logits / temperature, then top-k / top-p, then a draw.
        top_p: nucleus mass kept (1 = all).
        top_k: keep the k best tokens (0 = all).
        seed: seed of this sequence's generator (``None``: nondeterministic).
        stop: strings that end the generation (excluded from the text).
        ignore_eos: keep going past the EOS token.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class StepOutput:
    """One event of a sequence: a new token (and the text it completes), and whether it is the last."""

    token_id: int | None
    text_delta: str
    logprob: float
    finished: bool = False
    text: str | None = None  # the whole text so far, on the last event
    finish_reason: str | None = None  # "eos" | "stop" (a stop string) | "length" | "cancelled" | "error"
    error: str | None = None


class SchedulerObserver(Protocol):
    """What the scheduler reports (metrics); every method must be cheap and never raise."""

    def on_admitted(self, queue_seconds: float) -> None: ...
    def on_first_token(self, seconds: float) -> None: ...
    def on_step(self, batch_size: int, seconds: float, new_tokens: int) -> None: ...
    def on_queue_depth(self, waiting: int, running: int) -> None: ...


_ids = itertools.count(1)


@dataclass(eq=False)
class Sequence:
    """One generation: a prompt, its mixture, its sampling parameters and its running state.

    Args:
        prompt_ids: the prompt's token ids (non-empty).
        mixture: ``[(key, LoraWeights, weight), ...]`` (``[]`` = the base model), weights already loaded.
        params: the sampling parameters.
        sink: called from the scheduler thread with every :class:`StepOutput` of this sequence.
        client: the fairness key (e.g. the API key).
    """

    prompt_ids: list[int]
    mixture: list[Any]
    params: SamplingParams
    sink: Callable[[StepOutput], None]
    client: str = ""
    id: int = field(default_factory=lambda: next(_ids))
    state: SequenceState = SequenceState.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    _cancel: bool = False
    _text: str = ""
    _sent: int = 0
    _generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens so far."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def reserved_tokens(self) -> int:
        """KV tokens this sequence may reach (prompt + max_tokens): what the token budget counts."""
        return len(self.prompt_ids) + self.params.max_tokens

    def cancel(self) -> None:
        """Ask the scheduler to drop this sequence before its next step (thread-safe)."""
        self._cancel = True


# -- sampling (pure functions) ---------------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``logits [V]`` scaled by the temperature, with tokens outside top-k / top-p set to -inf."""
    x = logits.float() / params.temperature
    if params.top_k and 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token of one row (``logits [V]``): argmax when greedy, else a draw from the filtered softmax."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


# -- the batched KV cache --------------------------------------------------------------------------------------------
class BatchCache:
    """The running rows' KV cache (left-padded ``DynamicCache``) and their ``[batch, width]`` attention mask."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [batch, width] 1 = real token

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    @staticmethod
    def _make(data: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        from transformers.cache_utils import DynamicCache

        return DynamicCache(ddp_cache_data=data)

    def add(self, cache: Any, mask: torch.Tensor) -> None:
        """Append new rows: their own prefill cache and its ``[rows, width]`` mask (left padding = 0)."""
        new = [(layer.keys, layer.values) for layer in cache.layers]
        if self.cache is None:
            self.cache, self.mask = self._make(new), mask
            return
        width = max(self.width, int(mask.shape[1]))
        old = [(_left_pad(k, width), _left_pad(v, width)) for k, v in self._layers()]
        new = [(_left_pad(k, width), _left_pad(v, width)) for k, v in new]
        self.cache = self._make([(torch.cat([ok, nk]), torch.cat([ov, nv])) for (ok, ov), (nk, nv) in zip(old, new)])
        assert self.mask is not None
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); drop the leading columns that are padding in every kept row."""
        if not rows:
            self.cache, self.mask = None, None
            return
        assert self.mask is not None
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        start = int(torch.nonzero(mask.any(0), as_tuple=False)[0, 0])
        self.mask = mask[:, start:]
        self.cache = self._make(
            [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:]) for k, v in self._layers()]
        )

    def extend_mask(self) -> torch.Tensor:
        """The mask of the next step (one more real column per row); becomes the current mask."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self.mask


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence axis (-2 for ``[B, H, L, D]`` caches, -1 for ``[B, L]`` masks) on the left to ``width``."""
    axis = -1 if t.dim() == 2 else -2
    missing = width - t.shape[axis]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=axis)


# -- the scheduler ---------------------------------------------------------------------------------------------------
class Scheduler:
    """The decode loop over an :class:`~smoa.inject.InferenceEngine` (its model and mixture handle).

    Args:
        engine: the attached engine (``model``, ``handle``, ``tokenizer``, ``device``).
        max_batch: running rows at most.
        max_queue: waiting sequences at most (then :class:`QueueFullError`).
        max_batch_tokens: token budget: the running rows' prompt + max_tokens summed stays under it.
        prefill_tokens: prompt tokens prefilled between two decode steps at most (one prompt always passes).
        per_client_cap: running rows per client key at most (0: ``max_batch``).
        eos_token_ids: tokens that end a sequence (unless ``ignore_eos``).
        observer: metrics callbacks.
        lock: a lock held around each step (e.g. the facade's ``engine_lock``, so in-process callers of the same
            model never interleave with the loop).
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        max_batch_tokens: int = 65536,
        prefill_tokens: int = 2048,
        per_client_cap: int = 0,
        eos_token_ids: Seq[int] = (),
        observer: SchedulerObserver | None = None,
        lock: Any = None,
    ) -> None:
        self.engine = engine
        self._model_lock = lock if lock is not None else threading.Lock()  # held for each step (shared model)
        self.model = engine.model
        self.handle = engine.handle
        self.tokenizer = engine.tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.prefill_tokens = prefill_tokens
        self.per_client_cap = per_client_cap or max_batch
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.observer = observer
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._batch = BatchCache()
        self._batch_changed = True
        self._cv = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._forward_params: set[str] | None = None
        self._admitting = 0  # sequences taken from the queue, not yet in ``running``
        self.steps = 0
        self.cancelled = 0  # sequences cancelled so far (client gone, shutdown)
        self.error: BaseException | None = None

    # -- public, any thread ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="smoa-scheduler", daemon=True)
            self._thread.start()

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq`` (state WAITING).

        Raises:
            QueueFullError: ``max_queue`` sequences are waiting.
            SchedulerClosedError: draining or stopped.
        """
        self.submit_many([seq])

    def submit_many(self, seqs: Seq[Sequence]) -> None:
        """Queue several sequences at once (all or none)."""
        with self._cv:
            if not self._accepting:
                raise SchedulerClosedError("the server is shutting down; no new requests")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} waiting); retry later")
            for s in seqs:
                s.state = SequenceState.WAITING
                self.waiting.append(s)
            self._cv.notify()
        self._report_depth()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self._admitting

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new sequences, let the queued and running ones finish; ``True`` when everything finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._accepting = False
            self._cv.notify()
            while not self.idle:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(timeout=0.05 if left is None else min(0.05, left))
        return True

    def stop(self) -> None:
        """Stop the loop (sequences still queued or running are cancelled)."""
        with self._cv:
            self._accepting = False
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for s in [*self.waiting, *self.running]:
            self._finish(s, "cancelled", SequenceState.CANCELLED)
        self.waiting.clear()
        self.running.clear()

    # -- the loop ----------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and self.idle:
                    self._cv.wait(timeout=0.5)
                if self._stop:
                    return
            try:
                self._iteration()
            except BaseException as exc:  # noqa: BLE001 - a failed step fails its sequences, never the loop
                self.error = exc
                self._fail_all(f"{type(exc).__name__}: {exc}")
            with self._cv:
                self._cv.notify_all()  # drain() waiters

    def _iteration(self) -> None:
        """One turn: drop cancelled rows, admit and prefill newcomers, one decode step for every running row."""
        self._drop_cancelled()
        with self._model_lock, torch.inference_mode():
            try:
                admitted = self._schedule()
                if admitted:
                    try:
                        self._prefill(admitted)
                    except Exception as exc:  # noqa: BLE001 - these prompts fail (e.g. out of memory), not the loop
                        for seq in admitted:
                            if seq not in self.running:
                                self._finish(seq, "error", SequenceState.FINISHED, f"{type(exc).__name__}: {exc}")
            finally:
                self._admitting = 0
            self._retire()
            if self.running:
                self._decode_step()
                self._retire()
        self._report_depth()

    def _schedule(self) -> list[Sequence]:
        """THE decision of who joins the batch: FIFO, ``max_batch``, per-client cap, token and prefill budgets."""
        admitted: list[Sequence] = []
        with self._cv:
            per_client = collections.Counter(s.client for s in self.running)
            reserved = sum(s.reserved_tokens for s in self.running)
            prefill = 0
            skipped: list[Sequence] = []
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                seq = self.waiting.popleft()
                if seq._cancel:
                    self._finish(seq, "cancelled", SequenceState.CANCELLED)
                    continue
                busy = bool(self.running or admitted)
                over_budget = reserved + seq.reserved_tokens > self.max_batch_tokens
                over_prefill = prefill + len(seq.prompt_ids) > self.prefill_tokens
                if per_client[seq.client] >= self.per_client_cap or (busy and (over_budget or over_prefill)):
                    skipped.append(seq)
                    if busy and (over_budget or over_prefill):
                        break  # budgets are FIFO: nobody overtakes a sequence waiting for room
                    continue
                admitted.append(seq)
                per_client[seq.client] += 1
                reserved += seq.reserved_tokens
                prefill += len(seq.prompt_ids)
            self.waiting.extendleft(reversed(skipped))
            self._admitting = len(admitted)
        now = time.perf_counter()
        for seq in admitted:
            seq.state = SequenceState.RUNNING
            if self.observer is not None:
                self.observer.on_admitted(now - seq.arrival)
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Run the newcomers' prompts in one forward (left-padded, masked, each row its own positions and mixture);
        their cache rows join the batch and each emits its first token."""
        from transformers.cache_utils import DynamicCache

        device = self.engine.device
        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            s._generator = _generator(s.params.seed, device)
            ids[r, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids, dtype=torch.long)
            mask[r, width - len(s.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [G, width] each row counts from its first real token
        cache = DynamicCache()
        t0 = time.perf_counter()
        alone = not self.running  # the batch will be exactly these rows: keep their plans for the decode steps
        self.handle.set_mixtures([s.mixture for s in seqs])
        self._batch_changed = True
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **self._cache_kwargs(cache))  # fmt: skip
            self._batch_changed = not alone
        finally:
            if self._batch_changed:
                self.handle.set_mixtures(None)
        logits = out.logits[:, -1]  # [G, V]: the last position is every row's last real token
        self._batch.add(cache, mask)  # the cache was filled in place by the forward
        self.running.extend(seqs)
        for r, s in enumerate(seqs):
            self._emit(s, logits[r])
        if self.observer is not None:
            self.observer.on_step(len(seqs), time.perf_counter() - t0, len(seqs))

    def _decode_step(self) -> None:
        """One forward of every running row (one new token each), row r under its own mixture."""
        rows = self.running
        t0 = time.perf_counter()
        if self._batch_changed:
            self.handle.set_mixtures([s.mixture for s in rows])
            self._batch_changed = False
        device = self.engine.device
        input_ids = torch.tensor([[s.output_ids[-1]] for s in rows], dtype=torch.long, device=device)  # [B, 1]
        positions = torch.tensor([[s.num_tokens - 1] for s in rows], dtype=torch.long, device=device)  # [B, 1]
        mask = self._batch.extend_mask()  # [B, width + 1]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **self._cache_kwargs(self._batch.cache))  # fmt: skip
        logits = out.logits[:, -1]  # [B, V]
        for r, seq in enumerate(rows):
            if seq.state is SequenceState.RUNNING:
                self._emit(seq, logits[r])
        self.steps += 1
        if self.observer is not None:
            self.observer.on_step(len(rows), time.perf_counter() - t0, len(rows))

    def _cache_kwargs(self, cache: Any) -> dict[str, Any]:
        """The cache argument under the model's name for it (``cache`` in newer transformers), logits of the last
        position only when the model supports it."""
        if self._forward_params is None:
            import inspect

            self._forward_params = set(inspect.signature(self.model.forward).parameters)
        name = "cache" if "cache" in self._forward_params else "past_key_values"
        extra = {"logits_to_keep": 1} if "logits_to_keep" in self._forward_params else {}
        return {name: cache, **extra}

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Pick ``seq``'s next token from ``logits [V]``, update its text, tell its sink, maybe finish it."""
        token = sample_token(logits, seq.params, seq._generator)
        logprob = float(torch.log_softmax(logits.float(), dim=-1)[token])
        seq.output_ids.append(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
            if self.observer is not None:
                self.observer.on_first_token(seq.first_token_at - seq.arrival)
        reason = None
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            reason = "eos"
        text = self._decode(seq.output_ids if reason is None else seq.output_ids[:-1])
        cut = _find_stop(text, seq.params.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif reason is None and len(seq.output_ids) >= seq.params.max_tokens:
            reason = "length"
        seq._text = text
        safe = len(text) if reason is not None else _safe_prefix(text, seq.params.stop)
        delta = text[seq._sent : safe] if safe > seq._sent else ""
        seq._sent = max(seq._sent, safe)
        if reason is None:
            _deliver(seq, StepOutput(token, delta, logprob))
        else:
            seq.finish_reason = reason
            seq.state = SequenceState.FINISHED
            _deliver(seq, StepOutput(token, delta, logprob, finished=True, text=text, finish_reason=reason))

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _retire(self) -> None:
        """Rows that finished or were cancelled leave the batch (their cache rows go)."""
        keep = [i for i, s in enumerate(self.running) if s.state is SequenceState.RUNNING and not s._cancel]
        if len(keep) == len(self.running):
            return
        for s in self.running:
            if s._cancel and s.state is SequenceState.RUNNING:
                self._finish(s, "cancelled", SequenceState.CANCELLED)
        self.running = [self.running[i] for i in keep]
        self._batch.keep(keep)
        self._batch_changed = True

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [s for s in self.waiting if s._cancel]
            for s in gone:
                self.waiting.remove(s)
                self._finish(s, "cancelled", SequenceState.CANCELLED)
        self._retire()

    def _finish(self, seq: Sequence, reason: str, state: SequenceState, error: str | None = None) -> None:
        if seq.state in (SequenceState.FINISHED, SequenceState.CANCELLED):
            return
        seq.state = state
        seq.finish_reason = reason
        self.cancelled += state is SequenceState.CANCELLED
        _deliver(seq, StepOutput(None, "", 0.0, finished=True, text=seq._text, finish_reason=reason, error=error))

    def _fail_all(self, message: str) -> None:
        for s in list(self.running):
            self._finish(s, "error", SequenceState.FINISHED, message)
        self.running = []
        self._batch = BatchCache()
        self._batch_changed = True
        try:
            self.handle.set_mixtures(None)
        except Exception:  # noqa: BLE001 - best effort after a failure
            pass

    def _report_depth(self) -> None:
        if self.observer is not None:
            self.observer.on_queue_depth(len(self.waiting), len(self.running))


def _deliver(seq: Sequence, event: StepOutput) -> None:
    try:
        seq.sink(event)
    except Exception:  # noqa: BLE001 - a broken consumer must not stop the loop
        seq._cancel = True


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator()  # sampling draws on the CPU: identical streams on every device
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) % (2**63))
    return g


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in ``text`` (``None``: none)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent now: hold back a tail that may still grow into a stop string, and a
    trailing replacement character (an incomplete UTF-8 sequence)."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:n]):
                end = min(end, len(text[:end]) - n)
                break
    return max(end, 0)
