"""How fast does `smoa serve` generate when every request carries its own routed k = 3 mixture?

SmolLM2-135M-Instruct behind the real server (uvicorn on 127.0.0.1), streaming OpenAI completions of exactly
``--tokens`` new tokens (``ignore_eos``), greedy, from 1 / 4 / 16 / 64 concurrent clients. Side by side in one run:

* ``routed k=3``      model ``"smoa"``: each prompt routed to its own 3-adapter mixture, all rows in one batch;
* ``no adapters``     the same server, the base model's name (the ceiling);
* ``one at a time``   the same routed requests, server started with ``--max-batch 1``;
* ``PEFT``            in-process PEFT baseline: per request ``add_weighted_adapter(..., "cat")`` + ``set_adapter``
                      + ``generate`` (PEFT applies one adapter to a whole batch, so requests run one by one).

Prints tokens/s, time to first token (TTFT) p50/p99 and inter-token latency (ITL) p50/p99; writes
``docs/bench_serve.json`` and ``docs/bench_serve.png``.

    .venv/bin/python benchmarks/bench_serve.py                 # full run (a few minutes on 2 CPU cores)
    .venv/bin/python benchmarks/bench_serve.py --quick         # 1 and 16 clients only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["medicine", "law", "cooking", "finance", "sport", "music", "travel", "physics", "history", "gardening",
          "programming", "astronomy"]  # fmt: skip
QUESTIONS = ["explain the basics of {t}", "what should a beginner know about {t}?", "give me one tip about {t}",
             "summarise a common problem in {t}"]  # fmt: skip


def make_adapters(model: Any, n: int, rank: int, seed: int = 0) -> list[Any]:
    """Random non-zero LoRA factors on the attention projections of every layer."""
    from smoa.adapter.profile import profile_from_model
    from smoa.adapter.weights import LoraWeights

    prof = profile_from_model(model)
    mods = [m for m in prof.module_names if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        f = {}
        for m in mods:
            d_in, d_out = prof.shape(m)
            f[m] = (torch.randn(rank, d_in, generator=g) * 0.02, torch.randn(d_out, rank, generator=g) * 0.02)
        out.append(LoraWeights(f, float(2 * rank), rank))
    return out


def build_library(path: Path, weights: list[Any]) -> list[str]:
    from smoa import SMoAConfig, SparseAdapterMixture

    with SparseAdapterMixture(SMoAConfig(storage_path=path, encoder="hash")) as smoa:
        return [smoa.create_adapter_sync("domain", [TOPICS[i % len(TOPICS)]], [f"skill{i}"], weights=w,
                                         description=f"{TOPICS[i % len(TOPICS)]} helper {i}").id
                for i, w in enumerate(weights)]  # fmt: skip


def prompts(n: int, offset: int = 0) -> list[str]:
    return [QUESTIONS[(i + offset) % len(QUESTIONS)].format(t=TOPICS[(i * 5 + offset) % len(TOPICS)]) + f" ({i})"
            for i in range(n)]  # fmt: skip


# -- the server side ---------------------------------------------------------------------------------------------
class Server:
    def __init__(self, library: Path, max_batch: int, **config: Any) -> None:
        import uvicorn

        from smoa.serve import ServeConfig, build_app

        sys.path.insert(0, str(ROOT / "tests" / "serve"))
        from helpers import free_port

        self.port = free_port()
        cfg = ServeConfig(library=library, encoder="hash", max_batch=max_batch, max_queue=1024,
                          per_client_cap=max_batch, **config)  # every client has the same address: no per-client cap
        self.app = build_app(cfg)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not come up")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    stamps: list[float] = []
    n = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
            elif ev["choices"] and ev["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return {"t0": t0, "stamps": stamps, "tokens": n, "end": time.perf_counter()}


async def run_clients(url: str, model: str, clients: int, per_client: int, tokens: int) -> list[dict[str, Any]]:
    texts = prompts(clients * per_client, offset=clients)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker(c: int) -> list[dict[str, Any]]:
            return [await one_request(client, url, model, texts[c * per_client + j], tokens) for j in range(per_client)]

        results = await asyncio.gather(*[worker(c) for c in range(clients)])
    return [r for rs in results for r in rs]


def summarise(results: list[dict[str, Any]]) -> dict[str, float]:
    start = min(r["t0"] for r in results)
    end = max(r["end"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")
    return {"tokens_per_s": tokens / (end - start), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99), "requests": len(results), "tokens": tokens}


# -- the PEFT baseline -----------------------------------------------------------------------------------------------
def peft_baseline(weights: list[Any], ids: list[str], routes: list[list[tuple[str, float]]], texts: list[str],
                  tokens: int, clients: int) -> dict[str, float]:  # fmt: skip
    """Every request: add_weighted_adapter(cat) + set_adapter + generate; one at a time (PEFT has one active
    adapter per model); ``clients`` requests arrive together, so later ones wait (their TTFT counts it)."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers.generation.streamers import BaseStreamer

    from smoa.models import load_default_base_model

    model, tok = load_default_base_model()
    index = {a: i for i, a in enumerate(ids)}
    cfg = LoraConfig(r=weights[0].rank, lora_alpha=weights[0].alpha, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, cfg, adapter_name="a0")
        for i in range(1, len(weights)):
            pm.add_adapter(f"a{i}", cfg)
    for i, w in enumerate(weights):
        for m, (a, b) in w.factors.items():
            layer = pm.base_model.model.get_submodule(m)
            layer.lora_A[f"a{i}"].weight.data.copy_(a)
            layer.lora_B[f"a{i}"].weight.data.copy_(b)
    pm.eval()

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.first = True

        def put(self, value: Any) -> None:
            if self.first:  # the prompt
                self.first = False
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    results = []
    t_arrival = time.perf_counter()  # every client's request arrives now
    for n, (text, route) in enumerate(zip(texts, routes)):
        t0 = t_arrival if n < clients else time.perf_counter()
        names = [f"a{index[a]}" for a, _ in route]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.add_weighted_adapter(names, [w for _, w in route], adapter_name="req", combination_type="cat")
        pm.set_adapter("req")
        enc = tok([text], return_tensors="pt")
        s = Stamps()
        with torch.no_grad():
            out = pm.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=s,
                              pad_token_id=tok.pad_token_id)  # fmt: skip
        pm.set_adapter("a0")
        pm.delete_adapter("req")
        results.append({"t0": t0, "stamps": s.times, "tokens": int(out.shape[1] - enc["input_ids"].shape[1]),
                        "end": time.perf_counter()})  # fmt: skip
    return summarise(results)


# -- main --------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=24)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--serial-clients", type=int, nargs="+", default=[1, 16],
                    help="client counts for the one-at-a-time and PEFT baselines (they run requests serially)")
    ap.add_argument("--quick", action="store_true", help="1 and 16 clients only")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine more threads spin against each other)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_serve"))
    args = ap.parse_args(argv)
    if args.quick:
        args.clients = [1, 16]
    torch.set_num_threads(args.threads)

    from smoa.models import load_default_base_model

    model, _ = load_default_base_model()
    weights = make_adapters(model, args.adapters, args.rank)
    del model
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    ids = build_library(tmp / "lib", weights)
    per_client = lambda c: 2 if c == 1 else 1
    rows: list[dict[str, Any]] = []

    def record(mode: str, clients: int, summary: dict[str, float]) -> None:
        rows.append({"mode": mode, "clients": clients, **summary})
        print(f"{mode:14s} {clients:4d}  {summary['tokens_per_s']:8.1f} tok/s  TTFT p50 {summary['ttft_p50_ms']:8.1f} "
              f"p99 {summary['ttft_p99_ms']:8.1f} ms  ITL p50 {summary['itl_p50_ms']:7.1f} p99 "
              f"{summary['itl_p99_ms']:7.1f} ms  ({summary['requests']} req)", flush=True)  # fmt: skip

    routes_for: dict[int, list[list[tuple[str, float]]]] = {}
    with Server(tmp / "lib", max_batch=max(args.clients)) as srv:
        base = srv.app.state.serving.model_name
        asyncio.run(run_clients(srv.url, "smoa", 2, 1, 4))  # warm up
        for c in args.clients:
            record("routed k=3", c, summarise(asyncio.run(run_clients(srv.url, "smoa", c, per_client(c), args.tokens))))
            record("no adapters", c, summarise(asyncio.run(run_clients(srv.url, base, c, per_client(c), args.tokens))))
        for c in args.serial_clients:
            texts = prompts(c * per_client(c), offset=c)
            routes_for[c] = [
                [(a, w) for a, w in zip(r["adapter_ids"], r["weights"])]
                for r in (httpx.post(srv.url + "/v1/route", json={"query": t}).json() for t in texts)
            ]
    with Server(tmp / "lib", max_batch=1) as srv:
        asyncio.run(run_clients(srv.url, "smoa", 1, 1, 4))
        for c in args.serial_clients:
            record("one at a time", c, summarise(asyncio.run(run_clients(srv.url, "smoa", c, per_client(c),
                                                                       args.tokens))))  # fmt: skip
    for c in args.serial_clients:
        texts = prompts(c * per_client(c), offset=c)
        record("PEFT", c, peft_baseline(weights, ids, routes_for[c], texts, args.tokens, c))

    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    plot(rows, out.with_suffix(".png"))
    verdict(rows)
    return 0


def verdict(rows: list[dict[str, Any]]) -> None:
    at = {(r["mode"], r["clients"]): r["tokens_per_s"] for r in rows}
    if ("routed k=3", 16) not in at:
        return
    routed = at[("routed k=3", 16)]
    for mode, target, kind in (("no adapters", 0.9, "ratio"), ("one at a time", 3.0, "x"), ("PEFT", 3.0, "x")):
        if (mode, 16) in at:
            ratio = routed / at[(mode, 16)]
            ok = ratio >= target
            print(f"16 clients: routed / {mode} = {ratio:.2f} (target >= {target}) {'OK' if ok else 'MISSED'}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        pts = sorted((r["clients"], r["tokens_per_s"], r["ttft_p50_ms"]) for r in rows if r["mode"] == mode)
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        b.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=mode)
    for ax, title in ((a, "throughput (tokens/s)"), (b, "time to first token p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    b.set_yscale("log")
    a.legend()
    fig.suptitle("smoa serve, SmolLM2-135M, 64 new tokens, each request its own routed k=3 mixture")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
