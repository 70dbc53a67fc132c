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

from helpers import make_row  # noqa: E402

from smoa.storage.postgres import PostgresCatalog  # noqa: E402


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


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "write":
        write(args[0], args[1], int(args[2]), int(args[3]))
    else:
        raise SystemExit(f"unknown command {command!r}")
