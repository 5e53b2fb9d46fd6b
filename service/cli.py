"""prune-serve: serve the packed models under PRUNE_SERVE_MODELS_DIR with uvicorn."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prune-serve", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--models-dir", help="overrides PRUNE_SERVE_MODELS_DIR")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    import uvicorn

    from service.app import create_app
    from service.registry import RegistryError, discover
    from service.settings import Settings

    try:
        settings = Settings(**({"models_dir": args.models_dir} if args.models_dir else {}))
        discover(settings.models_dir)  # fail before binding the port, with a message that says what to do
    except ValidationError as exc:
        print(f"prune-serve: error: invalid setting: {exc}", file=sys.stderr)
        return 2
    except RegistryError as exc:
        print(f"prune-serve: error: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s) or None,
        access_log=False,  # request logs carry no payloads; metrics carry the rest
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handlers it found; with
    # these in place a drained shutdown ends with exit status 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    # A model that fails to load aborts startup (lifespan error): uvicorn exits without serving.
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
