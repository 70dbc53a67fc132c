"""The `smoa` command line: one table from command to a typed, documented function.

    smoa --version                            the installed version
    smoa run [ARGS...]                        the main job: routed mixtures on SmolLM2-135M vs base / oracle / uniform
    smoa stats LIBRARY                        statistics of a library (JSON)
    smoa list LIBRARY [--tag T] [--status S]  adapters, one a line (--offset/--limit page, --json)
    smoa show LIBRARY ADAPTER_ID              one adapter's metadata (JSON)
    smoa route LIBRARY QUERY                  route a query (--meta key=value, --strategy, -k)
    smoa import LIBRARY DIRECTORY             import a PEFT LoRA directory (safetensors only) as a new adapter
    smoa export LIBRARY ADAPTER_ID DIRECTORY  export an adapter as a PEFT directory
    smoa delete|archive|restore LIBRARY ADAPTER_ID [ADAPTER_ID ...]
    smoa compact LIBRARY                      reclaim the catalog space of deleted adapters
    smoa optimize LIBRARY                     merge near-duplicates and prune unused adapters
    smoa fsck LIBRARY [--repair]              check rows against weight files; rebuild a lost catalog
    smoa serve ...                            the HTTP server (smoa.serve)
    smoa migrate SRC DST                      copy a library between backends (dir / postgresql://, --dst-weights s3://)

Every command that opens a library refuses a path that holds none (exit 2, nothing created). Commands that
route take ``--encoder``; by default the encoder the library was built with is used (never a silent re-encode).
Errors are reported as ``smoa: error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_LIBRARY_HELP = "library directory (the `storage_path` of an existing library)"
_ID_HELP = "adapter id (as printed by `smoa list`; an alias of a merged adapter resolves to it)"


# == helpers ===========================================================================================================
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("smoa")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        from smoa import __version__

        return str(__version__)


def _recorded_encoder(path: str) -> str | None:
    """The encoder a library's keys were made with (catalog meta), read without opening it for writing."""
    from smoa.routing.encoders import available_encoders

    cat = Path(path) / "catalog.sqlite3"
    if not cat.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{cat}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'encoder'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    name = row[0] if row else None
    return name if name in available_encoders() else None


@contextmanager
def _open(args: argparse.Namespace) -> Iterator[Any]:
    """Open the library named by ``args.library`` (refusing a path that holds none), closed on exit."""
    from smoa import SMoAConfig, SparseAdapterMixture
    from smoa.errors import StorageError
    from smoa.storage.fsck import holds_library

    path = args.library
    if "://" not in path and not holds_library(path):
        raise StorageError(f"no smoa library at {path!r} (no catalog, no weight files); nothing was created")
    encoder = getattr(args, "encoder", None) or _recorded_encoder(path) or "default"
    smoa = SparseAdapterMixture(SMoAConfig(storage_path=path, encoder=encoder))
    try:
        yield smoa
    finally:
        smoa.close()


def _adapter_dict(ad: Any) -> dict[str, Any]:
    out = dataclasses.asdict(ad)
    for k, v in out.items():
        if hasattr(v, "value"):
            out[k] = v.value
    return out


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str, ensure_ascii=False))


# == commands ==========================================================================================================
def cmd_run(args: argparse.Namespace) -> int:
    """Run the main job (see smoa.jobs.main_job); extra arguments are passed through."""
    from smoa.jobs.main_job import main

    return int(main(args.rest) or 0)


def cmd_stats(args: argparse.Namespace) -> int:
    """Print the statistics of a library as JSON."""
    with _open(args) as smoa:
        _print_json(smoa.get_statistics())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """List adapters: id, status, specialization, parameters, tags (or --json)."""
    status = {"all": ("active", "archived", "merged"), None: ("active", "archived")}.get(args.status, args.status)
    with _open(args) as smoa:
        page = smoa.list_adapters_sync(args.tag, args.offset, args.limit, status)
        if args.json:
            _print_json([_adapter_dict(a) for a in page])
            return 0
        for a in page:
            tags = ",".join(a.tags)
            print(f"{a.id}  {a.status:<8}  {a.specialization.value:<9}  {a.granularity.value:<6}  "
                  f"{a.num_parameters:>10,}  {tags}")  # fmt: skip
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print one adapter's metadata as JSON."""
    with _open(args) as smoa:
        _print_json(_adapter_dict(smoa.get_adapter_sync(args.adapter_id)))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    """Route one query and print the chosen adapters."""
    from smoa.errors import InvalidInputError

    meta = {}
    for item in args.meta or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInputError(f"`--meta` expects key=value, got {item!r}")
        meta[key] = value
    with _open(args) as smoa:
        route = smoa.query_adapters_sync(args.query, meta or None, args.strategy, args.k)
        for aid, score, w in zip(route.adapter_ids, route.routing_scores, route.weights, strict=True):
            ad = smoa.get_adapter_sync(aid)
            print(f"{aid}  score={score:.3f}  weight={w:.3f}  tags={ad.domain_tags + ad.skill_tags}")
        print(f"({route.routing_latency_ms:.2f} ms, strategy {route.strategy.value})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Import a PEFT LoRA directory as a new adapter; prints its id."""
    with _open(args) as smoa:
        adapter = smoa.import_peft_sync(args.directory, specialization=args.specialization,
                                        domain_tags=args.domain or [], skill_tags=args.skill or [],
                                        description=args.description or "")  # fmt: skip
        print(adapter.id)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export one adapter as a PEFT directory; prints the directory."""
    with _open(args) as smoa:
        print(smoa.export_peft_sync(args.adapter_id, args.directory, overwrite=args.overwrite))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete adapters (all or none); prints each deleted id."""
    with _open(args) as smoa:
        for ad in smoa.delete_adapters_sync(args.adapter_ids):
            print(ad.id)
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    """Archive adapters (weights to cold storage, no longer routed, restorable)."""
    with _open(args) as smoa:
        for aid in args.adapter_ids:
            freed = smoa.archive_adapter_sync(aid)
            print(f"{aid}  archived ({freed:,} hot bytes freed)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore archived adapters (routed again)."""
    with _open(args) as smoa:
        for aid in args.adapter_ids:
            print(f"{smoa.restore_adapter_sync(aid).id}  {smoa.get_adapter_sync(aid).status}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Reclaim the catalog space of deleted adapters; prints the bytes reclaimed."""
    with _open(args) as smoa:
        print(f"{smoa.compact_sync():,} bytes reclaimed")
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    """Run merge + prune once and print the report."""
    with _open(args) as smoa:
        print(smoa.optimize_library_sync(dry_run=args.dry_run))
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    """Check every catalog row against its weights (exit 1 if not clean); --repair rebuilds a lost catalog."""
    from smoa.storage.fsck import fsck, report_json

    report = fsck(args.library, repair=args.repair)
    print(report_json(report) if args.json else report.summary())
    if args.repair:
        return 0 if report.repaired or report.clean else 1
    return 0 if report.clean else 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the library over HTTP (OpenAI- and LoRAX-compatible); see smoa.serve.cli."""
    from smoa.serve.cli import run

    return run(args)


def cmd_migrate(args: argparse.Namespace) -> int:
    """Copy a library between backends (SQLite <-> PostgreSQL, local <-> S3), resumably; see smoa.storage.migrate."""
    from smoa.storage.migrate import run

    return run(args)


def _migrate_args(p: argparse.ArgumentParser) -> None:
    from smoa.storage.migrate import add_arguments

    add_arguments(p)


def _serve_args(p: argparse.ArgumentParser) -> None:
    from smoa.serve.cli import add_arguments

    add_arguments(p)


# == the table =========================================================================================================
@dataclass(frozen=True)
class Command:
    """One row of the table: a name, the function it runs, the arguments it takes."""

    name: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]
    passthrough: bool = False  # every argument (``--help`` too) goes to the command's own parser


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the main job (`smoa run --help`)")


def _lib(p: argparse.ArgumentParser) -> None:
    p.add_argument("library", metavar="LIBRARY", help=_LIBRARY_HELP)


def _lib_encoder(p: argparse.ArgumentParser) -> None:
    _lib(p)
    p.add_argument("--encoder", help="routing encoder (default: the one the library was built with); another "
                   "encoder re-encodes every routing key once")  # fmt: skip


def _ids(p: argparse.ArgumentParser) -> None:
    _lib(p)
    p.add_argument("adapter_ids", metavar="ADAPTER_ID", nargs="+", help=_ID_HELP)


def _one_id(p: argparse.ArgumentParser) -> None:
    _lib(p)
    p.add_argument("adapter_id", metavar="ADAPTER_ID", help=_ID_HELP)


def _list_args(p: argparse.ArgumentParser) -> None:
    _lib(p)
    p.add_argument("--tag", help="only adapters holding this tag (normalised: NFKC + casefold)")
    p.add_argument("--status", choices=["active", "archived", "merged", "all"], default=None,
                   help="which adapters (default: active and archived; merged = merged-away sources)")  # fmt: skip
    p.add_argument("--offset", type=int, default=0, help="skip this many (creation order)")
    p.add_argument("--limit", type=int, default=100, help="at most this many")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per adapter")


def _route_args(p: argparse.ArgumentParser) -> None:
    _lib_encoder(p)
    p.add_argument("query", metavar="QUERY", help="the query text")
    p.add_argument("--meta", action="append", help="metadata key=value (repeatable), e.g. domain=medical")
    p.add_argument("--strategy", choices=["semantic", "task_based", "hybrid", "hierarchical"])
    p.add_argument("-k", type=int, default=None, help="number of adapters (default: max_active_adapters)")


def _import_args(p: argparse.ArgumentParser) -> None:
    _lib_encoder(p)
    p.add_argument("directory", metavar="DIRECTORY",
                   help="PEFT directory (adapter_config.json + adapter_model.safetensors)")  # fmt: skip
    p.add_argument("--domain", action="append", help="domain tag (repeatable)")
    p.add_argument("--skill", action="append", help="skill tag (repeatable)")
    p.add_argument("--description", help="routing description")
    p.add_argument("--specialization", default="custom", choices=["domain", "skill", "task", "custom"])


def _export_args(p: argparse.ArgumentParser) -> None:
    _one_id(p)
    p.add_argument("directory", metavar="DIRECTORY", help="output PEFT directory (created)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing PEFT directory")


def _optimize_args(p: argparse.ArgumentParser) -> None:
    _lib_encoder(p)
    p.add_argument("--dry-run", action="store_true", help="report what would be merged/pruned, change nothing")


def _fsck_args(p: argparse.ArgumentParser) -> None:
    _lib(p)
    p.add_argument("--repair", action="store_true",
                   help="rebuild a missing/empty/unreadable catalog from the weight files' headers")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")


COMMANDS: tuple[Command, ...] = (
    Command("run", cmd_run, _run_args, passthrough=True),
    Command("stats", cmd_stats, _lib_encoder),
    Command("list", cmd_list, _list_args),
    Command("show", cmd_show, _one_id),
    Command("route", cmd_route, _route_args),
    Command("import", cmd_import, _import_args),
    Command("import-peft", cmd_import, _import_args),  # the 0.1 name of `import`
    Command("export", cmd_export, _export_args),
    Command("export-peft", cmd_export, _export_args),  # the 0.1 name of `export`
    Command("delete", cmd_delete, _ids),
    Command("archive", cmd_archive, _ids),
    Command("restore", cmd_restore, _ids),
    Command("compact", cmd_compact, _lib),
    Command("optimize", cmd_optimize, _optimize_args),
    Command("fsck", cmd_fsck, _fsck_args),
    Command("serve", cmd_serve, _serve_args),
    Command("migrate", cmd_migrate, _migrate_args),
)


def build_parser() -> argparse.ArgumentParser:
    """The parser: one sub-command per row of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="smoa", description="Sparse Mixtures of Adapters")
    parser.add_argument("--version", action="version", version=f"smoa {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        doc = (c.run.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(c.name, help=doc, description=doc, add_help=not c.passthrough)
        c.arguments(p)
        p.set_defaults(_run=c.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smoa`` console script; returns the exit status (2 on a smoa error)."""
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
