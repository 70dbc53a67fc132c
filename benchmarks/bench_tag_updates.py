"""How long does a big change set's tag and group update take inside the apply's hold of the router's lock?

``Router.apply`` makes a big change set live in one hold of the router's lock (atomic for the routes): the vector
keys were staged before it (``benchmarks/bench_refit_lock.py --apply``), but the tag index and the groups are
updated inside it. This times those updates alone, for ``--changes`` new adapters into a library of ``--keys``
(``bench_routing.Pool``'s realistic tags: a BBC category or CLINC150 domain, and a skill word), then their removal:

* ``TagIndex.add_many`` / ``remove_many`` as they are, against a copy whose removal finds the gone keys in each
  posting with ``np.isin`` (``IsinTags``: as before 2026-12-07, ~25 us of set-up per posting; now by binary search),
  side by side. The insert is the same code in both (each touched posting concatenated with its new keys and
  sorted again): merging the new keys in where they sort (``np.insert``, two slices for a single key) was tried and
  was slower here, 78 against 53 ms per 10K adapters;
* ``GroupIndex.add_many`` / ``remove_many`` (unchanged; for the hold's total).

Each copy's postings are checked equal after every round.

    .venv/bin/python benchmarks/bench_tag_updates.py                      # 200K keys, 10K changes, ~1 min
    .venv/bin/python benchmarks/bench_tag_updates.py --keys 1000000 --changes 10000
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_routing  # noqa: E402

from smoa.routing.index import GroupIndex, TagIndex  # noqa: E402


class IsinTags(TagIndex):
    """``TagIndex`` whose bulk removal finds the gone keys with ``np.isin``, as before 2026-12-07 (the reference)."""

    def _delete_postings(self, gone: dict[str, list[np.ndarray]]) -> None:
        for t, parts in gone.items():
            k, f = self._postings[t]
            keep = ~np.isin(k, np.concatenate(parts))
            if keep.any():
                self._postings[t] = (k[keep], f[keep])
            else:
                del self._postings[t]


def timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--changes", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    pool, rng = bench_routing.Pool(), np.random.default_rng(0)
    vecs, tags = pool.keys(args.keys, rng)
    rows = [(k, d, s) for k, (d, s) in enumerate(tags)]
    now = TagIndex()
    now.add_many(rows)
    before = IsinTags()
    before.__dict__.update(copy.deepcopy(now.__dict__))
    groups = GroupIndex(vecs.shape[1])
    groups.add_many(np.arange(args.keys), vecs, [d for d, _ in tags])
    print(f"{args.keys:,} adapters, {len(now._postings):,} tag terms, {len(groups)} groups; {args.changes:,} new "
          "adapters per round, then removed", flush=True)  # fmt: skip
    out: dict[str, list[float]] = {}
    for r in range(args.rounds):
        nv, nt = pool.keys(args.changes, rng)
        new = np.arange(10 * args.keys, 10 * args.keys + args.changes) + r * args.changes
        batch = [(int(k), d, s) for k, (d, s) in zip(new.tolist(), nt)]
        for name, index in ((("tags, now", now), ("tags, before", before)) if r % 2 == 0 else
                            (("tags, before", before), ("tags, now", now))):  # fmt: skip
            out.setdefault(f"{name}: add", []).append(timed(lambda: index.add_many(batch)))
        out.setdefault("groups: add", []).append(timed(lambda: groups.add_many(new, nv, [d for d, _ in nt])))
        assert now._postings.keys() == before._postings.keys()
        assert all(np.array_equal(now._postings[t][0], before._postings[t][0]) for t in now._postings)
        for name, index in ((("tags, before", before), ("tags, now", now)) if r % 2 == 0 else
                            (("tags, now", now), ("tags, before", before))):  # fmt: skip
            out.setdefault(f"{name}: remove", []).append(timed(lambda: index.remove_many(new)))
        out.setdefault("groups: remove", []).append(timed(lambda: groups.remove_many(new, nv)))
        assert all(np.array_equal(now._postings[t][1], before._postings[t][1]) for t in now._postings)
    print("\n| update | ms per round (median) | min | max |")
    print("|---|---|---|---|")
    for name in sorted(out):
        v = out[name]
        print(f"| {name} | {np.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
