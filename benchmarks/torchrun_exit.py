"""How often a finished torchrun rank aborts at interpreter shutdown, with and without ``os._exit``.

    python benchmarks/torchrun_exit.py [--launches N] [--out PATH]

Each launch is ``torchrun --standalone --nproc_per_node=2`` of a bare DistributedDataParallel script
on gloo (a 2-layer MLP, 10 Adam steps, one all_reduce per step, then ``destroy_process_group()``),
ending either as a script normally ends ("shutdown") or with ``os._exit(0)`` after flushing
("os._exit", what ``ddpm.cli.run`` does for a torchrun rank). The two endings alternate, so machine
load hits both. A launch fails when torchrun exits non-zero; the table counts failures and the
launches whose stderr says "terminate called without an active exception" (the abort CI saw).
Writes JSON (default benchmarks/results/torchrun_exit.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

WORKER = """\
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
torch.manual_seed(0)
net = torch.nn.parallel.DistributedDataParallel(
    torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.SiLU(), torch.nn.Linear(256, 64))
)
opt = torch.optim.Adam(net.parameters())
for _ in range(10):
    loss = net(torch.randn(32, 64)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    dist.all_reduce(loss.detach().clone())
dist.destroy_process_group()
if sys.argv[1] == "os._exit":
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
"""
ENDINGS = ("shutdown", "os._exit")
ABORT = "terminate called without an active exception"


def launch(script: Path, ending: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "PYTHONFAULTHANDLER": "1",
    }
    if sys.platform == "linux":
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, str(script), ending], capture_output=True, text=True, timeout=300, env=env
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", type=int, default=40, help="launches per ending (default 40)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/torchrun_exit.json"))
    args = p.parse_args(argv)
    counts = {e: {"launches": 0, "failed": 0, "aborted": 0} for e in ENDINGS}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        for i in range(args.launches):
            for ending in ENDINGS:
                proc = launch(script, ending)
                c = counts[ending]
                c["launches"] += 1
                c["failed"] += proc.returncode != 0
                c["aborted"] += ABORT in proc.stderr
            line = ", ".join(f"{e} {counts[e]['failed']}/{counts[e]['launches']}" for e in ENDINGS)
            print(
                f"\r{i + 1}/{args.launches} launches each; failed: {line}", end="", file=sys.stderr
            )
    print(file=sys.stderr)
    print(f"torch {torch.__version__}, 2 gloo processes per launch")
    print("| ending | launches | failed | aborted (SIGABRT message) |")
    print("|---|---|---|---|")
    for e in ENDINGS:
        c = counts[e]
        print(f"| {e} | {c['launches']} | {c['failed']} | {c['aborted']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(["python", "benchmarks/torchrun_exit.py", *(argv or sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "counts": counts,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
