"""Sample quality of a trained run against the number of network evaluations, for every sampler.

Each cell draws the same number of images from the same x_T seed with one sampler on its default grid
(ancestral/DDIM: linspace, DPM-Solver++: log-SNR) and computes FID and KID on the shipped domain
classifier's features against the run's test split (``ddpm.evaluate``). The 1000-step ancestral row is
the reference the faster samplers are compared with. ``train`` is the same metric for real training
images: what a perfect model would score under this protocol.

    python benchmarks/sampler_quality.py runs/digits [--num 500] [--out benchmarks/results/sampler_quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ddpm.evaluate import (  # noqa: E402
    _load_split,
    classifier_extractor,
    image_metrics,
    reference_features,
)
from ddpm.runs import build_schedule, load_run_model  # noqa: E402
from ddpm.samplers import sample  # noqa: E402

SAMPLERS = [
    ("ancestral", "ancestral", {}),
    ("ddim", "ddim", {"eta": 0.0}),
    ("dpm_solver++ 2M", "dpm_solver", {"order": 2}),
    ("dpm_solver++ 3M", "dpm_solver", {"order": 3}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained run directory (an image data set with a classifier)")
    parser.add_argument("--num", type=int, default=500, help="images per cell")
    parser.add_argument("--budgets", default="5,10,20,50,100", help="network evaluations")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/sampler_quality.json")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]

    model, config, ckpt = load_run_model(args.run)
    schedule = build_schedule(config.diffusion)
    T = schedule.num_timesteps
    shape = tuple(ckpt.meta["data"]["sample_shape"])
    extractor = classifier_extractor(config.data.name, shape[-1])
    test = _load_split(config, "test")
    ref = reference_features(
        extractor,
        test,
        split="test",
        image_size=config.data.image_size,
        root=config.data.root,
        num=len(test),
        cache=None,
    )
    train = _load_split(config, "train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    floor = image_metrics(train.x[idx[: args.num]], ref, extractor, seed=args.seed)
    print(
        f"run {args.run} (step {ckpt.step}, {config.data.name}, T={T}); {args.num} images per cell; "
        f"reference: {len(test)} test images; real training images score FID {floor['fid']:.3f}, "
        f"KID {floor['kid']:.4f}"
    )

    def cell(name, kind, options, steps):
        gen = torch.Generator().manual_seed(args.seed)
        start, out = time.monotonic(), []
        for begin in range(0, args.num, args.batch_size):
            n = min(args.batch_size, args.num - begin)
            x = sample(
                model,
                schedule,
                (n, *shape),
                sampler=kind,
                num_steps=steps,
                generator=gen,
                prediction=config.diffusion.prediction,
                variance=config.diffusion.variance,
                clip_x0=True,
                **options,
            ).x0
            out.append(x.float())
        seconds = time.monotonic() - start
        m = image_metrics(torch.cat(out), ref, extractor, seed=args.seed)
        row = {"sampler": name, "nfe": steps, "fid": m["fid"], "kid": m["kid"], "seconds": seconds}
        print(
            f"  {name:16s} NFE {steps:5d}: FID {m['fid']:8.3f}  KID {m['kid']:.4f}  ({seconds:.0f} s)"
        )
        return row

    rows = [cell("ancestral", "ancestral", {}, T)]
    for name, kind, options in SAMPLERS:
        rows += [cell(name, kind, options, k) for k in budgets]

    reference = rows[0]["fid"]
    header = "sampler".ljust(18) + "".join(f"NFE {k}".rjust(16) for k in budgets)
    print(f"\nFID on classifier features (KID); 1000-step ancestral: FID {reference:.3f}")
    print(header)
    for name, _, _ in SAMPLERS:
        cells = [r for r in rows[1:] if r["sampler"] == name]
        print(
            name.ljust(18) + "".join(f"{r['fid']:8.3f} ({r['kid']:.3f})".rjust(16) for r in cells)
        )
    out = {
        "benchmark": "sampler_quality",
        "command": "python benchmarks/sampler_quality.py " + args.run,
        "args": vars(args),
        "checkpoint_step": ckpt.step,
        "data": config.data.name,
        "train_images": {"fid": floor["fid"], "kid": floor["kid"]},
        "rows": rows,
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
