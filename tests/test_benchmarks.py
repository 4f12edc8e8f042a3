"""Every benchmark script still runs: it imports what the library now exports and parses its options.

(A benchmark that calls a function the library has since renamed fails only when someone runs it,
often in a later session; ``--help`` imports the whole script and builds its parser in seconds.)
"""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm.oracle import GaussianMixture

BENCHMARKS = sorted(
    p for p in (Path(__file__).parent.parent / "benchmarks").glob("*.py") if p.name != "mixtures.py"
)


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_script_imports_and_parses_its_options(script):
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


@pytest.fixture
def mixtures(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    import mixtures

    return mixtures


def test_the_mixture_family_has_exact_denoisers_that_match_the_oracle(mixtures):
    check_denoiser, family = mixtures.check_denoiser, mixtures.family

    from ddpm.schedules import NoiseSchedule

    schedule = NoiseSchedule.from_name("linear", 1000)
    for member in family():
        assert check_denoiser(member.mixture, schedule) <= 1e-9


def test_the_exact_v_denoiser_is_the_eps_oracle_converted_and_the_data_mean_at_zero_snr(mixtures):
    from ddpm.diffusion import eps_from_v
    from ddpm.schedules import NoiseSchedule

    schedule = NoiseSchedule.from_name("linear", 1000, zero_terminal_snr=True)
    for member in (mixtures.family()[0], mixtures.family()[4]):  # full-covariance and diagonal
        mix = member.mixture
        v_model, eps_model = (
            mixtures.exact_v_denoiser(mix, schedule),
            mixtures.exact_denoiser(mix, schedule),
        )
        x = mix.sample(64, torch.Generator().manual_seed(0))
        t = torch.randint(0, 999, (64,), generator=torch.Generator().manual_seed(1))
        assert torch.allclose(eps_from_v(schedule, x, t, v_model(x, t)), eps_model(x, t), atol=1e-9)
        last = torch.full((64,), 999)  # alpha_bar = 0: E[x_0 | x_T] is the data mean, v = -x_0
        mean = mix.sample(400_000, torch.Generator().manual_seed(2)).mean(0)
        assert torch.allclose(-v_model(x, last), mean.expand(64, -1), atol=0.01)


def test_exact_sliced_wasserstein_uses_the_exact_quantiles_of_each_projection(mixtures):
    """One Gaussian N(mu, Sigma): on direction theta the quantile is theta.mu + sqrt(theta' Sigma theta)
    Phi^-1(u), which the interpolated mixture CDF must reproduce to 1e-3 of the projected std."""
    mu = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    cov = torch.tensor([[[0.5, 0.2], [0.2, 0.3]]], dtype=torch.float64)
    sw = mixtures.ExactSlicedW(GaussianMixture([1.0], mu, cov), num_projections=8)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    std = torch.einsum("dp,de,ep->p", sw.theta, cov[0], sw.theta).sqrt()
    exact = (mu @ sw.theta) + std * torch.special.ndtri(u)[:, None]
    assert ((sw.quantiles(1000) - exact).abs() / std).max() < 1e-3


def test_exact_sliced_wasserstein_falls_as_the_sample_grows_and_sees_a_shift(mixtures):
    mix = GaussianMixture.isotropic([1.0, 2.0], [[-1.0, 0.0], [1.0, 0.5]], 0.3)
    sw = mixtures.ExactSlicedW(mix)
    g = torch.Generator().manual_seed(0)
    small, large = sw(mix.sample(1000, g)), sw(mix.sample(64000, g))
    assert large < small / 4  # ~ n^-1/2: 8x more points per halving
    shifted = sw(mix.sample(64000, g) + torch.tensor([0.2, 0.0], dtype=torch.float64))
    # W1 of a shift c on direction theta is |c . theta|: mean over directions of 0.2 |cos|, 0.127.
    assert abs(shifted - 0.2 * 2 / math.pi) < 0.02


@pytest.fixture
def sampler_benchmark(mixtures):
    import samplers

    return samplers


def test_a_ratio_to_the_chain_is_the_ratio_of_the_seed_means_not_the_mean_of_ratios(
    sampler_benchmark,
):
    # Per-seed ratios 2 and 2/3 average 1.33; the expected distances are equal.
    assert sampler_benchmark.ratio_of_means([2.0, 2.0], [1.0, 3.0])[0] == pytest.approx(1.0)
    assert sampler_benchmark.ratio_of_means([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == (2.0, 0.0)


def test_the_ratio_standard_error_matches_its_spread_over_repeated_experiments(sampler_benchmark):
    """Independent x ~ 1.2 (1 + 0.3 z), y ~ 1 + 0.3 z', 30 seeds: the delta-method SE must match the
    standard deviation of R over 2000 repeated experiments (~0.3 sqrt(1.44 + 1.44) / sqrt(30) ~ 0.093)
    to 10%; an SE that ignored either spread (0.066) or the pairing would miss."""
    g = torch.Generator().manual_seed(0)
    x = 1.2 * (1 + 0.3 * torch.randn(2000, 30, generator=g, dtype=torch.float64))
    y = 1 + 0.3 * torch.randn(2000, 30, generator=g, dtype=torch.float64)
    fits = [
        sampler_benchmark.ratio_of_means(a.tolist(), b.tolist()) for a, b in zip(x, y, strict=True)
    ]
    ratios = torch.tensor([r for r, _ in fits])
    mean_se = sum(se for _, se in fits) / len(fits)
    assert abs(ratios.mean() - 1.2) < 0.01
    assert mean_se == pytest.approx(float(ratios.std()), rel=0.1)
    # Paired: y shares x's noise, so R is sharp and the SE says so.
    paired = sampler_benchmark.ratio_of_means(x[0].tolist(), (x[0] / 1.2 * 1.001).tolist())
    assert paired[1] < 1e-12 and paired[0] == pytest.approx(1.2 / 1.001)


def test_target_se_adds_seeds_until_every_chain_ratio_is_resolved_or_the_cap(tmp_path):
    """... and the true-sample floor, which costs no network, has --floor-seeds seeds or as many as
    the cells."""
    script = Path(__file__).parent.parent / "benchmarks" / "samplers.py"

    def run(*args):
        out = tmp_path / "resolved.json"
        done = subprocess.run(
            [sys.executable, str(script), "--mixtures", "2d-3", "--samplers", "ddim",
             "--num", "200", "--budgets", "5", "--seeds", "2", "--floor-seeds", "5",
             "--out", str(out), *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return __import__("json").loads(out.read_text())["mixtures"][0]

    plain = run()
    assert plain["seeds"] == 2 and len(plain["floor_sw_per_seed"]) == 5
    capped = run("--target-se", "0.001", "--max-seeds", "7")
    assert capped["seeds"] == 7 and len(capped["rows"][0]["sw_per_seed"]) == 7
    assert len(capped["floor_sw_per_seed"]) == 7
    loose = run("--target-se", "0.2", "--max-seeds", "40")
    assert 2 <= loose["seeds"] < 40
    assert loose["rows"][0]["sw_ratio_se"] <= 0.2 * loose["rows"][0]["sw_ratio"]
    assert loose["ode_over_chain_se"] <= 0.2 * loose["ode_over_chain"]


def test_sampler_figure_draws_one_captioned_row_per_sampler_and_budget(trained_run, tmp_path):
    from PIL import Image

    script = Path(__file__).parent.parent / "benchmarks" / "sampler_figure.py"

    def figure(*args):
        out = tmp_path / "samplers.png"
        done = subprocess.run(
            [sys.executable, str(script), str(trained_run), "--num", "3", "--no-chain",
             "--out", str(out), *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return done, (Image.open(out).size if done.returncode == 0 else None)

    one, (w1, h1) = figure("--budgets", "2", "--samplers", "ddim")
    four, (w4, h4) = figure("--budgets", "2,3", "--samplers", "ddim,sde_dpm_solver++ 2M")
    assert one.returncode == 0 and four.returncode == 0, four.stderr[-2000:]
    assert "sde_dpm_solver++ 2M, 3 NFE" in four.stdout
    assert w4 > w1 and 3.5 * h1 < h4 < 4 * h1  # a wider caption band; four rows of tiles
    bad, _ = figure("--samplers", "nope")
    assert bad.returncode != 0 and "unknown sampler label" in bad.stderr


@pytest.mark.parametrize(
    ("script", "args"),
    [("samplers.py", ["--quick", "--mixtures", "2d-3,nope"]),
     ("samplers.py", ["--quick", "--samplers", "nope"]),
     ("sampler_quality.py", ["RUN", "--samplers", "ddim,nope"])],
)  # fmt: skip
def test_an_unknown_mixture_or_sampler_label_is_refused_before_any_work(
    trained_run, tmp_path, script, args
):
    path = Path(__file__).parent.parent / "benchmarks" / script
    args = [str(trained_run) if a == "RUN" else a for a in args]
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, str(path), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "unknown" in done.stderr and "nope" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_background_load_runs_busy_processes_only_inside_its_block(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    import multiprocessing

    import train_speed

    with train_speed.busy_processes(2):
        children = multiprocessing.active_children()
        assert len(children) == 2 and all(p.is_alive() for p in children)
    assert multiprocessing.active_children() == []


def _benchmark_calls(script: str) -> dict[str, set[str]]:
    """{benchmark name: the options a shell script passes it}, the options of the variables its
    call expands (every assignment of them) included."""
    joined = script.replace("\\\n", " ")
    calls: dict[str, set[str]] = {}
    for line in joined.splitlines():
        for name in re.findall(r"benchmarks/(\w+)\.py", line):
            if line.lstrip().startswith("#"):
                continue
            flags = set(re.findall(r"\s(--[a-z][a-z0-9-]*)", line))
            for var in re.findall(r"\$([A-Z_]+)", line):
                for value in re.findall(rf'\b{var}="([^"]*)"', joined):
                    flags |= set(re.findall(r"(--[a-z][a-z0-9-]*)", value))
            calls.setdefault(name, set()).update(flags)
    return calls


def test_the_gpu_session_script_passes_only_options_its_benchmarks_take():
    path = Path(__file__).parent.parent / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    calls = _benchmark_calls(path.read_text())
    assert set(calls) == {"train_speed", "train_alone", "sampler_quality", "sampler_figure"}
    for name, flags in calls.items():
        script = path.parent / f"{name}.py"
        done = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
        )
        unknown = {f for f in flags if f not in done.stdout}
        assert not unknown, f"{name}.py takes no {sorted(unknown)}"
