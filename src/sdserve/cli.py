"""`sdserve serve | worker | keys | models`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from sdserve.settings import Settings


def _settings(args: argparse.Namespace, **extra) -> Settings:
    overrides = {k: v for k, v in extra.items() if v is not None}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sdserve.api.app import create_app

    settings = _settings(args, host=args.host, port=args.port, public_url=args.public_url)
    app = create_app(settings)
    keys = app.state.sdserve.keys
    if not settings.admin_key and keys.count() == 0:
        key = keys.create(label="first key")
        key_file = settings.data_dir / "first-key.txt"
        key_file.write_text(key + "\n")
        print(f"Created a first API key (also saved in {key_file}):\n{key}", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from sdserve.api.app import build_state
    from sdserve.engine.images import ImageEngine
    from sdserve.jobs.webhooks import WebhookDispatcher
    from sdserve.jobs.worker import Worker

    settings = _settings(args)
    state = build_state(settings)
    stop = threading.Event()
    # SIGTERM drains: the current batch finishes, no new one is claimed.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    webhooks = threading.Thread(
        target=WebhookDispatcher(settings, state.store).run, args=(stop,), daemon=True
    )
    webhooks.start()
    worker = Worker(settings, state.store, ImageEngine(settings, state.registry), state.storage)
    worker.run(stop)
    webhooks.join(timeout=10)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from sdserve.api.app import build_state

    keys = build_state(_settings(args)).keys
    if args.keys_command == "create":
        key = keys.create(label=args.label or "", queue_limit=args.queue_limit)
        print("Created API key (shown once, store it now):")
        print(key)
    elif args.keys_command == "list":
        for row in keys.list():
            print(json.dumps(row))
    elif args.keys_command == "revoke":
        if not keys.revoke(args.key):
            print("No such active key", file=sys.stderr)
            return 1
        print("Revoked")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from sdserve.engine.registry import ModelRegistry

    for model in ModelRegistry(_settings(args)).list_models():
        print(f"{model['model_id']}\t{model['source']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API with an in-process worker")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data-dir")
    serve.add_argument("--public-url")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run an extra worker on the same job store")
    worker.add_argument("--data-dir")
    worker.set_defaults(func=cmd_worker)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create")
    create.add_argument("--label")
    create.add_argument("--queue-limit", type=int)
    keys_sub.add_parser("list")
    revoke = keys_sub.add_parser("revoke")
    revoke.add_argument("key", help="the key, or its 8-character prefix")
    for p in (create, keys_sub.choices["list"], revoke):
        p.add_argument("--data-dir")
    keys.set_defaults(func=cmd_keys)

    models = sub.add_parser("models", help="list models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list")
    listing.add_argument("--data-dir")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
