"""What does applying a routed k-adapter mixture per row cost, against the bare base model and against PEFT?

For each model (the default SmolLM2-135M-Instruct and a tiny Llama), batch size and k, every row of a batch of
random token ids gets its own mixture of k NANO adapters (rank 2, non-zero B, modules chosen by
``select_modules``) drawn from a pool, as a router would produce. Measured in the same run, interleaved rep by
rep (medians):

* ``base``: the bare model forward (no mixture layers);
* ``smoa``: ``set_mixtures`` (stacking cache cleared first, so planning is included) + one forward of the batch;
* ``peft-mixed`` (k = 1 only): PEFT mixed-batch inference, ``adapter_names=`` one adapter per row;
* ``peft-cat``: per row, ``add_weighted_adapter(..., combination_type="cat")`` + ``set_adapter`` + forward of
  that row + ``delete_adapter`` (PEFT cannot mix per row, so each mixture runs on its own).

Also reported: the adapters' FLOP share (``2 * adapter parameters`` per token over the base's linear and
attention FLOPs), an isolated overhead (the wrapped layers timed alone against their base layers, free of
whole-model noise), and the cold load of one adapter: ``LoraWeights.from_bytes`` (+ validation and stacking)
against PEFT ``load_adapter`` from a saved directory.

    python benchmarks/bench_inference.py            # full: batch 1/16/64, k 1/3/5, seq 64 (~6-9 min on 2 cores)
    python benchmarks/bench_inference.py --quick    # batch 1/4, k 1/3, seq 32, tiny reps (~1 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from smoa.adapter.granularity import select_modules
from smoa.adapter.profile import BaseProfile, profile_from_model
from smoa.adapter.weights import LoraWeights
from smoa.config import AdapterGranularity
from smoa.inject import attach

Mixture = list[tuple[LoraWeights, float]]
ROOT = Path(__file__).resolve().parents[1]


# -- models and adapters -------------------------------------------------------------------------------------------
def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def load_model(name: str) -> nn.Module:
    if name == "tiny":
        return tiny_llama()
    from smoa.models import load_default_base_model

    return load_default_base_model()[0]


def nano_pool(profile: BaseProfile, n: int, seed: int = 0) -> list[LoraWeights]:
    """``n`` NANO rank-2 adapters with random non-zero A and B on the modules ``select_modules`` picks."""
    modules = select_modules(profile, AdapterGranularity.NANO, rank=2)
    g = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(n):
        factors = {}
        for m in modules:
            d_in, d_out = profile.shape(m)
            factors[m] = (torch.randn(2, d_in, generator=g) * 0.05, torch.randn(d_out, 2, generator=g) * 0.05)
        pool.append(LoraWeights(factors, 4.0, 2))
    return pool


def routed_mixtures(n_pool: int, batch: int, k: int, rng: random.Random) -> list[list[tuple[int, float]]]:
    """Per row, k distinct pool indices with softmax-like weights summing to 1 (as a router returns)."""
    rows = []
    for _ in range(batch):
        idx = rng.sample(range(n_pool), k)
        raw = [rng.random() + 0.5 for _ in idx]
        rows.append([(i, r / sum(raw)) for i, r in zip(idx, raw)])
    return rows


# -- FLOPs ---------------------------------------------------------------------------------------------------------
def base_flops_per_token(model: nn.Module, seq: int) -> float:
    """2 x (linear parameters incl. the head) + attention scores and values (4 x layers x seq x hidden)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    cfg = model.config
    return 2.0 * linear + 4.0 * cfg.num_hidden_layers * seq * cfg.hidden_size


def adapter_flops_per_token(mixture: Mixture) -> float:
    """``B (A x)`` costs ``2 r (d_in + d_out)`` = 2 x the adapter's parameters, per module and token."""
    return sum(2.0 * w.num_parameters for w, _ in mixture)


# -- timing --------------------------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin ``reps`` times after one warm-up each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def time_calls(
    fn: Callable[[], Any], reps: int, warmup: bool = True, agg: Callable[[list[float]], float] = statistics.median
) -> float:
    with torch.no_grad():
        if warmup:
            fn()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return agg(out)


# -- PEFT ----------------------------------------------------------------------------------------------------------
def peft_with_pool(model: nn.Module, pool: list[LoraWeights]) -> Any:
    """A PeftModel on a copy of ``model`` holding the pool as adapters ``a0 .. a{n-1}``."""
    from peft import LoraConfig, get_peft_model

    pm = None
    base = copy.deepcopy(model)
    for i, w in enumerate(pool):
        cfg = LoraConfig(r=w.rank, lora_alpha=w.alpha, target_modules=list(w.modules), lora_dropout=0.0)
        if pm is None:
            pm = get_peft_model(base, cfg, adapter_name=f"a{i}")
        else:
            pm.add_adapter(f"a{i}", cfg)
        for m, (a, b) in w.factors.items():
            layer = pm.base_model.model.get_submodule(m)
            layer.lora_A[f"a{i}"].weight.data.copy_(a)
            layer.lora_B[f"a{i}"].weight.data.copy_(b)
    return pm.eval()


def peft_cat_batch(pm: Any, x: torch.Tensor, rows: list[list[tuple[int, float]]]) -> None:
    """PEFT's per-mixture path: build the exact cat adapter of each row's mixture, switch to it, run the row."""
    for r, mix in enumerate(rows):
        pm.add_weighted_adapter([f"a{i}" for i, _ in mix], [w for _, w in mix], "mix", combination_type="cat")
        pm.set_adapter("mix")
        pm(input_ids=x[r : r + 1])
        pm.delete_adapter("mix")


# -- the measurements ----------------------------------------------------------------------------------------------
def isolated_overhead(handle: Any, batch: int, seq: int, reps: int) -> float:
    """Seconds the mixture layers add per forward, timing each wrapped layer alone against its base layer."""
    total = 0.0
    seen: dict[tuple[int, int, bool], float] = {}
    for name, layer in handle.layers.items():
        d_in, d_out = handle.profile.shape(name)
        touched = handle.state is not None and name in handle.state.touching
        key = (d_in, d_out, touched)
        if key not in seen:  # same-shaped layers cost the same: time one of each
            x = torch.randn(batch, seq, d_in)
            t_wrapped = time_calls(lambda: layer(x), reps, agg=min)  # min: noise only ever adds
            t_base = time_calls(lambda: layer.base_layer(x), reps, agg=min)
            seen[key] = t_wrapped - t_base
        total += seen[key]
    return total


def bench_model(name: str, batches: list[int], ks: list[int], seq: int, reps: int, peft_on: bool,
                pool_size: int) -> list[dict[str, Any]]:  # fmt: skip
    model = load_model(name)
    profile = profile_from_model(model)
    vocab = model.config.vocab_size
    pool = nano_pool(profile, pool_size)
    pm = None
    if peft_on:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft_with_pool(model, pool)
    handle = attach(model)
    rng = random.Random(1)
    results = []
    for batch in batches:
        x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
        rows_by_k = {k: routed_mixtures(len(pool), batch, k, rng) for k in ks}
        mix_by_k = {k: [[(pool[i], w) for i, w in row] for row in rows] for k, rows in rows_by_k.items()}

        def run_base() -> None:
            handle.set_mixtures(None)
            model(input_ids=x)

        def run_smoa(k: int) -> Callable[[], None]:
            def fn() -> None:
                handle.cache.clear(validated=False)  # restack every batch; adapters were validated on first load
                handle.set_mixtures(mix_by_k[k])
                model(input_ids=x)

            return fn

        fns: dict[str, Callable[[], Any]] = {"base": run_base}
        fns.update({f"smoa_k{k}": run_smoa(k) for k in ks})
        if pm is not None and 1 in ks:
            names = [f"a{rows_by_k[1][r][0][0]}" for r in range(batch)]
            fns["peft_mixed_k1"] = lambda: pm(input_ids=x, adapter_names=names)
        med = interleaved(fns, reps if batch * seq <= 2048 else max(3, reps // 2))  # big batches: fewer reps
        peft_cat: dict[int, float] = {}
        if pm is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for k in ks:
                    fn = lambda: peft_cat_batch(pm, x, rows_by_k[k])  # noqa: E731
                    peft_cat[k] = time_calls(fn, max(1, reps // 3), warmup=False)
        for k in ks:
            handle.cache.clear(validated=False)
            t0 = time.perf_counter()
            handle.set_mixtures(mix_by_k[k])
            set_s = time.perf_counter() - t0
            iso = isolated_overhead(handle, batch, seq, reps=max(5, reps))
            flops = statistics.mean(adapter_flops_per_token(m) for m in mix_by_k[k])
            row = {
                "model": name, "batch": batch, "k": k, "seq": seq, "base_s": med["base"], "smoa_s": med[f"smoa_k{k}"],
                "set_ms": set_s * 1e3, "iso_overhead_pct": 100 * iso / med["base"],
                "flop_share_pct": 100 * flops / base_flops_per_token(model, seq),
                "peft_mixed_s": med.get("peft_mixed_k1") if k == 1 else None, "peft_cat_s": peft_cat.get(k),
            }  # fmt: skip
            row["overhead_pct"] = 100 * (row["smoa_s"] / row["base_s"] - 1)
            results.append(row)
        handle.set_mixtures(None)
    handle.detach()
    return results


def bench_cold_load(name: str, n_loaded: list[int], reps: int) -> list[dict[str, Any]]:
    """One NANO adapter from safetensors to ready-to-serve: smoa vs PEFT ``load_adapter`` (+ ``set_adapter``).

    smoa: ``LoraWeights.from_bytes`` + ``set_mixtures`` (validation against the profile and stacking). PEFT: load
    the same adapter saved by ``save_pretrained`` into a PeftModel already holding ``n`` adapters.
    """
    from peft import LoraConfig, get_peft_model

    model = load_model(name)
    pristine = copy.deepcopy(model)
    profile = profile_from_model(model)
    pool = nano_pool(profile, max(n_loaded) + reps, seed=5)
    blobs = [w.to_bytes() for w in pool[-reps:]]
    handle = attach(model)
    out = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w0 = pool[-1]
        cfg = LoraConfig(r=w0.rank, lora_alpha=w0.alpha, target_modules=list(w0.modules), lora_dropout=0.0)
        get_peft_model(copy.deepcopy(pristine), cfg, adapter_name="x").save_pretrained(tmp)
        for n in n_loaded:
            pm = peft_with_pool(pristine, pool[:n])
            parse_t, smoa_t, peft_t = [], [], []
            for r, blob in enumerate(blobs):
                t0 = time.perf_counter()
                w = LoraWeights.from_bytes(blob)
                t1 = time.perf_counter()
                handle.set_mixtures([(w, 1.0)])  # validation + stacking: ready to serve
                t2 = time.perf_counter()
                pm.load_adapter(str(Path(tmp) / "x"), adapter_name=f"cold{r}")
                pm.set_adapter(f"cold{r}")
                t3 = time.perf_counter()
                parse_t.append(t1 - t0)
                smoa_t.append(t2 - t0)
                peft_t.append(t3 - t2)
            handle.set_mixtures(None)
            out.append({"model": name, "peft_adapters_loaded": n, "smoa_parse_ms": 1e3 * statistics.median(parse_t),
                        "smoa_ready_ms": 1e3 * statistics.median(smoa_t),
                        "peft_load_ms": 1e3 * statistics.median(peft_t)})  # fmt: skip
            del pm
    handle.detach()
    return out


# -- output --------------------------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def overhead_table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | batch | k | base tok/s | smoa tok/s | overhead (end-to-end) | overhead (isolated) "
            "| set ms | adapter FLOP share | PEFT mixed tok/s (k=1) | PEFT cat per-mixture tok/s "
            "| smoa / PEFT-cat |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        tokens = r["batch"] * r["seq"]
        mixed = tokens / r["peft_mixed_s"] if r["peft_mixed_s"] else None
        cat = tokens / r["peft_cat_s"] if r["peft_cat_s"] else None
        speed = r["peft_cat_s"] / r["smoa_s"] if r["peft_cat_s"] else None
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['k']} | {tokens / r['base_s']:,.0f} | {tokens / r['smoa_s']:,.0f} "
            f"| {r['overhead_pct']:+.1f} % | {r['iso_overhead_pct']:+.2f} % | {r['set_ms']:.1f} "
            f"| {r['flop_share_pct']:.4f} % | {_f(mixed, ',.0f')} | {_f(cat, ',.0f')} | {_f(speed, '.1f')}x |"
        )
    return "\n".join(lines)


def cold_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | adapters already in PEFT | smoa from_bytes ms | smoa ready (parse+validate+stack) ms "
             "| PEFT load_adapter+set_adapter ms | PEFT / smoa-load | PEFT / smoa-ready |", "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['model']} | {r['peft_adapters_loaded']} | {r['smoa_parse_ms']:.3f} "
                     f"| {r['smoa_ready_ms']:.3f} | {r['peft_load_ms']:.1f} "
                     f"| {r['peft_load_ms'] / r['smoa_parse_ms']:,.0f}x "
                     f"| {r['peft_load_ms'] / r['smoa_ready_ms']:,.0f}x |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=lambda m: m != "smollm2")
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model]
        for batch in sorted({r["batch"] for r in sub}):
            pts = sorted((r["k"], r["overhead_pct"], r["iso_overhead_pct"]) for r in sub if r["batch"] == batch)
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"batch {batch} end-to-end")[0]
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", color=line.get_color(), alpha=0.7,
                    label=f"batch {batch} isolated")  # fmt: skip
        ax.axhline(5, color="red", lw=0.8, ls=":", label="5 % target")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xlabel("adapters per row (k)")
        ax.set_ylabel("overhead over bare base forward (%)")
        ax.set_title(f"{model}: per-row routed NANO mixtures (seq {sub[0]['seq']})")
        ax.set_xticks(sorted({r["k"] for r in sub}))
        if max(max(r["overhead_pct"], r["iso_overhead_pct"]) for r in sub) > 50:
            ax.set_yscale("symlog", linthresh=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small, fast version")
    ap.add_argument("--models", nargs="*", default=["smollm2", "tiny"], choices=["smollm2", "tiny"])
    ap.add_argument("--batches", type=int, nargs="*")
    ap.add_argument("--ks", type=int, nargs="*")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default docs/bench_inference[_quick].png)")
    ap.add_argument("--json", type=Path, default=None, help="write raw results here")
    args = ap.parse_args(argv)
    batches = args.batches or ([1, 4] if args.quick else [1, 16, 64])
    ks = args.ks or ([1, 3] if args.quick else [1, 3, 5])
    seq = args.seq or (32 if args.quick else 64)
    reps = args.reps or (2 if args.quick else 5)
    pool_size = max(max(batches), 5 * max(ks)) + 8
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    cold: list[dict[str, Any]] = []
    for name in args.models:
        model_reps = {"tiny": reps * 4}.get(name, reps)
        rows += bench_model(name, batches, ks, seq, model_reps, not args.no_peft, pool_size)
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr)
        if not args.no_peft:
            cold += bench_cold_load(name, [1, 8] if args.quick else [1, 64], reps=3 if args.quick else 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seq {seq}, reps {reps} (tiny x4), "
          f"pool {pool_size} NANO rank-2 adapters\n")  # fmt: skip
    print(overhead_table(rows))
    if cold:
        print()
        print(cold_table(cold))
    path = args.plot or ROOT / "docs" / ("bench_inference_quick.png" if args.quick else "bench_inference.png")
    plot(rows, path)
    print(f"\nplot: {path}   total {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"overhead": rows, "cold_load": cold}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
