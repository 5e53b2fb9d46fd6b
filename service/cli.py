"""prune-serve: serve the packed models under PRUNE_SERVE_MODELS_DIR with uvicorn."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pydantic import ValidationError

from service.settings import Settings


def settings_help() -> str:
    """Every setting with its environment variable and default, for --help."""
    lines = ["settings (environment variables; defaults in brackets):"]
    for name, info in Settings.model_fields.items():
        default = info.default if info.default_factory is None else info.default_factory()
        lines.append(f"  PRUNE_SERVE_{name.upper():<28} [{default}]  {info.description or ''}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    from packer import __version__

    p = argparse.ArgumentParser(
        prog="prune-serve",
        description="Serve the packed models under PRUNE_SERVE_MODELS_DIR (a directory per model) over HTTP. "
        "`prune-serve doctor [ARTIFACT ...]` checks what this machine can run instead.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s, this machine only; 0.0.0.0 for every interface)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--models-dir", help="overrides PRUNE_SERVE_MODELS_DIR")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default: %(default)s)",
    )
    p.add_argument("--version", action="version", version=f"prune-serve {__version__}")
    return p


def configure_logging(level: str, access_log: bool) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("prune_serve.access")
    access.propagate = False
    if access_log:  # JSON lines on stdout, one per request, no payloads
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        from service.doctor import main as doctor

        return doctor(argv[1:])
    args = parser().parse_args(argv)

    try:
        settings = Settings(**({"models_dir": args.models_dir} if args.models_dir else {}))
    except ValidationError as exc:
        print(f"prune-serve: error: invalid setting: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, settings.access_log)

    import uvicorn

    from service.app import create_app
    from service.connections import configure, raise_descriptor_limit
    from service.registry import RegistryError, discover

    try:
        discover(settings.models_dir)  # fail before binding the port, with a message that says what to do
    except RegistryError as exc:
        print(f"prune-serve: error: {exc}", file=sys.stderr)
        return 2
    descriptors = raise_descriptor_limit()
    if settings.max_connections + 64 > descriptors:
        logging.getLogger("prune_serve").warning(
            "PRUNE_SERVE_MAX_CONNECTIONS %d is near the open-files limit %d; lower it or raise the limit",
            settings.max_connections,
            descriptors,
        )
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        http=configure(settings.read_timeout_s),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=int(settings.keep_alive_s) or 1,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s) or None,
        access_log=False,  # our own access log (PRUNE_SERVE_ACCESS_LOG) is JSON and carries the request id
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handlers it found; with
    # these in place a drained shutdown ends with exit status 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    # No model at all could be loaded (lifespan error): uvicorn exits without serving.
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
