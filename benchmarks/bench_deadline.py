"""How late does an escalation's deadline stop the main encoder, and how slow is a cold encoder?

The router stops a MiniLM run still going at the latency budget's deadline (:mod:`smoa.routing.deadline`: one
watchdog thread sets onnxruntime's ``RunOptions.terminate``, checked between graph nodes). Two tables, on the
packaged int8 MiniLM (one intra-op thread, as the router runs it):

1. **Stop latency.** ``--runs`` encodes of four CLINC150 val queries joined (~40 tokens), each with a deadline half
   its full run away: how long after the deadline the stopped run returns (p50 / p99 / max ms): the watchdog's
   wake-up, the node in progress, onnxruntime's error path.
2. **Cold encoder.** One query at a time (CLINC150 val): the first 16 of a fresh session, 16 more once warm, and 16
   after the process sat idle for 2 s. These are what the first escalations of a process meet
   (:meth:`smoa.routing.costs.EncoderCost.explore`).

    python benchmarks/bench_deadline.py             # 200 stopped runs (~10 s)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from smoa.data.clinc import clinc150
from smoa.routing.deadline import EncodeCancelled, Watchdog
from smoa.routing.encoders.onnx_int8 import OnnxInt8Encoder


def stop_latency(enc: OnnxInt8Encoder, text: str, runs: int) -> tuple[float, np.ndarray]:
    """(full run ms, ms from the deadline to the stopped run's return [stopped runs]) through the router's
    :class:`~smoa.routing.deadline.Watchdog`."""
    for _ in range(20):
        enc.encode([text])
    t = time.perf_counter()
    enc.encode([text])
    full = (time.perf_counter() - t) * 1e3
    dog, late = Watchdog(), []
    for _ in range(runs):
        deadline = time.perf_counter() + full / 2e3
        try:
            dog.run(lambda options: enc.encode([text], options), deadline)
        except EncodeCancelled:
            late.append((time.perf_counter() - deadline) * 1e3)
    dog.close()
    return full, np.asarray(late)


def one_by_one(enc: OnnxInt8Encoder, texts: list[str]) -> list[float]:
    out = []
    for t in texts:
        a = time.perf_counter()
        enc.encode([t])
        out.append((time.perf_counter() - a) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    val = [e.text for e in clinc150("val")]
    text = " ".join(val[:4])  # ~40 tokens
    enc = OnnxInt8Encoder(threads=1)
    full, late = stop_latency(enc, text, args.runs)
    print(f"stop latency: {len(late)} of {args.runs} runs stopped; full run {full:.2f} ms, deadline at half of it")
    print("| ms from the deadline to the run's return | p50 | p99 | max |")
    print("|---|---|---|---|")
    print(f"| stopped runs | {np.percentile(late, 50):.3f} | {np.percentile(late, 99):.3f} | {late.max():.3f} |")

    cold = OnnxInt8Encoder(threads=1)
    rows = [("fresh session", one_by_one(cold, val[100:116])), ("warm", one_by_one(cold, val[116:132]))]
    time.sleep(2.0)
    rows.append(("after 2 s idle", one_by_one(cold, val[132:148])))
    print("\ncold encoder: one query at a time, ms")
    print("| state | first 4 | median of 16 | last 4 |")
    print("|---|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {' '.join(f'{x:.1f}' for x in ms[:4])} | {np.median(ms):.2f} | "
              f"{' '.join(f'{x:.1f}' for x in ms[-4:])} |")


if __name__ == "__main__":
    main()
