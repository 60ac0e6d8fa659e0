"""Forward processes as executable maths: closed forms vs matrix exponentials, samplers vs exact marginals,
posteriors vs Bayes' rule, Duo's alpha vs Monte Carlo (IDLM §2.1, App. B)."""
import math

import pytest
import torch

from processes import (Absorbing, Uniform, as_probs, alpha_loglinear, dalpha_loglinear, sigma_bar_loglinear,
                       dsigma_bar_loglinear, sample_time, time_grid, duo_gamma, duo_coefficients, duo_latent,
                       duo_alpha, duo_gamma_for_alpha)

PROCESSES = [Absorbing, Uniform]


def soft_x0(shape, V, seed, N=None):
    """Strictly positive probabilities over the first N columns (all V when N is None)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(*shape, N or V, generator=g, dtype=torch.float64), -1)
    return as_probs(p, V)


# ------------------------------------------------------------------------------------------------- schedules


def test_loglinear_schedule_derivatives():
    """alpha_t = exp(-sigma_bar_t), alpha_0 = 1, alpha_1 = eps; dalpha and dsigma_bar are the t-derivatives."""
    t = torch.linspace(0, 1, 11, dtype=torch.float64, requires_grad=True)
    a, sb = alpha_loglinear(t), sigma_bar_loglinear(t)
    assert torch.allclose(a, torch.exp(-sb))
    assert a[0].item() == 1.0 and abs(a[-1].item() - 1e-3) < 1e-12
    (da,) = torch.autograd.grad(a.sum(), t)
    (dsb,) = torch.autograd.grad(sigma_bar_loglinear(t).sum(), t)
    assert torch.allclose(dalpha_loglinear(t), da) and dalpha_loglinear(t).shape == t.shape
    assert torch.allclose(dsigma_bar_loglinear(t), dsb)


def test_sample_time_is_stratified():
    """t = eps_t + (1 - eps_t)(i + U0)/B: exactly one u in each bin [i/B, (i+1)/B), all t in [eps_t, 1]."""
    for seed in range(5):
        B, eps_t = 16, 1e-3
        t = sample_time(B, torch.Generator().manual_seed(seed), eps_t=eps_t)
        assert t.shape == (B,) and t.dtype == torch.float32
        assert (t >= eps_t).all() and (t <= 1).all()
        u = (t.double() - eps_t) / (1 - eps_t)
        assert torch.equal(torch.floor(u * B).long().clamp(0, B - 1), torch.arange(B))
        spacing = u[1:] - u[:-1]                           # one shared offset: equal spacing 1/B
        assert torch.allclose(spacing, torch.full_like(spacing, 1 / B), atol=1e-5)
    t1 = sample_time(8, torch.Generator().manual_seed(1))
    t2 = sample_time(8, torch.Generator().manual_seed(2))
    assert not torch.equal(t1, t2)


def test_time_grid_and_as_probs():
    """Sampling grid runs from 1 down to t_min; as_probs one-hots ids and zero-pads N-column probs to V."""
    g = time_grid(4)
    assert g.dtype == torch.float64 and len(g) == 5 and g[0] == 1 and abs(g[-1] - 1e-5) < 1e-15
    assert (g[1:] < g[:-1]).all()
    ids = torch.tensor([[0, 2]])
    assert torch.equal(as_probs(ids, 4), torch.tensor([[[1.0, 0, 0, 0], [0, 0, 1.0, 0]]]))
    p = torch.tensor([[[0.25, 0.75]]], dtype=torch.float64)
    assert torch.equal(as_probs(p, 3), torch.tensor([[[0.25, 0.75, 0.0]]], dtype=torch.float64))


# ------------------------------------------------------------------------------------- rate and transition


def test_rate_matrices():
    """Q_abs is IDLM eq. 12; Q_uni is IDLM eq. 17 divided by N. Columns sum to 0, off-diagonals >= 0."""
    N = 4
    Qa, Qu = Absorbing(N).rate_matrix(), Uniform(N).rate_matrix()
    eq12 = torch.zeros(N + 1, N + 1, dtype=torch.float64)
    for x in range(N):
        eq12[x, x], eq12[N, x] = -1, 1
    eq17 = torch.ones(N, N, dtype=torch.float64) - N * torch.eye(N, dtype=torch.float64)
    assert torch.equal(Qa, eq12) and torch.allclose(Qu, eq17 / N)
    for Q in (Qa, Qu):
        assert torch.allclose(Q.sum(0), torch.zeros(len(Q), dtype=torch.float64))
        assert (Q - torch.diag(Q.diag()) >= 0).all()


@pytest.mark.parametrize("Process", PROCESSES)
@pytest.mark.parametrize("N", [2, 5, 8])
def test_transition_matrix_is_matrix_exponential(Process, N):
    """Closed forms IDLM eq. 14/16 (absorbing) and eq. 21 with alpha = e^{-sigma_bar} (uniform, rescaled Q)
    equal torch.linalg.matrix_exp(sigma_bar Q), for tiny to large sigma_bar."""
    proc = Process(N)
    Q = proc.rate_matrix()
    for sb in [1e-6, 0.1, 1.0, 3.7]:
        assert torch.allclose(proc.transition_matrix(sb), torch.linalg.matrix_exp(sb * Q), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("Process", PROCESSES)
def test_marginal_is_transition_times_x0(Process):
    """q(x_t | x0) = exp(sigma_bar Q) x0 (IDLM eq. 2) for ids and for probs x0 (N or V columns)."""
    N, sb = 5, 0.7
    proc = Process(N)
    T = torch.linalg.matrix_exp(sb * proc.rate_matrix())
    alpha = torch.full((2, 1), math.exp(-sb), dtype=torch.float64)
    ids = torch.tensor([[0, 3, 4], [1, 2, 0]])
    assert torch.allclose(proc.marginal(ids, alpha), T[:, ids].permute(1, 2, 0))
    for p in (soft_x0((2, 3), proc.V, 0, N=N), soft_x0((2, 3), N, 1)):
        assert torch.allclose(proc.marginal(p, alpha), as_probs(p, proc.V) @ T.T)


@pytest.mark.parametrize("Process", PROCESSES)
@pytest.mark.parametrize("soft", [False, True])
def test_sample_frequencies_match_marginal(Process, soft):
    """sample() draws x_t ~ q(. | x0): empirical frequencies over 100k draws are within 5 binomial standard
    errors of marginal() (fixed generator, so deterministic)."""
    N, n = 4, 100_000
    proc = Process(N)
    alpha = torch.tensor([[0.3]], dtype=torch.float64)
    x0 = torch.tensor([[0.1, 0.6, 0.0, 0.3]], dtype=torch.float64)[None].expand(1, n, N) if soft \
        else torch.full((1, n), 2)
    x_t = proc.sample(x0, alpha, torch.Generator().manual_seed(0))
    assert x_t.shape == (1, n) and x_t.dtype == torch.long
    freq = torch.bincount(x_t.flatten(), minlength=proc.V).double() / n
    p = proc.marginal(x0[:, :1], alpha)[0, 0]
    assert (freq - p).abs().max() <= 5 * (p * (1 - p) / n).sqrt().max() + 1e-12


# ------------------------------------------------------------------------------------------------- posteriors


def bayes_posterior(proc, x_t, x0p, sb_s, sb_t):
    """q(x_s | x_t, x0) proportional to q(x_t | x_s) q(x_s | x0) by enumeration, with q(x_t | x_s) the column
    x_s of exp((sigma_bar_t - sigma_bar_s) Q) (keep probability alpha_t / alpha_s)."""
    Q = proc.rate_matrix()
    T_s, T_st = torch.linalg.matrix_exp(sb_s * Q), torch.linalg.matrix_exp((sb_t - sb_s) * Q)
    out = torch.empty(*x_t.shape, proc.V, dtype=torch.float64)
    for b in range(x_t.shape[0]):
        for l in range(x_t.shape[1]):
            joint = T_st[x_t[b, l]] * (T_s @ x0p[b, l])   # (V,) over x_s
            out[b, l] = joint / joint.sum()
    return out


@pytest.mark.parametrize("Process", PROCESSES)
@pytest.mark.parametrize("soft", [False, True])
def test_posterior_is_bayes_rule(Process, soft):
    """Absorbing posterior (DiDi eq. 2) and the uniform closed form equal Bayes' rule by enumeration, over every
    reachable x_t, for ids and for soft x0 (where Bayes' rule marginalises over x0)."""
    N, sb_s, sb_t = 4, 0.4, 1.1
    proc = Process(N)
    a_s = torch.full((1, 1), math.exp(-sb_s), dtype=torch.float64)
    a_t = torch.full((1, 1), math.exp(-sb_t), dtype=torch.float64)
    x_t = torch.arange(proc.V)[None]                              # (1, V): every value of x_t
    if soft:
        x0 = soft_x0((1, proc.V), proc.V, 3, N=N)                 # strictly positive on real tokens
        x0p = x0
    else:
        x0 = torch.full((1, proc.V), 1)
        if Process is Absorbing:                                  # unmasked x_t must equal x0 to be reachable
            x_t, x0 = torch.tensor([[1, N]]), torch.tensor([[1, 1]])
        x0p = as_probs(x0, proc.V, torch.float64)
    got = proc.posterior(x_t, x0, a_s, a_t)
    assert got.shape == (*x_t.shape, proc.V)
    assert torch.allclose(got.sum(-1), torch.ones(x_t.shape, dtype=torch.float64))
    assert torch.allclose(got, bayes_posterior(proc, x_t, x0p, sb_s, sb_t), atol=1e-12)


# ------------------------------------------------------------------------------------------------------ Duo


def test_duo_coefficients_and_latent():
    """Variance preserving: a^2 + s^2 = 1, a/s = exp(-gamma/2); w = a x0 + s eps (IDLM eq. 22)."""
    gamma = torch.tensor([[-3.0], [0.5]], dtype=torch.float64)
    a, s = duo_coefficients(gamma)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a)) and torch.allclose(a / s, torch.exp(-gamma / 2))
    x0, eps = soft_x0((2, 3), 5, 0), torch.randn(2, 3, 5, dtype=torch.float64)
    assert torch.allclose(duo_latent(x0, gamma, eps), a[..., None] * x0 + s[..., None] * eps)
    assert torch.allclose(duo_gamma(torch.tensor([0.0, 1.0]), -3.0, 2.0), torch.tensor([-3.0, 2.0]))


@pytest.mark.parametrize("N", [8, 64])
def test_duo_alpha_matches_monte_carlo_argmax(N):
    """P(argmax(a e_x + s eps) = x) = alpha + (1 - alpha)/N with alpha = duo_alpha (the uniform-process
    relation); the other tokens each get (1 - alpha)/N. 200k draws per gamma, 5 binomial standard errors."""
    n, g = 200_000, torch.Generator().manual_seed(N)
    for gamma in [-4.0, -2.0, 0.0, 2.0]:
        alpha, _ = duo_alpha(torch.tensor(gamma, dtype=torch.float64), N)
        a, s = duo_coefficients(torch.tensor(gamma))
        w = s * torch.randn(n, N, generator=g)
        w[:, 0] += a
        count = torch.bincount(w.argmax(-1), minlength=N).double()
        p_clean = alpha + (1 - alpha) / N
        p_other = (1 - alpha) / N                               # every wrong token equally likely
        # 5 binomial standard errors, plus 3 counts of slack for rare tokens (Poisson regime at small gamma)
        assert abs(count[0] - n * p_clean) <= 5 * math.sqrt(n * p_clean * (1 - p_clean)) + 3
        assert (count[1:] - n * p_other).abs().max() <= 5 * math.sqrt(n * p_other * (1 - p_other)) + 3


def test_duo_alpha_shape_limits_derivative_and_inverse():
    """alpha decreases from 1 (no noise) to 0 (pure noise); d alpha/d gamma (from the derivative integral)
    matches central differences of alpha; duo_gamma_for_alpha inverts duo_alpha."""
    N = 16
    gamma = torch.linspace(-6, 6, 49, dtype=torch.float64).view(7, 7)
    alpha, dalpha = duo_alpha(gamma, N)
    assert alpha.shape == gamma.shape and alpha.dtype == torch.float64
    flat = alpha.flatten()
    assert (flat[1:] <= flat[:-1]).all() and flat[0] > 0.9999 and flat[-1] < 0.05
    assert (dalpha[(alpha > 1e-3) & (alpha < 0.999)] < 0).all()
    h = 0.02  # well above the table step (0.008), well below the curvature scale
    fd = (duo_alpha(gamma + h, N)[0] - duo_alpha(gamma - h, N)[0]) / (2 * h)
    assert torch.allclose(dalpha, fd, atol=2e-4)
    for target in [0.999, 0.5, 0.001]:
        assert abs(duo_alpha(torch.tensor(duo_gamma_for_alpha(target, N)), N)[0].item() - target) < 1e-5
    # the same alpha needs a less noisy latent (smaller gamma) when more tokens compete for the argmax
    assert duo_gamma_for_alpha(0.5, 64) < duo_gamma_for_alpha(0.5, 8)
