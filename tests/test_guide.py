"""docs/guide.md and scripts/figures.py: the quick mode runs, its Monte-Carlo claims hold against their
closed forms, and every number and figure the guide shows comes from the script (numbers.txt)."""

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"
GUIDE_DIR = ROOT / "docs" / "guide"
MAX_PNG_BYTES = 150 * 1024


def load_script():
    spec = importlib.util.spec_from_file_location("guide_figures", ROOT / "scripts" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fig():
    return load_script()


@pytest.fixture(scope="module")
def quick(fig, tmp_path_factory):
    """The script's quick mode, run once: (results by section, output folder)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("guide")
    torch.set_num_threads(1)  # small tensors: a second thread only adds synchronisation
    try:
        results, _ = fig.generate(fig.QUICK, out)
    finally:
        torch.set_num_threads(threads)
    return results, out


# --------------------------------------------------------------------------------------------------
# the quick mode (what CI runs)
# --------------------------------------------------------------------------------------------------


def test_quick_mode_writes_every_oracle_figure_small(fig, quick):
    _, out = quick
    written = {p.name for p in out.glob("*.png")}
    assert written == set(fig.ORACLE_FIGURES)
    for name in written:
        assert (out / name).stat().st_size < MAX_PNG_BYTES, name
    assert (out / "numbers.txt").read_text().startswith("# scripts/figures.py, quick mode")


def test_two_steps_merge_into_one_with_variance_one_minus_the_product(quick):
    m = quick[0][1]["merge"]
    n = 4000  # QUICK.n
    se_var = m["formula_var"] * math.sqrt(2 / n)
    se_mean = math.sqrt(m["formula_var"] / n)
    assert m["formula_var"] == pytest.approx(1 - 0.9 * 0.8)
    for key in ("two_step", "one_step"):
        assert abs(m[f"{key}_var"] - m["formula_var"]) < 5 * se_var
        assert abs(m[f"{key}_mean"] - m["formula_mean"]) < 5 * se_mean


def test_t_steps_of_the_chain_match_one_q_sample(quick):
    r = quick[0][1]
    critical = 1.63 * math.sqrt(2 / r["n_chain"])  # two-sample KS at the 1% level
    assert all(ks < critical for ks in r["ks"].values())
    assert r["chain_worst_var_error"] < 0.1


def test_shrinking_keeps_the_variance_at_one_and_not_shrinking_explodes_it(quick):
    rows = quick[0][2]["rows"]
    for var0, (vp, vp_exact, ve, ve_exact) in rows.items():
        assert vp_exact == pytest.approx(1.0, abs=1e-3), var0
        assert abs(vp - vp_exact) < 0.1, var0
        assert abs(ve - ve_exact) / ve_exact < 0.05, var0
        assert ve > 5 * vp, var0  # the variance-exploding alternative, as claimed


def test_x0_zero_gives_noise_of_variance_one_minus_alpha_bar(quick):
    assert quick[0][3]["worst"] < 0.15  # max over T = 100 estimates from 4000 draws each


def test_bound_terms_are_lambda_times_the_eps_error(quick):
    assert quick[0][7]["rel"] < 1e-10


def test_oracle_bound_stays_above_the_likelihood(quick):
    for gap, se in quick[0][9]["gaps"].values():
        assert gap > -3 * se


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_closed_form_gap_on_gaussian_data_matches_the_measured_bound(fig, variance):
    from ddpm import GaussianMixture, NoiseSchedule, variational_bound
    from ddpm.likelihood import bits_per_dim_summary

    m, v0 = fig.GAUSSIAN_DATA
    s = NoiseSchedule.from_name("linear", 200)
    data = GaussianMixture([1.0], [[m, m]], [[[v0, 0.0], [0.0, v0]]])
    g = torch.Generator().manual_seed(0)
    b = variational_bound(
        data.denoiser(s),
        s,
        data.sample(4000, g),
        decoder="gaussian",
        variance=variance,
        generator=g,
    )
    mean, se = bits_per_dim_summary(b.total_bpd)
    entropy_bpd = 0.5 * math.log(2 * math.pi * math.e * v0) / math.log(2)
    expected = fig.gaussian_bound_gap(s, m, v0, fig.reverse_variances(s)[variance])
    assert abs(mean - entropy_bpd - expected) < 4 * se


def test_the_gap_that_stays_comes_from_the_decoder_variance(quick):
    closed = quick[0][9]["closed"]
    largest = max(closed)
    assert closed[largest]["fixed_large"] > 0.1  # the library's fixed_large keeps a gap
    assert closed[largest]["fixed_large, decoder beta_1"] < 0.01  # which sigma_1^2 = beta_1 closes


def test_x0_recorder_stores_what_the_sampler_used(fig):
    from ddpm.diffusion import p_mean_variance
    from ddpm.schedules import NoiseSchedule

    s = NoiseSchedule.from_name("linear", 30)
    x_T = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps, _ = fig.reverse_with_x0(fig.MIXTURE.denoiser(s), s, x_T, "ancestral", 30, shown=4)
    for t, x_t, x0_pred in steps:
        index = torch.full((50,), t)
        out = fig.MIXTURE.denoiser(s)(x_t, index)
        expected = p_mean_variance(s, x_t, index, out).x0_pred
        assert torch.allclose(x0_pred, expected)


# --------------------------------------------------------------------------------------------------
# the guide against the committed output of the full mode
# --------------------------------------------------------------------------------------------------


def guide_text() -> str:
    return GUIDE.read_text()


def numbers_text() -> str:
    return (GUIDE_DIR / "numbers.txt").read_text()


def test_every_figure_of_the_guide_is_committed_small_and_made_by_the_script(fig):
    shown = set(re.findall(r"guide/([\w-]+\.png)", guide_text()))
    assert shown == set(fig.ORACLE_FIGURES) | set(fig.TRAINED_FIGURES)
    for name in shown:
        assert (GUIDE_DIR / name).stat().st_size < MAX_PNG_BYTES, name


def test_every_number_the_guide_states_is_printed_by_the_script():
    # Decimal numbers (0.2800, 2.08e-05, -4.368): each must appear verbatim in numbers.txt, the output
    # of the full mode. Integers (T, t, N) are parameters and may be written freely.
    number = re.compile(r"(?<![\w.])-?\d+\.\d+(?:e[+-]\d+)?")
    printed = set(number.findall(numbers_text()))
    stated = set(number.findall(guide_text()))
    assert stated, "no numbers found in the guide"
    assert stated <= printed, sorted(stated - printed)


def test_the_committed_closed_form_tables_are_those_of_the_current_library(fig):
    text = numbers_text()
    table = fig.prior_table(fig.digits_test(), fig.FULL.table_T)
    for line in fig.format_prior_table(table, fig.FULL.table_T):
        assert line in text, line
    s = fig.NoiseSchedule.from_name("linear", fig.FULL.T)
    rows = fig.posterior_rows(s, sorted({1, 2, 3, 10, fig.FULL.T // 10, fig.FULL.T}))
    for line in fig.format_posterior_rows(rows):
        assert line in text, line
    lam = fig.lambda_weight(s)
    assert f"t=2: {float(lam[1]):.2e}" in text


def test_the_guide_closes_with_the_command_and_the_sections():
    text = guide_text()
    closing = text[text.rindex("\n## ") :]
    assert "make figures" in closing and "scripts/figures.py" in closing
    for k in range(1, 11):
        assert f"{k}." in closing


def test_the_readme_links_the_guide_on_its_first_screen():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:25])
    assert "docs/guide.md" in first_screen


def test_make_figures_runs_the_script():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\nfigures:") :].split("\n\n")[0]
    assert "scripts/figures.py" in recipe
