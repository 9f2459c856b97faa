"""``pacs-ai serve`` (listener + worker + deliveries) and ``pacs-ai worker`` (worker only, e.g. GPU hosts)."""

from __future__ import annotations

import argparse
import dataclasses

from pacs_ai.cli.common import add_config_argument, config_from_args
from pacs_ai.cli.config_check import config_problems
from pacs_ai.config import Config
from pacs_ai.errors import ConfigError
from pacs_ai.ops.logging_setup import configure_logging


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the daemon in the foreground: DICOM listener, worker and result delivery",
        description="Run the daemon in the foreground. Without --config it uses the embedded defaults: "
        "AE PACSAI on 127.0.0.1:11112, SQLite and spool under ./pacs-ai-data, the bundled model.",
    )
    add_config_argument(serve)
    serve.add_argument("--port", type=int, help="override [listener] port")
    serve.add_argument("--no-worker", action="store_true", help="do not run the worker here")
    serve.set_defaults(func=run_serve)

    worker = subparsers.add_parser(
        "worker",
        help="run only the worker (no listener): claims jobs from the shared job store",
        description="Run a worker without a listener, for scale-out on a shared database and spool.",
    )
    add_config_argument(worker)
    worker.add_argument("--deliver", action="store_true", help="also deliver results from this process")
    worker.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # started by `serve`
    worker.set_defaults(func=run_worker)


def require_model_folders(config: Config) -> None:
    """Refuse to start a worker whose model folders cannot load (checked without importing torch).

    Without this the daemon would acknowledge images that no worker can ever classify, while its worker
    child restarts in a loop. Raises ConfigError naming the first missing ``model.path`` or
    ``model.shadow`` entry (the same check as ``pacs-ai config check``'s warnings).
    """
    for key, problem in config_problems(config):
        if key.startswith("model."):
            raise ConfigError(key, problem)


def run_serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.port:
        config = dataclasses.replace(config, listener=dataclasses.replace(config.listener, port=args.port))
    configure_logging(config.logging)
    work = config.worker.enabled and not args.no_worker
    if work:
        require_model_folders(config)
    separate = config.worker.separate_process
    child = None
    if work and separate:
        # Start the worker child before this process imports the listener's libraries: the child's start-up
        # (torch, the model, the warm-up) is the longest, and it runs on the other core meanwhile.
        from pacs_ai.daemon.wakeup import Doorbell
        from pacs_ai.daemon.worker_process import WorkerProcess

        child = WorkerProcess(config.source, niceness=config.worker.niceness, doorbells=(Doorbell(), Doorbell()))
        child.start()
    from pacs_ai.daemon.service import Roles, Service

    roles = Roles(listener=True, worker=work and not separate, deliveries=True, worker_process=work and separate)
    return Service(config, roles, worker_process=child).run_forever()


def run_worker(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    require_model_folders(config)
    if args.child:  # the parent `serve` serves the metrics, talks to systemd and needs a core to listen
        config = dataclasses.replace(config, metrics=dataclasses.replace(config.metrics, enabled=False))
    configure_logging(config.logging)
    from pacs_ai.daemon.service import Roles, Service

    roles = Roles(listener=False, worker=True, deliveries=args.deliver, beside_listener=bool(args.child))
    return Service(config, roles).run_forever()
