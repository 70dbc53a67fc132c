"""The main job (``smoa run``): do routed adapter mixtures help a real model on real held-out text?

::

    SmolLM2-135M (frozen) + library = 5 shipped BBC-topic adapters  +  N distractor NANO adapters (random tags)
                                      (each keyed by its routing examples: multi-vector keys learned by the router)
                                            │
    held-out BBC articles (never trained on), first T tokens ──► route from the text alone (no metadata)
                                            │
          per-row mixtures ──► mean next-token NLL per text, for each condition:
              base         no adapter
              routed k     the route's top-k adapters, softmax weights (the SMoA mixture)
              oracle       the article's own topic adapter, weight 1
              uniform      all topic adapters, weight 1/5 each
          + routing accuracy (top-1 = the right topic's adapter), routing / encoding latencies, forward overhead

``recovered = (loss_base - loss_routed) / (loss_base - loss_oracle)``: the share of the oracle's gain the
routed mixture keeps. Top-1 routing counts as right when the first adapter of the route is (an alias of) the
text's topic adapter. Distractors get small random ``B`` factors (``--distractor-noise``) so that routing to
one costs something; with ``0`` they are the library's fresh adapters (``B = 0``, no effect).
Conditions are evaluated batch by batch, interleaved, so the forward-time ratios see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from smoa.adapter.weights import LoraWeights

if TYPE_CHECKING:
    from smoa.mixture import SparseAdapterMixture

DISTRACTOR_DOMAINS = (
    "medical", "radiology", "cardiology", "oncology", "pediatrics", "pharmacy", "nursing", "dentistry", "veterinary",
    "genomics", "neuroscience", "legal", "contract", "patent", "compliance", "finance", "trading", "risk", "insurance",
    "accounting", "tax", "audit", "banking", "crypto", "real-estate", "education", "mathematics", "physics",
    "chemistry", "biology", "astronomy", "geology", "climate", "agriculture", "energy", "oil-and-gas", "automotive",
    "aviation", "maritime", "logistics", "supply-chain", "manufacturing", "retail", "e-commerce", "hospitality",
    "travel", "cooking", "nutrition", "fitness", "fashion", "gaming", "music", "film", "television", "literature",
    "poetry", "history", "philosophy", "psychology", "sociology", "linguistics", "spanish", "french", "german",
    "chinese", "japanese", "customer-support", "human-resources", "recruiting", "marketing", "advertising", "sales",
    "cybersecurity", "devops", "databases", "frontend", "mobile", "cloud", "networking", "robotics", "telecom",
    "sports", "football", "tennis", "politics", "elections", "government", "business", "economy", "technology",
    "internet", "software", "entertainment", "celebrity", "weather", "parenting", "pets", "gardening", "religion",
)  # fmt: skip
DISTRACTOR_SKILLS = (
    "summarization", "classification", "translation", "question-answering", "code-generation", "reasoning",
    "extraction", "review", "diagnosis", "analysis", "prediction", "drafting", "dialogue", "sentiment",
    "entity-recognition", "retrieval", "planning", "tutoring", "formatting", "rewriting", "fact-checking",
    "scheduling", "recommendation", "explanation",
)  # fmt: skip
# Distractor tags that name a BBC topic or a close synonym: left out unless ``overlap=True`` (see the docstring).
TOPIC_WORDS = frozenset({
    "business", "economy", "finance", "trading", "banking", "accounting", "tax", "entertainment", "film", "music",
    "television", "celebrity", "politics", "government", "elections", "sports", "football", "tennis", "fitness",
    "technology", "internet", "software", "mobile", "cloud", "gaming", "cybersecurity", "telecom",
})  # fmt: skip
_TEMPLATES = (
    "{skill} for {d1} texts", "{d1} and {d2} {skill}", "adapter specialised in {skill} of {d1} documents",
    "{skill} assistant for {d1} questions", "{d1} {skill} on short {d2} notes",
)


@dataclass
class EvalText:
    """One held-out text and the topic it comes from."""

    domain: str
    text: str


# -- pure helpers ------------------------------------------------------------------------------------------------
def distractor_specs(n: int, seed: int, noise: float, profile: Any, rank: int = 2, overlap: bool = True) -> list[Any]:
    """``n`` NANO adapter specs with random realistic tags and descriptions.

    Args:
        n: how many.
        seed: fixes tags, descriptions and weights.
        noise: std of the random ``B`` factors (``A`` is Kaiming-uniform as usual); 0 = fresh adapters (``B = 0``).
        profile: the library's profile (module shapes).
        rank: LoRA rank.
        overlap: draw tags from the whole vocabulary; ``False`` leaves out :data:`TOPIC_WORDS`.
    """
    from smoa.adapter.granularity import select_modules
    from smoa.adapter.spec import AdapterSpec
    from smoa.adapter.weights import init_factor_a
    from smoa.config import AdapterGranularity

    domains = [d for d in DISTRACTOR_DOMAINS if overlap or d not in TOPIC_WORDS]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    modules = select_modules(profile, AdapterGranularity.NANO, rank)
    specs = []
    for i in range(n):
        d = [str(x) for x in rng.choice(domains, size=int(rng.integers(1, 3)), replace=False)]
        s = [str(x) for x in rng.choice(DISTRACTOR_SKILLS, size=int(rng.integers(1, 3)), replace=False)]
        desc = str(rng.choice(_TEMPLATES)).format(skill=s[0], d1=d[0], d2=d[-1])
        weights = None
        if noise > 0:
            factors = {}
            for m in modules:
                d_in, d_out = profile.shape(m)
                a = init_factor_a(1, rank, d_in, gen, torch.float32)[0]
                factors[m] = (a, torch.randn(d_out, rank, generator=gen) * noise)
            weights = LoraWeights(factors, 2.0 * rank, rank)
        specs.append(AdapterSpec(specialization="domain", domain_tags=d, skill_tags=s, granularity="nano", rank=rank,
                                 description=desc, weights=weights, metadata={"distractor": i}))  # fmt: skip
    return specs


def recovered_fraction(base: float, routed: float, oracle: float) -> float:
    """``(base - routed) / (base - oracle)``; NaN when the oracle gains nothing."""
    gain = base - oracle
    return (base - routed) / gain if gain > 0 else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else math.nan


def held_out_texts(domains: Sequence[str], per_domain: int | None, tokenizer: Any, max_tokens: int) -> list[EvalText]:
    """The first ``per_domain`` held-out BBC articles of each topic, cut to ``max_tokens`` tokens (``None``: every
    held-out article, as many per topic as the smallest topic holds: 69 x 5 = 345 texts)."""
    from smoa.data.bbc import bbc_news
    from smoa.data.text import head_tokens

    if per_domain is None:
        per_domain = min(len(bbc_news("held_out", [d])) for d in domains)
    out = []
    for d in domains:
        arts = bbc_news("held_out", [d])[:per_domain]
        out += [EvalText(d, t) for t in head_tokens([a.text for a in arts], tokenizer, max_tokens)]
    return out


# -- the job -----------------------------------------------------------------------------------------------------
def run_main_job(
    distractors: int = 5000,
    per_domain: int | None = None,
    k: int = 3,
    extra_k: Sequence[int] = (1,),
    seed: int = 0,
    max_tokens: int = 128,
    batch_size: int = 10,
    domains: Sequence[str] | None = None,
    strategy: str | None = None,
    distractor_noise: float = 0.05,
    prototypes: int = 0,
    refit: bool = True,
    overlap: bool = True,
    progress: bool = True,
    model: Any = None,
    tokenizer: Any = None,
    adapters_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run the main job (see the module docstring) and return every figure as a JSON-able dict.

    Args:
        distractors: distractor NANO adapters added to the library.
        per_domain: held-out texts per topic (default: all, balanced to the smallest topic: 69 each, 345 in all;
            the 100 texts of 20 per topic used until 2026-12-06 resolve top-1 only to ~+-2.4 points).
        k: adapters per route of the main routed condition (``max_active_adapters``).
        extra_k: other ``k`` to evaluate as extra routed conditions.
        seed: fixes distractors (and the library's random init).
        max_tokens: tokens per held-out text.
        batch_size: texts per forward.
        domains: topics to use (default: every shipped adapter's).
        strategy: routing strategy (default the config's, HYBRID).
        distractor_noise: std of the distractors' random ``B`` factors (0 = inert fresh adapters); the shipped
            adapters' trained ``B`` have std ~0.042.
        prototypes: legacy COMPOSITE-alias prototype keys per topic adapter on top of the built-in multi-vector
            keys (:func:`smoa.train.prototypes.add_routing_prototypes`); 0 (default) = the built-in keys alone.
        refit: refit the routing (learned keys and query encoder, :meth:`LibraryCore.refit_routing`) once the
            library is built, as ``optimize_library()`` and the background optimiser do.
        overlap: distractor tags may name the topics themselves (the hard setting); ``False`` leaves out
            :data:`TOPIC_WORDS`.
        progress: tqdm bars.
        model, tokenizer: a base model to use instead of :func:`smoa.models.load_default_base_model` (must fit
            the shipped adapters' profile).
        adapters_dir: a folder of adapters in the shipped format (default: the ones shipped in the package).
    """
    from tqdm.auto import tqdm

    from smoa.config import SMoAConfig
    from smoa.data.shipped import load_shipped_adapters
    from smoa.mixture import SparseAdapterMixture

    if per_domain is not None and (not isinstance(per_domain, int) or isinstance(per_domain, bool) or per_domain < 1):
        raise ValueError(f"`per_domain` must be a positive int or None (every held-out article), got {per_domain!r}")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    refit_report: dict[str, float] = {}
    t = time.perf_counter()
    if model is None:
        from smoa.models import load_default_base_model

        model, tokenizer = load_default_base_model()
    timings["load_model_s"] = time.perf_counter() - t
    shipped = load_shipped_adapters(Path(adapters_dir) if adapters_dir is not None else None)
    if domains is not None:
        shipped = [a for a in shipped if a.domain in set(domains)]
    names = [a.domain for a in shipped]
    if not shipped:
        raise ValueError(f"no shipped adapter for `domains`={list(domains or [])!r}")
    all_k = sorted({k, *extra_k})
    config = SMoAConfig(max_active_adapters=k, seed=seed, max_adapters=max(1_000_000, distractors + 1000),
                        **({"routing_strategy": strategy} if strategy else {}))  # fmt: skip
    smoa = SparseAdapterMixture(config, base_model=model, tokenizer=tokenizer)
    try:
        t = time.perf_counter()
        domain_ads, aliases = add_topic_adapters(smoa, shipped, prototypes, seed)
        timings["create_domain_adapters_s"] = time.perf_counter() - t
        t = time.perf_counter()
        specs = distractor_specs(distractors, seed, distractor_noise, smoa.library.profile, overlap=overlap)
        chunk = 500
        with tqdm(total=distractors, desc="distractor adapters", unit="ad", disable=not progress, leave=False) as bar:
            for i in range(0, distractors, chunk):
                smoa.create_adapters_sync(specs[i : i + chunk])
                bar.update(min(chunk, distractors - i))
        timings["create_distractors_s"] = time.perf_counter() - t
        if refit:  # what optimize_library() and the background optimiser run for routing (keys, query encoder)
            t = time.perf_counter()
            refit_report = smoa.core.refit_routing()
            timings["refit_routing_s"] = time.perf_counter() - t
        ad_of = {d: a.id for d, a in zip(names, domain_ads)}
        texts = held_out_texts(names, per_domain, tokenizer, max_tokens)
        routes, routing = _route_all(smoa, texts, ad_of, all_k, progress)
        routing["alias_keys_per_topic"] = len(aliases[names[0]]) - 1
        routing["routing_keys_per_adapter"] = config.routing_keys_per_adapter
        conditions, forward_s = _evaluate(smoa, texts, ad_of, routes, k, all_k, batch_size, max_tokens + 8, progress)
        stats = smoa.get_statistics()
    finally:
        smoa.close()
    base = conditions["base"]["loss"]
    oracle = conditions["oracle"]["loss"]
    for c in conditions.values():
        c["gain"] = base - c["loss"]
        c["recovered"] = recovered_fraction(base, c["loss"], oracle)
    per_text_forward = {c: s / len(texts) * 1e3 for c, s in forward_s.items()}
    timings["total_s"] = time.perf_counter() - t_start
    return {
        "config": {"distractors": distractors, "per_domain": len(texts) // len(names), "k": k, "extra_k": list(extra_k), "seed": seed,
                   "max_tokens": max_tokens, "batch_size": batch_size, "domains": names,
                   "strategy": config.routing_strategy.value, "distractor_noise": distractor_noise,
                   "prototypes": prototypes, "refit": refit, "overlap": overlap,
                   "library_size": stats["library"]["total_adapters"], "texts": len(texts),
                   "torch_threads": torch.get_num_threads()},
        "conditions": conditions,
        "recovered": conditions[f"routed k={k}"]["recovered"],
        "routing": routing,
        "refit_routing": refit_report,
        "forward_ms_per_text": per_text_forward,
        "forward_overhead": {c: forward_s[c] / forward_s["base"] - 1.0 for c in forward_s if c != "base"},
        "timings": timings,
    }  # fmt: skip


def add_topic_adapters(smoa: SparseAdapterMixture, shipped: list[Any], prototypes: int, seed: int) -> tuple[list[Any], dict[str, list[str]]]:
    """Add the shipped adapters with their routing examples: the router keys each by up to
    ``routing_keys_per_adapter`` prototypes of them and learns the keys (issue 11, :mod:`smoa.routing.learner`).
    ``prototypes > 0`` adds the legacy COMPOSITE-alias prototype keys of :mod:`smoa.train.prototypes` on top
    (kept for comparison only). Returns the adapters and ``topic -> [adapter id, alias ids...]``."""
    from smoa.data.shipped import shipped_specs

    ads = smoa.create_adapters_sync(shipped_specs(shipped))
    aliases = {a.domain: [ad.id] for a, ad in zip(shipped, ads)}
    if prototypes > 0:
        from smoa.train.prototypes import add_routing_prototypes

        for a, ad in zip(shipped, ads):
            aliases[a.domain] += [p.id for p in add_routing_prototypes(smoa, ad.id, a.routing_examples, prototypes, seed)]
    return ads, aliases


def _route_all(smoa: SparseAdapterMixture, texts: list[EvalText], ad_of: dict[str, str], all_k: list[int], progress: bool
               ) -> tuple[dict[int, list[Any]], dict[str, Any]]:  # fmt: skip
    """Route every text for every k (largest first: its latencies are the cold ones); accuracy and latencies."""
    from tqdm.auto import tqdm

    routes: dict[int, list[Any]] = {}
    for kk in sorted(all_k, reverse=True):
        routes[kk] = [smoa.query_adapters_sync(t.text, k=kk)
                      for t in tqdm(texts, desc=f"routing k={kk}", disable=not progress, leave=False)]  # fmt: skip
    cold = routes[max(all_k)]
    leaf = _leaf_weights(smoa)
    top1 = [bool(r.adapter_ids) and next(iter(leaf(r.adapter_ids[0])), None) == ad_of[t.domain] for r, t in zip(cold, texts)]
    right_w = {kk: float(np.mean([sum(w * lw for a, w in zip(r.adapter_ids, r.weights) for x, lw in leaf(a).items()
                                      if x == ad_of[t.domain]) for r, t in zip(routes[kk], texts)])) for kk in all_k}
    in_k = {kk: float(np.mean([any(ad_of[t.domain] in leaf(a) for a in r.adapter_ids) for r, t in zip(routes[kk], texts)]))
            for kk in all_k}
    domain_ids = set(ad_of.values())
    distractor_w = {kk: float(np.mean([sum(w * lw for a, w in zip(r.adapter_ids, r.weights) for x, lw in leaf(a).items()
                                           if x not in domain_ids) for r in routes[kk]])) for kk in all_k}
    per_domain = {d: float(np.mean([c for c, t in zip(top1, texts) if t.domain == d])) for d in ad_of}
    lat = [r.routing_latency_ms for r in cold]
    enc = [r.timings_ms.get("encode", math.nan) for r in cold]
    search = [r.timings_ms.get("search", math.nan) + r.timings_ms.get("fuse", 0.0) for r in cold]
    return routes, {
        "top1_accuracy": float(np.mean(top1)), "top1_per_domain": per_domain, "right_adapter_in_route": in_k,
        "right_adapter_weight": right_w, "distractor_weight": distractor_w,
        "latency_ms_p50": percentile(lat, 50), "latency_ms_p95": percentile(lat, 95), "latency_ms_mean": float(np.mean(lat)),
        "encode_ms_p50": percentile(enc, 50), "search_ms_p50": percentile(search, 50),
        "degraded": int(sum(r.degraded for r in cold)),
    }  # fmt: skip


def _leaf_weights(smoa: SparseAdapterMixture) -> Any:
    """``adapter id -> {leaf id: weight}`` (composites flattened), memoised."""
    memo: dict[str, dict[str, float]] = {}

    def leaf(aid: str) -> dict[str, float]:
        if aid not in memo:
            out: dict[str, float] = {}
            for x, w in smoa.library.flatten(aid):
                out[x] = out.get(x, 0.0) + w
            memo[aid] = out
        return memo[aid]

    return leaf


def _evaluate(smoa: SparseAdapterMixture, texts: list[EvalText], ad_of: dict[str, str], routes: dict[int, list[Any]], k: int,
              all_k: list[int], batch_size: int, max_length: int, progress: bool) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:  # fmt: skip
    """Mean per-text NLL of every condition, evaluated batch by batch (conditions interleaved)."""
    from tqdm.auto import tqdm

    weights = {d: smoa.library.get_weights(a) for d, a in ad_of.items()}
    uniform = [(w, 1.0 / len(weights)) for w in weights.values()]
    names = ["base", *[f"routed k={kk}" for kk in sorted(all_k, key=lambda x: (x != k, x))], "oracle", "uniform"]
    nll: dict[str, list[float]] = {n: [] for n in names}
    secs = dict.fromkeys(names, 0.0)
    engine = smoa.engine
    with tqdm(total=len(texts), desc="evaluating", unit="text", disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            rows = texts[start : start + batch_size]
            batch = [t.text for t in rows]
            mix: dict[str, Any] = {"base": [], "oracle": [[(weights[t.domain], 1.0)] for t in rows], "uniform": uniform}
            for kk in all_k:
                mix[f"routed k={kk}"] = [smoa.mixture_for(r) for r in routes[kk][start : start + batch_size]]
            for n in names:
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = engine.loss(batch, mix[n], max_length=max_length)
                secs[n] += time.perf_counter() - t0
                nll[n] += out.tolist()
            bar.update(len(rows))
    conditions = {}
    for n in names:
        v = np.asarray(nll[n], np.float64)
        per_domain = {d: float(v[[i for i, t in enumerate(texts) if t.domain == d]].mean()) for d in ad_of}
        conditions[n] = {"loss": float(v.mean()), "ppl": float(math.exp(v.mean())), "per_domain": per_domain}
    return conditions, secs


# -- reporting ---------------------------------------------------------------------------------------------------
def format_table(result: dict[str, Any]) -> str:
    """The job's results as a plain-text report."""
    cfg, r = result["config"], result["routing"]
    lines = [
        f"SMoA main job: SmolLM2-135M, {len(cfg['domains'])} BBC topic adapters + {cfg['distractors']:,} distractors "
        f"(library {cfg['library_size']:,}; topic adapters keyed by their examples, up to {r['routing_keys_per_adapter']} "
        f"learned keys each{', routing refit' if cfg['refit'] else ''}), {cfg['texts']} held-out "
        f"texts x {cfg['max_tokens']} tokens, strategy {cfg['strategy']}, distractor tags "
        f"{'may name the topics' if cfg['overlap'] else 'never name the topics'}",
        "",
        f"{'condition':<14}{'loss':>8}{'ppl':>9}{'gain':>8}{'% oracle gain':>15}{'fwd ms/text':>13}",
    ]
    fwd = result["forward_ms_per_text"]
    for name, c in result["conditions"].items():
        rec = "" if math.isnan(c["recovered"]) else f"{100 * c['recovered']:.1f}%"
        lines.append(f"{name:<14}{c['loss']:>8.4f}{c['ppl']:>9.2f}{c['gain']:>8.4f}{rec:>15}{fwd[name]:>13.1f}")
    k = cfg["k"]
    lines += [
        "",
        f"routed mixture (k={k}) recovers {100 * result['recovered']:.1f}% of the oracle's gain over the base model",
        f"routing: top-1 accuracy {100 * r['top1_accuracy']:.1f}% ("
        + ", ".join(f"{d} {100 * a:.0f}%" for d, a in r["top1_per_domain"].items()) + ")",
        "         right adapter in route: " + ", ".join(f"k={kk} {100 * v:.1f}%" for kk, v in r["right_adapter_in_route"].items())
        + "; its mean weight: " + ", ".join(f"k={kk} {v:.3f}" for kk, v in r["right_adapter_weight"].items())
        + "; weight on distractors: " + ", ".join(f"k={kk} {v:.3f}" for kk, v in r["distractor_weight"].items()),
        f"         latency p50 {r['latency_ms_p50']:.2f} ms, p95 {r['latency_ms_p95']:.2f} ms "
        f"(encode p50 {r['encode_ms_p50']:.2f} ms, search+fuse p50 {r['search_ms_p50']:.2f} ms), degraded {r['degraded']}",
        "forward overhead vs base: " + ", ".join(f"{n} {100 * v:+.1f}%" for n, v in result["forward_overhead"].items()),
        "timings: " + ", ".join(f"{n} {v:.1f}s" for n, v in result["timings"].items()),
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``smoa run``: run the main job, print the table, optionally write the JSON."""
    p = argparse.ArgumentParser(prog="smoa run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--distractors", type=int, default=5000, help="distractor NANO adapters (default 5000)")
    p.add_argument("--per-domain", type=int, default=None,
                   help="held-out texts per topic (default: all held-out articles, balanced to the smallest topic: 69)")
    p.add_argument("--k", type=int, default=3, help="adapters per route (default 3)")
    p.add_argument("--extra-k", type=int, nargs="*", default=[1], help="other k to evaluate (default 1)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per held-out text (default 128)")
    p.add_argument("--strategy", default=None, help="routing strategy (default hybrid)")
    p.add_argument("--distractor-noise", type=float, default=0.05, help="std of distractors' B (0 = inert)")
    p.add_argument("--no-refit", action="store_true", help="route with the keys as created (no routing refit)")
    p.add_argument("--prototypes", type=int, default=0,
                   help="legacy COMPOSITE-alias prototype keys per topic adapter on top of the built-in ones (0 = none)")
    p.add_argument("--disjoint-distractors", action="store_true", help="distractor tags never name a BBC topic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapters-dir", default=None, help="adapters in the shipped format (default: the package's)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(list(argv) if argv is not None else None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run_main_job(
        distractors=args.distractors, per_domain=args.per_domain, k=args.k, extra_k=args.extra_k, seed=args.seed,
        max_tokens=args.max_tokens, strategy=args.strategy, distractor_noise=args.distractor_noise,
        progress=not args.no_progress, adapters_dir=args.adapters_dir, prototypes=args.prototypes, refit=not args.no_refit,
        overlap=not args.disjoint_distractors,
    )  # fmt: skip
    print(format_table(result))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
