"""`sdserve serve | worker | keys | plans | models`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from sdserve.settings import Settings


def _settings(args: argparse.Namespace, **extra) -> Settings:
    """Settings from the environment, then DATA/sdserve.env (re-read on every restart)."""
    overrides = {k: v for k, v in extra.items() if v is not None}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = Path(args.data_dir)
    env_file = Path(overrides.get("data_dir") or Settings().data_dir) / "sdserve.env"
    return Settings(_env_file=env_file if env_file.is_file() else None, **overrides)


def _reexec() -> None:
    """Replace this process with a fresh `sdserve` of the same arguments (same pid)."""
    logging.getLogger(__name__).info("restarting")
    os.execv(sys.executable, [sys.executable, "-m", "sdserve.cli", *sys.argv[1:]])


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sdserve.api.app import create_app

    settings = _settings(args, host=args.host, port=args.port, public_url=args.public_url)
    app = create_app(settings)
    _first_start_keys(settings, app.state.sdserve.keys)
    state = app.state.sdserve

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.shutting_down.set()  # requests waiting on a job answer `processing` now
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=10,
            # Longer than clients' and load balancers' idle timeouts (httpx 5 s, AWS ALB 60 s):
            # otherwise the server can close an idle connection just as a client sends a
            # request on it, and that request fails with a dropped connection.
            timeout_keep_alive=75,
        )
    )
    restart = threading.Event()

    def request_shutdown(then_restart: bool) -> None:
        if then_restart:
            restart.set()
        state.shutting_down.set()
        server.should_exit = True

    state.request_shutdown = request_shutdown
    server.run()
    if restart.is_set():
        _reexec()
    return 0


def _save_secret(path: Path, secret: str) -> None:
    """Write a key readable by its owner only (mode 0600, also when the file was there)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")
    os.chmod(path, 0o600)


def _first_start_keys(settings: Settings, keys) -> None:
    """Without SDSERVE_ADMIN_KEY: an admin key, once; with no keys at all: a first API key."""
    if settings.admin_key:
        return
    if not keys.has_admin_key():
        admin = keys.create_admin()
        if admin is not None:
            admin_file = settings.data_dir / "admin-key.txt"
            _save_secret(admin_file, admin)
            print(
                "Created the admin key (enterprise endpoints such as load_model; shown once, "
                f"saved in {admin_file}, mode 0600):\n{admin}",
                flush=True,
            )
    if keys.count() == 0:
        key = keys.create(label="first key")
        key_file = settings.data_dir / "first-key.txt"
        _save_secret(key_file, key)
        print(f"Created a first API key (shown once, saved in {key_file}):\n{key}", flush=True)


def cmd_worker(args: argparse.Namespace) -> int:
    from sdserve.api.app import build_state, build_worker, webhook_dispatcher

    settings = _settings(args)
    state = build_state(settings)
    stop = threading.Event()
    restart = threading.Event()
    # SIGTERM drains: the current batch finishes, no new one is claimed.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    webhooks = threading.Thread(
        target=webhook_dispatcher(state).run,
        args=(stop,),
        daemon=True,
    )
    webhooks.start()

    def on_restart() -> None:  # restart_server / update_server: drain, then start afresh
        restart.set()
        stop.set()

    worker = build_worker(state, on_restart=on_restart)
    worker.run(stop)
    webhooks.join(timeout=10)
    if restart.is_set():
        _reexec()
    return 0


def _keyring(args: argparse.Namespace):
    """The data dir's keys and plans, without loading the server (no torch: the CLI stays quick)."""
    from sdserve.jobs.keys import KeyRing
    from sdserve.jobs.store import JobStore

    settings = _settings(args)
    store = JobStore(settings.resolved_database_url)
    store.create_schema()
    return KeyRing(store, settings.admin_key, settings.queue_limit_per_key)


def cmd_keys(args: argparse.Namespace) -> int:
    keys = _keyring(args)
    if args.keys_command == "create":
        if args.plan and keys.plan(args.plan) is None:
            print(f"No such plan: {args.plan}", file=sys.stderr)
            return 1
        key = keys.create(label=args.label or "", queue_limit=args.queue_limit, plan=args.plan)
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


def cmd_plans(args: argparse.Namespace) -> int:
    keys = _keyring(args)
    if args.plans_command == "set":
        keys.set_plan(
            args.name,
            args.requests_per_month,
            args.queue_limit,
            args.included_models,
            args.self_service,
        )
    for plan in keys.plans():
        print(json.dumps(plan))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Models and whether each is ready, from the catalogue and the data dir (no torch: quick)."""
    from sdserve.engine.availability import list_models
    from sdserve.jobs.catalogue import ModelCatalogue
    from sdserve.jobs.store import JobStore

    settings = _settings(args)
    store = JobStore(settings.resolved_database_url)
    store.create_schema()
    for model in list_models(settings, ModelCatalogue(store)):
        print(f"{model['model_id']}\t{model['source']}\t{model['status']}\t{model['note']}")
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
    create.add_argument("--plan", help="a plan made with `sdserve plans set`")
    keys_sub.add_parser("list")
    revoke = keys_sub.add_parser("revoke")
    revoke.add_argument(
        "key", help="the key, or its 8-character prefix (an older key that starts with - : -- KEY)"
    )
    for p in (create, keys_sub.choices["list"], revoke):
        p.add_argument("--data-dir")
    keys.set_defaults(func=cmd_keys)

    plans = sub.add_parser("plans", help="manage plans (monthly quota, queue limit)")
    plans_sub = plans.add_subparsers(dest="plans_command", required=True)
    plan_set = plans_sub.add_parser("set", help="create or change a plan")
    plan_set.add_argument("name")
    plan_set.add_argument("--requests-per-month", type=int)
    plan_set.add_argument("--queue-limit", type=int)
    plan_set.add_argument("--included-models", type=int, default=0)
    plan_set.add_argument("--self-service", action="store_true", help="any key may buy it")
    for p in (plan_set, plans_sub.add_parser("list")):
        p.add_argument("--data-dir")
    plans.set_defaults(func=cmd_plans)

    models = sub.add_parser("models", help="list models and whether each is ready")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser(
        "list", help="id, source, status (ready | downloadable | unavailable), note"
    )
    listing.add_argument("--data-dir")
    models.set_defaults(func=cmd_models)
    return parser


class _DropTorchvisionFallback(logging.Filter):
    """transformers says, once per image-processor class, that it uses the PIL one because
    torchvision is not installed. sdserve needs no torchvision, so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


class _DropAlembicContext(logging.Filter):
    """alembic's two lines per start about the SQL dialect tell a user nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Context impl", "Will assume"))


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin
    logging.getLogger("alembic.runtime.migration").addFilter(_DropAlembicContext())
    # A logger's filters run before any handler, whichever imports it later: only this one
    # message is dropped, every other transformers warning and error still shows.
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallback())


def main(argv: list[str] | None = None) -> int:
    _configure_logging()
    args = build_parser().parse_args(argv)
    from sdserve.extras import MissingExtra

    try:
        return args.func(args)
    except MissingExtra as exc:  # a setting needs an optional package: one line, not a traceback
        print(f"sdserve: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
