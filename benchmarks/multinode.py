"""Training throughput across process layouts: 1 node x 2 processes against 2 nodes x 1 process, on loopback.

Each layout runs our engine's training step (`engine.prepare_model` -> DDP, `engine.train_one_epoch` with the
weighted loss every multi-process run uses) on the demo's network (a quarter-width 3D ResNet-10, 16x56x56 clips,
batch 8 per process) over in-memory batches, under torchrun: `--standalone` for one node, two torchrun agents
meeting at a c10d rendezvous on 127.0.0.1 for two. The clips/s of the world (the median of `--repeats` timed
epochs after one warm-up epoch) and the ratio of the layouts go to benchmarks/results/multinode_<cpu kind>.json.
On one machine the two layouts have the same cores, so the ratio is what crossing "machines" costs: the gloo
all-reduce over TCP and the rendezvous, not the network a real cluster has.

    python benchmarks/multinode.py                               # CPU: 1x2 against 2x1
    python benchmarks/multinode.py --device cuda --layouts 1x1 1xall   # a GPU machine: one GPU against all of them
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_kind() -> str:
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        pass
    return "avx512_bf16" if "avx512_bf16" in flags else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags \
        else platform.machine()


def worker(args: argparse.Namespace) -> None:
    """One rank: train the demo network for `--repeats` + 1 epochs of `--steps` batches; rank 0 writes the times."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / "src"))
    from action3d import distributed, engine
    from action3d.models import create_model

    info = distributed.init_distributed()
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{info.local_rank}")
    engine.seed_everything(0)
    model = engine.prepare_model(create_model("resnet10", n_classes=24, widen_factor=0.25, conv1_t_size=3), device,
                                 channels_last=True)
    optimizer = engine.build_optimizer(model, lr=0.01, dampening=0.0)
    g = torch.Generator().manual_seed(info.rank)
    batches = [{"video": torch.randn(args.batch, 3, 16, 56, 56, generator=g),
                "label": torch.randint(24, (args.batch,), generator=g), "video_index": torch.arange(args.batch),
                "weight": torch.ones(args.batch)} for _ in range(args.steps)]
    rates = []
    for epoch in range(args.repeats + 1):
        distributed.barrier()
        start = time.perf_counter()
        metrics = engine.train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, batches, device, epoch,
                                         channels_last=True, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        distributed.barrier()
        if epoch:  # the first is warm-up
            rates.append(metrics["clips"] / (time.perf_counter() - start))
    if distributed.is_main_process():
        Path(args.out).write_text(json.dumps({"world": info.world_size, "clips_per_s": rates}))
    distributed.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(layout: str, args: argparse.Namespace, scratch: Path) -> dict:
    nodes, per_node = layout.split("x")
    nodes = int(nodes)
    if per_node == "all":
        import torch

        per_node = str(max(1, torch.cuda.device_count()))
    out = scratch / f"{layout}.json"
    script = [__file__, "--worker", "--device", args.device, "--batch", str(args.batch), "--steps", str(args.steps),
              "--repeats", str(args.repeats), "--out", str(out)]
    if nodes == 1:
        launches = [["--standalone", "--nproc-per-node", per_node]]
    else:
        endpoint = f"127.0.0.1:{free_port()}"
        launches = [["--nnodes", str(nodes), "--nproc-per-node", per_node, "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", endpoint, "--rdzv-id", f"bench-{layout}"]] * nodes
    threads = max(1, (os.cpu_count() or 1) // (nodes * int(per_node))) if args.device == "cpu" else 1
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # the same cores for every layout, shared alike
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch, *script], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for launch in launches]
    logs = [a.communicate(timeout=1800)[0] for a in agents]
    if any(a.returncode for a in agents):
        raise RuntimeError(f"layout {layout} failed:\n" + "\n".join(log[-2000:] for log in logs))
    result = json.loads(out.read_text())
    return {"nodes": nodes, "processes_per_node": int(per_node), "world": result["world"],
            "clips_per_s": round(statistics.median(result["clips_per_s"]), 2),
            "repeats": [round(r, 2) for r in result["clips_per_s"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="NODESxPROCESSES (all = every GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="clips per process per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="multinode-"))
    results = {layout: run_layout(layout, args, scratch) for layout in args.layouts}
    first, second = (results[name]["clips_per_s"] for name in args.layouts[:2])
    kind = cpu_kind() if args.device == "cpu" else "gpu"
    report = {"cpu": f"{platform.processor() or platform.machine()} ({cpu_kind()}), {os.cpu_count()} cores",
              "device": args.device, "date": time.strftime("%Y-%m-%d"), "batch_per_process": args.batch,
              "layouts": results, "ratio": {f"{args.layouts[1]} / {args.layouts[0]}": round(second / first, 3)},
              # clips/s per process of the second layout over the first's: 1.0 is perfect scaling
              "scaling_efficiency": round((second / results[args.layouts[1]]["world"])
                                          / (first / results[args.layouts[0]]["world"]), 3)}
    out = Path(args.out) if args.out else RESULTS / f"multinode_{kind}.json"
    from action3d.atomic import write_atomic_text

    write_atomic_text(out, json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name}: {r['clips_per_s']} clips/s over a world of {r['world']} (repeats {r['repeats']})")
    print(f"{args.layouts[1]} / {args.layouts[0]}: {second / first:.3f}; wrote {out}")


if __name__ == "__main__":
    main()
