"""`python -m pipeline` (or `ctcflow-flow`): start the Prefect server, serve the scheduled
deployment, run the pipeline flow once, or run a sweep.

The server listens on 127.0.0.1 only. The other commands talk to the server named by
PREFECT_API_URL or, when that is unset, to one answering on 127.0.0.1:4200; `run` and `sweep`
without any server use a temporary one of Prefect's own (the run is then gone when they end).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from pipeline.dvc import stop_process_group

DEFAULT_PORT = 4200


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`train.epochs=2` → {"train.epochs": 2}; values are YAML, as in `dvc exp run -S`."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {pair!r}: expected section.param=value, e.g. train.epochs=2")
        overrides[key] = yaml.safe_load(value)
    return overrides


def find_server(required: bool) -> None:
    """Point Prefect at the local server unless PREFECT_API_URL already names one."""
    if os.environ.get("PREFECT_API_URL"):
        return
    url = f"http://127.0.0.1:{DEFAULT_PORT}/api"
    try:
        urllib.request.urlopen(f"{url}/health", timeout=1)
        os.environ["PREFECT_API_URL"] = url
    except OSError:
        if required:
            raise SystemExit(f"no Prefect server at {url}: start one with `make server` "
                             "(or `python -m pipeline server`), or set PREFECT_API_URL") from None
        print(f"no Prefect server at {url}: running against a temporary one", file=sys.stderr)


def exit_on_sigterm() -> None:
    """Let SIGTERM (a service manager's stop, `kill`) unwind this process as Ctrl-C does, so that
    `finally` blocks and atexit handlers stop what was started from here: our server, or Prefect's
    temporary one (stopped at exit). By default SIGTERM ends the process on the spot, and they ran on."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def start_server(port: int) -> int:
    print(f"Prefect UI: http://127.0.0.1:{port}  (export PREFECT_API_URL=http://127.0.0.1:{port}/api)")
    # This interpreter's prefect, so the command works without an activated virtualenv; in a
    # process group of its own, which stops as a whole when this process stops.
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], start_new_session=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        if server.poll() is None:
            stop_process_group(server)


def serve(project_dir: str, dask_address: str | None) -> None:
    from prefect.schedules import Cron

    from pipeline.config import load_flow_params
    from pipeline.flows import pipeline_flow

    params = load_flow_params(project_dir)
    pipeline_flow.serve(name=params.deployment, schedules=[Cron(params.cron, timezone=params.timezone)],
                        parameters={"project_dir": str(Path(project_dir).resolve()), "dask_address": dask_address})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    server = commands.add_parser("server", help="start a Prefect server and its UI on 127.0.0.1")
    server.add_argument("--port", type=int, default=DEFAULT_PORT)
    for name, help_text in [("serve", "serve the pipeline deployment on flow.cron (params.yaml) until stopped"),
                            ("run", "run the pipeline flow once (with --set: as a DVC experiment)"),
                            ("sweep", "run flow.sweep's grid as DVC experiments and rank them by test WER")]:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--project-dir", default=".", help="the DVC project (default: %(default)s)")
    for name in ("serve", "run", "sweep"):
        commands.choices[name].add_argument("--dask-address", metavar="tcp://HOST:PORT",
                                            help="featurize on the Dask cluster of this scheduler")
    commands.choices["run"].add_argument("--set", dest="overrides", action="append", default=[],
                                         metavar="SECTION.PARAM=VALUE", help="override a params.yaml value")
    commands.choices["run"].add_argument("--name", help="experiment name (with --set)")
    commands.choices["sweep"].add_argument("--apply-best", action="store_true",
                                           help="apply the best experiment to the workspace (dvc exp apply)")
    commands.choices["sweep"].add_argument("--branch", help="keep the best experiment as this git branch")
    args = parser.parse_args(argv)
    # Servers started from here (ours, or Prefect's temporary one) send no telemetry: this
    # machine may have no route out, and nobody asked for it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    exit_on_sigterm()

    if args.command == "server":
        sys.exit(start_server(args.port))
    find_server(required=args.command == "serve")
    if args.command == "serve":
        serve(args.project_dir, args.dask_address)
    elif args.command == "run":
        from pipeline.flows import pipeline_flow

        result = pipeline_flow(project_dir=args.project_dir, overrides=parse_overrides(args.overrides) or None,
                               experiment=args.name, dask_address=args.dask_address)
        print(json.dumps(result, indent=2))
    elif args.command == "sweep":
        from pipeline.flows import sweep_flow

        rows = sweep_flow(project_dir=args.project_dir, apply_best=args.apply_best, branch=args.branch,
                          dask_address=args.dask_address)
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
