"""Sampler accuracy against the number of network evaluations, on a family of exact Gaussian mixtures.

Data: the mixtures of benchmarks/mixtures.py -- tight separated modes (std 0.02), overlapping needles,
full covariances in 8-D, 50 modes in 16-D and 64-D with anisotropy up to 50. The model is each
mixture's exact E[eps | x_t], so every difference from the true distribution is the sampler's own
error. For each mixture, sampler and budget of network evaluations (NFE; Heun's grid has (NFE + 1) / 2
points) we draw N samples from each of several x_T seeds and report
  - SW:     sliced Wasserstein-1 distance to the mixture itself (256 fixed projections, each against
            the projected mixture's exact quantiles: mixtures.ExactSlicedW), as a ratio to the same
            distance for 1000-step ancestral sampling from the same seeds ("the 1000-step chain");
            mean over seeds, with the standard error of the per-seed ratios. At N samples every cell
            carries a sampling floor ~ N^-1/2 -- the distance of N true points, reported -- so a ratio
            near 1 means "as good as the chain at this N", and larger N resolves smaller differences.
            Also the ratio to the converged ODE from the same x_T (UniPC-3, 250 evaluations):
            deterministic samplers share its sampling noise, so this ratio shows their own
            discretisation error.
  - NLL-H:  the samples' mean -log p_data minus the entropy H, in nats: > 0 when a sampler spreads
            mass where the data has little (over-dispersion), < 0 when it collapses onto the modes.
The summary takes, for each sampler and budget, the *worst* mixture: the hardest cases decide.

    python benchmarks/samplers.py --quick      # ~2 minutes on one core: 2000 samples, one seed
    python benchmarks/samplers.py              # the full run: writes benchmarks/results/samplers.json
    python benchmarks/samplers.py --schedule cosine --out PATH       # another chain
    python benchmarks/samplers.py --zero-terminal-snr --out PATH     # alpha_bar_T = 0, exact v-prediction
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parent)
)  # benchmarks/mixtures.py, run from anywhere

import ddpm.samplers as solvers  # noqa: E402
from ddpm.samplers import network_evaluations, sample, steps_for_evaluations  # noqa: E402
from ddpm.schedules import NoiseSchedule  # noqa: E402
from mixtures import (  # noqa: E402
    ExactSlicedW,
    check_denoiser,
    exact_denoiser,
    exact_v_denoiser,
    family,
)

# (label, sampler, options, grid)
SAMPLERS = [
    ("ancestral", "ancestral", {}, "linspace"),
    ("ddim", "ddim", {"eta": 0.0}, "linspace"),
    ("dpm_solver++ 2M", "dpm_solver", {"order": 2}, "logsnr"),
    ("dpm_solver++ 3M", "dpm_solver", {"order": 3}, "logsnr"),
    ("dpm_solver++ 2M sparse", "dpm_solver", {"order": 2}, "logsnr_sparse"),
    ("dpm_solver++ 2M quadratic", "dpm_solver", {"order": 2}, "quadratic"),
    ("dpm_solver++ 2M karras", "dpm_solver", {"order": 2}, "karras"),
    ("unipc-2", "unipc", {"order": 2}, "logsnr"),
    ("unipc-3", "unipc", {"order": 3}, "logsnr"),
    ("unipc-2 sparse", "unipc", {"order": 2}, "logsnr_sparse"),
    ("unipc-3 sparse", "unipc", {"order": 3}, "logsnr_sparse"),
    ("unipc-2 quadratic", "unipc", {"order": 2}, "quadratic"),
    ("unipc-2 karras", "unipc", {"order": 2}, "karras"),
    ("heun karras", "heun", {}, "karras"),
    ("sde_dpm_solver++ 2M", "sde_dpm_solver", {"order": 2}, "logsnr"),
    ("dpm_solver++ 2M linspace", "dpm_solver", {"order": 2}, "linspace"),
    ("sde_dpm_solver++ 2M linspace", "sde_dpm_solver", {"order": 2}, "linspace"),
    ("sde_dpm_solver++ 3M linspace", "sde_dpm_solver", {"order": 3}, "linspace"),
]
# Not in the default list (a --quick run of 2026-11-30 had them no better than bh2 at 20-50 NFE and
# worse at 5-10); select with --samplers.
EXTRA_SAMPLERS = [
    ("unipc-3 quadratic", "unipc", {"order": 3}, "quadratic"),
    ("unipc-1", "unipc", {"order": 1}, "logsnr"),
    ("unipc-2 bh1", "unipc", {"order": 2, "variant": "bh1"}, "logsnr"),
    ("unipc-3 bh1", "unipc", {"order": 3, "variant": "bh1"}, "logsnr"),
    ("unipc-3 karras", "unipc", {"order": 3}, "karras"),
    ("dpm_solver++ 3M karras", "dpm_solver", {"order": 3}, "karras"),
    # iPNDM (2026-12-02): on 2d-3 at 16000 x 3 the only family within 50% of the chain at 10 NFE
    # (results/samplers_ipndm_2d3.json); all mixtures: results/samplers_ipndm.json.
    ("ipndm-2 sparse", "ipndm", {"order": 2}, "logsnr_sparse"),
    ("ipndm-3 sparse", "ipndm", {"order": 3}, "logsnr_sparse"),
    ("ipndm-4 sparse", "ipndm", {"order": 4}, "logsnr_sparse"),
    ("ipndm-3 logsnr", "ipndm", {"order": 3}, "logsnr"),
    ("ipndm-4 quadratic", "ipndm", {"order": 4}, "quadratic"),
    ("ipndm-3 karras", "ipndm", {"order": 3}, "karras"),
]
BUDGETS = [5, 10, 20, 50]
REFERENCE_STEPS = 1000
# The converged probability-flow ODE from the same x_T: UniPC-3 on 250 log-SNR points (on the exact
# Gaussian test its error is ~1e-5 at 81 points). Deterministic samplers share its sampling noise, so
# SW(cell) / SW(ODE) isolates their own discretisation error.
ODE_REFERENCE = ("unipc", {"order": 3}, "logsnr", 250)


def _mean_se(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2000 samples, 1 seed")
    parser.add_argument("--num", type=int, help="samples per cell and seed (default 4000)")
    parser.add_argument("--seeds", type=int, help="x_T seeds per cell (default 3)")
    parser.add_argument("--mixtures", help="comma-separated member names (default: all)")
    parser.add_argument("--samplers", help="comma-separated labels (default: all)")
    parser.add_argument("--schedule", default="linear")
    parser.add_argument(
        "--zero-terminal-snr", action="store_true",
        help="rescale the schedule to alpha_bar_T = 0 (Lin et al. 2023) and sample with the exact "
        "v-prediction, as such a model must",
    )  # fmt: skip
    parser.add_argument(
        "--max-step-growth", type=float, default=solvers.MAX_STEP_GROWTH,
        help="ddpm.samplers.MAX_STEP_GROWTH for this run (inf: the multistep solvers as published, "
        "whatever the step ratio)",
    )  # fmt: skip
    parser.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's JSON "
                        "again (and refresh its summary) instead of sampling")  # fmt: skip
    parser.add_argument(
        "--markdown", action="store_true", help="with --report: also the README table"
    )
    parser.add_argument("--out", help="JSON path (default benchmarks/results/samplers.json; "
                        "--quick: not written unless given)")  # fmt: skip
    args = parser.parse_args()
    if args.report:
        path = Path(args.report)
        saved = json.loads(path.read_text())
        for result in saved["mixtures"]:
            _print_member(result)
        saved["summary"] = report(saved["mixtures"], num=saved["args"]["num"],
                                  seeds=saved["args"]["seeds"])  # fmt: skip
        _write_json(path, saved)
        if args.markdown:
            _print_markdown(saved["summary"])
        return
    num = args.num or (2000 if args.quick else 4000)
    seeds = args.seeds or (1 if args.quick else 3)
    out_path = args.out or (None if args.quick else "benchmarks/results/samplers.json")
    torch.set_num_threads(1)  # small tensors: a second thread only adds synchronisation
    solvers.MAX_STEP_GROWTH = args.max_step_growth

    members = family()
    if args.mixtures:
        members = [m for m in members if m.name in _known(args.mixtures, [m.name for m in members])]
    samplers = SAMPLERS
    if args.samplers:
        wanted = _known(args.samplers, [s[0] for s in SAMPLERS + EXTRA_SAMPLERS])
        samplers = [s for s in SAMPLERS + EXTRA_SAMPLERS if s[0] in wanted]
    schedule = NoiseSchedule.from_name(
        args.schedule, 1000, zero_terminal_snr=args.zero_terminal_snr
    )
    prediction = "v" if args.zero_terminal_snr else "eps"
    start_all = time.monotonic()
    results = []
    for member in members:
        result = run_member(member, schedule, samplers, num=num, seeds=seeds, prediction=prediction)
        results.append(result)
        _print_member(result)
    print()

    summary = report(results, num=num, seeds=seeds)
    print(f"total {time.monotonic() - start_all:.0f} s")

    if out_path is None:
        return
    out = {
        "benchmark": "samplers",
        "command": "python benchmarks/samplers.py" + (" --quick" if args.quick else ""),
        "args": vars(args) | {"num": num, "seeds": seeds},
        "budgets": BUDGETS,
        "mixtures": results,
        "summary": summary,
        "seconds": time.monotonic() - start_all,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    _write_json(Path(out_path), out)


def _known(requested: str, known: list[str]) -> list[str]:
    """The comma-separated names asked for, refused in one line unless every one is known."""
    names = requested.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown name(s) {unknown}; known: {', '.join(known)}")
    return names


def _print_markdown(summary: dict[str, list[dict]]) -> None:
    """The README's table: per cell the worst mixture's SW over that of the 1000-step chain, of the converged
    ODE and of as many true samples (each ratio's own worst mixture)."""
    print("\n| sampler (grid) \\ network evaluations | " + " | ".join(map(str, BUDGETS)) + " |")
    print("|---" * (len(BUDGETS) + 1) + "|")
    for label, cells in summary.items():
        print(f"| {label} | " + " | ".join(
            f"{c['worst_ratio']:.2f} / {c['worst_ratio_to_ode']:.2f} / {c['worst_ratio_to_floor']:.2f}"
            for c in cells) + " |")  # fmt: skip


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")


def run_member(
    member, schedule, samplers, *, num: int, seeds: int, prediction: str = "eps"
) -> dict:
    """Every cell of one mixture: the 1000-step reference, then each sampler at each budget; the
    model predicts eps, or v (``prediction="v"``, needed on a zero-terminal-SNR chain)."""
    mix, start = member.mixture, time.monotonic()
    check_denoiser(mix, schedule)  # the fast denoiser is ddpm.oracle's formula, to 1e-9
    model = (exact_v_denoiser if prediction == "v" else exact_denoiser)(mix, schedule)
    sw = ExactSlicedW(mix)
    entropy, entropy_se = mix.entropy_mc(200_000, torch.Generator().manual_seed(7))
    floor = [sw(mix.sample(num, torch.Generator().manual_seed(1000 + r))) for r in range(seeds)]

    def cell(name, options, grid, steps):
        sws, nlls = [], []
        for r in range(seeds):
            x = sample(
                model, schedule, (num, mix.dim), sampler=name, num_steps=steps, grid=grid,
                generator=torch.Generator().manual_seed(r), dtype=torch.float64,
                prediction=prediction, **options,
            ).x0  # fmt: skip
            sws.append(sw(x))
            nlls.append(float(-mix.log_prob(x).mean()) - entropy)
        return sws, nlls

    ref_sws, ref_nlls = cell("ancestral", {}, "linspace", REFERENCE_STEPS)
    ode_sws, ode_nlls = cell(*ODE_REFERENCE)
    rows = []
    for label, name, options, grid in samplers:
        for nfe in BUDGETS:
            steps = steps_for_evaluations(name, nfe)
            sws, nlls = cell(name, options, grid, steps)
            ratio, ratio_se = _mean_se([a / b for a, b in zip(sws, ref_sws, strict=True)])
            ode_ratio, ode_ratio_se = _mean_se([a / b for a, b in zip(sws, ode_sws, strict=True)])
            rows.append(
                {"sampler": label, "name": name, "options": options, "grid": grid,
                 "nfe": network_evaluations(name, steps), "budget": nfe, "steps": steps,
                 "sw": _mean_se(sws)[0], "sw_per_seed": sws, "sw_ratio": ratio,
                 "sw_ratio_se": ratio_se, "sw_ratio_to_ode": ode_ratio,
                 "sw_ratio_to_ode_se": ode_ratio_se, "nll_minus_h": _mean_se(nlls)[0]}
            )  # fmt: skip
    return {
        "mixture": member.name, "what": member.what, "dim": mix.dim,
        "components": mix.num_components, "entropy_nats": entropy, "entropy_se": entropy_se,
        "floor_sw": _mean_se(floor)[0], "floor_sw_per_seed": floor,
        "reference_sw": _mean_se(ref_sws)[0], "reference_sw_per_seed": ref_sws,
        "reference_nll_minus_h": _mean_se(ref_nlls)[0],
        "ode_sw": _mean_se(ode_sws)[0], "ode_sw_per_seed": ode_sws,
        "ode_nll_minus_h": _mean_se(ode_nlls)[0], "rows": rows,
        "seconds": time.monotonic() - start,
    }  # fmt: skip


def _print_member(r: dict) -> None:
    print(
        f"\n{r['mixture']}: {r['what']}; H = {r['entropy_nats']:.3f} nats; SW floor (true points) "
        f"{r['floor_sw']:.4f}; 1000-step ancestral SW {r['reference_sw']:.4f}, NLL-H "
        f"{r['reference_nll_minus_h']:+.3f}; converged ODE SW {r['ode_sw']:.4f}, NLL-H "
        f"{r['ode_nll_minus_h']:+.3f} ({r['seconds']:.0f} s)"
    )
    print("SW / SW(1000-step ancestral) | SW / SW(converged ODE), (NLL - H in nats)")
    print(f"{'sampler':<24}" + "".join(f"{'NFE ' + str(k):>22}" for k in BUDGETS))
    labels = list(dict.fromkeys(row["sampler"] for row in r["rows"]))
    for label in labels:
        cells = [row for row in r["rows"] if row["sampler"] == label]
        print(f"{label:<24}" + "".join(
            f"{c['sw_ratio']:.2f}|{c['sw_ratio_to_ode']:.2f} ({c['nll_minus_h']:+.2f})".rjust(22)
            for c in cells))  # fmt: skip


def report(results: list[dict], *, num: int, seeds: int) -> dict[str, list[dict]]:
    """Print and return, per sampler and budget, the worst mixture of the family for three measures:
    SW / SW(1000-step ancestral), SW / SW(converged ODE), and NLL - H (largest in size)."""
    labels = list(dict.fromkeys(row["sampler"] for row in results[0]["rows"]))
    summary = {}
    for label in labels:
        cells = []
        for k in BUDGETS:
            rows = [
                (
                    r["mixture"],
                    next(x for x in r["rows"] if x["sampler"] == label and x["budget"] == k),
                )
                for r in results
            ]
            floors = {r["mixture"]: r["floor_sw"] for r in results}
            chain = max(rows, key=lambda mr: mr[1]["sw_ratio"])
            floor = max(rows, key=lambda mr: mr[1]["sw"] / floors[mr[0]])
            ode = max(rows, key=lambda mr: mr[1]["sw_ratio_to_ode"])
            nll = max(rows, key=lambda mr: abs(mr[1]["nll_minus_h"]))
            cells.append(
                {"budget": k, "nfe": chain[1]["nfe"],
                 "worst_ratio": chain[1]["sw_ratio"], "worst_ratio_se": chain[1]["sw_ratio_se"],
                 "worst_mixture": chain[0],
                 "worst_ratio_to_ode": ode[1]["sw_ratio_to_ode"],
                 "worst_ratio_to_ode_se": ode[1]["sw_ratio_to_ode_se"], "worst_ode_mixture": ode[0],
                 "worst_ratio_to_floor": floor[1]["sw"] / floors[floor[0]],
                 "worst_floor_mixture": floor[0],
                 "worst_nll_minus_h": nll[1]["nll_minus_h"], "worst_nll_mixture": nll[0]}
            )  # fmt: skip
        summary[label] = cells
    print(f"worst mixture of {len(results)} per cell; {num} samples x {seeds} seeds")
    for title, key, where, fmt in [
        ("SW / SW(1000-step ancestral)", "worst_ratio", "worst_mixture", "{:.2f}"),
        ("SW / SW(converged ODE, same x_T)", "worst_ratio_to_ode", "worst_ode_mixture", "{:.2f}"),
        ("SW / SW(as many true samples)", "worst_ratio_to_floor", "worst_floor_mixture", "{:.2f}"),
        ("NLL - H in nats, largest in size", "worst_nll_minus_h", "worst_nll_mixture", "{:+.2f}"),
    ]:
        print(f"\n{title}")
        print(f"{'sampler':<24}" + "".join(f"{'NFE ' + str(k):>24}" for k in BUDGETS))
        for label, cells in summary.items():
            print(f"{label:<24}" + "".join(
                f"{fmt.format(c[key])} ({c[where]})".rjust(24) for c in cells))  # fmt: skip
    print()
    for i, k in enumerate(BUDGETS):
        best = min(summary, key=lambda s: summary[s][i]["worst_ratio"])
        best_ode = min(summary, key=lambda s: summary[s][i]["worst_ratio_to_ode"])
        print(f"best at {k} NFE on the worst mixture: {best} ({summary[best][i]['worst_ratio']:.2f} "
              f"of the 1000-step chain); to the converged ODE: {best_ode} "
              f"({summary[best_ode][i]['worst_ratio_to_ode']:.2f})")  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
