"""Sample quality of a trained run against the number of network evaluations, for every sampler, with
enough samples and seeds that the interval between seeds is smaller than the differences it reports.

For each x_T seed, each cell draws ``--num`` images with one sampler (on the grid of the benchmark's
table: ancestral/DDIM linspace, DPM-Solver++/UniPC log-SNR or logsnr_sparse, Heun karras) from that
seed, and computes FID and KID against the run's test split on the shipped domain classifier's features (or the FID
Inception network with ``--features inception``). Ancestral sampling on the full chain (T steps,
usually 1000) from the same seeds is the reference row. For every cell: the mean over seeds and the 95%
t-interval of that mean, and the same for the per-seed difference to the reference. ``train`` is the metric of
``--num`` real training images: what a perfect model would score under this protocol.

    python benchmarks/sampler_quality.py runs/digits --num 500 --seeds 1      # minutes, one CPU core
    python benchmarks/sampler_quality.py runs/mnist --num 2000 --seeds 3 --budgets 10,20,50 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ddpm.devices import PRECISIONS, autocast, resolve_precision  # noqa: E402
from ddpm.evaluate import (  # noqa: E402
    classifier_extractor,
    image_metrics,
    inception_extractor,
    reference_features,
)
from ddpm.runs import build_schedule, load_data, load_run_model  # noqa: E402
from ddpm.samplers import network_evaluations, sample, steps_for_evaluations  # noqa: E402

# (label, sampler, options, grid), as in benchmarks/samplers.py
SAMPLERS = [
    ("ancestral", "ancestral", {}, "linspace"),
    ("ddim", "ddim", {"eta": 0.0}, "linspace"),
    ("dpm_solver++ 2M", "dpm_solver", {"order": 2}, "logsnr"),
    ("dpm_solver++ 3M", "dpm_solver", {"order": 3}, "logsnr"),
    ("unipc-2", "unipc", {"order": 2}, "logsnr"),
    ("unipc-3", "unipc", {"order": 3}, "logsnr"),
    ("dpm_solver++ 2M sparse", "dpm_solver", {"order": 2}, "logsnr_sparse"),
    ("unipc-2 sparse", "unipc", {"order": 2}, "logsnr_sparse"),
    ("heun karras", "heun", {}, "karras"),
    ("ipndm-3 sparse", "ipndm", {"order": 3}, "logsnr_sparse"),
    ("ipndm-4 quadratic", "ipndm", {"order": 4}, "quadratic"),
    ("sde_dpm_solver++ 2M", "sde_dpm_solver", {"order": 2}, "logsnr"),
    ("sde_dpm_solver++ 2M linspace", "sde_dpm_solver", {"order": 2}, "linspace"),
]
# Two-sided 97.5% quantiles of Student's t for n - 1 degrees of freedom (n = 2..10 seeds).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def select_samplers(labels: str) -> list[tuple]:
    """The table's rows named by comma-separated labels, in that order; an unknown label is one
    line before anything is sampled or written."""
    known = {s[0]: s for s in SAMPLERS}
    unknown = [label for label in labels.split(",") if label not in known]
    if unknown:
        raise SystemExit(f"unknown sampler label(s) {unknown}; known: {', '.join(known)}")
    return [known[label] for label in labels.split(",")]


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval of the mean); the half-width is nan for one value."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    t = _T975.get(len(values) - 1, 1.96)
    return m, t * statistics.stdev(values) / math.sqrt(len(values))


def _saved_reference(args: argparse.Namespace, step: int, precision: str) -> dict:
    """The reference row of ``args.reference``, refused unless it was made under the same protocol."""
    saved = json.loads(Path(args.reference).read_text())
    same = {"run": args.run, "num": args.num, "seeds": args.seeds, "batch_size": args.batch_size,
            "features": args.features}  # fmt: skip
    theirs = {k: saved["args"][k] for k in same} | {"step": saved["checkpoint_step"],
                                                      "precision": saved["machine"]["precision"]}  # fmt: skip
    if theirs != same | {"step": step, "precision": precision}:
        raise SystemExit(f"--reference {args.reference} was made under another protocol: {theirs}")
    print(f"reference row from {args.reference}: FID {saved['reference']['fid']:.3f}")
    return saved["reference"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained run directory (an image data set with a classifier)")
    parser.add_argument("--num", type=int, default=500, help="images per cell and seed")
    parser.add_argument("--seeds", type=int, default=1, help="x_T seeds per cell")
    parser.add_argument("--budgets", default="5,10,20,50,100", help="network evaluations")
    parser.add_argument("--samplers", help="comma-separated labels (default: all)")
    parser.add_argument("--features", default="classifier", choices=["classifier", "inception"])
    parser.add_argument("--ref-num", type=int, help="reference images (default: the test split; "
                        "inception: --num)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="cpu", help="where the network runs (noise: CPU)")
    parser.add_argument(
        "--precision", default="fp32", choices=PRECISIONS,
        help="the network's autocast precision, the same for every cell (default fp32)",
    )  # fmt: skip
    parser.add_argument(
        "--reference", metavar="JSON",
        help="reuse the T-step reference row of an earlier run's JSON (same run, --num, --seeds, "
        "--precision, --batch-size) instead of sampling it again",
    )  # fmt: skip
    parser.add_argument(
        "--no-reference", action="store_true",
        help="skip the T-step chain row (most of the cost) when only the cells are compared, e.g. "
        "one sampler in two precisions",
    )  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/sampler_quality.json")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    samplers = select_samplers(args.samplers) if args.samplers else SAMPLERS

    model, config, ckpt = load_run_model(args.run)
    model = model.to(args.device)
    precision = resolve_precision(args.precision, torch.device(args.device))

    def network(x, t):
        with autocast(torch.device(args.device), precision):
            return model(x, t).float()

    schedule = build_schedule(config.diffusion)
    T = schedule.num_timesteps
    shape = tuple(ckpt.meta["data"]["sample_shape"])
    if args.features == "classifier":
        extractor = classifier_extractor(config.data.name, shape[-1])
    else:
        extractor = inception_extractor()
    test = load_data(config, "test")
    ref_num = args.ref_num or (len(test) if args.features == "classifier" else args.num)
    ref = reference_features(
        extractor,
        test,
        split="test",
        image_size=config.data.image_size,
        root=config.data.root,
        num=min(ref_num, len(test)),
        cache=None,
    )
    train = load_data(config, "train")
    floor = []
    for seed in range(args.seeds):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        floor.append(image_metrics(train.x[idx[: args.num]], ref, extractor, seed=seed)["fid"])
    print(
        f"run {args.run} (step {ckpt.step}, {config.data.name}, T={T}); {args.num} images per cell "
        f"x {args.seeds} seeds; {args.features} features; reference: {len(ref)} test images; real "
        f"training images score FID {statistics.fmean(floor):.3f}"
    )

    def cell(label, name, options, grid, steps):
        fids, kids, seconds = [], [], 0.0
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(seed)
            start, out = time.monotonic(), []
            for begin in range(0, args.num, args.batch_size):
                n = min(args.batch_size, args.num - begin)
                x = sample(
                    network, schedule, (n, *shape), sampler=name, num_steps=steps, grid=grid,
                    generator=gen, device=args.device, prediction=config.diffusion.prediction,
                    variance=config.diffusion.variance, clip_x0=True, **options,
                ).x0  # fmt: skip
                out.append(x.float().cpu())
            seconds += time.monotonic() - start
            m = image_metrics(torch.cat(out), ref, extractor, seed=seed)
            fids.append(m["fid"])
            kids.append(m["kid"])
        fid, fid_ci = interval(fids)
        row = {"sampler": label, "name": name, "options": options, "grid": grid, "steps": steps,
               "nfe": network_evaluations(name, steps), "fid": fid, "fid_ci95": fid_ci,
               "fid_per_seed": fids, "kid": statistics.fmean(kids), "kid_per_seed": kids,
               "seconds": seconds}  # fmt: skip
        print(f"  {label:18s} NFE {row['nfe']:5d}: FID {fid:8.3f} +- {fid_ci:.3f}  "
              f"KID {row['kid']:.4f}  ({seconds:.0f} s)")  # fmt: skip
        return row

    def save(reference: dict, rows: list[dict]) -> None:
        """The JSON so far, rewritten atomically after every cell: a long run killed late keeps its rows."""
        out = {
            "benchmark": "sampler_quality",
            "command": "python benchmarks/sampler_quality.py " + args.run,
            "args": vars(args),
            "checkpoint_step": ckpt.step,
            "data": config.data.name,
            "train_images": {"fid_per_seed": floor},
            "reference": reference,
            "rows": rows,
            "machine": {
                "platform": platform.platform(),
                "threads": torch.get_num_threads(),
                "device": args.device,
                "precision": precision,
            },  # fmt: skip
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        tmp.replace(args.out)

    if args.no_reference:
        reference = None
    elif args.reference:
        reference = _saved_reference(args, ckpt.step, precision)
    else:
        reference = cell("ancestral", "ancestral", {}, "linspace", T)
    rows: list[dict] = []
    save(reference, rows)
    for label, name, options, grid in samplers:
        for k in budgets:
            row = cell(label, name, options, grid, steps_for_evaluations(name, k)) | {"budget": k}
            if reference is not None:
                diff, diff_ci = interval(
                    [a - b for a, b in zip(row["fid_per_seed"], reference["fid_per_seed"], strict=True)]
                )  # fmt: skip
                row |= {"fid_minus_reference": diff, "fid_minus_reference_ci95": diff_ci}
            rows.append(row)
            save(reference, rows)

    chain = "no reference row" if reference is None else (
        f"{T}-step ancestral: {reference['fid']:.3f} +- {reference['fid_ci95']:.3f}"
    )  # fmt: skip
    print(
        f"\nFID on {args.features} features, mean +- 95% interval over {args.seeds} seeds; {chain}"
    )
    print("sampler".ljust(18) + "".join(f"NFE {k}".rjust(20) for k in budgets))
    for label, *_ in samplers:
        cells = [r for r in rows if r["sampler"] == label]
        print(label.ljust(18) + "".join(f"{r['fid']:8.3f} +- {r['fid_ci95']:.3f}".rjust(20)
                                        for r in cells))  # fmt: skip
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
