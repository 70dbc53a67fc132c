"""Child processes of the backend tests (run as ``python workers.py <command> ...``).

``write URL PREFIX BATCHES SIZE``: insert BATCHES batches of SIZE adapters (ids ``PREFIX_b_j``) into the PostgreSQL
catalog at URL, printing ``ACK b`` (flushed) after each batch's transaction returned. ``BATCHES=0``: forever.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_row

from smoa.storage.postgres import PostgresCatalog


def write(url: str, prefix: str, batches: int, size: int) -> None:
    cat = PostgresCatalog(url, listen=False)
    rng = random.Random(prefix)
    for b in itertools.count() if batches == 0 else range(batches):
        rows = []
        for j in range(size):
            row = make_row(j, rng)
            row.id = f"{prefix}_{b}_{j}"
            rows.append(row)
        cat.insert_many(rows)
        print(f"ACK {b}", flush=True)
    cat.close()


def _core() -> object:
    """A LibraryCore on the backend the parent test passed in SMOA_TEST_BACKEND (the test module's config)."""
    import ast
    import os

    from helpers import open_core

    return open_core(ast.literal_eval(os.environ["SMOA_TEST_BACKEND"]))


def core_create(seed: int, tag: str) -> None:
    from helpers import spec

    core = _core()
    print(core.create(spec(seed, tag=tag)).id, flush=True)  # type: ignore[attr-defined]
    core.close()  # type: ignore[attr-defined]


def core_create_loop() -> None:
    """Create adapters two at a time forever, printing ``ACK seed id`` after each call returned."""
    from helpers import spec

    core = _core()
    for seed in itertools.count(1000, 2):
        made = core.create_many([spec(seed), spec(seed + 1)])  # type: ignore[attr-defined]
        for i, ad in enumerate(made):
            print(f"ACK {seed + i} {ad.id}", flush=True)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "write":
        write(args[0], args[1], int(args[2]), int(args[3]))
    elif command == "core-create":
        core_create(int(args[0]), args[1])
    elif command == "core-create-loop":
        core_create_loop()
    else:
        raise SystemExit(f"unknown command {command!r}")
