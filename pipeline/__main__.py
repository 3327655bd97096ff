"""`python -m pipeline` (or `ctcflow-flow`): start the Prefect server, serve the scheduled
deployment, run the pipeline flow once, or run a sweep.

The server listens on 127.0.0.1 only. The other commands talk to the server named by
PREFECT_API_URL (from the environment or the active Prefect profile, as the prefect command reads
it) or, when that is unset, to one answering on 127.0.0.1:4200; `run` and `sweep` without any
server use a temporary one of Prefect's own (the run is then gone when they end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.dvc import stop_process_group

DEFAULT_PORT = 4200


def parse_overrides(pairs: list[str]) -> list[str]:
    """The --set texts, checked as `dvc exp run -S` parses them (Hydra's grammar) and passed on as
    they are: `train.init_from=null`, `train.blank_penalty={mode: soft_ratio, weight: 0.5}`."""
    from pipeline.flows import FlowError, parse_override

    keys: set[str] = set()
    for pair in pairs:
        key = parse_override(pair).key_or_group
        if key in keys:
            raise FlowError(f"--set {key}: given twice")
        keys.add(key)
    return pairs


def strict_json(value) -> str:
    """What run and sweep print: JSON any parser reads, a diverged run's NaN (or an infinity) as
    null (Python's json writes a bare NaN, which JSON has not and JavaScript or jq refuse)."""
    def finite(item):
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(inner) for key, inner in item.items()}
        if isinstance(item, list | tuple):
            return [finite(inner) for inner in item]
        return item
    return json.dumps(finite(value), indent=2, allow_nan=False)


def server_answers(url: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        return client.api_healthcheck() is None  # None, or the exception it met


def find_server(required: bool) -> str | None:
    """The Prefect API to use: PREFECT_API_URL as Prefect itself reads it (the environment, else the
    active profile; `prefect config view` shows it), which must answer; else the local server on
    DEFAULT_PORT when one answers; else None: Prefect's temporary server (refused if required)."""
    from prefect.settings import get_current_settings

    from pipeline.flows import FlowError

    if url := get_current_settings().api.url:
        if not server_answers(url):
            # The commonest slip: the UI's address, where the API's is that with /api.
            hint = "" if url.rstrip("/").endswith("/api") else f"; the API's URL ends in /api ({url.rstrip('/')}/api?)"
            raise FlowError(f"no Prefect server answers at PREFECT_API_URL = {url} (from the environment or "
                            f"the active Prefect profile): start it, or change or unset the setting{hint}")
        return url
    url = f"http://127.0.0.1:{DEFAULT_PORT}/api"
    if server_answers(url):
        return url
    if required:
        raise FlowError(f"no Prefect server at {url}: start one with `make server` "
                        "(or `python -m pipeline server`), or set PREFECT_API_URL")
    print(f"no Prefect server at {url}: running against a temporary one", file=sys.stderr)
    return None


def port(text: str) -> int:
    """argparse type: a TCP port number."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def program_name() -> str:
    """The name this was called by: `ctcflow-flow`, or `python -m pipeline`."""
    called = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m pipeline" if called in ("", "__main__.py", "-c") else called


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


def check_project(project_dir: str) -> None:
    """The project and its flow: section, checked before any server or flow starts."""
    from pipeline.config import load_flow_params
    from pipeline.flows import FlowError, check_dvc_yaml

    if not (Path(project_dir) / "params.yaml").is_file():
        raise FlowError(f"--project-dir {project_dir}: no params.yaml there; give the DVC project's root")
    load_flow_params(project_dir)  # a ParamsError names the bad key
    check_dvc_yaml(project_dir, f"--project-dir {project_dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=program_name(), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    server = commands.add_parser("server", help="start a Prefect server and its UI on 127.0.0.1")
    server.add_argument("--port", type=port, default=DEFAULT_PORT,
                        help="the port it listens on, on 127.0.0.1 (default: %(default)s)")
    for name, help_text in [("serve", "serve the pipeline deployment on flow.cron (params.yaml) until stopped"),
                            ("run", "run the pipeline flow once (with --set: as a DVC experiment)"),
                            ("sweep", "run flow.sweep's grid as DVC experiments and rank them by flow.sweep.rank_by")]:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--project-dir", default=".", help="the DVC project (default: %(default)s)")
    for name in ("serve", "run", "sweep"):
        commands.choices[name].add_argument("--dask-address", metavar="tcp://HOST:PORT",
                                            help="featurize on the Dask cluster of this scheduler (a runtime "
                                                 "knob: it is saved in no params file or experiment)")
    commands.choices["run"].add_argument("--set", dest="overrides", action="append", default=[],
                                         metavar="SECTION.PARAM=VALUE",
                                         help="override a params.yaml value, as `dvc exp run -S` takes it")
    commands.choices["run"].add_argument("--name", help="experiment name (with --set; default: from the overrides)")
    commands.choices["sweep"].add_argument("--apply-best", action="store_true",
                                           help="apply the best experiment to the workspace (dvc exp apply)")
    commands.choices["sweep"].add_argument("--branch", help="keep the best experiment as this git branch")
    args = parser.parse_args(argv)
    if args.command == "run" and args.name is not None and not args.overrides:
        commands.choices["run"].error("--name names the experiment that --set makes; without --set there is none")
    # Servers started from here (ours, or Prefect's temporary one) send no telemetry: this
    # machine may have no route out, and nobody asked for it.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    exit_on_sigterm()

    if args.command == "server":
        sys.exit(start_server(args.port))
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ctcflow.params import ParamsError
    from pipeline.dvc import DvcFailed
    from pipeline.config import load_flow_params
    from pipeline.flows import (FlowError, SweepPointsFailed, check_branch, check_experiment_name, check_sweep,
                                expected_params)

    prefix = f"{parser.prog} {args.command}: error:"
    try:
        # Mistakes found now cost nothing: no server is looked for and no stage runs.
        check_project(args.project_dir)
        overrides = parse_overrides(args.overrides) if args.command == "run" else []
        if overrides:
            expected_params(args.project_dir, overrides)  # a key DVC would refuse
        if args.command == "run" and args.name is not None:
            check_experiment_name(args.name)
        if args.command == "sweep" and args.branch:
            check_branch(args.project_dir, args.branch)
        if args.command == "sweep":
            check_sweep(args.project_dir, load_flow_params(args.project_dir).sweep)  # a grid key DVC would refuse
        url = find_server(required=args.command == "serve")
        with temporary_settings(updates={PREFECT_API_URL: url} if url else {}):
            run_command(args, overrides)
    except (ParamsError, FlowError, DvcFailed) as err:
        sys.exit(f"{prefix} {err}")
    except KeyboardInterrupt:
        # Ctrl-C: the dvc command and the stage under it are stopped by now (run_dvc); the
        # traceback of where this process was waiting tells nothing.
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except SweepPointsFailed as err:
        print(strict_json(err.rows))
        sys.exit(f"{prefix} {err}")


def run_command(args: argparse.Namespace, overrides: list[str]) -> None:
    if args.command == "serve":
        serve(args.project_dir, args.dask_address)
    elif args.command == "run":
        from pipeline.flows import pipeline_flow

        result = pipeline_flow(project_dir=args.project_dir, overrides=overrides or None,
                               experiment=args.name, dask_address=args.dask_address)
        print(strict_json(result))
    elif args.command == "sweep":
        from pipeline.flows import sweep_flow

        rows = sweep_flow(project_dir=args.project_dir, apply_best=args.apply_best, branch=args.branch,
                          dask_address=args.dask_address)
        print(strict_json(rows))


if __name__ == "__main__":
    main()
