"""Train the domain adapters shipped in ``src/smoa/data/adapters/`` (one per BBC News topic).

Reproduce (about 10-12 minutes on a 2-core CPU; the default base model is converted on first use)::

    flock /tmp/smoa-heavy.lock python scripts/train_domain_adapters.py

Each adapter: LoRA rank ``--rank`` on every linear module of the top layers (``--first-layer`` .. 29) of
SmolLM2-135M-Instruct, trained with :func:`smoa.train.train_adapter_weights` on passages of its topic's *train*
articles (the held-out articles are never seen), ``--steps`` AdamW steps of ``--batch-size`` passages cut to
``--max-length`` tokens, seed ``--seed``. Writes ``bbc-<topic>.safetensors`` and ``manifest.json`` (tags,
description, routing examples, seed, steps, losses, timings, sha256).

Routing examples: the first 128 tokens (headline + lead, cut to 320 characters) of up to
``--routing-examples`` train articles per topic, evenly spread. ``--rekey-only`` rewrites just the routing examples of an existing manifest (no training).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from smoa.adapter.profile import layer_index  # noqa: E402
from smoa.adapter.weights import init_lora  # noqa: E402
from smoa.data.bbc import BBC_TOPICS, bbc_news, bbc_passages  # noqa: E402
from smoa.data.shipped import FORMAT, MANIFEST, shipped_adapter_dir  # noqa: E402
from smoa.data.text import head_tokens  # noqa: E402
from smoa.inject.engine import InferenceEngine  # noqa: E402
from smoa.models import CACHE_NAME, load_default_base_model  # noqa: E402
from smoa.train.loop import train_adapter_weights  # noqa: E402

# What each topic's adapter is called and routed by (tags and a one-line description; examples come from data).
DOMAIN_INFO: dict[str, tuple[list[str], list[str], str]] = {
    "business": (["business", "economy", "finance"], ["news", "language-modeling"],
                 "BBC business news: markets, companies, economy, trade, shares and profits"),
    "entertainment": (["entertainment", "film", "music"], ["news", "language-modeling"],
                      "BBC entertainment news: films, music, awards, television and celebrities"),
    "politics": (["politics", "government", "elections"], ["news", "language-modeling"],
                 "BBC politics news: government, parliament, parties, elections and policy"),
    "sports": (["sports", "football", "athletics"], ["news", "language-modeling"],
               "BBC sport news: football, rugby, tennis, athletics, matches and players"),
    "tech": (["technology", "computing", "internet"], ["news", "language-modeling"],
             "BBC technology news: computers, the internet, mobile phones, games and software"),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=shipped_adapter_dir(), help="output folder")
    p.add_argument("--topics", nargs="+", default=list(BBC_TOPICS), choices=list(BBC_TOPICS))
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--lr", type=float, default=8e-3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--first-layer", type=int, default=22, help="adapt every linear module of layers >= this")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--passage-chars", type=int, default=600)
    p.add_argument("--routing-examples", type=int, default=240)
    p.add_argument("--rekey-only", action="store_true", help="only rewrite the manifest's routing examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def topic_examples(topic: str, tokenizer: object, n: int, max_tokens: int = 128, max_chars: int = 320) -> list[str]:
    """Headline + lead (first ``max_tokens`` tokens, at most ``max_chars`` characters) of ``n`` train articles of
    ``topic``, evenly spread: what a query about the topic looks like."""
    arts = bbc_news("train", [topic])
    arts = arts[:: max(1, len(arts) // n)][:n]
    return [" ".join(t.split())[:max_chars] for t in head_tokens([a.text for a in arts], tokenizer, max_tokens)]


def rekey(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from smoa.models import default_model_dir

    load_default_base_model()  # makes sure the tokenizer is cached
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    path = args.out / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for entry in manifest["adapters"]:
        entry["routing_examples"] = topic_examples(entry["domain"], tokenizer, args.routing_examples)
    manifest["routing_examples"] = ROUTING_NOTE
    path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"rewrote the routing examples of {len(manifest['adapters'])} adapters in {path}")
    return 0


ROUTING_NOTE = "headline + lead (first 128 tokens, <= 320 chars) of evenly spread train articles of the topic"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rekey_only:
        return rekey(args)
    t_load = time.perf_counter()
    model, tokenizer = load_default_base_model()
    engine = InferenceEngine(model, tokenizer)
    print(f"base model loaded in {time.perf_counter() - t_load:.1f}s; torch threads {torch.get_num_threads()}", flush=True)
    modules = [m for m in engine.profile.module_names if layer_index(m) >= args.first_layer]
    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    total = time.perf_counter()
    for i, topic in enumerate(args.topics):
        data = bbc_passages(topic, "train", max_chars=args.passage_chars)
        start = init_lora(engine.profile, modules, args.rank, 2.0 * args.rank, torch.Generator().manual_seed(args.seed + i))
        weights, hist = train_adapter_weights(
            engine, start, data, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed + i,
            max_length=args.max_length, progress=not args.no_progress, description=f"bbc-{topic}",
        )  # fmt: skip
        name = f"bbc-{topic}"
        blob = weights.to_bytes()
        (args.out / f"{name}.safetensors").write_bytes(blob)
        domain_tags, skill_tags, description = DOMAIN_INFO[topic]
        examples = topic_examples(topic, tokenizer, args.routing_examples)
        entries.append({
            "name": name, "file": f"{name}.safetensors", "sha256": hashlib.sha256(blob).hexdigest(),
            "domain": topic, "domain_tags": domain_tags, "skill_tags": skill_tags, "description": description,
            "rank": weights.rank, "alpha": weights.alpha, "num_parameters": weights.num_parameters,
            "bytes": len(blob), "target_modules": weights.modules, "seed": args.seed + i, "steps": args.steps,
            "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length,
            "train_passages": len(data), "train_tokens": hist.tokens, "initial_loss": round(hist.initial_loss, 4),
            "final_loss": round(hist.final_loss, 4), "train_seconds": round(hist.seconds, 1),
            "routing_examples": examples,
        })  # fmt: skip
        print(f"{name:20s} {len(data):5d} passages  loss {hist.initial_loss:.3f} -> {hist.final_loss:.3f}  "
              f"{hist.seconds:6.1f}s  {len(blob) / 1e6:.2f} MB", flush=True)  # fmt: skip
    manifest = {
        "format": FORMAT, "base_model": CACHE_NAME, "profile": engine.profile.name,
        "profile_fingerprint": engine.profile.fingerprint, "created_by": "scripts/train_domain_adapters.py",
        "command": "python scripts/train_domain_adapters.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "split": "BBC train articles only (smoa.data.bbc: sha256-hash split, ~20% held out)",
        "routing_examples": ROUTING_NOTE, "torch": torch.__version__, "total_seconds": round(time.perf_counter() - total, 1), "adapters": entries,
    }  # fmt: skip
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(entries)} adapters to {args.out} in {manifest['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
