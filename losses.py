"""
Teacher training losses of diffusion language models, per token, and the "objectives" that pair each loss with
the way it corrupts a clean batch.

Every loss is the integrand (at one t, one noisy sample) of a continuous-time NELBO / score-entropy objective:
  SEDD score entropy, IDLM eq. 3:
      sum_{y != x_t} lambda_{x_t y} [ s_y - r_y log s_y + K(r_y) ],  r_y = q_t(y | x0) / q_t(x_t | x0),
      lambda_{x_t y} = dsigma_bar_t * Q[x_t, y] (forward rate from y into x_t), K(a) = a (log a - 1).
      K does not involve the network; it makes the loss >= 0 with equality iff s = r.
  MDLM, IDLM eq. 4 / DiDi eq. 3: -alpha'_t / (1 - alpha_t) * (-<x0, log x0_hat>) at masked positions.
  UDLM, IDLM eq. 5 (sign fixed, see udlm_loss) and Duo, IDLM eq. 6/23: UDLM at x_t = argmax(w_t).

All losses return (B, L) per-token values (not reduced; the caller normalises per token), are >= 0, accept x0
as ids (B, L) or probabilities (B, L, N or V), and are differentiable in probs x0: this is what the IDLM student
needs (IDLM §3.2 / App. C, "simplex relaxation").

Numerical care: SUBS outputs contain log 0 = -inf where x0 has no mass, so products x0 * log(.) are taken only
where x0 > 0 (otherwise 0 * -inf = nan, in the value or in its gradient); K(0) = 0.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from processes import (Absorbing, Uniform, as_probs, alpha_loglinear, dalpha_loglinear, sigma_bar_loglinear,
                       dsigma_bar_loglinear, duo_gamma, duo_latent, duo_alpha, duo_gamma_for_alpha,
                       duo_gamma_of_alpha)

# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def _probs(x0, V, like):
    """x0 as (B, L, V) probs; ids take the dtype of the network output, probs keep theirs (and their graph)."""
    return as_probs(x0, V, dtype=None if x0.is_floating_point() else like.dtype)


def _p_log(p, log_q):
    """p * log_q with the convention 0 * log 0 = 0, safe for the value and the gradient. Only the -inf
    entries that meet p == 0 are replaced, so d/dp = log_q stays exact wherever log_q is finite."""
    zero_times_inf = (p == 0) & torch.isneginf(log_q)
    return p * torch.where(zero_times_inf, torch.zeros_like(log_q), log_q)


def _K(a):
    """K(a) = a (log a - 1), with K(0) = 0 (the constant of score entropy, IDLM eq. 3). At a = 0 the true
    slope log a is -inf; we return 0 there instead of nan (only reachable at a vertex of the simplex)."""
    pos = a > 0
    log_a = torch.log(torch.where(pos, a, torch.ones_like(a)))
    return torch.where(pos, a * (log_a - 1), torch.zeros_like(a))


# ----------------------------------------------------------------------------------------------------------------
# Per-token losses


def mdlm_loss(log_x0_hat, x0, x_t, alpha, dalpha, mask_id):
    """MDLM NELBO integrand, IDLM eq. 4 / DiDi eq. 3 with lambda_t = -alpha'_t / (1 - alpha_t) (= 1/t for the
    log-linear schedule): weight * cross-entropy(x0, x0_hat) at masked positions, 0 at unmasked ones (there
    SUBS carries x_t = x0 over and the term is exactly 0). log_x0_hat (B, L, V), alpha, dalpha (B, 1) -> (B, L)"""
    masked = x_t == mask_id                                               # (B, L)
    if not x0.is_floating_point():  # ids: a gather, no (B, L, V) one-hot (it is 1.6 GB at the papers' scale)
        cross_entropy = -log_x0_hat.gather(-1, x0[..., None]).squeeze(-1)
    else:
        # zero the log-probs at unmasked positions first: SUBS puts -inf there, and 0 * -inf = nan
        log_x0_hat = torch.where(masked[..., None], log_x0_hat, torch.zeros_like(log_x0_hat))
        cross_entropy = -_p_log(_probs(x0, log_x0_hat.shape[-1], log_x0_hat), log_x0_hat).sum(-1)  # (B, L)
    return -dalpha / (1 - alpha) * torch.where(masked, cross_entropy, torch.zeros_like(cross_entropy))


def sedd_absorb_loss(log_score, x0, x_t, sigma_bar, dsigma_bar, mask_id):
    """Score entropy for the absorbing process, IDLM eq. 3 with Q_abs (eq. 12). Only masked x_t has incoming
    rates (Q[m, y] = 1 for y != m), and there r_y = q(y | x0) / q(m | x0) = alpha x0_y / (1 - alpha)
    = x0_y / expm1(sigma_bar). Per masked token:
        dsigma_bar * sum_{y != m} [ exp(l_y) - r x0_y l_y + K(r x0_y) ],  r = 1 / expm1(sigma_bar).
    log_score (B, L, V) are log s_y; sigma_bar, dsigma_bar (B, 1). -> (B, L)"""
    V = log_score.shape[-1]
    x0 = _probs(x0, V, log_score)
    masked = (x_t == mask_id)[..., None]                                  # (B, L, 1)
    real = torch.arange(V, device=x_t.device) != mask_id                  # (V,) y != m
    on = masked & real                                                    # (B, L, V) terms that exist
    l = torch.where(on, log_score, torch.zeros_like(log_score))
    ratio = x0 / torch.expm1(torch.as_tensor(sigma_bar)).unsqueeze(-1)   # (B, L, V) r_y
    terms = torch.exp(l) - _p_log(ratio, l) + _K(ratio)
    terms = torch.where(on, terms, torch.zeros_like(terms))
    return dsigma_bar * terms.sum(-1)


def sedd_uniform_loss(log_score, x0, x_t, sigma_bar, dsigma_bar):
    """Score entropy for the uniform process, IDLM eq. 3 with Q_uni = (1 1^T - N I)/N (so lambda = dsigma_bar/N):
        dsigma_bar / N * sum_{y != x_t} [ s_y - r_y log s_y + K(r_y) ],  r_y = q(y | x0) / q(x_t | x0),
    with q(. | x0) = alpha x0 + (1 - alpha)/N, alpha = exp(-sigma_bar); soft x0 allowed. -> (B, L)"""
    N = log_score.shape[-1]
    x0 = _probs(x0, N, log_score)
    sb = torch.as_tensor(sigma_bar).unsqueeze(-1)
    q = torch.exp(-sb) * x0 + (-torch.expm1(-sb)) / N                    # (B, L, N) q(y | x0), eq. 21
    ratio = q / q.gather(-1, x_t[..., None])                             # (B, L, N) r_y
    off = F.one_hot(x_t, N) == 0                                         # (B, L, N) y != x_t
    l = torch.where(off, log_score, torch.zeros_like(log_score))
    terms = torch.exp(l) - ratio * l + _K(ratio)
    terms = torch.where(off, terms, torch.zeros_like(terms))
    return dsigma_bar / N * terms.sum(-1)


def udlm_loss(log_x0_hat, x0, x_t, alpha, dalpha):
    """UDLM NELBO integrand (IDLM eq. 5), in its O(N) closed form. With xbar = N alpha x0 + (1 - alpha),
    xbar_hat likewise from x0_hat, i = x_t, r_j = xbar_j / xbar_i, rhat_j = xbar_hat_j / xbar_hat_i:
        -alpha' / (N alpha) * sum_j [ r_j log(r_j / rhat_j) - r_j + rhat_j ]   (>= 0, 0 iff x0_hat = x0).
    Sign: eq. 5's bracket as printed equals MINUS this sum, so with a positive lambda it would be <= 0; we
    minimise the non-negative form. It equals sedd_uniform_loss with the denoiser-induced score s = rhat.
    log_x0_hat (B, L, N), alpha, dalpha (B, 1). -> (B, L)"""
    N = log_x0_hat.shape[-1]
    x0 = _probs(x0, N, log_x0_hat)
    a = torch.as_tensor(alpha).unsqueeze(-1)
    i = x_t[..., None]
    log_xbar = torch.log(N * a * x0 + (1 - a))                           # (B, L, N), > 0 while alpha < 1
    log_xbar_hat = torch.log(N * a * log_x0_hat.exp() + (1 - a))
    log_r = log_xbar - log_xbar.gather(-1, i)
    log_rhat = log_xbar_hat - log_xbar_hat.gather(-1, i)
    r, rhat = log_r.exp(), log_rhat.exp()
    bregman = r * (log_r - log_rhat) - r + rhat                          # (B, L, N), 0 at j = i
    return -dalpha / (N * alpha) * bregman.sum(-1)


def duo_loss(log_x0_hat, x0, w_t, alpha, dalpha):
    """Duo integrand, IDLM eq. 6/23: the UDLM loss at the hard token x_t = argmax(w_t) of the Gaussian latent
    (the network itself saw softmax(w_t / tau)); alpha, dalpha are Duo's discrete-process schedule."""
    return udlm_loss(log_x0_hat, x0, w_t.argmax(-1), alpha, dalpha)


# ----------------------------------------------------------------------------------------------------------------
# Objectives: corrupt a clean batch, then score the network's output on it


@dataclass
class Noisy:
    """One noisy batch. input: what the network eats, (B, L) ids or (B, L, N) soft input; sigma: (B,) the
    network's conditioning; x_t: (B, L) hard ids; schedule values (B, 1)."""
    input: torch.Tensor
    sigma: torch.Tensor
    x_t: torch.Tensor
    alpha: torch.Tensor
    dalpha: torch.Tensor
    sigma_bar: Optional[torch.Tensor] = None
    dsigma_bar: Optional[torch.Tensor] = None
    w_t: Optional[torch.Tensor] = None  # Duo's Gaussian latent (B, L, N)


def _loglinear(t):
    """alpha, dalpha, sigma_bar, dsigma_bar at t (B,) as (B, 1) columns."""
    t = t[:, None]
    return alpha_loglinear(t), dalpha_loglinear(t), sigma_bar_loglinear(t), dsigma_bar_loglinear(t)


class _AbsorbingObjective:
    """Shared corruption of MDLM and SEDD-absorb: mask each token with probability 1 - alpha_t."""

    def __init__(self, N):
        self.N, self.vocab_size, self.mask_id = N, N + 1, N
        self.process = Absorbing(N)

    def alpha(self, t):
        return alpha_loglinear(t)

    def corrupt(self, x0, t, generator=None):
        """x_t ~ q(. | sg(x0)): no gradient through the sampling. For masked positions x_t does not depend on
        x0 at all and unmasked positions contribute zero loss (IDLM App. C), so nothing is lost."""
        alpha, dalpha, sigma_bar, dsigma_bar = _loglinear(t)
        x_t = self.process.sample(x0.detach(), alpha, generator)
        return Noisy(input=x_t, sigma=sigma_bar[:, 0], x_t=x_t, alpha=alpha, dalpha=dalpha,
                     sigma_bar=sigma_bar, dsigma_bar=dsigma_bar)


class MDLMObjective(_AbsorbingObjective):
    """MDLM: SUBS denoiser (B, L, V log-probs) trained with the masked cross-entropy (IDLM eq. 4).
    Not time-conditioned, like the released model: with SUBS the masked positions already tell the noise level."""
    head = 'subs'
    time_conditioning = False

    def corrupt_by_count(self, x0, generator=None):
        """A lower-variance corruption with the same expected loss, for training a model that ignores t.

        With alpha_t = 1 - t the number of masked tokens k is Binomial(L, t), and
            int_0^1 (1/t) C(L, k) t^k (1 - t)^(L - k) dt = 1/k,
        so the NELBO (IDLM eq. 4) of a sequence is sum_k E[sum_{masked} CE | k masked] / k: per token, the
        mean cross-entropy over k uniformly chosen masked positions, averaged over k ~ U{1..L}. Sampling k
        (stratified over the batch) and masking exactly k positions estimates it without the 1/t weight that
        explodes at small t. Returned as a Noisy with alpha = 1 - k/L and alpha' = -1, so mdlm_loss's weight
        -alpha'/(1 - alpha) is L/k and the mean over tokens is the mean masked cross-entropy. (The eps of
        the log-linear schedule is dropped: a 1e-3 relative change of the weight.)"""
        x0 = x0 if not x0.is_floating_point() else self.process.sample(x0, 1.0, generator)  # ids (B, L)
        B, L = x0.shape
        u0 = torch.rand(1, generator=generator, device=x0.device)
        k = 1 + ((torch.arange(B, device=x0.device) + u0) / B * L).floor().long().clamp(max=L - 1)  # (B,) in 1..L
        scores = torch.rand(B, L, generator=generator, device=x0.device)
        rank = scores.argsort(-1).argsort(-1)                    # a uniformly random ranking of the positions
        x_t = torch.where(rank < k[:, None], torch.full_like(x0, self.mask_id), x0)
        alpha = (1 - k.to(torch.float32) / L)[:, None]           # (B, 1)
        return Noisy(input=x_t, sigma=-torch.log(alpha[:, 0].clamp_min(1e-6)), x_t=x_t, alpha=alpha,
                     dalpha=-torch.ones_like(alpha))

    def loss(self, out, x0, noisy):
        return mdlm_loss(out, x0, noisy.x_t, noisy.alpha, noisy.dalpha, self.mask_id)


class SEDDObjective(_AbsorbingObjective):
    """SEDD-absorb: log-score head (B, L, V) trained with score entropy (IDLM eq. 3)."""
    head = 'sedd'
    time_conditioning = True

    def loss(self, out, x0, noisy):
        return sedd_absorb_loss(out, x0, noisy.x_t, noisy.sigma_bar, noisy.dsigma_bar, self.mask_id)


class DuoObjective:
    """Duo: x0 denoiser fed softmax(w_t / tau) of the Gaussian latent w_t = a x0 + s eps (IDLM eq. 22-23).

    The endpoints are gamma_min (t = 0) and gamma_max (t = 1). The OpenWebText curriculum uses (-3.55, -1.85) for
    N = 50257; for a small N these leave too much signal, because argmax(w) competes with the max of N - 1
    Gaussians, which grows with N. When None, gamma_min / gamma_max are solved from the alpha table so that the
    discrete process has alpha = 0.999 at t = 0 and alpha = 0.001 at t = 1 (like the log-linear schedule's range).

    spacing: how t runs between the endpoints.
      'gamma'  gamma_t = gamma_min + t (gamma_max - gamma_min), as Duo trains (and as its released models expect).
      'alpha'  alpha_t = alpha_0 + t (alpha_1 - alpha_0), gamma_t = the table's inverse of alpha_t: every stretch of
               t carries the same share of alpha, as the log-linear schedule does. The NELBO is the same integral
               either way (t is only its variable of integration), but its one-sample estimate is not equally
               noisy. For N = 64 gamma-spacing squeezes all of alpha's fall into t in [0.03, 0.3] (alpha = 0.99 to
               0.1), so most training times carry almost no signal and the few informative ones carry huge
               weights: the 'cpu' teacher (train.py, N = 64) reached 3.31 nats/token after 2200 iterations
               with 'gamma' and 1.73 with 'alpha' (exact denoiser: 1.30)."""
    head = 'x0'
    time_conditioning = True
    mask_id = -1  # the uniform process has no mask token
    SPACINGS = ('gamma', 'alpha')

    def __init__(self, N, gamma_min=None, gamma_max=None, tau=1e-3, spacing='gamma'):
        if spacing not in self.SPACINGS:
            raise ValueError(f"Duo spacing is one of {', '.join(self.SPACINGS)}, not {spacing!r}")
        self.N = self.vocab_size = N
        self.process = Uniform(N)
        self.gamma_min = duo_gamma_for_alpha(0.999, N) if gamma_min is None else gamma_min
        self.gamma_max = duo_gamma_for_alpha(0.001, N) if gamma_max is None else gamma_max
        self.tau, self.spacing = tau, spacing
        self.alpha_0, self.alpha_1 = (float(duo_alpha(torch.tensor(g, dtype=torch.float64), N)[0])
                                      for g in (self.gamma_min, self.gamma_max))

    def gamma(self, t):
        if self.spacing == 'gamma':
            return duo_gamma(t, self.gamma_min, self.gamma_max)
        return duo_gamma_of_alpha(self.alpha(t), self.N)

    def schedule(self, t):
        """alpha_t and d alpha_t / dt of the discrete process that argmax(w_t) follows."""
        if self.spacing == 'alpha':
            return self.alpha_0 + t * (self.alpha_1 - self.alpha_0), torch.full_like(t, self.alpha_1 - self.alpha_0)
        alpha, dalpha_dgamma = duo_alpha(duo_gamma(t, self.gamma_min, self.gamma_max), self.N)
        return alpha, dalpha_dgamma * (self.gamma_max - self.gamma_min)   # chain rule in gamma

    def alpha(self, t):
        return self.schedule(t)[0]

    def corrupt(self, x0, t, generator=None):
        """w_t = a x0 + s eps with eps from generator: reparameterised, so gradients flow from input into x0.
        x_t = argmax(w_t) is the hard token the loss is evaluated at; sigma = -log alpha_t."""
        x0 = as_probs(x0, self.N, dtype=None if x0.is_floating_point() else t.dtype)
        gamma = self.gamma(t)[:, None].to(x0.dtype)                                  # (B, 1)
        alpha, dalpha = self.schedule(t[:, None].to(x0.dtype))
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        w_t = duo_latent(x0, gamma, noise)                                           # (B, L, N)
        return Noisy(input=torch.softmax(w_t / self.tau, dim=-1), sigma=-torch.log(alpha[:, 0]),
                     x_t=w_t.argmax(-1), alpha=alpha, dalpha=dalpha, w_t=w_t)

    def loss(self, out, x0, noisy):
        return duo_loss(out, x0, noisy.w_t, noisy.alpha, noisy.dalpha)


# The alpha range of Duo's curriculum: the public OWT run's gamma range (-3.55, -1.85) is alpha 0.945 -> 0.049 at
# N = 50257, and the same alphas give other gamma values at another N (processes.duo_gamma_for_alpha).
CURRICULUM_ALPHA = (0.95, 0.05)


def duo_curriculum_objective(N, tau, spacing='alpha'):
    """Duo's curriculum learning (Sahoo et al. 2025), as the public code's DUO.nll runs it before curriculum.end.

    The same Gaussian latent and the same loss as DuoObjective, the UDLM integrand at x_t = argmax(w_t) with the
    discrete process's alpha_t, d alpha_t / dt from the integral table (processes._duo_table). Two things change:
      - t runs over a restricted range, alpha_t from 0.95 down to 0.05 (CURRICULUM_ALPHA). The ends it leaves out
        are the noisiest stretch of the NELBO's one-sample estimate (alpha near 1: rare corruptions with large
        weights) and the least informative one (alpha near 0: almost no signal).
      - the network sees softmax(w_t / tau): at a larger tau it also sees how far the other latent coordinates
        were from winning, information the discrete x_t does not carry.
    The loss is not the NELBO (the range is cut, and at tau > 0 the input says more than x_t). As tau -> 0 the input
    tends to one_hot(x_t), and since argmax(w_t) follows the uniform process at alpha_t, the loss tends to the
    discrete Duo loss on that range (tests/test_losses.py). The teacher then trains on DuoObjective (train.py)."""
    if tau <= 0:
        raise ValueError(f"Duo's curriculum temperature must be positive, not {tau}")
    hi, lo = CURRICULUM_ALPHA
    return DuoObjective(N, duo_gamma_for_alpha(hi, N), duo_gamma_for_alpha(lo, N), tau=tau, spacing=spacing)


OBJECTIVES = {'mdlm': MDLMObjective, 'sedd': SEDDObjective, 'duo': DuoObjective}


def make_objective(name, N, **duo_options):
    """The training objective of a teacher kind ('mdlm', 'sedd', 'duo') over N real tokens. duo_options
    (gamma_min, gamma_max, tau, spacing) are passed to DuoObjective and ignored by the others."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return DuoObjective(N, **duo_options) if name == 'duo' else OBJECTIVES[name](N)
