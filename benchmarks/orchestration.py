"""Benchmark: what the Prefect flow adds over plain `dvc repro` on an up-to-date pipeline.

Runs, in the same session and alternating so machine noise hits both alike:
  - `dvc repro` with nothing to do (the floor),
  - the pipeline flow with nothing to do, against a Prefect server already running on loopback
    (the served-deployment case; the server is started once, before timing).
Prints medians, the ratio and the difference, and writes them to benchmarks/results/orchestration.json.

Usage: python benchmarks/orchestration.py [--project-dir .] [--repeats 5] [--quick]
The project must be up to date first (`make demo`, or any project after `dvc repro`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "orchestration.json"


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(env: dict) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", env["PREFECT_API_URL"].split(":")[-1].split("/")[0]],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(180):
        try:
            urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    server.terminate()
    raise SystemExit("the Prefect server did not answer within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project-dir", type=Path, default=Path("."))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 repeat: a smoke test, figures are noise")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/orchestration.json; "
                                                    "--quick: benchmarks/results/quick/orchestration.json)")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    out = Path(args.out) if args.out else RESULTS.parent / "quick" / RESULTS.name if args.quick else RESULTS
    project = args.project_dir.resolve()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": tempfile.mkdtemp(prefix="prefect-bench-"),
           "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    # dvc.yaml alone, as `dvc repro` reads it (the FSDD recipe's is never up to date without FSDD).
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], cwd=project, env=env,
                            capture_output=True, text=True)
    if status.returncode != 0 or json.loads(status.stdout or "{}"):
        raise SystemExit(f"{project}: the pipeline is not up to date; run `dvc repro` (or `make demo`) first")

    server = start_server(env)
    try:
        flow_cmd = [sys.executable, "-m", "pipeline", "run", "--project-dir", str(project)]
        timed(flow_cmd, project, env)  # warm-up: imports, the flow's first registration
        repro, flow = [], []
        for _ in range(args.repeats):
            repro.append(timed([sys.executable, "-m", "dvc", "repro"], project, env))
            flow.append(timed(flow_cmd, project, env))
    finally:
        server.terminate()
        server.wait(30)

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "repeats": args.repeats,
        "dvc_repro_noop_s": round(statistics.median(repro), 2),
        "flow_noop_s": round(statistics.median(flow), 2),
    }
    result["flow_over_repro_ratio"] = round(result["flow_noop_s"] / result["dvc_repro_noop_s"], 2)
    result["flow_extra_s"] = round(result["flow_noop_s"] - result["dvc_repro_noop_s"], 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
