"""
Forward noising processes of diffusion language models (IDLM §2.1 and Appendix B).

A token is a one-hot column over N real tokens; a probability vector x0 on the simplex is allowed everywhere
(IDLM §3.2, "simplex relaxation"), and then every formula below is linear in x0. The forward process is a
continuous-time Markov chain dp/dt = sigma_t Q p (IDLM eq. 1) with columns of Q summing to zero and
Q[y, x] = rate from x to y, so that q(x_t | x0) = exp(sigma_bar_t Q) x0 (IDLM eq. 2).

Two choices of Q are used, both written with alpha_t = exp(-sigma_bar_t):
  Absorbing (MDLM, SEDD-absorb), IDLM eq. 12-16. One extra mask token m = id N, so vocab V = N + 1.
      q(x_t | x0) = alpha_t x0 + (1 - alpha_t) m
  Uniform (UDLM, Duo), IDLM eq. 17-21. V = N. We divide eq. 17 by N, Q_uni = (1 1^T - N I) / N, so that
      exp(sigma_bar Q_uni) = e^{-sigma_bar} I + (1 - e^{-sigma_bar}) / N 1 1^T, i.e. alpha_t = exp(-sigma_bar_t)
      exactly as for the absorbing process (IDLM eq. 19-21 use alpha_t = exp(-N sigma_bar_t) instead).
      q(x_t | x0) = alpha_t x0 + (1 - alpha_t) / N

Schedules are log-linear: alpha_t = 1 - (1 - eps) t (SEDD/MDLM/UDLM; IDLM App. F).

Duo (IDLM §2.1, eq. 22) runs a Gaussian diffusion w_t = a x0 + s eps on the one-hot vector; argmax(w_t) then
follows the uniform process above with an alpha given by a one-dimensional integral, tabulated once per N.
"""
import functools
import math

import torch
import torch.nn.functional as F

EPS = 1e-3

# ----------------------------------------------------------------------------------------------------------------
# Log-linear schedule and time sampling


def alpha_loglinear(t, eps=EPS):
    """alpha_t = 1 - (1 - eps) t: the probability that a token is still clean at time t."""
    return 1 - (1 - eps) * t


def dalpha_loglinear(t, eps=EPS):
    """d alpha_t / dt = -(1 - eps), same shape as t."""
    return torch.full_like(t, -(1 - eps))


def sigma_bar_loglinear(t, eps=EPS):
    """Total noise sigma_bar_t = -log alpha_t (log1p keeps precision for small t)."""
    return -torch.log1p(-(1 - eps) * t)


def dsigma_bar_loglinear(t, eps=EPS):
    """Noise rate sigma_t = d sigma_bar_t / dt = (1 - eps) / (1 - (1 - eps) t)."""
    return (1 - eps) / (1 - (1 - eps) * t)


def sample_time(batch_size, generator=None, eps_t=1e-3, device=None):
    """Stratified training times: one t in each of the B bins of [0, 1), shifted by a single U0 ~ U[0, 1),
    then mapped to [eps_t, 1]. Lower variance than i.i.d. times, same marginal U[eps_t, 1]. -> (B,) float32"""
    u0 = torch.rand(1, generator=generator, device=device)
    u = (torch.arange(batch_size, device=device) + u0) / batch_size
    return eps_t + (1 - eps_t) * u


def time_grid(steps, t_min=1e-5, dtype=torch.float64):
    """Sampling grid from t = 1 down to t_min: steps + 1 points, float64 by default (see precision notes)."""
    return torch.linspace(1.0, t_min, steps + 1, dtype=dtype)


def as_probs(x0, V, dtype=None):
    """x0 as probability vectors (B, L, V): ids -> one-hot; probs with fewer than V columns (N real tokens fed
    to an absorbing process) are zero-padded, so the mask gets no mass. Probs keep their dtype (and graph)
    unless dtype is given; ids become the default float dtype unless dtype is given."""
    if not x0.is_floating_point():
        return F.one_hot(x0, V).to(dtype or torch.get_default_dtype())
    if x0.shape[-1] < V:
        x0 = F.pad(x0, (0, V - x0.shape[-1]))
    return x0 if dtype is None else x0.to(dtype)


def _float_dtype(x0, alpha):
    """dtype for q(. | x0): that of probs x0, else that of a float alpha, else the default."""
    if x0.is_floating_point():
        return x0.dtype
    if torch.is_tensor(alpha) and alpha.is_floating_point():
        return alpha.dtype
    return torch.get_default_dtype()


def _bcast(a, like):
    """A per-token scalar (B, 1) -> (B, 1, 1), so that it broadcasts against (B, L, V)."""
    return torch.as_tensor(a, dtype=like.dtype, device=like.device).unsqueeze(-1)


def _draw_tokens(x0, generator=None):
    """Clean token ids (B, L): x0 itself if ids, else one categorical draw from the probs (no gradient)."""
    if not x0.is_floating_point():
        return x0
    flat = x0.detach().reshape(-1, x0.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(x0.shape[:-1])


def _keep_mask(tokens, alpha, generator=None):
    """Bernoulli(alpha) per position (B, L): True where the clean token survives."""
    u = torch.rand(tokens.shape, generator=generator, device=tokens.device, dtype=torch.float64)
    return u < torch.as_tensor(alpha, device=tokens.device)


# ----------------------------------------------------------------------------------------------------------------
# Absorbing process (IDLM App. B.1)


class Absorbing:
    """Each token jumps to the mask m (id N) at rate sigma_t and then stays there. Vocab V = N + 1."""

    def __init__(self, N):
        self.N, self.V, self.mask_id = N, N + 1, N

    def rate_matrix(self):
        """Q_abs (V, V), IDLM eq. 12: -1 on the diagonal of real tokens, 1 in the mask row, mask column 0."""
        Q = torch.zeros(self.V, self.V, dtype=torch.float64)
        Q[: self.N, : self.N] = -torch.eye(self.N, dtype=torch.float64)
        Q[self.mask_id, : self.N] = 1.0
        return Q

    def transition_matrix(self, sigma_bar):
        """exp(sigma_bar Q_abs) (V, V) in closed form, IDLM eq. 14/16 (alpha = e^{-sigma_bar} on the diagonal)."""
        alpha = math.exp(-sigma_bar)
        T = alpha * torch.eye(self.V, dtype=torch.float64)
        T[self.mask_id, : self.N] = -math.expm1(-sigma_bar)  # 1 - alpha, accurate for tiny sigma_bar
        T[self.mask_id, self.mask_id] = 1.0
        return T

    def marginal(self, x0, alpha):
        """q(x_t | x0) = alpha x0 + (1 - alpha) m (IDLM eq. 16 applied to x0). -> (B, L, V)"""
        x0 = as_probs(x0, self.V, _float_dtype(x0, alpha))
        a = _bcast(alpha, x0)
        m = F.one_hot(torch.tensor(self.mask_id, device=x0.device), self.V).to(x0.dtype)
        return a * x0 + (1 - a) * m

    def sample(self, x0, alpha, generator=None):
        """x_t ~ q(. | x0): keep the clean token with probability alpha, else mask. Probs x0 are sampled first
        (no gradient: IDLM App. C, the masked positions do not depend on x0). -> (B, L) long"""
        tokens = _draw_tokens(x0, generator)
        keep = _keep_mask(tokens, alpha, generator)
        return torch.where(keep, tokens, torch.full_like(tokens, self.mask_id))

    def posterior(self, x_t, x0, alpha_s, alpha_t):
        """q(x_s | x_t, x0) for s < t, DiDi eq. 2: an unmasked x_t stays; a masked one becomes
        ((1 - alpha_s) m + (alpha_s - alpha_t) x0) / (1 - alpha_t). -> (B, L, V)"""
        x0 = as_probs(x0, self.V, _float_dtype(x0, alpha_t))
        a_s, a_t = _bcast(alpha_s, x0), _bcast(alpha_t, x0)
        m = F.one_hot(torch.tensor(self.mask_id, device=x0.device), self.V).to(x0.dtype)
        masked = ((1 - a_s) * m + (a_s - a_t) * x0) / (1 - a_t)
        stay = F.one_hot(x_t, self.V).to(x0.dtype)
        return torch.where((x_t == self.mask_id)[..., None], masked, stay)


# ----------------------------------------------------------------------------------------------------------------
# Uniform process (IDLM App. B.2, rescaled by 1/N)


class Uniform:
    """Each token is resampled uniformly from all N tokens at rate sigma_t. Vocab V = N (no mask)."""

    def __init__(self, N):
        self.N = self.V = N

    def rate_matrix(self):
        """Q_uni (N, N) = (1 1^T - N I) / N: IDLM eq. 17 divided by N, so that alpha_t = exp(-sigma_bar_t)."""
        N = self.N
        return (torch.ones(N, N, dtype=torch.float64) - N * torch.eye(N, dtype=torch.float64)) / N

    def transition_matrix(self, sigma_bar):
        """exp(sigma_bar Q_uni) = alpha I + (1 - alpha)/N 1 1^T, alpha = e^{-sigma_bar} (IDLM eq. 21). (N, N)"""
        alpha = math.exp(-sigma_bar)
        beta = -math.expm1(-sigma_bar) / self.N
        return alpha * torch.eye(self.N, dtype=torch.float64) + beta

    def marginal(self, x0, alpha):
        """q(x_t | x0) = alpha x0 + (1 - alpha)/N (IDLM eq. 21 applied to x0). -> (B, L, N)"""
        x0 = as_probs(x0, self.N, _float_dtype(x0, alpha))
        a = _bcast(alpha, x0)
        return a * x0 + (1 - a) / self.N

    def sample(self, x0, alpha, generator=None):
        """x_t ~ q(. | x0): keep the clean token with probability alpha, else a uniform token (possibly the
        same one, hence the (1 - alpha)/N on the diagonal). -> (B, L) long"""
        tokens = _draw_tokens(x0, generator)
        keep = _keep_mask(tokens, alpha, generator)
        noise = torch.randint(0, self.N, tokens.shape, generator=generator, device=tokens.device)
        return torch.where(keep, tokens, noise)

    def posterior(self, x_t, x0, alpha_s, alpha_t):
        """q(x_s | x_t, x0) for s < t by Bayes' rule, q(x_t | x_s) q(x_s | x0) / q(x_t | x0), written out
        (the reference sampler's formula; x0 may be a model's x0_hat):
          [N a_t x0_i z + (a_t/a_s - a_t) z + (a_s - a_t) x0 + (1 - a_t/a_s)(1 - a_s)/N] / [N a_t x0_i + 1 - a_t]
        with z = one-hot(x_t), i = x_t. -> (B, L, N)"""
        N = self.N
        x0 = as_probs(x0, N, _float_dtype(x0, alpha_t))
        a_s, a_t = _bcast(alpha_s, x0), _bcast(alpha_t, x0)
        z = F.one_hot(x_t, N).to(x0.dtype)
        x0_i = x0.gather(-1, x_t[..., None])  # (B, L, 1) clean mass on the current token
        num = (N * a_t * x0_i * z + (a_t / a_s - a_t) * z + (a_s - a_t) * x0
               + (1 - a_t / a_s) * (1 - a_s) / N)
        return num / (N * a_t * x0_i + 1 - a_t)


# ----------------------------------------------------------------------------------------------------------------
# Duo: a Gaussian latent whose argmax is the uniform process (IDLM §2.1, eq. 22-23)


def duo_gamma(t, gamma_min, gamma_max):
    """Linear log-SNR schedule of the Gaussian latent: gamma_t = gamma_min + t (gamma_max - gamma_min)."""
    return gamma_min + t * (gamma_max - gamma_min)


def duo_coefficients(gamma):
    """(a, s) with a^2 = sigmoid(-gamma), s^2 = sigmoid(gamma): variance preserving, a / s = exp(-gamma / 2)."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def duo_latent(x0, gamma, noise):
    """w_t = a x0 + s eps (IDLM eq. 22). Reparameterised: gradients reach probs x0. x0, noise (B, L, N),
    gamma (B, 1) -> (B, L, N)"""
    a, s = duo_coefficients(gamma)
    return a.unsqueeze(-1) * x0 + s.unsqueeze(-1) * noise


_GAMMA_LO, _GAMMA_HI, _GAMMA_POINTS = -16.0, 16.0, 4001


@functools.lru_cache(maxsize=None)
def _duo_table(N):
    """alpha and d alpha / d gamma on a fixed gamma grid, float64.

    With mu = a/s = exp(-gamma/2), argmax(w) = x0 iff mu + eps_x0 > eps_j for all j != x0, so
        p(gamma) = P(argmax w = x0) = int phi(u) Phi(mu + u)^(N-1) du   (= int phi(z - mu) Phi(z)^(N-1) dz)
        dp/dmu   = int phi(u) (N-1) Phi(mu + u)^(N-2) phi(mu + u) du,   dmu/dgamma = -mu / 2.
    The other N-1 tokens share 1 - p equally, which is the uniform process with p = alpha + (1 - alpha)/N,
    i.e. alpha = (N p - 1)/(N - 1). The trapezoid rule on a fine u grid is near exact for these smooth,
    Gaussian-decaying integrands; powers of Phi are taken in log space (log_ndtr) to survive large N."""
    assert N >= 2, "the uniform process needs at least two tokens"
    gamma = torch.linspace(_GAMMA_LO, _GAMMA_HI, _GAMMA_POINTS, dtype=torch.float64)
    mu = torch.exp(-gamma / 2)[:, None]                               # (G, 1)
    u = torch.linspace(-10.0, 10.0, 801, dtype=torch.float64)[None]   # (1, U)
    log_phi = lambda z: -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    log_Phi = torch.special.log_ndtr(mu + u)                          # (G, U)
    p = torch.trapezoid(torch.exp(log_phi(u) + (N - 1) * log_Phi), u[0], dim=-1)
    dp_dmu = torch.trapezoid((N - 1) * torch.exp(log_phi(u) + (N - 2) * log_Phi + log_phi(mu + u)), u[0], dim=-1)
    alpha = (N * p - 1) / (N - 1)
    dalpha = N / (N - 1) * dp_dmu * (-mu[:, 0] / 2)
    return gamma, alpha, dalpha


def _interp(x, xp, fp):
    """Linear interpolation on the uniform grid xp (clamped at its ends)."""
    h = (xp[-1] - xp[0]) / (len(xp) - 1)
    pos = ((x - xp[0]) / h).clamp(0, len(xp) - 1)
    i = pos.floor().long().clamp(max=len(xp) - 2)
    w = pos - i
    return fp[i] * (1 - w) + fp[i + 1] * w


def duo_alpha(gamma, N):
    """alpha_t of the uniform process followed by argmax(w_t), and d alpha / d gamma, looked up in a table
    computed once per N (see _duo_table). Not differentiable (it is a schedule). Same shape/dtype as gamma."""
    grid, alpha, dalpha = _duo_table(N)
    g = torch.as_tensor(gamma).detach()
    dtype = g.dtype if g.is_floating_point() else torch.float64
    g64 = g.to(torch.float64).cpu()
    a, da = _interp(g64, grid, alpha), _interp(g64, grid, dalpha)
    return a.to(dtype=dtype, device=g.device), da.to(dtype=dtype, device=g.device)


def duo_gamma_of_alpha(alpha, N):
    """The inverse of duo_alpha: gamma at which the table's alpha equals alpha (a tensor; alpha decreases in gamma),
    by linear interpolation between table points. Not differentiable (a schedule). Same shape/dtype/device."""
    grid, table, _ = _duo_table(N)
    a_up, g_up = table.flip(0), grid.flip(0)  # increasing alpha
    a = torch.as_tensor(alpha).detach()
    a64 = a.to(torch.float64).cpu()
    j = torch.searchsorted(a_up, a64).clamp(1, len(a_up) - 1)
    w = (a64 - a_up[j - 1]) / (a_up[j] - a_up[j - 1])
    gamma = g_up[j - 1] + w * (g_up[j] - g_up[j - 1])
    return gamma.to(dtype=a.dtype if a.is_floating_point() else torch.float64, device=a.device)


def duo_gamma_for_alpha(alpha, N):
    """duo_gamma_of_alpha for one float, checked to lie inside the table. Used to pick gamma_min / gamma_max for
    a vocabulary size: the max of N - 1 Gaussians grows with N, so the OpenWebText curriculum's (-3.55, -1.85 for
    N = 50257) do not carry over to a small N."""
    _, table, _ = _duo_table(N)
    if not (table.min() < alpha < table.max()):
        raise ValueError(f"alpha={alpha} outside the tabulated range [{table.min():.2e}, {table.max():.6f}]")
    return float(duo_gamma_of_alpha(torch.tensor(alpha, dtype=torch.float64), N))
