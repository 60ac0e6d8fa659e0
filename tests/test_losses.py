"""Losses as executable maths: each closed form against its defining equation computed by brute force on a
tiny vocabulary (IDLM eq. 3, 4, 5), the identities that tie them together, their zeros and signs, their
gradients with respect to a soft x0 (IDLM §3.2 / App. C) and the objectives' corrupt() + loss() paths."""
import math

import numpy as np
import pytest
import torch

from data import SyntheticLanguage
from data import exact_denoiser
from processes import Absorbing, Uniform, as_probs, duo_alpha, sample_time
from losses import (mdlm_loss, sedd_absorb_loss, sedd_uniform_loss, udlm_loss, duo_loss,
                    MDLMObjective, SEDDObjective, DuoObjective, duo_curriculum_objective)
from model import build_model

B, L, N = 2, 6, 4
F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def soft(V, seed, n_real=None):
    """(B, L, V) strictly positive probabilities on the first n_real columns (all when None)."""
    return as_probs(torch.softmax(rand(B, L, n_real or V, seed=seed), -1), V)


def schedule(sigma_bars=(0.3, 1.7), rates=(0.9, 2.5)):
    """Per-sequence (B, 1) columns: sigma_bar, dsigma_bar and the matching alpha = e^{-sigma_bar},
    alpha' = -dsigma_bar * alpha."""
    sb, dsb = torch.tensor(sigma_bars, dtype=F64)[:, None], torch.tensor(rates, dtype=F64)[:, None]
    alpha = torch.exp(-sb)
    return sb, dsb, alpha, -dsb * alpha


def K(a):
    return a * (math.log(a) - 1) if a > 0 else 0.0


def brute_score_entropy(Q, x0p, x_t, log_score, sb, dsb):
    """IDLM eq. 3 term by term: sum over y != x_t of lambda (s_y - r_y log s_y + K(r_y)) with
    lambda = dsigma_bar * Q[x_t, y] (forward rate from y into x_t; note Q[y, x_t], the rate out of the mask,
    is 0 for the absorbing process) and r_y = p_t(y|x0)/p_t(x_t|x0) from torch.linalg.matrix_exp."""
    out = torch.zeros(x_t.shape, dtype=F64)
    for b in range(x_t.shape[0]):
        T = torch.linalg.matrix_exp(sb[b, 0] * Q)
        for l in range(x_t.shape[1]):
            p, x = T @ x0p[b, l], int(x_t[b, l])
            for y in range(len(Q)):
                lam = float(Q[x, y] * dsb[b, 0])
                if y == x or lam == 0:
                    continue
                r, s = float(p[y] / p[x]), float(log_score[b, l, y].exp())
                out[b, l] += lam * (s - r * math.log(s) + K(r))
    return out


# ------------------------------------------------------------------------------ losses vs their definitions


@pytest.mark.parametrize("soft_x0", [False, True])
def test_sedd_absorb_is_score_entropy_eq3(soft_x0):
    """sedd_absorb_loss == IDLM eq. 3 with Q_abs (eq. 12) by explicit sum, masked and unmasked x_t alike."""
    proc = Absorbing(N)
    sb, dsb, _, _ = schedule()
    x0 = soft(proc.V, 1, N) if soft_x0 else torch.randint(0, N, (B, L), generator=gen(1))
    x0p = as_probs(x0, proc.V, F64)
    x_t = torch.where(torch.arange(L) % 2 == 0, N, x0p.argmax(-1))   # half masked, half clean
    if not soft_x0:
        x_t[0, 1] = (x_t[0, 1] + 1) % N                             # unreachable unmasked x_t: no rate, 0
    log_score = rand(B, L, proc.V, seed=2)
    got = sedd_absorb_loss(log_score, x0, x_t, sb, dsb, proc.mask_id)
    assert torch.allclose(got, brute_score_entropy(proc.rate_matrix(), x0p, x_t, log_score, sb, dsb))
    assert (got[:, 1::2] == 0).all() and (got[:, ::2] > 0).all()


@pytest.mark.parametrize("soft_x0", [False, True])
def test_sedd_uniform_is_score_entropy_eq3(soft_x0):
    """sedd_uniform_loss == IDLM eq. 3 with Q_uni = eq. 17 / N by explicit sum over y != x_t."""
    proc = Uniform(N)
    sb, dsb, _, _ = schedule()
    x0 = soft(N, 3) if soft_x0 else torch.randint(0, N, (B, L), generator=gen(3))
    x_t = torch.randint(0, N, (B, L), generator=gen(4))
    log_score = rand(B, L, N, seed=5)
    got = sedd_uniform_loss(log_score, x0, x_t, sb, dsb)
    want = brute_score_entropy(proc.rate_matrix(), as_probs(x0, N, F64), x_t, log_score, sb, dsb)
    assert torch.allclose(got, want)


def test_mdlm_is_eq4_explicit_sum():
    """mdlm_loss == -lambda_t sum_y x0_y log x0_hat_y at masked positions, lambda_t = -alpha'/(1 - alpha)
    (IDLM eq. 4, DiDi eq. 3), and 0 at unmasked positions."""
    _, _, alpha, dalpha = schedule()
    x0 = soft(N + 1, 6, N)
    log_x0_hat = torch.log_softmax(rand(B, L, N + 1, seed=7), -1)
    x_t = torch.randint(0, N + 1, (B, L), generator=gen(8))
    x_t[:, 0] = N
    got = mdlm_loss(log_x0_hat, x0, x_t, alpha, dalpha, N)
    want = torch.zeros(B, L, dtype=F64)
    for b in range(B):
        lam = -dalpha[b, 0] / (1 - alpha[b, 0])
        for l in range(L):
            if x_t[b, l] == N:
                want[b, l] = -lam * sum(x0[b, l, y] * log_x0_hat[b, l, y] for y in range(N + 1))
    assert torch.allclose(got, want) and (got[:, 0] > 0).all()


@pytest.mark.parametrize("soft_x0", [False, True])
def test_udlm_closed_form_is_minus_eq5_bracket(soft_x0):
    """udlm_loss == -lambda * [1/p(x_t|x0) - 1/p(x_t|x0_hat) - sum_{y != x_t} p(y|x0)/p(x_t|x0)
    log(p(x_t|x0_hat) p(y|x0) / (p(y|x0_hat) p(x_t|x0)))], lambda = -alpha'/(N alpha): the closed form is
    MINUS IDLM eq. 5's printed bracket, which is <= 0 (so the printed sign would be maximised)."""
    sb, _, alpha, dalpha = schedule()
    x0 = soft(N, 9) if soft_x0 else torch.randint(0, N, (B, L), generator=gen(9))
    x0p = as_probs(x0, N, F64)
    x0_hat = soft(N, 10)
    x_t = torch.randint(0, N, (B, L), generator=gen(11))
    got = udlm_loss(x0_hat.log(), x0, x_t, alpha, dalpha)
    bracket = torch.zeros(B, L, dtype=F64)
    for b in range(B):
        T = torch.linalg.matrix_exp(sb[b, 0] * Uniform(N).rate_matrix())
        for l in range(L):
            p, ph, i = T @ x0p[b, l], T @ x0_hat[b, l], int(x_t[b, l])
            bracket[b, l] = 1 / p[i] - 1 / ph[i] - sum(
                p[y] / p[i] * torch.log(ph[i] * p[y] / (ph[y] * p[i])) for y in range(N) if y != i)
    weight = -dalpha / (N * alpha)
    assert torch.allclose(got, -weight * bracket)
    assert (bracket < 0).all() and (got > 0).all()


def test_udlm_equals_uniform_sedd_with_denoiser_score():
    """With the denoiser-induced score s_y = q(y|x0_hat)/q(x_t|x0_hat), uniform score entropy (eq. 3) IS the
    UDLM loss (eq. 5): both are lambda sum_y [r log(r/rhat) - r + rhat] with dsigma_bar/N = -alpha'/(N alpha)."""
    sb, dsb, alpha, dalpha = schedule()
    x0, x0_hat = soft(N, 12), soft(N, 13)
    x_t = torch.randint(0, N, (B, L), generator=gen(14))
    q_hat = Uniform(N).marginal(x0_hat, alpha)                        # (B, L, N)
    log_score = q_hat.log() - q_hat.gather(-1, x_t[..., None]).log()
    assert torch.allclose(sedd_uniform_loss(log_score, x0, x_t, sb, dsb), udlm_loss(x0_hat.log(), x0, x_t, alpha, dalpha))


def test_sedd_absorb_with_denoiser_score_is_weighted_kl():
    """At a masked position the denoiser-induced absorbing score is s_y = x0_hat_y / expm1(sigma_bar); then
    score entropy = lambda_t KL(x0 || x0_hat) = mdlm_loss - lambda_t H(x0), lambda_t = -alpha'/(1 - alpha):
    a SEDD score model and an MDLM denoiser carry the same information."""
    sb, dsb, alpha, dalpha = schedule()
    x0, x0_hat = soft(N + 1, 15, N), soft(N + 1, 16, N)
    x_t = torch.full((B, L), N)
    log_score = x0_hat.log() - torch.expm1(sb)[..., None].log()     # mask column: log 0, excluded anyway
    entropy = -(x0[..., :N] * x0[..., :N].log()).sum(-1)
    want = mdlm_loss(x0_hat.log(), x0, x_t, alpha, dalpha, N) - (-dalpha / (1 - alpha)) * entropy
    assert torch.allclose(sedd_absorb_loss(log_score, x0, x_t, sb, dsb, N), want)


# -------------------------------------------------------------------------------------- signs and zeros


def test_losses_are_nonnegative():
    """Random scores / denoisers, random x_t, ids and soft x0: every per-token loss is >= 0."""
    sb, dsb, alpha, dalpha = schedule()
    for seed in range(5):
        for x0 in (soft(N + 1, seed, N), torch.randint(0, N, (B, L), generator=gen(seed))):
            x_abs = torch.randint(0, N + 1, (B, L), generator=gen(seed + 100))
            x_uni = torch.randint(0, N, (B, L), generator=gen(seed + 200))
            x0u = x0[..., :N] if x0.is_floating_point() else x0
            w = 3 * rand(B, L, N, seed=seed + 300)
            losses = [mdlm_loss(torch.log_softmax(rand(B, L, N + 1, seed=seed), -1), x0, x_abs, alpha, dalpha, N),
                      sedd_absorb_loss(3 * rand(B, L, N + 1, seed=seed), x0, x_abs, sb, dsb, N),
                      sedd_uniform_loss(3 * rand(B, L, N, seed=seed), x0u, x_uni, sb, dsb),
                      udlm_loss(torch.log_softmax(3 * rand(B, L, N, seed=seed), -1), x0u, x_uni, alpha, dalpha),
                      duo_loss(torch.log_softmax(rand(B, L, N, seed=seed), -1), x0u, w, alpha, dalpha)]
            for value in losses:
                assert value.shape == (B, L) and (value >= -1e-12).all()


def test_losses_vanish_at_the_truth():
    """Zero where theory says: UDLM / Duo at x0_hat = x0 (ids or soft); SEDD with the exact ratios s = r; MDLM
    only with x0_hat = one-hot(x0) (with a soft x0 its minimum is lambda H(x0) > 0)."""
    sb, dsb, alpha, dalpha = schedule()
    x_uni = torch.randint(0, N, (B, L), generator=gen(20))
    ids, x0 = torch.randint(0, N, (B, L), generator=gen(21)), soft(N, 22)
    assert udlm_loss(x0.log(), x0, x_uni, alpha, dalpha).abs().max() < 1e-12
    one_hot_log = as_probs(ids, N, F64).log()                         # contains -inf
    assert udlm_loss(one_hot_log, ids, x_uni, alpha, dalpha).abs().max() < 1e-12
    assert duo_loss(x0.log(), x0, rand(B, L, N, seed=23), alpha, dalpha).abs().max() < 1e-12
    q = Uniform(N).marginal(x0, alpha)
    exact = q.log() - q.gather(-1, x_uni[..., None]).log()            # log r_y
    assert sedd_uniform_loss(exact, x0, x_uni, sb, dsb).abs().max() < 1e-12
    x0a, masked = soft(N + 1, 24, N), torch.full((B, L), N)
    exact_abs = x0a.log() - torch.expm1(sb)[..., None].log()          # log(r x0_y); mask column -inf, unused
    assert sedd_absorb_loss(exact_abs, x0a, masked, sb, dsb, N).abs().max() < 1e-12
    assert mdlm_loss(as_probs(ids, N + 1, F64).log(), ids, masked, alpha, dalpha, N).abs().max() == 0
    assert (mdlm_loss(x0a.log(), x0a, masked, alpha, dalpha, N) > 0).all()


def test_mdlm_survives_subs_minus_infinity():
    """SUBS outputs log 0 = -inf (mask column; everything but x_t at unmasked positions). Value and gradient
    with respect to a soft x0 stay finite: no 0 * -inf = nan."""
    _, _, alpha, dalpha = schedule()
    x_t = torch.randint(0, N + 1, (B, L), generator=gen(30))
    x_t[:, :2] = N
    logits = rand(B, L, N + 1, seed=31)
    logits[..., N] = -math.inf                                        # mask logit
    log_x0_hat = torch.log_softmax(logits, -1)
    carry = as_probs(x_t.clamp(max=N - 1), N + 1, F64).log()          # one-hot carry-over, -inf elsewhere
    log_x0_hat = torch.where((x_t == N)[..., None], log_x0_hat, carry)
    theta = rand(B, L, N, seed=32).requires_grad_()
    value = mdlm_loss(log_x0_hat, torch.softmax(theta, -1), x_t, alpha, dalpha, N)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(theta.grad).all()
    assert (value[x_t != N] == 0).all() and theta.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------- gradients in x0


def test_gradients_finite_at_simplex_vertices():
    """x0 exactly one-hot (float, requires_grad): every loss has a finite value and gradient (K(0) = 0,
    0 * log 0 = 0), and MDLM's gradient is the exact d/dx0_y = lambda_t * (-log x0_hat_y) at masked positions,
    also where x0_y = 0."""
    sb, dsb, alpha, dalpha = schedule()
    ids = torch.randint(0, N, (B, L), generator=gen(35))
    x_abs = torch.where(torch.arange(L) % 2 == 0, N, ids)
    x_uni = torch.randint(0, N, (B, L), generator=gen(36))
    log_x0_hat = torch.log_softmax(rand(B, L, N + 1, seed=37), -1)
    for loss_of in (lambda x0: mdlm_loss(log_x0_hat, x0, x_abs, alpha, dalpha, N),
                    lambda x0: sedd_absorb_loss(rand(B, L, N + 1, seed=38), x0, x_abs, sb, dsb, N),
                    lambda x0: sedd_uniform_loss(rand(B, L, N, seed=39), x0, x_uni, sb, dsb),
                    lambda x0: udlm_loss(log_x0_hat[..., :N], x0, x_uni, alpha, dalpha),
                    lambda x0: duo_loss(log_x0_hat[..., :N], x0, rand(B, L, N, seed=40), alpha, dalpha)):
        x0 = as_probs(ids, N, F64).requires_grad_()
        value = loss_of(x0)
        (grad,) = torch.autograd.grad(value.sum(), x0)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all() and grad.abs().sum() > 0
    x0 = as_probs(ids, N, F64).requires_grad_()
    (grad,) = torch.autograd.grad(mdlm_loss(log_x0_hat, x0, x_abs, alpha, dalpha, N).sum(), x0)
    lam = (-dalpha / (1 - alpha))[..., None]
    want = torch.where((x_abs == N)[..., None], -lam * log_x0_hat[..., :N], torch.zeros(()).double())
    assert torch.allclose(grad, want)


def _gradcheck_in_simplex(loss_of_x0, n_cols):
    """gradcheck with respect to theta, x0 = softmax(theta) on the simplex (float64)."""
    theta = rand(B, L, n_cols, seed=40).requires_grad_()
    assert torch.autograd.gradcheck(lambda th: loss_of_x0(torch.softmax(th, -1)), (theta,))


def test_gradcheck_all_losses_wrt_soft_x0():
    """Every loss is a smooth function of a simplex x0 (IDLM App. C), including its K term and the SUBS -inf."""
    sb, dsb, alpha, dalpha = schedule()
    x_abs = torch.randint(0, N + 1, (B, L), generator=gen(41))
    x_abs[:, :3] = N
    x_uni = torch.randint(0, N, (B, L), generator=gen(42))
    subs = torch.log_softmax(rand(B, L, N + 1, seed=43).index_fill(-1, torch.tensor([N]), -math.inf), -1)
    score_abs, score_uni = rand(B, L, N + 1, seed=44), rand(B, L, N, seed=45)
    x0_hat = torch.log_softmax(rand(B, L, N, seed=46), -1)
    w = rand(B, L, N, seed=47)
    _gradcheck_in_simplex(lambda x0: mdlm_loss(subs, x0, x_abs, alpha, dalpha, N), N)
    _gradcheck_in_simplex(lambda x0: sedd_absorb_loss(score_abs, x0, x_abs, sb, dsb, N), N)
    _gradcheck_in_simplex(lambda x0: sedd_uniform_loss(score_uni, x0, x_uni, sb, dsb), N)
    _gradcheck_in_simplex(lambda x0: udlm_loss(x0_hat, x0, x_uni, alpha, dalpha), N)
    _gradcheck_in_simplex(lambda x0: duo_loss(x0_hat, x0, w, alpha, dalpha), N)


def test_gradcheck_duo_objective_full_path():
    """Duo end to end (IDLM eq. 22-23): x0 -> w_t = a x0 + s eps (fixed eps) -> softmax(w_t / tau) -> a fixed
    differentiable 'network' -> loss. Gradients flow through the reparameterised latent and through the loss's
    own x0; argmax(w_t) is piecewise constant and does not move under gradcheck's tiny perturbations."""
    obj = DuoObjective(N, tau=0.5)                                    # moderate tau: a smooth softmax
    W, bias = rand(N, N, seed=50), rand(N, seed=51)
    t = torch.tensor([0.3, 0.7], dtype=F64)

    def loss_of_x0(x0):
        noisy = obj.corrupt(x0, t, generator=gen(52))                 # same eps on every call
        return obj.loss(torch.log_softmax(noisy.input @ W + bias, -1), x0, noisy)

    _gradcheck_in_simplex(loss_of_x0, N)


# ------------------------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("Objective", [MDLMObjective, SEDDObjective])
def test_absorbing_objectives_corrupt(Objective):
    """corrupt(): ids input (B, L) with mask id N, sigma = sigma_bar (B,), schedule columns (B, 1); masking
    rate ~ 1 - alpha_t; no gradient through sampling a soft x0, but the loss itself is differentiable in x0."""
    obj = Objective(N)
    assert obj.vocab_size == N + 1 and obj.process.V == N + 1 and obj.head in ('subs', 'sedd')
    t = torch.tensor([0.2, 0.9])
    x0 = torch.randint(0, N, (2, 5000), generator=gen(60))
    noisy = obj.corrupt(x0, t, generator=gen(61))
    assert noisy.input.shape == (2, 5000) and noisy.input.dtype == torch.long and torch.equal(noisy.input, noisy.x_t)
    assert noisy.sigma.shape == (2,) and noisy.alpha.shape == noisy.dsigma_bar.shape == (2, 1)
    assert torch.allclose(noisy.sigma, -noisy.alpha[:, 0].log())
    masked = noisy.x_t == N
    assert torch.equal(noisy.x_t[~masked], x0[~masked])
    p = 1 - noisy.alpha[:, 0].double()
    assert ((masked.double().mean(1) - p).abs() <= 5 * (p * (1 - p) / 5000).sqrt()).all()

    theta = rand(2, 8, N, seed=62).requires_grad_()
    x0_soft = torch.softmax(theta, -1)
    noisy = obj.corrupt(x0_soft, t.double(), generator=gen(63))
    assert not noisy.input.requires_grad and noisy.input.dtype == torch.long
    out = torch.log_softmax(rand(2, 8, N + 1, seed=64), -1)
    value = obj.loss(out, x0_soft, noisy)
    assert value.shape == (2, 8)
    value.sum().backward()
    assert theta.grad.abs().sum() > 0


def test_duo_objective_corrupt_and_defaults():
    """Duo: soft input softmax(w_t / tau) (B, L, N) carries gradient into x0; x_t = argmax(w_t);
    sigma = -log alpha_t; loss == udlm_loss at x_t. Default gammas give alpha 0.999 -> 0.001 for any N."""
    for n_tok in (8, 64):
        obj = DuoObjective(n_tok)
        a0, a1 = obj.alpha(torch.tensor([0.0, 1.0], dtype=F64))
        assert a0 >= 0.99 and a1 <= 0.01 and obj.vocab_size == n_tok and obj.head == 'x0'
    obj = DuoObjective(N)
    theta = rand(B, L, N, seed=70).requires_grad_()
    x0 = torch.softmax(theta, -1)
    t = sample_time(B, gen(71)).double()
    noisy = obj.corrupt(x0, t, generator=gen(72))
    assert noisy.input.shape == (B, L, N) and noisy.input.requires_grad and noisy.x_t.dtype == torch.long
    assert torch.equal(noisy.x_t, noisy.w_t.argmax(-1)) and noisy.alpha.shape == noisy.dalpha.shape == (B, 1)
    assert torch.allclose(noisy.sigma, -noisy.alpha[:, 0].log()) and (noisy.dalpha < 0).all()
    (g,) = torch.autograd.grad((noisy.input * rand(B, L, N, seed=73)).sum(), theta)
    assert g.abs().sum() > 0                                          # reparameterised: gradient reaches x0
    out = torch.log_softmax(rand(B, L, N, seed=74), -1)
    assert torch.allclose(obj.loss(out, x0, noisy), udlm_loss(out, x0, noisy.x_t, noisy.alpha, noisy.dalpha))
    ids = obj.corrupt(torch.randint(0, N, (B, L), generator=gen(75)), t.float(), generator=gen(76))
    assert ids.input.dtype == torch.float32 and ids.input.shape == (B, L, N)


def test_duo_alpha_spacing_runs_alpha_linearly_through_the_same_endpoints():
    """spacing='alpha': alpha_t is linear in t between the gamma-spaced schedule's own endpoints, d alpha/dt is the
    constant slope, and the latent's gamma_t really produces alpha_t (duo_alpha(gamma_t) = alpha_t, the table's
    inverse); x_t is then corrupted at that rate (Monte Carlo over many tokens)."""
    by_gamma, by_alpha = DuoObjective(64), DuoObjective(64, spacing='alpha')
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    assert torch.allclose(by_gamma.alpha(ends), by_alpha.alpha(ends), atol=1e-9)
    t = torch.linspace(0, 1, 11, dtype=F64)
    alpha, dalpha = by_alpha.schedule(t)
    assert torch.allclose(alpha, by_alpha.alpha_0 + t * (by_alpha.alpha_1 - by_alpha.alpha_0))
    assert torch.allclose(dalpha, (by_alpha.alpha(t + 1e-4) - by_alpha.alpha(t - 1e-4)) / 2e-4)
    assert torch.allclose(duo_alpha(by_alpha.gamma(t), 64)[0], alpha, atol=1e-5)
    x0 = torch.randint(0, 64, (3, 20000), generator=gen(80))
    noisy = by_alpha.corrupt(x0, torch.tensor([0.1, 0.5, 0.9], dtype=F64), generator=gen(81))
    keep = noisy.alpha[:, 0] + (1 - noisy.alpha[:, 0]) / 64                      # P(x_t = x0)
    observed = (noisy.x_t == x0).double().mean(1)
    assert ((observed - keep).abs() <= 5 * (keep * (1 - keep) / 20000).sqrt()).all()
    with pytest.raises(ValueError, match='spacing'):
        DuoObjective(8, spacing='sigma')


def test_duo_spacing_changes_the_estimator_not_the_nelbo():
    """t is only the NELBO's variable of integration: with the synthetic language's exact denoiser, the Duo NELBO
    estimated with t spaced in gamma and in alpha agree (within 4 standard errors of their difference; a wrong
    d alpha/dt, off by a factor of 2, would move one of them by about 40 of those)."""
    language = SyntheticLanguage(N=6, L=6, K=2, successors=2)
    denoiser = exact_denoiser(language, 'duo')
    x0 = language.sample(20000, generator=gen(90))
    estimates = []
    for i, spacing in enumerate(('gamma', 'alpha')):
        obj = DuoObjective(6, spacing=spacing)
        t = sample_time(len(x0), gen(91 + i)).double()
        noisy = obj.corrupt(x0, t, generator=gen(93 + i))
        per_seq = obj.loss(denoiser(noisy.x_t, noisy.sigma), x0, noisy).sum(-1)
        estimates.append((per_seq.mean(), per_seq.var() / len(per_seq)))
    (m1, v1), (m2, v2) = estimates
    assert abs(m1 - m2) < 4 * (v1 + v2).sqrt(), (estimates, language.entropy_rate())
    assert m2 > 0
    assert v2 < v1 / 2     # why the option exists: the alpha-spaced one-sample estimate is far less noisy


# ----------------------------------------------------------------------------------------------------------------
# Duo's curriculum (losses.duo_curriculum_objective)

@pytest.mark.parametrize('n_tok', [2, 64, 50257])
def test_duo_integral_and_its_gradient_against_another_quadrature(n_tok):
    """The integral table (processes._duo_table: trapezoid rule in u, with p = int phi(u) Phi(mu + u)^(N-1) du) against
    Gauss-Legendre quadrature of the other form p(mu) = int phi(z - mu) Phi(z)^(N-1) dz, and its derivative against
    that form differentiated under the integral sign, dp/dmu = int (z - mu) phi(z - mu) Phi(z)^(N-1) dz: a different
    formula for the gradient, not a finite difference of the same one. alpha = (N p - 1)/(N - 1), mu = exp(-gamma/2)."""
    nodes, weights = np.polynomial.legendre.leggauss(400)
    z = torch.tensor(nodes * 14.0 + 2.0, dtype=F64)          # [-12, 16]: Phi(z)^(N-1) shifts right as N grows
    w = torch.tensor(weights * 14.0, dtype=F64)
    gamma = torch.tensor([-4.0, -3.55, -2.5, -1.85, 0.0, 3.0], dtype=F64)   # mu <= 7.4: inside the z range
    mu = torch.exp(-gamma / 2)[:, None]
    phi = torch.exp(-0.5 * (z - mu) ** 2) / math.sqrt(2 * math.pi)
    power = torch.exp((n_tok - 1) * torch.special.log_ndtr(z))
    p = (w * phi * power).sum(-1)
    dp_dmu = (w * (z - mu) * phi * power).sum(-1)
    alpha = (n_tok * p - 1) / (n_tok - 1)
    dalpha = n_tok / (n_tok - 1) * dp_dmu * (-mu[:, 0] / 2)
    table_alpha, table_dalpha = duo_alpha(gamma, n_tok)
    assert torch.allclose(table_alpha, alpha, atol=2e-5), (table_alpha, alpha)
    assert torch.allclose(table_dalpha, dalpha, atol=2e-4, rtol=2e-3), (table_dalpha, dalpha)


def test_duo_curriculum_range_is_the_public_one_at_owt_scale_and_its_x_t_is_the_uniform_process():
    """The curriculum runs alpha_t from 0.95 to 0.05: at N = 50257 those are the public run's gammas (-3.55, -1.85)
    to within 0.05, at N = 64 other gammas. x_t = argmax(w_t) is corrupted at the uniform process's rate."""
    owt = duo_curriculum_objective(50257, 1e-3)
    assert abs(owt.gamma_min + 3.55) < 0.05 and abs(owt.gamma_max + 1.85) < 0.05, (owt.gamma_min, owt.gamma_max)
    obj = duo_curriculum_objective(64, 0.1)
    ends = obj.alpha(torch.tensor([0.0, 1.0], dtype=F64))
    assert torch.allclose(ends, torch.tensor([0.95, 0.05], dtype=F64), atol=1e-5)
    assert obj.gamma_min > owt.gamma_min + 0.5 and obj.gamma_max > owt.gamma_max + 0.5  # 63 rivals need less noise
    x0 = torch.randint(0, 64, (3, 20000), generator=gen(100))
    noisy = obj.corrupt(x0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), generator=gen(101))
    keep = noisy.alpha[:, 0] + (1 - noisy.alpha[:, 0]) / 64
    observed = (noisy.x_t == x0).double().mean(1)
    assert ((observed - keep).abs() <= 5 * (keep * (1 - keep) / 20000).sqrt()).all()
    with pytest.raises(ValueError, match='temperature'):
        duo_curriculum_objective(64, 0.0)


def test_duo_curriculum_loss_tends_to_the_discrete_loss_as_tau_falls():
    """With the same latent draws, a network fed softmax(w_t / tau) and scored at x_t = argmax(w_t) gives a loss that
    converges, as tau -> 0, to the discrete Duo loss: the same network fed the token ids x_t. At tau = 1 the two
    differ (the soft input carries more than x_t), so the comparison is not vacuous."""
    torch.manual_seed(0)
    n_tok, length = 6, 8
    net = build_model('tiny', vocab_size=n_tok, seq_len=length, head='x0', mask_id=-1, time_conditioning=True).eval()
    with torch.no_grad():
        for p in net.parameters():      # some layers start at zero, and their output would not depend on the input
            p.add_(0.3 * torch.randn_like(p))
    x0 = torch.randint(0, n_tok, (16, length), generator=gen(110))
    t = sample_time(16, gen(111))
    gaps = []
    for tau in (1.0, 1e-1, 1e-2, 1e-3, 1e-5):
        obj = duo_curriculum_objective(n_tok, tau)
        noisy = obj.corrupt(x0, t, generator=gen(112))                 # the same noise for every tau
        with torch.no_grad():
            curriculum = obj.loss(net(noisy.input, noisy.sigma), x0, noisy)
            discrete = udlm_loss(net(noisy.x_t, noisy.sigma), x0, noisy.x_t, noisy.alpha, noisy.dalpha)
        gaps.append(((curriculum - discrete).abs().max() / discrete.abs().max()).item())
    assert gaps[0] > 1e-2, gaps
    assert all(a >= b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-5, gaps
