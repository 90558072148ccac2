"""The data side at scale: what a user runs on a Kinetics-layout set of N videos, timed, for N = 10^3, 10^4, 10^5.

Per N, in a temporary folder: N tiny real videos (H.264, 64x48, 20 frames, a moving square: each one different) in
the Kinetics layout, its train CSV listing 1% more videos than there are (public copies miss some: the split's
coverage shows it); a git + DVC project holding the data stages of dvc.yaml (check, split, the cache slices); moto
as S3 on loopback. Then, as a user would, each timed:

  pack           `action3d data pack RAW data/kinetics` (the README's route for large sets: videos in tar files)
  add            `dvc add data/kinetics`
  split          `dvc repro split@pretrain` (parse, probe every video, fingerprint, slice lists)
  cache          `dvc repro` of the cache slices (decode, scale, JPEG, shards)
  status         a no-op `dvc status`
  push           `dvc push` to S3 of the cache alone, then of the rest (the raw tars, the manifests)
  push_noop      a no-op `dvc push`
  transfer       boto3's transfer manager uploading the cache's files to another prefix (the yardstick for push)
  pull           `git clone` + `dvc pull` into a fresh clone

with the peak memory of each command's process tree (sampled), the files DVC tracks for the raw set and the cache,
and the data stages' cost per video. `--routes folder` also times the plain folder route (`dvc add` of the videos
as files, one DVC object each) for comparison. JSON in benchmarks/results/scale.json, a log-log plot beside it;
docs/performance.md quotes both.

    python benchmarks/scale.py                         # N = 1000, 10000, 100000 (about an hour on 2 cores)
    python benchmarks/scale.py --sizes 1000 --routes packed folder
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
CLASSES = 10
FRAMES = 20


def cpu_kind() -> str:
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
            f.seek(0)
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        model = platform.processor()
    kind = "AVX512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    return f"{model}, {kind}, {os.cpu_count()} cores"


# --- the data ------------------------------------------------------------------------------------------------------


def _video(job: tuple[str, int]) -> None:
    from action3d.data.video import write_video

    path, seed = job
    rng = np.random.default_rng(seed)
    colour, start, step = rng.integers(40, 255, 3), rng.integers(0, 40, 2), rng.integers(1, 4, 2)
    frames = []
    for t in range(FRAMES):
        frame = np.full((48, 64, 3), 16, np.uint8)
        y, x = (start + step * t) % np.array([32, 48])
        frame[y:y + 16, x:x + 16] = colour
        frames.append(frame)
    write_video(Path(path), frames, fps=25, crf=30)


def make_set(raw: Path, n: int) -> None:
    """N videos in the Kinetics layout; the train CSV lists 1% more that are not there."""
    rows, jobs = [], []
    listed = n + n // 100
    for i in range(listed):
        label = f"class_{i % CLASSES:02d}"
        key = f"vid{i:07d}"
        rows.append(f"{label},{key},0,10,train")
        if i < n:
            jobs.append((str(raw / "train" / label / f"{key}_000000_000010.mp4"), i))
    for label in {f"class_{c:02d}" for c in range(CLASSES)}:
        (raw / "train" / label).mkdir(parents=True, exist_ok=True)
    (raw / "kinetics_train.csv").write_text("label,youtube_id,time_start,time_end,split\n" + "\n".join(rows) + "\n")
    with concurrent.futures.ProcessPoolExecutor() as pool:
        list(pool.map(_video, jobs, chunksize=64))


def make_project(folder: Path, data: str, slices: int, shard_mb: float) -> None:
    """A git + DVC project with dvc.yaml's data stages, reading data.pretrain from `data`."""
    folder.mkdir(parents=True)
    shutil.copytree(ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in (".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, folder / name)
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline["stages"] = {k: v for k, v in pipeline["stages"].items() if k in ("check", "split", "cache")}
    pipeline["stages"]["split"]["foreach"] = {"pretrain": "${data.pretrain}"}  # the large set's stages alone
    pipeline["stages"]["cache"]["matrix"]["role"] = ["pretrain"]
    (folder / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] = {role: {"path": data, "layout": "kinetics"} for role in ("pretrain", "finetune")}
    params["synth"]["sets"] = {}
    params["cache"].update(short_side=48, slices=list(range(slices)), shard_mb=shard_mb)
    params["split"].update(min_frames=FRAMES)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "bench@example.com"],
                 ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"],
                 ["dvc", "config", "core.analytics", "false"], ["git", "add", "-A"],
                 ["git", "commit", "-qm", "project"]):
        subprocess.run(argv, cwd=folder, check=True, capture_output=True, env=ENV)


# --- timing --------------------------------------------------------------------------------------------------------


def timed(argv: list[str], cwd: Path) -> dict:
    """Run a command; its wall seconds and the peak resident memory of its whole process tree (sampled)."""
    import psutil

    start = time.perf_counter()
    process = subprocess.Popen([str(a) for a in argv], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(process.pid)
        while not stop.wait(0.2):
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                continue
            peak[0] = max(peak[0], total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed in {cwd}:\n{output[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_mb": round(peak[0] / 2**20, 1), "output": output}


def tracked_files(project: Path, dvc_file: str | None = None) -> dict:
    """Files DVC tracks: of a .dvc file's output, and of the cache stages' outputs (dvc.lock)."""
    found = {}
    if dvc_file:
        outs = yaml.safe_load((project / dvc_file).read_text())["outs"]
        found["raw"] = sum(o.get("nfiles", 1) for o in outs)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    found["cache"] = sum(o.get("nfiles", 1) for name, spec in lock.items() if name.startswith("cache@")
                         for o in spec["outs"])
    return found


def moto(port: int, log: Path) -> subprocess.Popen:
    import urllib.request

    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=ENV,
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer: {log.read_text()[-2000:]}")


def run_size(n: int, route: str, work: Path, port: int, slices: int, shard_mb: float) -> dict:
    from action3d.storage import S3Config, upload

    raw = work / "raw"
    if not raw.exists():
        t0 = time.perf_counter()
        make_set(raw, n)
        print(f"  {n} videos written in {time.perf_counter() - t0:.0f} s", flush=True)
    project = work / f"project-{route}"
    shutil.rmtree(project, ignore_errors=True)
    make_project(project, "data/kinetics", slices, shard_mb)
    steps: dict[str, dict] = {}
    if route == "packed":
        steps["pack"] = timed([BIN / "action3d", "data", "pack", raw, project / "data/kinetics", "--shard-mb",
                               shard_mb], project)
    else:
        shutil.copytree(raw, project / "data/kinetics")
    steps["add"] = timed([BIN / "dvc", "add", "data/kinetics"], project)
    steps["split"] = timed([BIN / "dvc", "repro", "split@pretrain"], project)
    steps["cache"] = timed([BIN / "dvc", "repro", *[f"cache@pretrain-{k}" for k in range(slices)]], project)
    steps["status"] = timed([BIN / "dvc", "status"], project)
    bucket = f"bench-{n}-{route}"
    import boto3

    config = S3Config.from_env()
    boto3.client("s3", endpoint_url=ENV["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=bucket)
    subprocess.run([BIN / "action3d", "remote", "setup", f"s3://{bucket}/dvc"], cwd=project, env=ENV, check=True,
                   capture_output=True)
    subprocess.run(["git", "add", "-A"], cwd=project, env=ENV, check=True)
    subprocess.run(["git", "commit", "-qm", "data"], cwd=project, env=ENV, check=True)
    cache_stages = [f"cache@pretrain-{k}" for k in range(slices)]
    steps["push_cache"] = timed([BIN / "dvc", "push", *cache_stages], project)
    steps["push_rest"] = timed([BIN / "dvc", "push"], project)
    steps["push_noop"] = timed([BIN / "dvc", "push"], project)
    files = [p for p in (project / "data/cache/pretrain").rglob("*") if p.is_file()]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # as DVC does: several transfers at once
        list(pool.map(lambda p: upload(p, f"s3://{bucket}/boto/{p.relative_to(project)}", config=config), files))
    steps["transfer_cache"] = {"seconds": round(time.perf_counter() - start, 2), "files": len(files),
                               "bytes": sum(p.stat().st_size for p in files)}
    clone = work / f"clone-{route}"
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", project, clone], env=ENV, check=True, capture_output=True)
    steps["pull"] = timed([BIN / "dvc", "pull"], clone)
    split_report = json.loads((project / "data/splits/pretrain/report.json").read_text())
    result = {
        "n": n, "route": route, "slices": slices, "shard_mb": shard_mb,
        "files_tracked": tracked_files(project, "data/kinetics.dvc"),
        "coverage": split_report["coverage"],
        "data_stage_ms_per_video": round(1000 * (steps["split"]["seconds"] + steps["cache"]["seconds"]) / n, 2),
        "push_cache_over_transfer": round(steps["push_cache"]["seconds"] / steps["transfer_cache"]["seconds"], 2),
        "steps": {k: {kk: vv for kk, vv in v.items() if kk != "output"} for k, v in steps.items()},
    }
    shutil.rmtree(clone, ignore_errors=True)
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = ("split", "cache", "status", "push_cache", "push_noop", "pull")
    colours = dict(zip(steps, plt.get_cmap("tab10").colors))  # a colour per step, a line style per route
    for route in sorted({r["route"] for r in results}, reverse=True):
        rows = sorted((r for r in results if r["route"] == route), key=lambda r: r["n"])
        for step in steps:
            ax.plot([r["n"] for r in rows], [r["steps"][step]["seconds"] for r in rows], marker="o",
                    color=colours[step], linestyle="-" if route == "packed" else ":", label=f"{step} ({route})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("videos in the set")
    ax.set_ylabel("seconds")
    ax.set_title("the data side at scale (benchmarks/scale.py)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
       "MLFLOW_DISABLE_TELEMETRY": "true", "ACTION3D_QUIET": "1", "AWS_ACCESS_KEY_ID": "bench",
       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--routes", nargs="+", default=["packed"], choices=["packed", "folder"])
    parser.add_argument("--slices", type=int, default=1)
    parser.add_argument("--folder-max", type=int, default=10000, help="the folder route up to this N only")
    parser.add_argument("--work", type=Path, default=None, help="where the sets go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    port = _free_port()
    ENV["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    ENV["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
    os.environ.update({k: v for k, v in ENV.items() if k.startswith("AWS_")})  # boto3 here talks to moto too
    work_root = args.work or Path(tempfile.mkdtemp(prefix="scale-"))
    work_root.mkdir(parents=True, exist_ok=True)
    server = moto(port, work_root / "moto.log")
    results = []
    try:
        for n in args.sizes:
            shard_mb = 256 if n >= 100000 else 64 if n >= 10000 else 16  # a few to a few dozen shards
            for route in args.routes:
                if route == "folder" and n > args.folder_max:
                    continue
                print(f"N = {n}, {route}", flush=True)
                result = run_size(n, route, work_root / f"n{n}", port, args.slices, shard_mb)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "steps"}), flush=True)
                print("  " + ", ".join(f"{k} {v['seconds']} s" for k, v in result["steps"].items()), flush=True)
                write(results, args.out)  # after every size: a run cut short keeps what it measured
            shutil.rmtree(work_root / f"n{n}", ignore_errors=True)
    finally:
        os.killpg(server.pid, 15)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def write(results: list[dict], out: Path) -> None:
    from action3d.atomic import write_atomic_text

    data = {"cpu": cpu_kind(), "date": time.strftime("%Y-%m-%d"), "results": results}
    write_atomic_text(out, json.dumps(data, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
