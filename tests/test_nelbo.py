"""The MDLM NELBO (IDLM eq. 4) of the synthetic language's exact denoiser bounds the true NLL from above, tightly.

A perfectly trained MDLM outputs the exact posterior marginals p(x0_i | x_t), which the synthetic language
computes by forward-backward. Its continuous-time NELBO is then the true negative log-likelihood up to the
schedule's eps truncation, so E[NELBO(x) - (-log p(x))] must be >= 0 and small. Both estimators of the NELBO,
t ~ U[eps, 1] (the standard one) and the mask count k ~ U{1..L} (losses.MDLMObjective.corrupt_by_count), must
agree with it.
"""
import torch

from data import SyntheticLanguage
from losses import MDLMObjective
from processes import sample_time
from data import exact_denoiser


def exact_subs(language):
    """The exact denoiser as a SUBS head (sample.ExactDenoiser; absorbing posteriors ignore sigma)."""
    net = exact_denoiser(language, 'mdlm')
    return lambda x_t: net(x_t, torch.zeros(x_t.shape[0], dtype=torch.float64))


def paired_gap(language, by_count, n=8000, seed=0):
    """Per-sequence NELBO/L minus the true NLL/L: mean and standard error over n sequences."""
    g = torch.Generator().manual_seed(seed)
    x0 = language.sample(n, generator=g)
    objective, net = MDLMObjective(language.N), exact_subs(language)
    if by_count:
        noisy = objective.corrupt_by_count(x0, generator=g)
    else:
        noisy = objective.corrupt(x0, sample_time(n, generator=g).double(), generator=g)
    nelbo = objective.loss(net(noisy.x_t), x0, noisy).mean(-1)       # (n,) per token
    gap = nelbo - (-language.log_prob(x0) / language.L)
    return gap.mean().item(), (gap.std() / n ** 0.5).item(), nelbo.mean().item()


def test_exact_denoiser_nelbo_bounds_the_nll_tightly():
    language = SyntheticLanguage(N=8, L=8, K=2, successors=3)
    H = language.entropy_rate()[0]
    for by_count in (False, True):
        gap, se, nelbo = paired_gap(language, by_count)
        assert gap > -3 * se, (by_count, gap, se)            # not below the true NLL
        assert abs(gap) < 3 * se, (by_count, gap, se)        # and equal to it within noise
        assert se < 0.015 * H                                 # the check has power: 3 se is under 5% of H


def test_a_wrong_denoiser_has_a_visible_gap():
    """The same statistic separates an imperfect denoiser: one that ignores the right neighbour of each token."""
    language = SyntheticLanguage(N=8, L=8, K=2, successors=3)
    n, g = 4000, torch.Generator().manual_seed(1)
    x0 = language.sample(n, generator=g)
    objective, net = MDLMObjective(language.N), exact_subs(language)
    noisy = objective.corrupt_by_count(x0, generator=g)
    blurred = noisy.x_t.clone()
    blurred[:, 1:][noisy.x_t[:, :-1] == language.N] = language.N  # hide tokens right after a mask
    out = net(blurred)
    keep = (noisy.x_t == language.N)[..., None]                    # score only the truly masked positions
    out = torch.where(keep, out, net(noisy.x_t))
    gap = (objective.loss(out, x0, noisy).mean(-1) - (-language.log_prob(x0) / language.L))
    assert gap.mean() > 5 * gap.std() / n ** 0.5
