"""Classifier-free guidance on real data: how the guidance scale w trades diversity for fidelity.

A class-conditional model (``ddpm train --cond class``, labels dropped to the null class with
probability 0.1) draws the classes in equal shares at w = 0, 1, 2, 3, 5 (w = 0: unconditional, 1:
plain conditional; ``ddpm.guidance``), from the same x_T, with DPM-Solver++ on 50 log-SNR steps.
Each row is one ``ddpm eval RUN --class all --guidance w``: the shipped domain classifier's accuracy
at recognising the class asked for, and FID / KID / precision / recall on its features against the
whole test split (``ddpm.evaluate``). At w = 0 the accuracy is what unconditional samples score by
chance (about 1 / number of classes).

    python benchmarks/guidance.py --quick        # digits: trains runs/digits_cond (10 minutes)
    python benchmarks/guidance.py                # MNIST: trains runs/guidance_mnist (60 minutes)
    python benchmarks/guidance.py --run RUN      # any class-conditional run with a shipped classifier

A run directory that already exists is evaluated as it is (not trained further).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ddpm.checkpoint import atomic_write_bytes  # noqa: E402
from ddpm.evaluate import eval_run  # noqa: E402

SCALES = (0.0, 1.0, 2.0, 3.0, 5.0)
PRESETS = {  # --quick or not: data set, training minutes, run directory
    True: ("digits", 10.0, "runs/digits_cond"),
    False: ("mnist", 60.0, "runs/guidance_mnist"),
}


def train_if_absent(run: Path, data: str, minutes: float) -> None:
    if (run / "config.json").is_file():
        print(f"using the existing run {run}")
        return
    cmd = [sys.executable, "-m", "ddpm", "train", "--data", data, "--cond", "class",
           "--minutes", str(minutes), "--sample-every", "0", "--run-dir", str(run), "-q"]  # fmt: skip
    print("training:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8x8 digits instead of MNIST")
    parser.add_argument("--run", help="evaluate this class-conditional run (no training)")
    parser.add_argument("--minutes", type=float, help="training budget of a new run")
    parser.add_argument("--num", type=int, default=1000, help="samples per scale (1000)")
    parser.add_argument("--steps", type=int, default=50, help="DPM-Solver++ steps (50)")
    parser.add_argument("--scales", default=",".join(f"{w:g}" for w in SCALES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON (default benchmarks/results/guidance[_quick].json)")
    args = parser.parse_args()
    data, minutes, default_run = PRESETS[args.quick]
    run = Path(args.run or default_run)
    if args.run is None:
        train_if_absent(run, data, args.minutes or minutes)
    scales = [float(w) for w in args.scales.split(",")]
    out = Path(args.out or f"benchmarks/results/guidance{'_quick' if args.quick else ''}.json")

    rows = []
    for w in scales:
        start = time.monotonic()
        report = eval_run(run, num=args.num, sampler="dpm_solver", steps=args.steps,
                          seed=args.seed, class_label="all", guidance=w, progress=False,
                          out_dir=Path(run) / "eval")  # fmt: skip
        block = report.results["classifier"]
        rows.append({
            "guidance": w,
            "class_accuracy": block["class_accuracy"],
            "fid": block["fid"],
            "kid": block["kid"],
            "precision": block["precision"],
            "recall": block["recall"],
            "inception_score": block["inception_score"],
            "seconds": round(time.monotonic() - start, 1),
        })  # fmt: skip
        print(
            f"w = {w:g}: accuracy {block['class_accuracy']:.3f}, FID {block['fid']:.2f}", flush=True
        )
    protocol = report.results["protocol"]
    floor = report.results["classifier"].get("train_vs_ref", {})

    print(f"\n{protocol['data']}, step {protocol['checkpoint_step']}, {args.num} samples per row "
          f"(classes in equal shares), DPM-Solver++ {args.steps} steps, seed {args.seed}")  # fmt: skip
    print("| w | class accuracy | FID | KID | precision | recall | classifier IS |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance']:g} | {r['class_accuracy']:.3f} | {r['fid']:.2f} | {r['kid']:.4f} "
              f"| {r['precision']:.3f} | {r['recall']:.3f} | {r['inception_score']:.2f} |")  # fmt: skip
    if floor:
        print(f"| real training images | - | {floor['fid']:.2f} | {floor['kid']:.4f} | "
              f"{floor['precision']:.3f} | {floor['recall']:.3f} | {floor['inception_score']:.2f} |")  # fmt: skip
    record = {
        "benchmark": "guidance",
        "command": " ".join(["python", "benchmarks/guidance.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "run": str(run),
        "protocol": protocol,
        "train_vs_ref": floor,
        "rows": rows,
    }
    atomic_write_bytes(out, (json.dumps(record, indent=2) + "\n").encode())
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
