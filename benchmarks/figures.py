"""The speed and memory figures, measured side by side in one run on this machine (record `figures`).

    python -m benchmarks.figures [--tasks 3] [--rounds 30]

Needs the default pipeline's artifacts (`make run`). Prints, and writes as the result record
benchmarks/records/figures.json (docs/results.md, `python -m benchmarks.results`):

1. XMA2 training step time / plain fine-tuning step time (target <= 1.3; see step_ratio.py);
2. PE ranking on one mini-batch / one training epoch, on the first task of params.yaml;
3. for k = 1..K, the time to add one more task (a copy of the first task's spec) with
   `xbar add-task` -- Prefect flow, DVC stages, MLflow, gate -- in a scratch copy of this
   workspace (this one is not touched), against a Prefect server that is already up (as for
   a run triggered from the UI): the new-task flow's wall time, the stages' own time, the
   orchestration share of the flow (everything but the stages' own work, MLflow included;
   target <= 10%) and its parts (MLflow; DVC between the stages: after each one it re-writes
   dvc.lock, hashes and caches the outputs; the rest: DVC's start-up, its check of the upstream
   stages and its exit, and Prefect), the same share for the whole `xbar add-task` process (its
   Python start and Prefect client included), and the peak memory of train_masks. The time must
   stay flat in k: no earlier task is retrained.

A stage's own time is its process's wall time, interpreter and imports included, minus the
time it spent in MLflow: benchmarks/stage_probe/ (on the stages' PYTHONPATH) measures both, and
the peak memory, from outside the stages. The flow's wall time is the one Prefect records.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from benchmarks.records import save_record
from benchmarks.step_ratio import step_times
from workflow.io import BACKBONE, load_torch
from xbar.data import load_task_data
from xbar.methods import backbone_net, build_task_model, crossbar_spec, deploy_cells, train_task
from xbar.params import Params, load_params
from xbar.ranking import rank_batch, rank_pes
from xbar.training import seed_everything

WORKSPACE_STATE = ("artifacts", "metrics", "dvc.lock", ".dvc/cache")  # what `make run` left, besides git's files
PROBE = Path(__file__).resolve().parent / "stage_probe"  # its sitecustomize.py logs each stage process's figures
PROBE_LOG_ENV = "XBAR_BENCH_LOG"  # the file it appends them to


def ranking_vs_epoch(params: Params) -> tuple[float, float]:
    """Seconds of PE ranking (one mini-batch) and of one XMA2 training epoch on the first task."""
    spec = next(iter(params.tasks.values()))
    data = load_task_data(spec.dataset, params.seed)
    quant, levels = load_torch(BACKBONE / "quant.pt"), load_torch(BACKBONE / "levels.pt")
    seed_everything(params.seed, params.train.threads)
    net = backbone_net(params, quant)
    deploy_cells(net, levels, crossbar_spec(params))
    start = time.perf_counter()
    images, labels = rank_batch(data.train, spec.rank_batch_size, params.seed)
    table, _ = rank_pes(net, images, labels, data.num_classes, spec.spare_ratio)
    ranking = time.perf_counter() - start
    one_epoch = spec.model_copy(update={"epochs": 1, "method": "xma2"})
    model = build_task_model(params, one_epoch, quant, levels, data.num_classes,
                             spare_pes=table.filter("selected")["pe"].to_list())
    start = time.perf_counter()
    train_task(model, data.train, one_epoch, params.train, params.seed, "one epoch")
    return ranking, time.perf_counter() - start


def scratch_workspace(dest: Path) -> None:
    """A git + DVC copy of this workspace after `make run` (tracked files and the pipeline's outputs)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if Path(name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(name, dest / name)
    for name in WORKSPACE_STATE:
        if Path(name).is_dir():
            shutil.copytree(name, dest / name)
        elif Path(name).is_file():
            shutil.copy2(name, dest / name)
    git = ["git", "-c", "user.name=xbar", "-c", "user.email=xbar@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "scratch copy for benchmarks"]):
        subprocess.run(git + cmd, cwd=dest, check=True)


def prefect_server(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on 127.0.0.1 (a free port), its home in `root`; returns (process, API URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, process_group=0)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300  # the first start migrates a fresh database
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return proc, url
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)
    sys.exit("error: the benchmark's Prefect server did not start")


def add_task(root: Path, name: str, params: Params, env: dict[str, str]) -> float:
    """Wall seconds of `xbar add-task NAME` (the first task's spec) in `root`."""
    spec = next(iter(params.tasks.values()))
    cmd = [sys.executable, "-m", "xbar.cli", "add-task", name, "--dataset", spec.dataset.source,
           "--method", spec.method, "--epochs", str(spec.epochs), "--spare-ratio", str(spec.spare_ratio),
           "--shift-levels", str(spec.shift_levels)]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"error: `xbar add-task {name}` failed in the scratch workspace: "
                 f"{(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return seconds


def probed(env: dict[str, str], log: Path) -> dict[str, str]:
    """`env` with the stage probe first on PYTHONPATH, logging to `log`."""
    path = os.pathsep.join(filter(None, [str(PROBE), env.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": path, PROBE_LOG_ENV: str(log)}


def flow_seconds(api_url: str, task: str) -> float:
    """The wall time Prefect recorded for the flow run that added `task` (flow run name `add <task>`)."""
    query = {"flow_runs": {"name": {"any_": [f"add {task}"]}}, "sort": "START_TIME_DESC", "limit": 1}
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=json.dumps(query).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        runs = json.load(answer)
    if not runs or runs[0]["total_run_time"] <= 0:
        sys.exit(f"error: the Prefect server has no finished flow run `add {task}`")
    return float(runs[0]["total_run_time"])


def add_tasks(params: Params, k_max: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="xbar-bench-") as tmp:
        root = Path(tmp)
        scratch_workspace(root)
        env = {**os.environ, "PREFECT_HOME": str(root / ".prefect"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        subprocess.run([sys.executable, "-c", "from workflow.tracking import Tracker; Tracker()"], cwd=root, env=env,
                       check=True)  # the MLflow store exists already in a used workspace
        server, env["PREFECT_API_URL"] = prefect_server(root, env)
        rows = []
        try:
            print(f"3. adding tasks (spec of {next(iter(params.tasks))!r}) after the {len(params.tasks)} of "
                  "params.yaml, Prefect server already up:")
            for k in range(1, k_max + 1):
                log = root / f"stages-{k}.jsonl"
                wall = add_task(root, f"bench{k}", params, probed(env, log))
                flow = flow_seconds(env["PREFECT_API_URL"], f"bench{k}")
                stages = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda s: s["ended"])
                mlflow = sum(s["mlflow_seconds"] for s in stages)
                own = sum(s["seconds"] for s in stages) - mlflow
                span = stages[-1]["ended"] - (stages[0]["ended"] - stages[0]["seconds"])  # first start to last end
                between = span - sum(s["seconds"] for s in stages)  # DVC, while no stage runs
                rest = flow - own - mlflow - between
                peak = max(s["peak_rss_mb"] for s in stages if s["stage"] == "train_masks")
                per_stage = ", ".join(f"{s['stage']} {s['seconds']:.1f}" for s in stages)
                print(f"   k={k}: flow {flow:.1f} s, stages' own work {own:.1f} s ({per_stage}): orchestration "
                      f"share {(flow - own) / flow:.1%} of the flow (target <= 10%; MLflow {mlflow:.1f} s, DVC "
                      f"between the stages {between:.1f} s, DVC start-up and exit and Prefect {rest:.1f} s), "
                      f"{(wall - own) / wall:.1%} of the whole `xbar add-task` ({wall:.1f} s); "
                      f"train_masks peak memory {peak:.0f} MB")
                rows.append({"figure": f"add task k={k}: new-task flow (s)", "value": round(flow, 1)})
                rows.append({"figure": f"add task k={k}: orchestration share of the flow",
                             "value": round((flow - own) / flow, 4)})
                rows.append({"figure": f"add task k={k}: train_masks peak memory (MB)", "value": round(peak)})
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tasks", type=int, default=3, help="K: tasks added one after another")
    parser.add_argument("--rounds", type=int, default=30, help="training steps timed per model")
    args = parser.parse_args()
    params = load_params(Path(args.params))
    if not (BACKBONE / "levels.pt").exists() or not Path("dvc.lock").exists():
        sys.exit("error: artifacts/backbone/levels.pt or dvc.lock missing: run the pipeline first (make run)")

    plain, xma2, n_spare = step_times(params, args.rounds)
    print(f"1. training step, batch {params.train.batch_size}, {torch.get_num_threads()} threads: "
          f"plain {plain * 1e3:.1f} ms, xma2 ({n_spare} spare PEs) {xma2 * 1e3:.1f} ms, "
          f"ratio {xma2 / plain:.2f} (target <= 1.3)")
    ranking, epoch = ranking_vs_epoch(params)
    print(f"2. PE ranking {ranking:.2f} s / one training epoch {epoch:.1f} s = {ranking / epoch:.3f}")
    rows = [{"figure": f"XMA2 step / plain fine-tuning step (batch {params.train.batch_size}, "
                       f"{torch.get_num_threads()} threads)", "value": round(xma2 / plain, 3)},
            {"figure": "PE ranking (one mini-batch) / one training epoch", "value": round(ranking / epoch, 4)}]
    rows += add_tasks(params, args.tasks)
    save_record("figures", title="Speed and memory", recipe=params.train.recipe, seeds=[params.seed], rows=rows,
                notes=f"On {os.cpu_count()} CPU cores; timings depend on the machine and its load.")


if __name__ == "__main__":
    main()
