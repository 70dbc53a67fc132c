"""`smoa serve`: start the HTTP server (uvicorn) on a library; SIGTERM drains before exiting.

::

    smoa serve --library PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--admin-key KEY]
               [--model DIR] [--max-batch N] [--max-queue N] [--create]

Keys also come from ``SMOA_API_KEY`` (several, comma-separated) and ``SMOA_ADMIN_KEY``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from types import FrameType
from typing import Any

__all__ = ["add_arguments", "config_from_args", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``smoa serve``."""
    p.add_argument("--library", required=True, help="library directory (refused if it holds none, unless --create)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=None, help="inference key(s), comma-separated (or SMOA_API_KEY)")
    p.add_argument("--admin-key", default=None, help="management key(s), comma-separated (or SMOA_ADMIN_KEY)")
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--max-batch", type=int, default=16, help="running sequences per decode step (default 16)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting sequences before 429 (default 256)")
    p.add_argument("--per-client-cap", type=int, default=0,
                   help="running sequences per API key (or client address) at most (default: half of --max-batch)")
    p.add_argument("--create", action="store_true", help="create a new library at --library if none is there")
    p.add_argument("--model-name", default=None, help="served name of the base model (default: the model's)")
    p.add_argument("--encoder", default=None, help="routing encoder (default: the library's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--device", default=None, help="model device, e.g. cpu or cuda (default: the library's)")
    p.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens accepted (default 2048)")
    p.add_argument("--max-body-bytes", type=int, default=1024 * 1024, help="JSON body cap (default 1 MiB)")
    p.add_argument("--max-upload-bytes", type=int, default=256 * 1024 * 1024, help="upload cap (default 256 MiB)")
    p.add_argument("--cache-bytes", type=int, default=None, help="weight cache budget (SMoAConfig.cache_max_bytes)")
    p.add_argument("--no-freeze-gc", dest="freeze_gc", action="store_false",
                   help="keep the loaded objects in Python's full garbage collections (default: frozen once loaded)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--ray", action="store_true", help="serve through Ray Serve: an affinity ingress + model replicas")
    p.add_argument("--replicas", type=int, default=2, help="model replicas with --ray (default 2)")
    p.add_argument("--weights-path", default=None, help="with --ray and a postgresql:// --library: s3://bucket/prefix")


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~smoa.serve.ServeConfig` of parsed flags (keys from the environment when not given)."""
    from smoa.serve.config import ServeConfig, keys_from_env

    overrides = {} if args.cache_bytes is None else {"cache_max_bytes": args.cache_bytes}
    return ServeConfig(
        library=args.library, create=args.create, model_dir=args.model, model_name=args.model_name,
        host=args.host, port=args.port, api_keys=keys_from_env(args.api_key, "SMOA_API_KEY"),
        admin_keys=keys_from_env(args.admin_key, "SMOA_ADMIN_KEY"), max_batch=args.max_batch,
        max_queue=args.max_queue, per_client_cap=args.per_client_cap, max_tokens_cap=args.max_tokens, max_body_bytes=args.max_body_bytes,
        max_upload_bytes=args.max_upload_bytes, dtype=args.dtype, device=args.device, encoder=args.encoder,
        smoa_overrides=overrides, freeze_gc=getattr(args, "freeze_gc", True),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Start the server; returns the exit code (2: the library path holds no library and no --create)."""
    import uvicorn

    from smoa.serve.app import build_app
    from smoa.serve.serving import SmoaServing, library_exists

    config = config_from_args(args)
    shared = bool(getattr(args, "ray", False)) and str(args.library).startswith(("postgresql://", "postgres://"))
    if not shared and not library_exists(config.library) and not config.create:
        print(f"smoa: error: --library {str(config.library)!r} holds no smoa library; pass --create to create one",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.ray:
        from smoa.serve.ray import RayOptions, run_ray, shared_library_config

        if shared:
            config = shared_library_config(config, args.library, args.weights_path)
        run_ray(config, RayOptions(replicas=args.replicas), host=config.host, port=config.port)
        return 0
    serving = SmoaServing(config)
    app = build_app(config, serving)
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=int(config.drain_timeout_s) + 5), serving)
    server.run()
    return 0


class DrainingServer:
    """A uvicorn server whose first SIGTERM/SIGINT drains: new requests get 503, in-flight ones finish, then exit."""

    def __new__(cls, config: Any, serving: Any) -> Any:
        import uvicorn

        class _Server(uvicorn.Server):
            draining = False

            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                if self.draining:  # a second signal: stop now
                    super().handle_exit(sig, frame)
                    return
                self.draining = True
                serving.begin_drain()
                threading.Thread(target=self._drain_then_exit, daemon=True).start()

            def _drain_then_exit(self) -> None:
                serving.wait_drained(serving.config.drain_timeout_s)
                time.sleep(0.2)  # let the last responses reach their clients
                self.should_exit = True

        return _Server(config)


