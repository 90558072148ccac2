"""How long the everyday commands take against importing the one library each needs, best of `--repeats` runs.

    python benchmarks/commands.py          # after `make run`: the project's own MLflow store holds the demo's model

`action3d models` against `import torch`, `action3d registry list` and `registry show champion` against
`import mlflow`, each a fresh process in the project folder (the local sqlite store). The goal: each command within
1.5x of its library's import, and `action3d --help` instant (under INSTANT seconds). The JSON goes to
benchmarks/results/commands_<cpu kind>.json
(commands_cpu-avx512-bf16.json, commands_cpu-avx2.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from training import cpu_kind, result_kind  # benchmarks/training.py: the script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GOAL = 1.5
INSTANT = 0.25  # seconds: what a person does not notice waiting for

# command -> what it is held to
PAIRS = {
    "action3d models": "import torch",
    "action3d registry list": "import mlflow",
    "action3d registry show champion": "import mlflow",
}
ARGV = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import mlflow": [sys.executable, "-c", "import mlflow"],
    "action3d --help": [str(BIN / "action3d"), "--help"],
    "action3d models": [str(BIN / "action3d"), "models"],
    "action3d registry list": [str(BIN / "action3d"), "registry", "list"],
    "action3d registry show champion": [str(BIN / "action3d"), "registry", "show", "champion"],
}


def best_of(argv: list[str], repeats: int) -> float:
    """The fastest of `repeats` runs, in seconds (a shared machine only ever adds time)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            sys.exit(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]} (`make run` first: the registry "
                     "commands read the demo's model from the project's store)")
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    seconds = {name: best_of(argv, args.repeats) for name, argv in ARGV.items()}
    rows = {command: {"seconds": round(seconds[command], 3), "baseline": base,
                      "baseline_seconds": round(seconds[base], 3), "ratio": round(seconds[command] / seconds[base], 2),
                      "goal_met": seconds[command] <= GOAL * seconds[base]}
            for command, base in PAIRS.items()}
    out = ROOT / "benchmarks" / "results" / f"commands_{result_kind(torch.device('cpu'))}.json"
    rows["action3d --help"] = {"seconds": round(seconds["action3d --help"], 3), "goal_met":
                               seconds["action3d --help"] <= INSTANT}
    result = {"cpu": cpu_kind(), "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "goal": GOAL,
              "instant_s": INSTANT, "commands": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    for command, row in rows.items():
        against = (f"{row['baseline']:<16} {row['baseline_seconds']:5.2f} s  {row['ratio']:4.2f}x" if "baseline" in row
                   else f"{'(instant)':<16} {INSTANT:5.2f} s")
        print(f"{command:<34} {row['seconds']:6.2f} s  {against}  {'met' if row['goal_met'] else 'MISSED'}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
