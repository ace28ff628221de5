"""Wall time from an unseen folder tree to test metrics (bench/results/byod.md).

    python bench/bench_byod.py --root /work/byod_data [--per-class 150 --test-per-class 50] [--threads 1]

Writes a hospital-style tree with bench/make_byod_tree.py under ROOT (outside the repository), then
times, as separate processes exactly as a user types them:

    medmim data manifest --from folder ROOT/chest --out ROOT/chest.csv
    medmim data card --manifest ROOT/chest.csv --out ROOT/chest_card
    medmim finetune -c byod data.path=ROOT/chest.csv run.name=chest run.num_threads=T run.out_dir=ROOT/runs

and prints a markdown table (seconds per command, the test metrics, the machine load). Baselines
printed beside them: the start-up cost of one `medmim --version` process, and the test AUROC /
accuracy of a constant (majority-class) prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return dt, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="scratch folder outside the repository")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from make_byod_tree import write_tree

    root = Path(a.root)
    if root.exists():
        shutil.rmtree(root)
    counts = write_tree(root / "chest", a.per_class, a.test_per_class, seed=0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(a.threads)}
    medmim = [sys.executable, "-m", "medmim.cli"]
    load0 = os.getloadavg()[0]
    t_start, _ = timed([*medmim, "--version"], env)
    steps = [
        ("manifest", ["data", "manifest", "--from", "folder", str(root / "chest"), "--out", str(root / "chest.csv")]),
        ("card", ["data", "card", "--manifest", str(root / "chest.csv"), "--out", str(root / "chest_card")]),
        ("finetune", ["finetune", "-c", "byod", f"data.path={root / 'chest.csv'}", "run.name=chest",
                      f"run.num_threads={a.threads}", f"run.out_dir={root / 'runs'}"]),
    ]
    rows = []
    for name, args in steps:
        dt, out = timed([*medmim, *args], env)
        rows.append((name, " ".join(["medmim", *args]), dt))
        print(f"{name}: {dt:.1f} s", file=sys.stderr)
    result = json.loads((root / "runs" / "chest" / "finetune" / "result.json").read_text())
    card = json.loads((root / "chest_card.json").read_text())
    test_counts = card["splits"]["test"]["classes"]
    majority = max(test_counts.values()) / sum(test_counts.values())
    load1 = os.getloadavg()[0]
    print("| step | command | wall (s) |\n|---|---|---|")
    for name, cmd, dt in rows:
        print(f"| {name} | `{cmd}` | {dt:.1f} |")
    print(f"| total | | {sum(r[2] for r in rows):.1f} |")
    print(f"| baseline: one `medmim --version` process | | {t_start:.1f} |")
    print(f"\nfiles: {counts}; splits: " + ", ".join(f"{s} {v['images']}" for s, v in card["splits"].items())
          + f"; duplicates across splits: {card['duplicates_across_splits']}")
    print(f"test: AUROC {result['test_auroc']:.3f} [{result.get('test_auroc_ci_low', float('nan')):.3f}, "
          f"{result.get('test_auroc_ci_high', float('nan')):.3f}], accuracy {result['test_accuracy']:.3f}, "
          f"n {result.get('test_n')}; constant prediction: AUROC 0.500, accuracy {majority:.3f}")
    print(f"load average (1 min) before / after: {load0:.1f} / {load1:.1f}; threads {a.threads}; "
          f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
