"""Does memory come back after churning 100x the cache size of adapters through it?

Creates ``100 * cache`` distinct adapters (rank 32 on every module of a tiny Llama: ~100 KiB each), then loads
them one after another through one path, so every load evicts. RSS (``/proc/self/statm``) is measured after
``gc.collect()`` and glibc ``malloc_trim(0)`` (freed small blocks otherwise stay in the heap, which is allocator
caching, not a leak) at three points: *baseline* (after one warm-up pass over ``2 * cache`` adapters),
*after churn*, and *after a second churn* of the same size. Paths:

* ``library``  ``AdapterLibrary.get_weights`` (the weight cache alone);
* ``offload``  the same with the host tier on (``enable_offloading``, 4 MiB of serialised bytes);
* ``facade``   ``SparseAdapterMixture.forward`` with one adapter per request (weight cache + the engine's
  stacked-factor cache and validation memo).

    python benchmarks/bench_churn.py            # cache 8 -> 800 adapters per churn, all paths
    python benchmarks/bench_churn.py --quick    # cache 4 -> 400
    python benchmarks/bench_churn.py --json --path library   # one path, JSON (used by tests/reliability)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def rss_mib() -> float:
    """Resident set size of this process (MiB) from ``/proc/self/statm``."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def settle() -> float:
    """Collect garbage, give freed heap pages back to the OS (glibc), then read RSS."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: RSS may stay higher, which the 10 % margin absorbs
    return rss_mib()


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def churn(path: str, cache: int, rounds: int = 100) -> dict[str, Any]:
    """Run one churn experiment in this process; returns RSS figures (MiB) and cache statistics."""
    from smoa import SMoAConfig, SparseAdapterMixture
    from smoa.adapter.profile import profile_from_model
    from smoa.adapter.weights import LoraWeights

    torch.set_num_threads(1)
    d = tempfile.mkdtemp(prefix="smoa-churn-")
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = SMoAConfig(storage_path=Path(d) / "lib", encoder="hash", max_loaded_adapters=cache, seed=0,
                     enable_offloading=path == "offload", offload_max_bytes=4 << 20,
                     base_profile=profile_from_model(model))  # fmt: skip
    # the model is attached only on the forward path; the others use its profile alone
    smoa = SparseAdapterMixture(cfg, base_model=model if path == "facade" else None)
    profile = smoa.library.profile
    g = torch.Generator().manual_seed(0)
    n = rounds * cache + 2 * cache
    ids: list[str] = []
    t0 = time.perf_counter()
    for start in range(0, n, 64):
        specs = []
        for _ in range(min(64, n - start)):
            f = {m: (torch.randn(32, profile.shape(m)[0], generator=g) * 0.01,
                     torch.randn(profile.shape(m)[1], 32, generator=g) * 0.01) for m in profile.module_names}  # fmt: skip
            specs.append({"weights": LoraWeights(f, 64.0, 32)})
        ids += [a.id for a in smoa.create_adapters_sync(specs)]
    create_s = time.perf_counter() - t0
    tokens = [[1, 2, 3, 4, 5, 6, 7, 8]]

    def use(aid: str) -> None:
        if path == "facade":
            smoa.forward_sync(tokens, routes=[[(aid, 1.0)]])
        else:
            smoa.library.get_weights(aid)

    warm, rest = ids[: 2 * cache], ids[2 * cache :]
    for aid in warm:
        use(aid)
    baseline = settle()
    adapter_mib = smoa.library.get_weights(ids[0]).nbytes / 2**20
    t0 = time.perf_counter()
    for aid in rest:
        use(aid)
    churn_s = time.perf_counter() - t0
    after = settle()
    for aid in rest:  # a second pass over the same adapters: steady state, no growth
        use(aid)
    after2 = settle()
    stats = smoa.get_statistics()["cache"]
    smoa.close()
    shutil.rmtree(d, ignore_errors=True)
    return {
        "path": path, "cache": cache, "churned": len(rest), "adapter_kib": round(adapter_mib * 1024, 1),
        "baseline_mib": round(baseline, 1), "after_mib": round(after, 1), "after2_mib": round(after2, 1),
        "growth_pct": round(100 * (after2 - baseline) / baseline, 2), "growth_mib": round(after2 - baseline, 1),
        "churn_data_mib": round(len(rest) * adapter_mib, 1), "evictions": stats["evictions"],
        "loaded": stats["loaded_adapters"], "create_s": round(create_s, 2), "loads_per_s": round(2 * len(rest) / churn_s / 2, 1),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object per path (for tests)")
    ap.add_argument("--path", choices=["library", "offload", "facade"], action="append")
    ap.add_argument("--cache", type=int)
    args = ap.parse_args()
    cache = args.cache or (4 if args.quick else 8)
    paths = args.path or ["library", "offload", "facade"]
    rows = []
    for p in paths:
        if len(paths) > 1:  # each path in a fresh process: one path's heap does not hide another's
            import subprocess

            out = subprocess.run([sys.executable, __file__, "--json", "--path", p, "--cache", str(cache)],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            rows.append(json.loads(out.strip().splitlines()[-1]))
        else:
            rows.append(churn(p, cache))
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    cols = ["path", "cache", "churned", "adapter_kib", "churn_data_mib", "baseline_mib", "after_mib", "after2_mib",
            "growth_mib", "growth_pct", "evictions", "loaded", "loads_per_s"]  # fmt: skip
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
