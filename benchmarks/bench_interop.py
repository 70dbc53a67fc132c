"""What does the strict safetensors pre-check cost, next to parsing, and how fast are PEFT import/export?

For adapters of several sizes on the default profile (SmolLM2-135M: 30 layers x 7 linear modules) this
prints, per adapter: file and header bytes, the pre-check alone (``check_safetensors_bytes``), the
safetensors parse alone (``safetensors.torch.load``), their ratio, ``LoraWeights.from_bytes``, and the PEFT
directory round trip (``write_peft_dir`` / ``read_peft_dir``, which includes the check, the parse and the
NaN/shape checks).

    python benchmarks/bench_interop.py            # full
    python benchmarks/bench_interop.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load

from smoa.adapter.profile import default_profile
from smoa.adapter.weights import LoraWeights
from smoa.interop import check_safetensors_bytes, read_peft_dir, write_peft_dir


def timed(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn`` in microseconds over ``reps`` runs (after one warm-up)."""
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def adapter(kinds: tuple[str, ...], rank: int, layers: int | None = None) -> LoraWeights:
    profile = default_profile()
    g = torch.Generator().manual_seed(0)
    modules = [m for m in profile.module_names if m.endswith(kinds)]
    if layers is not None:
        modules = [m for m in modules if int(m.split(".")[2]) < layers]
    factors = {}
    for m in modules:
        d_in, d_out = profile.shape(m)
        factors[m] = (torch.randn(rank, d_in, generator=g) * 0.01, torch.randn(d_out, rank, generator=g) * 0.01)
    return LoraWeights(factors, 2.0 * rank, rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    reps = 20 if args.quick else 200
    cases = [
        ("nano: 1 module r=1", adapter(("self_attn.q_proj",), 1, layers=1)),
        ("nano: 2 layers q,v r=2", adapter(("q_proj", "v_proj"), 2, layers=2)),
        ("small: 30 layers q,v r=8", adapter(("q_proj", "v_proj"), 8)),
        ("full: 210 modules r=16", adapter(("proj",), 16)),
    ]
    profile = default_profile()
    head = f"{'adapter':<26}{'params':>10}{'bytes':>11}{'header':>8}{'check us':>10}{'parse us':>10}{'check/parse':>12}{'from_bytes us':>14}{'write ms':>10}{'read ms':>9}"
    print(head)
    print("-" * len(head))
    for name, w in cases:
        data = w.to_bytes()
        header = int.from_bytes(data[:8], "little")
        check = timed(lambda: check_safetensors_bytes(data, name="bench"), reps)
        parse = timed(lambda: load(data), reps)
        from_bytes = timed(lambda: LoraWeights.from_bytes(data), reps)
        with tempfile.TemporaryDirectory() as tmp:
            n = [0]

            def write() -> None:
                n[0] += 1
                write_peft_dir(w, Path(tmp) / f"a{n[0]}")

            write_us = timed(write, max(3, reps // 10))
            read_us = timed(lambda: read_peft_dir(Path(tmp) / "a1", profile), max(3, reps // 10))
        print(
            f"{name:<26}{w.num_parameters:>10,}{len(data):>11,}{header:>8,}{check:>10.1f}{parse:>10.1f}"
            f"{check / parse:>12.2f}{from_bytes:>14.1f}{write_us / 1e3:>10.2f}{read_us / 1e3:>9.2f}"
        )


if __name__ == "__main__":
    main()
