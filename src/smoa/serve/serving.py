"""The serving layer: requests in, responses (plain dicts) out — no HTTP types, so a Ray replica can reuse it.

::

    request ──► validate limits (context, max_tokens, n) ──► tokenize (chat template for messages)
            ──► select adapters (off the event loop: route, cached | an adapter id | an explicit mixture |
                LoRAX merged_adapters | none) and load their weights  = prefetch before admission
            ──► Scheduler.submit (continuous batching; 429 when the queue is full, 503 when draining)
            ──► events -> OpenAI / LoRAX response dicts, or stream chunks

:class:`SmoaServing` owns the model, the library (a :class:`~smoa.SparseAdapterMixture`) and the scheduler;
``load()`` is blocking (call it in a thread), ``close()`` drains and releases everything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoa.errors import AdapterNotFoundError, InvalidInputError, SmoaError
from smoa.serve.config import ServeConfig
from smoa.serve.errors import (
    APIError,
    BadRequestError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    as_api_error,
)
from smoa.serve.metrics import ServeMetrics
from smoa.serve.protocol import (
    AdapterPatch,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    OptimizeRequest,
    RouteRequest,
)
from smoa.serve.scheduler import (
    QueueFullError,
    SamplingParams,
    Scheduler,
    SchedulerClosedError,
    StepOutput,
)
from smoa.serve.scheduler import (
    Sequence as SeqJob,
)

__all__ = ["DEFAULT_MODEL_NAME", "ROUTED_MODEL", "Selection", "SmoaServing", "library_exists"]

log = logging.getLogger("smoa.serve")
ROUTED_MODEL = "smoa"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_OPENAI_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "error": "stop"}
_LORAX_FINISH = {"eos": "eos_token", "stop": "stop_sequence", "length": "length", "cancelled": "length",
                 "error": "length"}  # fmt: skip


def library_exists(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a smoa library (its catalog file); a database URL is checked when it is opened."""
    if "://" in str(path):
        return True
    p = Path(path)
    return p.is_dir() and any((p / name).exists() for name in ("catalog.sqlite3", "catalog.db"))


@dataclass
class Selection:
    """The adapters one request runs under, and how they were chosen.

    Attributes:
        mixture: ``[((id, version), LoraWeights, weight), ...]`` handed to the scheduler (``[]``: base model).
        adapter_ids, weights, scores: what the response's ``smoa.route`` reports.
        latency_ms: routing + weight resolution time.
        strategy: the routing strategy, or ``"adapter"`` / ``"explicit"`` / ``"merged:<method>"`` / ``"none"``.
    """

    mixture: list[Any] = field(default_factory=list)
    adapter_ids: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    latency_ms: float = 0.0
    strategy: str = "none"

    def route_info(self) -> dict[str, Any]:
        return {"route": {"adapter_ids": list(self.adapter_ids), "weights": [float(w) for w in self.weights],
                          "scores": [float(s) for s in self.scores], "latency_ms": float(self.latency_ms),
                          "strategy": self.strategy}}  # fmt: skip

    def header(self) -> str:
        """The ``x-smoa-adapters`` header: ``id=weight`` pairs, comma-separated (empty: base model)."""
        return ",".join(f"{a}={w:.4g}" for a, w in zip(self.adapter_ids, self.weights))


@dataclass
class Generation:
    """A request turned into sequences: prompts, sampling parameters, the adapters."""

    prompts: list[list[int]]  # one per choice (prompt i repeated n times)
    params: list[SamplingParams]
    selection: Selection
    client: str
    seqs: list[Any] | None = None  # set by SmoaServing.submit
    events: Any = None


@dataclass
class Choice:
    """The result of one sequence."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class SmoaServing:
    """Owns model, library and scheduler; turns protocol requests into response dicts.

    Args:
        config: the server configuration.
        metrics: the metrics to report into (a fresh :class:`ServeMetrics` when omitted).
    """

    def __init__(self, config: ServeConfig, metrics: ServeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ServeMetrics(self._stats_for_metrics)
        self.smoa: Any = None
        self.engine: Any = None
        self.scheduler: Scheduler | None = None
        self.tokenizer: Any = None
        self.model_name = config.model_name or DEFAULT_MODEL_NAME
        self.context_length = 2048
        self.load_error: str | None = None
        self.started_at = time.time()
        self._ready = threading.Event()
        self._draining = False
        self._closed = False
        self._merge_cache: OrderedDict[Any, Any] = OrderedDict()
        self._merge_lock = threading.Lock()
        self._admin_lock = threading.Lock()
        self._frozen = False  # this server froze the collector's view of the loaded objects (_freeze_loaded)

    # == lifecycle ===============================================================================================
    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._draining and not self._closed

    @property
    def draining(self) -> bool:
        return self._draining

    def load(self) -> None:
        """Load the model, open the library, start the scheduler (blocking; errors are kept in ``load_error``)."""
        try:
            self._load()
        except BaseException as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("smoa serve: loading failed")
            self._release()
            raise
        if self.config.freeze_gc:
            self._freeze_loaded()
        self._ready.set()

    def _freeze_loaded(self) -> None:
        """Move every object alive after loading (torch's and transformers' modules, the model, the library:
        ~460K tracked objects) into the collector's permanent generation. Python's full collections then skip
        them: under load one came every ~25 s and took up to ~290 ms with the GIL held, a stall of every request;
        frozen, up to ~40 ms (``benchmarks/bench_gc.py``). Undone at :meth:`close`."""
        gc.collect()  # what is garbage already is not frozen
        gc.freeze()
        self._frozen = True

    def _load(self) -> None:
        import torch

        from smoa import SMoAConfig, SparseAdapterMixture

        cfg = self.config
        if not library_exists(cfg.library) and not cfg.create:
            raise InvalidInputError(
                f"`--library` {str(cfg.library)!r} holds no smoa library; pass `--create` to create one there"
            )
        model, tokenizer = self._load_model()
        model = model.to(getattr(torch, cfg.dtype))
        overrides = dict(cfg.smoa_overrides)
        if cfg.encoder is not None:
            overrides.setdefault("encoder", cfg.encoder)
        if cfg.device is not None:
            overrides.setdefault("device", cfg.device)
        smoa_cfg = SMoAConfig(storage_path=cfg.library, **overrides)
        device = cfg.device or smoa_cfg.device
        model = model.to(device)
        self.smoa = SparseAdapterMixture(smoa_cfg, base_model=model, tokenizer=tokenizer)
        self.engine = self.smoa.engine
        self.tokenizer = self.engine.tokenizer
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.scheduler = Scheduler(
            self.engine, max_batch=cfg.max_batch, max_queue=cfg.max_queue, max_batch_tokens=cfg.max_batch_tokens,
            prefill_tokens=cfg.prefill_tokens, per_client_cap=cfg.client_cap,
            eos_token_ids=_eos_ids(model, tokenizer), observer=self.metrics, lock=getattr(self.smoa, "engine_lock", None),
        )  # fmt: skip
        self.scheduler.start()

    def _load_model(self) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.config.model_dir is None:
            from smoa.models import load_default_base_model

            return load_default_base_model()
        d = Path(self.config.model_dir)
        if not d.is_dir():
            raise InvalidInputError(f"`--model` {str(d)!r} is not a directory")
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        tokenizer = AutoTokenizer.from_pretrained(d)
        if self.config.model_name is None:
            self.model_name = d.name
        return model, tokenizer

    def begin_drain(self) -> None:
        """New requests get 503 from now on; running and queued ones go on."""
        self._draining = True

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until the scheduler has nothing left (``True``) or ``timeout`` passed."""
        if self.scheduler is None:
            return True
        return self.scheduler.drain(timeout if timeout is not None else self.config.drain_timeout_s)

    def close(self) -> None:
        """Drain (bounded by ``drain_timeout_s``), stop the scheduler, close the library."""
        if self._closed:
            return
        self.begin_drain()
        try:
            self.wait_drained()
        finally:
            self._closed = True
            self._release()

    def _release(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.smoa is not None:
            self.smoa.close()
        if self._frozen:  # the closed library's objects become collectable again (a process may load another)
            self._frozen = False
            gc.unfreeze()

    def check_ready(self) -> None:
        if self._closed or self._draining:
            raise ServiceUnavailableError("the server is shutting down", code="draining")
        if not self._ready.is_set():
            msg = "the model is still loading" if self.load_error is None else f"loading failed: {self.load_error}"
            raise ServiceUnavailableError(msg, code="not_ready")

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``(ok, body)`` for ``GET /health``."""
        if self.ready:
            return True, {"status": "ok", "model": self.model_name}
        state = "draining" if (self._draining or self._closed) else ("error" if self.load_error else "loading")
        return False, {"status": state, "error": self.load_error}

    # == adapter selection =======================================================================================
    def _is_base(self, model: str) -> bool:
        return model == self.model_name

    def select(
        self,
        model: str,
        text: str,
        *,
        route: bool = False,
        adapters: Sequence[tuple[str, float]] | None = None,
        metadata: Mapping[str, Any] | None = None,
        strategy: str | None = None,
        k: int | None = None,
        param: str = "model",
    ) -> Selection:
        """The mixture of one request (blocking: routes and loads weights; run it in a thread)."""
        t0 = time.perf_counter()
        try:
            if adapters:
                pairs = [(a, float(w)) for a, w in adapters]
                sel = Selection(self.smoa.mixture_for(pairs), [a for a, _ in pairs], [w for _, w in pairs],
                                [], strategy="explicit")  # fmt: skip
            elif model == ROUTED_MODEL or (self._is_base(model) and route):
                r = self.smoa.query_adapters_sync(text, dict(metadata) if metadata else None, strategy, k)
                sel = Selection(self.smoa.mixture_for(r), list(r.adapter_ids), list(r.weights),
                                list(r.routing_scores), strategy=_enum_value(r.strategy))  # fmt: skip
            elif self._is_base(model):
                sel = Selection()
            else:
                sel = self._adapter_selection(model, param)
        except AdapterNotFoundError as exc:
            raise NotFoundError(str(exc), param="adapters" if adapters else param, code="adapter_not_found") from exc
        except SmoaError as exc:
            raise as_api_error(exc, param="adapters" if adapters else param) from exc
        sel.latency_ms = (time.perf_counter() - t0) * 1000.0
        self.metrics.route_latency.observe(sel.latency_ms / 1000.0)
        return sel

    def _adapter_selection(self, adapter_id: str, param: str) -> Selection:
        try:
            mix = self.smoa.mixture_for([(adapter_id, 1.0)])
        except AdapterNotFoundError as exc:
            raise NotFoundError(
                f"the model `{adapter_id}` does not exist: use {self.model_name!r}, {ROUTED_MODEL!r} or an adapter id",
                param=param, code="model_not_found",
            ) from exc  # fmt: skip
        return Selection(mix, [adapter_id], [1.0], [], strategy="adapter")

    def merged_selection(self, ids: Sequence[str], weights: Sequence[float], method: str, density: float,
                         sign: str | None) -> Selection:  # fmt: skip
        """LoRAX ``merged_adapters``: ``linear`` = the exact mixture; other methods merged once per distinct mixture."""
        t0 = time.perf_counter()
        pairs = list(zip(ids, (float(w) for w in weights)))
        try:
            items = self.smoa.mixture_for(pairs)
        except AdapterNotFoundError as exc:
            raise NotFoundError(str(exc), param="parameters.merged_adapters.ids", code="adapter_not_found") from exc
        if method == "linear":
            sel = Selection(items, list(ids), [w for _, w in pairs], [], strategy="merged:linear")
        else:
            key = (method, round(density, 6), sign, tuple((k, round(w, 9)) for k, _, w in items))
            merged = self._merged(key, items, method, density, sign)
            sel = Selection([(("merged", hash(key)), merged, 1.0)], list(ids), [w for _, w in pairs], [],
                            strategy=f"merged:{method}")  # fmt: skip
        sel.latency_ms = (time.perf_counter() - t0) * 1000.0
        return sel

    def _merged(self, key: Any, items: list[Any], method: str, density: float, sign: str | None) -> Any:
        from smoa.compose.merge import combine

        with self._merge_lock:
            hit = self._merge_cache.get(key)
            if hit is not None:
                self._merge_cache.move_to_end(key)
                self.metrics.merge_cache_hits.inc()
                return hit
        kwargs: dict[str, Any] = {}
        if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
            kwargs["density"] = density
        if method in ("ties", "dare_ties") and sign:
            kwargs["majority_sign_method"] = sign
        try:
            merged = combine([lw for _, lw, _ in items], [w for _, _, w in items], method=method, **kwargs)
        except SmoaError as exc:
            raise BadRequestError(str(exc), param="parameters.merged_adapters") from exc
        with self._merge_lock:
            self._merge_cache[key] = merged
            while len(self._merge_cache) > self.config.merge_cache_size:
                self._merge_cache.popitem(last=False)
        return merged

    # == tokenizing and limits ===================================================================================
    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode_text(text)

    def check_tokens(self, prompt_len: int, max_tokens: int | None, default: int | None, prompt_param: str,
                     tokens_param: str) -> int:  # fmt: skip
        """The ``max_tokens`` to run with; refuses prompts over the context and caps over the limits."""
        ctx = self.context_length
        if prompt_len == 0:
            raise BadRequestError(f"`{prompt_param}` is empty", param=prompt_param)
        if prompt_len >= ctx:
            raise BadRequestError(
                f"this model's maximum context length is {ctx} tokens; `{prompt_param}` has {prompt_len} tokens",
                param=prompt_param, code="context_length_exceeded",
            )  # fmt: skip
        if max_tokens is not None and max_tokens > self.config.max_tokens_cap:
            raise BadRequestError(f"`{tokens_param}` must be <= {self.config.max_tokens_cap}, got {max_tokens}",
                                  param=tokens_param)  # fmt: skip
        if max_tokens is None:
            cap = self.config.max_tokens_cap if default is None else min(default, self.config.max_tokens_cap)
            return max(1, min(cap, ctx - prompt_len))
        if prompt_len + max_tokens > ctx:
            raise BadRequestError(
                f"this model's maximum context length is {ctx} tokens; {prompt_len} in the prompt + {max_tokens} "
                f"in `{tokens_param}` exceed it", param=tokens_param, code="context_length_exceeded",
            )  # fmt: skip
        return max_tokens

    def check_n(self, n: int, param: str = "n") -> None:
        if n > self.config.max_n:
            raise BadRequestError(f"`{param}` must be <= {self.config.max_n}, got {n}", param=param)

    # == running =================================================================================================
    def submit(self, gen: Generation) -> None:
        """Queue every sequence of ``gen`` now (so 429 / 503 come before a response starts); call from the loop.

        Raises:
            RateLimitError: the queue is full.
            ServiceUnavailableError: draining.
        """
        assert self.scheduler is not None
        if gen.seqs is not None:
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()

        def sink_for(i: int) -> Any:
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev))

        seqs = [SeqJob(p, gen.selection.mixture, sp, sink_for(i), client=gen.client)
                for i, (p, sp) in enumerate(zip(gen.prompts, gen.params))]  # fmt: skip
        try:
            self.scheduler.submit_many(seqs)
        except QueueFullError as exc:
            raise RateLimitError(str(exc), retry_after=1) from exc
        except SchedulerClosedError as exc:
            raise ServiceUnavailableError(str(exc), code="draining") from exc
        gen.seqs, gen.events = seqs, events
        self.metrics.prompt_tokens.inc(sum(len(p) for p in gen.prompts))

    def cancel(self, gen: Generation) -> None:
        """Cancel what is left of ``gen`` (its sequences leave the batch before the next step)."""
        for s in gen.seqs or []:
            s.cancel()

    async def run(self, gen: Generation) -> AsyncIterator[tuple[int, StepOutput]]:
        """Yield ``(choice index, event)`` of ``gen``'s sequences (submitted first if needed) until all finished.

        Closing the iterator early (client gone) cancels the sequences that are still queued or running.
        """
        self.submit(gen)
        assert gen.seqs is not None and gen.events is not None
        left = len(gen.seqs)
        try:
            while left:
                i, ev = await gen.events.get()
                if ev.finished:
                    left -= 1
                yield i, ev
        finally:
            self.cancel(gen)

    async def collect(self, gen: Generation) -> list[Choice]:
        """Run ``gen`` to the end; one :class:`Choice` per sequence."""
        choices = [Choice() for _ in gen.prompts]
        async for i, ev in self.run(gen):
            c = choices[i]
            c.text += ev.text_delta
            if ev.token_id is not None:
                c.token_ids.append(ev.token_id)
                c.logprobs.append(ev.logprob)
            if ev.finished:
                c.finish_reason, c.error = ev.finish_reason, ev.error
                if ev.text is not None:
                    c.text = ev.text  # the whole decoded text (robust to tokenizers that re-space prefixes)
        for c in choices:
            if c.finish_reason == "error":
                raise APIError(f"generation failed: {c.error}")
        return choices

    def _sampling(self, *, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
                  stop: tuple[str, ...], ignore_eos: bool, n: int) -> list[SamplingParams]:  # fmt: skip
        return [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               seed=None if seed is None else seed + i, stop=stop, ignore_eos=ignore_eos)
                for i in range(n)]  # fmt: skip

    # == OpenAI ==================================================================================================
    async def prepare_completion(self, req: CompletionRequest, client: str) -> tuple[Generation, list[int]]:
        """Validate, tokenize and select adapters for ``/v1/completions``; returns the generation and, per
        prompt, its token count."""
        self.check_ready()
        self.check_n(req.n)
        if isinstance(req.prompt, str):
            texts: list[str | None] = [req.prompt]
        elif req.prompt and isinstance(req.prompt[0], int):
            texts = [None]
        else:
            texts = list(req.prompt)  # type: ignore[arg-type]
        if len(texts) * req.n > self.config.max_n * 8:
            raise BadRequestError(f"too many choices: {len(texts)} prompts x n={req.n}", param="prompt")
        ids = [self.encode_text(t) if t is not None else list(req.prompt) for t in texts]  # type: ignore[arg-type]
        max_tokens = max(self.check_tokens(len(p), req.max_tokens, 16, "prompt", "max_tokens") for p in ids)
        route_text = texts[0] if texts[0] is not None else self.tokenizer.decode(ids[0])
        sel = await asyncio.to_thread(self.select, req.model, route_text, route=req.route,
                                      adapters=_pairs(req.adapters), metadata=req.metadata, strategy=req.strategy,
                                      k=req.k)  # fmt: skip
        prompts = [p for p in ids for _ in range(req.n)]
        params = self._sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=0,
                                seed=req.seed, stop=req.stop_list(), ignore_eos=req.ignore_eos, n=req.n) * len(ids)  # fmt: skip
        return Generation(prompts, params, sel, client), [len(p) for p in ids]

    async def prepare_chat(self, req: ChatCompletionRequest, client: str) -> tuple[Generation, list[int]]:
        """Validate, apply the chat template and select adapters for ``/v1/chat/completions``."""
        self.check_ready()
        self.check_n(req.n)
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in req.messages]  # fmt: skip
        ids = self.encode_chat(messages)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.check_tokens(len(ids), req.token_cap(), None, "messages", param)
        route_text = "\n".join(m["content"] for m in messages if m["role"] == "user") or messages[-1]["content"]
        sel = await asyncio.to_thread(self.select, req.model, route_text, route=req.route,
                                      adapters=_pairs(req.adapters), metadata=req.metadata, strategy=req.strategy,
                                      k=req.k)  # fmt: skip
        params = self._sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=0,
                                seed=req.seed, stop=req.stop_list(), ignore_eos=req.ignore_eos, n=req.n)  # fmt: skip
        return Generation([ids] * req.n, params, sel, client), [len(ids)]

    @staticmethod
    def _usage(prompt_lens: list[int], n: int, choices: list[Choice]) -> dict[str, int]:
        prompt = sum(prompt_lens) * n
        completion = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def completion(self, req: CompletionRequest, gen: Generation, prompt_lens: list[int]) -> dict[str, Any]:
        """The ``text_completion`` object."""
        choices = await self.collect(gen)
        return {
            "id": _id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": req.model,
            "choices": [{"index": i, "text": c.text, "logprobs": None,
                         "finish_reason": _OPENAI_FINISH.get(c.finish_reason or "", "stop")}
                        for i, c in enumerate(choices)],
            "usage": self._usage(prompt_lens, req.n, choices), "smoa": gen.selection.route_info(),
        }  # fmt: skip

    async def completion_stream(self, req: CompletionRequest, gen: Generation, prompt_lens: list[int]) -> AsyncIterator[str]:
        """Server-sent events (``data: {...}``), ending with ``data: [DONE]``."""
        cid, created, smoa = _id("cmpl"), int(time.time()), gen.selection.route_info()
        counts = [0] * len(gen.prompts)
        async for i, ev in self.run(gen):
            counts[i] += ev.token_id is not None
            if ev.finished and ev.finish_reason == "error":
                yield _sse({"error": {"message": f"generation failed: {ev.error}", "type": "internal_error",
                                      "param": None, "code": None}})  # fmt: skip
                continue
            if not ev.text_delta and not ev.finished:
                continue
            choice = {"index": i, "text": ev.text_delta, "logprobs": None,
                      "finish_reason": _OPENAI_FINISH.get(ev.finish_reason or "", "stop") if ev.finished else None}
            yield _sse({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                        "choices": [choice], "smoa": smoa})  # fmt: skip
        if req.stream_options is not None and req.stream_options.include_usage:
            prompt = sum(prompt_lens) * req.n
            usage = {"prompt_tokens": prompt, "completion_tokens": sum(counts), "total_tokens": prompt + sum(counts)}
            yield _sse({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                        "choices": [], "usage": usage, "smoa": smoa})  # fmt: skip
        yield "data: [DONE]\n\n"

    async def chat(self, req: ChatCompletionRequest, gen: Generation, prompt_lens: list[int]) -> dict[str, Any]:
        """The ``chat.completion`` object."""
        choices = await self.collect(gen)
        return {
            "id": _id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": req.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                         "finish_reason": _OPENAI_FINISH.get(c.finish_reason or "", "stop")}
                        for i, c in enumerate(choices)],
            "usage": self._usage(prompt_lens, 1, choices), "smoa": gen.selection.route_info(),
        }  # fmt: skip

    async def chat_stream(self, req: ChatCompletionRequest, gen: Generation, prompt_lens: list[int]) -> AsyncIterator[str]:
        """``chat.completion.chunk`` events, ending with ``data: [DONE]``."""
        cid, created, smoa = _id("chatcmpl"), int(time.time()), gen.selection.route_info()

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                         "choices": choices, "smoa": smoa, **extra})  # fmt: skip

        for i in range(len(gen.prompts)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])  # fmt: skip
        counts = [0] * len(gen.prompts)
        async for i, ev in self.run(gen):
            counts[i] += ev.token_id is not None
            if ev.text_delta:
                yield chunk([{"index": i, "delta": {"content": ev.text_delta}, "logprobs": None,
                              "finish_reason": None}])  # fmt: skip
            if ev.finished:
                yield chunk([{"index": i, "delta": {}, "logprobs": None,
                              "finish_reason": _OPENAI_FINISH.get(ev.finish_reason or "", "stop")}])  # fmt: skip
        if req.stream_options is not None and req.stream_options.include_usage:
            p = prompt_lens[0] * req.n
            yield chunk([], usage={"prompt_tokens": p, "completion_tokens": sum(counts),
                                   "total_tokens": p + sum(counts)})  # fmt: skip
        yield "data: [DONE]\n\n"

    # == LoRAX ===================================================================================================
    async def prepare_generate(self, req: GenerateRequest, client: str) -> tuple[Generation, int]:
        """Validate, tokenize and select adapters for ``/generate`` and ``/generate_stream``."""
        self.check_ready()
        p = req.parameters or _default_parameters()
        ids = self.encode_text(req.inputs)
        if p.truncate is not None and len(ids) > p.truncate:
            ids = ids[-p.truncate :]
        max_tokens = self.check_tokens(len(ids), p.max_new_tokens, 20, "inputs", "parameters.max_new_tokens")
        sample = p.do_sample or (p.temperature is not None and p.temperature not in (0.0, 1.0)) or \
            p.top_p is not None or p.top_k is not None  # fmt: skip
        temperature = 0.0 if not sample else (p.temperature if p.temperature not in (None, 0.0) else 1.0)
        if p.merged_adapters is not None:
            m = p.merged_adapters
            sel = await asyncio.to_thread(self.merged_selection, m.ids, m.weights, m.merge_strategy or "linear",
                                          m.density, m.majority_sign_method)  # fmt: skip
        else:
            model = p.adapter_id if p.adapter_id else (ROUTED_MODEL if p.route else self.model_name)
            sel = await asyncio.to_thread(self.select, model, req.inputs, metadata=p.metadata, strategy=p.strategy,
                                          param="parameters.adapter_id")  # fmt: skip
        params = self._sampling(max_tokens=max_tokens, temperature=float(temperature), top_p=p.top_p or 1.0,
                                top_k=p.top_k or 0, seed=p.seed, stop=tuple(p.stop), ignore_eos=p.ignore_eos_token,
                                n=1)  # fmt: skip
        return Generation([ids], params, sel, client), len(ids)

    async def generate(self, req: GenerateRequest, gen: Generation, prompt_len: int) -> dict[str, Any]:
        """LoRAX ``Response``: ``generated_text`` (+ ``details``)."""
        p = req.parameters or _default_parameters()
        c = (await self.collect(gen))[0]
        text = (req.inputs + c.text) if p.return_full_text else c.text
        out: dict[str, Any] = {"generated_text": text, "smoa": gen.selection.route_info()}
        if p.details:
            out["details"] = {
                "finish_reason": _LORAX_FINISH.get(c.finish_reason or "", "length"), "prompt_tokens": prompt_len,
                "generated_tokens": len(c.token_ids), "seed": p.seed, "prefill": [],
                "tokens": [{"id": t, "text": self._piece(t), "logprob": lp, "special": t in self._special_ids()}
                           for t, lp in zip(c.token_ids, c.logprobs)],
            }  # fmt: skip
        return out

    async def generate_stream(self, req: GenerateRequest, gen: Generation, prompt_len: int) -> AsyncIterator[str]:
        """LoRAX ``StreamResponse`` events (no ``[DONE]``: lorax-client parses every ``data:`` line)."""
        p = req.parameters or _default_parameters()
        text, count, smoa = "", 0, gen.selection.route_info()
        async for _i, ev in self.run(gen):
            if ev.finished and ev.finish_reason == "error":
                yield _sse({"error": f"generation failed: {ev.error}", "error_type": "generation"})
                return
            if ev.token_id is None and not ev.finished:
                continue
            count += ev.token_id is not None
            text += ev.text_delta
            tid = ev.token_id if ev.token_id is not None else -1
            token = {"id": tid, "text": ev.text_delta, "logprob": ev.logprob, "special": tid in self._special_ids()}
            event: dict[str, Any] = {"token": token, "generated_text": None, "details": None, "smoa": smoa}
            if ev.finished:
                event["generated_text"] = (req.inputs + text) if p.return_full_text else text
                event["details"] = {"finish_reason": _LORAX_FINISH.get(ev.finish_reason or "", "length"),
                                    "prompt_tokens": prompt_len, "generated_tokens": count, "seed": p.seed}
            yield _sse(event)

    def _piece(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    def _special_ids(self) -> frozenset[int]:
        return frozenset(getattr(self.tokenizer, "all_special_ids", []) or [])

    # == models and management ===================================================================================
    def list_models(self, offset: int, limit: int) -> dict[str, Any]:
        """``GET /v1/models``: the base model, ``smoa`` and the adapters (active), paginated."""
        self.check_ready()
        created = int(self.started_at)
        head = [{"id": self.model_name, "object": "model", "created": created, "owned_by": "smoa", "root": None},
                {"id": ROUTED_MODEL, "object": "model", "created": created, "owned_by": "smoa",
                 "root": self.model_name}]  # fmt: skip
        rows = head[offset : offset + limit]
        skip = max(0, offset - len(head))
        want = limit - len(rows)
        adapters = list(self.smoa.list_adapters_sync(None, skip, want + 1, ("active",))) if want > 0 else []
        more = len(adapters) > want if want > 0 else True
        rows += [{"id": a.id, "object": "model", "created": int(a.created_at), "owned_by": "smoa",
                  "root": self.model_name, "parent": self.model_name} for a in adapters[:want]]  # fmt: skip
        return {"object": "list", "data": rows, "has_more": more,
                "first_id": rows[0]["id"] if rows else None, "last_id": rows[-1]["id"] if rows else None}  # fmt: skip

    def _adapters(self, status: str | None = None, tag: str | None = None) -> list[Any]:
        """Every adapter (optionally one status, one tag), in creation order, read in pages."""
        statuses: Any = (status,) if status else ("active", "archived")
        out: list[Any] = []
        page = 10_000
        while True:
            got = list(self.smoa.list_adapters_sync(tag, len(out), page, statuses))
            out.extend(got)
            if len(got) < page:
                return out

    def list_adapters(self, tag: str | None, query: str | None, status: str | None, offset: int,
                      limit: int) -> dict[str, Any]:  # fmt: skip
        """``GET /v1/adapters``: filter by tag (domain or skill) and text (id, tags, description), paginated."""
        self.check_ready()
        if query is None:
            page = list(self.smoa.list_adapters_sync(tag, offset, limit + 1, (status,) if status else
                                                     ("active", "archived")))  # fmt: skip
            return {"object": "list", "data": [adapter_json(a) for a in page[:limit]], "offset": offset,
                    "limit": limit, "has_more": len(page) > limit}  # fmt: skip
        q = query.casefold()
        items = [a for a in self._adapters(status, tag)
                 if q in " ".join([a.id, *a.domain_tags, *a.skill_tags, a.description]).casefold()]  # fmt: skip
        page = items[offset : offset + limit]
        return {"object": "list", "data": [adapter_json(a) for a in page], "total": len(items),
                "offset": offset, "limit": limit, "has_more": offset + limit < len(items)}  # fmt: skip

    def _get(self, adapter_id: str) -> Any:
        try:
            return self.smoa.get_adapter_sync(adapter_id)
        except AdapterNotFoundError as exc:
            raise NotFoundError(str(exc), param="adapter_id", code="adapter_not_found") from exc

    def get_adapter(self, adapter_id: str) -> dict[str, Any]:
        self.check_ready()
        return adapter_json(self._get(adapter_id))

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the facade's ``name`` (its ``_sync`` twin); smoa errors become API errors."""
        fn = getattr(self.smoa, name + "_sync", None) or getattr(self.smoa, name, None)
        if fn is None or asyncio.iscoroutinefunction(fn):
            raise APIError(f"this smoa version has no `{name}`")
        try:
            with self._admin_lock:
                return fn(*args, **kwargs)
        except AdapterNotFoundError as exc:
            raise NotFoundError(str(exc), param="adapter_id", code="adapter_not_found") from exc
        except SmoaError as exc:
            raise as_api_error(exc) from exc

    def patch_adapter(self, adapter_id: str, patch: AdapterPatch) -> dict[str, Any]:
        self.check_ready()
        fields = patch.model_dump(exclude_none=True)
        self._get(adapter_id)
        if fields:
            self._call("update_adapter", adapter_id, **fields)
        return adapter_json(self._get(adapter_id))

    def delete_adapter(self, adapter_id: str) -> dict[str, Any]:
        self.check_ready()
        self._get(adapter_id)
        self._call("delete_adapter", adapter_id)
        return {"id": adapter_id, "object": "adapter", "deleted": True}

    def archive_adapter(self, adapter_id: str) -> dict[str, Any]:
        self.check_ready()
        self._get(adapter_id)
        self._call("archive_adapter", adapter_id)
        return adapter_json(self._get(adapter_id))

    def restore_adapter(self, adapter_id: str) -> dict[str, Any]:
        self.check_ready()
        self._get(adapter_id)
        self._call("restore_adapter", adapter_id)
        return adapter_json(self._get(adapter_id))

    def route(self, req: RouteRequest) -> dict[str, Any]:
        """``POST /v1/route``: the route alone."""
        self.check_ready()
        sel = self.select(ROUTED_MODEL, req.query, metadata=req.metadata, strategy=req.strategy, k=req.k,
                          param="query")  # fmt: skip
        return sel.route_info()["route"]

    def optimize(self, req: OptimizeRequest) -> dict[str, Any]:
        """``POST /v1/optimize``: merge near-duplicates and prune, once; the report."""
        self.check_ready()
        report = self._call("optimize_library", **req.model_dump(exclude_none=True))
        return _jsonable(report)

    def stats(self) -> dict[str, Any]:
        """``GET /v1/stats``: the library's statistics plus the server's."""
        self.check_ready()
        s = _jsonable(self.smoa.get_statistics())
        sch = self.scheduler
        s["server"] = {"model": self.model_name, "queue_depth": sch.queue_depth if sch else 0,
                       "running": sch.num_running if sch else 0, "decode_steps": sch.steps if sch else 0,
                       "max_batch": self.config.max_batch, "max_queue": self.config.max_queue,
                       "context_length": self.context_length, "merge_cache_size": len(self._merge_cache),
                       "uptime_s": time.time() - self.started_at}  # fmt: skip
        return s

    def _stats_for_metrics(self) -> dict[str, Any] | None:
        if not self.ready or self.smoa is None:
            return None
        return self.smoa.get_statistics()

    def upload_adapter(self, files: Mapping[str, Path], fields: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /v1/adapters``: import an uploaded PEFT directory (strict checks of ``import_peft``).

        Args:
            files: ``{"adapter_config.json": path, "adapter_model.safetensors": path}`` (already spooled, outside
                the library).
            fields: ``domain_tags``, ``skill_tags``, ``description``, ``examples``, ``specialization``.
        """
        self.check_ready()
        work = Path(tempfile.mkdtemp(prefix="smoa-upload-"))
        try:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copyfile(files[name], work / name)
            adapter = self._call("import_peft", work, **fields)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return adapter_json(adapter)


# -- helpers -----------------------------------------------------------------------------------------------------------
def _pairs(adapters: Any) -> list[tuple[str, float]] | None:
    return None if not adapters else [(a.id, a.weight) for a in adapters]


def _default_parameters() -> Any:
    from smoa.serve.protocol import GenerateParameters

    return GenerateParameters()


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _enum_value(x: Any) -> str:
    return str(x.value) if isinstance(x, enum.Enum) else str(x)


def _jsonable(obj: Any) -> Any:
    """Dataclasses, enums, paths, numpy scalars -> plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        if isinstance(obj, float) and math.isnan(obj):  # NaN is not JSON
            return None
        return obj
    if hasattr(obj, "item"):
        try:
            return _jsonable(obj.item())
        except Exception:  # noqa: BLE001
            pass
    return str(obj)


def adapter_json(a: Any) -> dict[str, Any]:
    """One adapter as the management API shows it."""
    d = _jsonable(a)
    d.pop("key", None)
    d["object"] = "adapter"
    return d
