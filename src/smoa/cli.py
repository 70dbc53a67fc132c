"""The `smoa` command line: one table from command to a typed, documented function.

    smoa run                         the main job: routed adapter mixtures on SmolLM2-135M vs base / oracle / uniform
    smoa stats LIBRARY               statistics of a persistent library
    smoa route LIBRARY "query" ...   route a query (optionally --meta key=value, --strategy, -k)
    smoa import-peft LIBRARY DIR     import a PEFT LoRA directory (safetensors only) as a new adapter
    smoa export-peft LIBRARY ID DIR  export an adapter as a PEFT directory
    smoa optimize LIBRARY            merge near-duplicates and prune unused adapters

Library commands open an existing library directory on the default base-model profile.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def cmd_run(args: argparse.Namespace) -> int:
    """Run the main job (see smoa.jobs.main_job); extra arguments are passed through."""
    from smoa.jobs.main_job import main

    return int(main(args.rest) or 0)


def _open(path: str, **overrides: Any) -> Any:
    from smoa import SMoAConfig, SparseAdapterMixture

    return SparseAdapterMixture(SMoAConfig(storage_path=path, **overrides))


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the statistics of a library as JSON."""
    with _open(args.library) as smoa:
        print(json.dumps(smoa.get_statistics(), indent=2, default=str))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    """Route one query and print the chosen adapters."""
    meta = {}
    for item in args.meta or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--meta expects key=value, got {item!r}")
        meta[key] = value
    with _open(args.library) as smoa:
        route = smoa.query_adapters_sync(args.query, meta or None, args.strategy, args.k)
        for aid, score, w in zip(route.adapter_ids, route.routing_scores, route.weights):
            ad = smoa.library.get_adapter(aid)
            print(f"{aid}  score={score:.3f}  weight={w:.3f}  tags={ad.domain_tags + ad.skill_tags}")
        print(f"({route.routing_latency_ms:.2f} ms, strategy {route.strategy.value})")
    return 0


def cmd_import_peft(args: argparse.Namespace) -> int:
    """Import a PEFT LoRA directory into the library."""
    with _open(args.library) as smoa:
        adapter = smoa.import_peft_sync(args.directory, domain_tags=args.domain or [], skill_tags=args.skill or [],
                                        description=args.description or "")  # fmt: skip
        print(adapter.id)
    return 0


def cmd_export_peft(args: argparse.Namespace) -> int:
    """Export one adapter as a PEFT directory."""
    with _open(args.library) as smoa:
        print(smoa.export_peft_sync(args.adapter_id, args.directory))
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    """Run merge + prune once and print the report."""
    with _open(args.library) as smoa:
        print(smoa.optimize_library_sync())
    return 0


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]
    passthrough: bool = False  # every argument (``--help`` too) goes to the command's own parser


def _lib(p: argparse.ArgumentParser) -> None:
    p.add_argument("library", help="library directory (storage_path)")


def _route_args(p: argparse.ArgumentParser) -> None:
    _lib(p)
    p.add_argument("query")
    p.add_argument("--meta", action="append", help="metadata key=value (repeatable)")
    p.add_argument("--strategy", choices=["semantic", "task_based", "hybrid", "hierarchical"])
    p.add_argument("-k", type=int, default=None)


def _import_args(p: argparse.ArgumentParser) -> None:
    _lib(p)
    p.add_argument("directory")
    p.add_argument("--domain", action="append")
    p.add_argument("--skill", action="append")
    p.add_argument("--description")


def _export_args(p: argparse.ArgumentParser) -> None:
    _lib(p)
    p.add_argument("adapter_id")
    p.add_argument("directory")


COMMANDS: tuple[Command, ...] = (
    Command("run", cmd_run, lambda p: p.add_argument("rest", nargs=argparse.REMAINDER), passthrough=True),
    Command("stats", cmd_stats, _lib),
    Command("route", cmd_route, _route_args),
    Command("import-peft", cmd_import_peft, _import_args),
    Command("export-peft", cmd_export_peft, _export_args),
    Command("optimize", cmd_optimize, _lib),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoa", description="Sparse Mixtures of Adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=(c.run.__doc__ or "").strip().splitlines()[0], add_help=not c.passthrough)
        c.arguments(p)
        p.set_defaults(_run=c.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from smoa.errors import SmoaError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not next(c for c in COMMANDS if c.name == args.command).passthrough:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.rest = [*extra, *args.rest]
    try:
        return args._run(args)
    except SmoaError as exc:
        print(f"smoa: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
