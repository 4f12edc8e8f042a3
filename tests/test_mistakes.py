"""Mistakes people make when they derive DDPM (docs/guide.md, section 10), one test each.

Every test checks the library's form against an independent truth (Gaussian conditioning, the chain of
eq. 2 run by hand, a Monte-Carlo KL, the data's entropy) and checks that the tempting wrong form fails
the same comparison, so a test would catch the library if it ever made the mistake.
"""

import math

import pytest
import torch

from ddpm.diffusion import p_mean_variance, q_sample, q_step
from ddpm.likelihood import variational_bound
from ddpm.losses import prior_kl
from ddpm.oracle import GaussianMixture
from ddpm.schedules import BETA_SCHEDULES, NoiseSchedule

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def run_chain_by_hand(beta: torch.Tensor, x0: torch.Tensor, g: torch.Generator) -> list:
    """x_1..x_T by the definition, eq. 2: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t."""
    xs, x = [], x0
    for b in beta.tolist():
        x = math.sqrt(1 - b) * x + math.sqrt(b) * torch.randn(x.shape, generator=g, dtype=F64)
        xs.append(x)
    return xs


def within(estimate: torch.Tensor, truth: float, se: float, k: float = 5.0) -> bool:
    return abs(float(estimate) - truth) < k * se


# --------------------------------------------------------------------------------------------------
# eq. 11: mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t), with a minus
# --------------------------------------------------------------------------------------------------


def test_eq11_subtracts_the_noise():
    s = NoiseSchedule.from_name("linear", 100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, generator=g, dtype=F64)
    eps = torch.randn(64, 3, generator=g, dtype=F64)
    t = torch.randint(1, 100, (64,), generator=g)
    x_t = q_sample(s, x0, t, eps)
    # Truth: Gaussian conditioning of (x_{t-1}, x_t) given x_0, where x_{t-1} ~ N(sqrt(ab') x0, 1 - ab')
    # and x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e: E[x_{t-1} | x_t, x_0] = m1 + C / V (x_t - m2).
    ab, ab_prev, alpha = s.alpha_bar[t, None], s.alpha_bar_prev[t, None], s.alpha[t, None]
    m1, m2 = ab_prev.sqrt() * x0, ab.sqrt() * x0
    truth = m1 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * (x_t - m2)
    # The library's eq. 11 fed the true eps is the posterior mean exactly.
    correct = p_mean_variance(s, x_t, t, eps, prediction="eps").model_mean
    assert torch.allclose(correct, truth, atol=1e-10)
    beta = s.beta[t, None]
    wrong = (x_t + beta / (1 - ab).sqrt() * eps) / alpha.sqrt()
    assert (wrong - truth).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrong",
    [
        lambda ab, x0, eps: ab * x0 + (1 - ab) * eps,  # no square roots: variances used as scales
        lambda ab, x0, eps: ab * x0 + (1 - ab).sqrt() * eps,  # sqrt forgotten on alpha_bar
        lambda ab, x0, eps: ab.sqrt() * x0 + ((1 - ab) * eps.abs()).sqrt(),  # eps under the root
    ],
    ids=["no-sqrt", "alpha-bar-unrooted", "eps-under-the-root"],
)
def test_q_sample_matches_the_chain_and_the_wrong_forms_do_not(wrong):
    beta = torch.linspace(0.02, 0.2, 8, dtype=F64)  # alpha_bar_8 ~ 0.45: far from both ends
    s = NoiseSchedule.from_betas(beta)
    g = torch.Generator().manual_seed(1)
    n = 40_000
    x0 = torch.full((n,), 2.0, dtype=F64)
    chain = run_chain_by_hand(beta, x0, g)[-1]
    t = torch.full((n,), 7)
    eps = torch.randn(n, generator=g, dtype=F64)
    right = q_sample(s, x0, t, eps)
    bad = wrong(s.alpha_bar[7], x0, eps)
    se_mean = math.sqrt(float(chain.var()) * 2 / n)
    se_var = float(chain.var()) * math.sqrt(4 / n)
    assert within(right.mean() - chain.mean(), 0.0, se_mean)
    assert within(right.var() - chain.var(), 0.0, se_var)
    assert not (
        within(bad.mean() - chain.mean(), 0.0, se_mean)
        and within(bad.var() - chain.var(), 0.0, se_var)
    )


# --------------------------------------------------------------------------------------------------
# beta_t is a variance, not a standard deviation
# --------------------------------------------------------------------------------------------------


def test_beta_is_the_variance_of_the_step():
    s = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(2)
    n = 20_000
    x_right = torch.randn(n, generator=g, dtype=F64)  # unit-variance data
    x_wrong = x_right.clone()
    for i in range(1000):
        t = torch.full((n,), i)
        eps = torch.randn(n, generator=g, dtype=F64)
        x_right = q_step(s, x_right, t, eps)
        x_wrong = s.alpha[i].sqrt() * x_wrong + s.beta[i] * eps  # beta used as a standard deviation
    # Truth: a variance-preserving chain keeps Var = 1 (c1^2 + c2^2 = (1 - beta) + beta = 1).
    se = math.sqrt(2 / n)
    assert within(x_right.var(), 1.0, se)
    assert float(x_wrong.var()) < 0.1  # the signal is shrunk away and too little noise replaces it


# --------------------------------------------------------------------------------------------------
# L_T = KL(q(x_T | x_0) || p(x_T)): q first, the data-conditioned forward marginal, not p
# --------------------------------------------------------------------------------------------------


def test_prior_term_is_the_kl_from_the_forward_marginal():
    s = NoiseSchedule.from_betas(torch.full((5,), 0.1, dtype=F64))  # short: alpha_bar_T = 0.59
    x0 = torch.tensor([[1.5, -0.5, 0.0]], dtype=F64)
    g = torch.Generator().manual_seed(3)
    n = 200_000
    # Truth: E_{x_T ~ q(x_T | x_0)} [log q(x_T | x_0) - log N(x_T; 0, I)] by Monte Carlo.
    mean, var = s.sqrt_alpha_bar[-1] * x0, 1 - s.alpha_bar[-1]
    x_T = q_sample(
        s, x0.expand(n, 3), torch.full((n,), 4), torch.randn(n, 3, generator=g, dtype=F64)
    )
    q = torch.distributions.Normal(mean, var.sqrt())
    p = torch.distributions.Normal(0.0, 1.0)
    log_ratio = (q.log_prob(x_T) - p.log_prob(x_T)).sum(1)
    mc, se = float(log_ratio.mean()), float(log_ratio.std()) / math.sqrt(n)
    assert within(prior_kl(s, x0)[0], mc, se)
    reversed_kl = torch.distributions.kl_divergence(p, q).sum()  # KL(p || q): the arguments swapped
    assert not within(reversed_kl, mc, se)
    assert not within(torch.tensor(0.0), mc, se)  # p in place of q: KL(p || p) = 0


# --------------------------------------------------------------------------------------------------
# alpha_bar_t = prod_{s=1}^{t} alpha_s: no alpha_0, no missing factor
# --------------------------------------------------------------------------------------------------


def test_alpha_bar_is_the_product_from_step_one():
    beta = torch.linspace(0.05, 0.3, 10, dtype=F64)
    s = NoiseSchedule.from_betas(beta)
    g = torch.Generator().manual_seed(4)
    n = 40_000
    chain = run_chain_by_hand(beta, torch.zeros(n, dtype=F64), g)
    measured = torch.stack([x.var() for x in chain])  # Var(x_t | x_0 = 0) = 1 - alpha_bar_t
    se = measured * math.sqrt(2 / n)
    right = 1 - s.alpha_bar  # index i holds paper step i + 1
    off_by_one = (
        1 - s.alpha_bar_prev
    )  # the product stopped one factor short (an "alpha_0 = 1" slot)
    assert ((measured - right).abs() < 5 * se).all()
    assert ((measured - off_by_one).abs() > 5 * se).any()


# --------------------------------------------------------------------------------------------------
# beta_t increases with t
# --------------------------------------------------------------------------------------------------


def test_schedules_increase_and_an_increasing_schedule_gives_a_tighter_bound():
    for name, fn in BETA_SCHEDULES.items():
        beta = fn(1000)
        assert (beta[1:] >= beta[:-1]).all(), name
    # Why: small steps first keep the reverse steps near x_0 nearly Gaussian. The same betas reversed
    # (same alpha_bar_T, same L_T) start with noise of std sqrt(0.1) = 0.32, coarser than the data's
    # structure (two modes 0.6 apart, std 0.05): p(x_0 | x_1) is then bimodal, the Gaussian reverse
    # step cannot follow, and the bound of the exact denoiser loosens (truth: -log p of the data).
    data = GaussianMixture.isotropic([0.5, 0.5], [[-0.3, 0.0], [0.3, 0.0]], std=0.05)
    g = torch.Generator().manual_seed(5)
    x0 = data.sample(500, g)
    nll = float((-data.log_prob(x0)).mean() / (2 * math.log(2)))
    s = NoiseSchedule.from_name("linear", 200)
    rev = NoiseSchedule.from_betas(s.beta.flip(0))
    bounds = {}
    for label, sched in (("increasing", s), ("decreasing", rev)):
        b = variational_bound(
            data.denoiser(sched), sched, x0, decoder="gaussian", variance="fixed_large", generator=g
        )
        bounds[label] = float(b.total_bpd.mean())
    assert nll < bounds["increasing"] < nll + 0.5
    assert bounds["decreasing"] > bounds["increasing"] + 1.0


# --------------------------------------------------------------------------------------------------
# the forward chain is Markov: x_t depends on x_{t-1} alone
# --------------------------------------------------------------------------------------------------


def test_the_forward_chain_is_markov():
    s = NoiseSchedule.from_name("linear", 100)
    g = torch.Generator().manual_seed(6)
    n = 40_000
    x0 = torch.zeros(n, dtype=F64)
    i = 50
    # q_step builds x_{t-1} -> x_t; the wrong "trajectory" draws each x_t from q(x_t | x_0) on its own.
    x_prev = q_sample(s, x0, torch.full((n,), i - 1), torch.randn(n, generator=g, dtype=F64))
    x_t = q_step(s, x_prev, torch.full((n,), i), torch.randn(n, generator=g, dtype=F64))
    x_t_indep = q_sample(s, x0, torch.full((n,), i), torch.randn(n, generator=g, dtype=F64))

    # Truth (eq. 2): regressing x_t on x_{t-1} gives slope sqrt(alpha_t) and residual variance beta_t.
    def slope_and_residual(y, x):
        slope = float(((x - x.mean()) * (y - y.mean())).mean() / x.var())
        return slope, float((y - slope * x).var())

    slope, resid = slope_and_residual(x_t, x_prev)
    se_slope = math.sqrt(float(s.beta[i]) / (n * float(x_prev.var())))
    assert abs(slope - float(s.alpha[i].sqrt())) < 5 * se_slope
    assert abs(resid - float(s.beta[i])) < 5 * float(s.beta[i]) * math.sqrt(2 / n)
    slope_bad, _ = slope_and_residual(x_t_indep, x_prev)
    assert abs(slope_bad - float(s.alpha[i].sqrt())) > 0.5
