"""Samplers as executable maths: the Gumbel-max draw against the categorical, every fused step against its full
float64 posterior (with a planted bug that the same statistic must reject), the uniform posterior against Bayes'
rule, and whole samplers driven by a tiny language's exact denoiser against the language itself (all N^L
sequences enumerated). Statistics are Pearson chi-square tests at a false-alarm rate of 1e-4, with fixed seeds."""
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
from data import SyntheticLanguage, prepare_synthetic
from losses import udlm_loss
from model import sedd_log_score, subs_log_probs
from processes import Uniform, alpha_loglinear
from test_train import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """These tests run many tiny tensor ops; on a shared 2-core machine, thread hand-offs cost 30x more than the
    work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------- statistics

def chi2_threshold(df, z=3.719):
    """Upper 1e-4 quantile of chi-square(df) (Wilson-Hilferty; z is the standard normal's 1e-4 quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts, probs):
    """Pearson statistic of observed counts against probabilities; bins expecting fewer than 5 are pooled, and a
    bin of probability 0 must stay empty. Returns (statistic, degrees of freedom)."""
    counts, probs = counts.to(F64).flatten(), probs.to(F64).flatten()
    assert counts[probs == 0].sum() == 0, "drew an outcome of probability 0"
    expected = counts.sum() * probs
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    return ((observed - expected)[keep] ** 2 / expected[keep]).sum().item(), int(keep.sum()) - 1


def per_position_chi_square(draws, probs):
    """draws (n, L) ids, probs (L, V): the chi-square statistics of every position, summed."""
    stat, df = 0.0, 0
    for i in range(probs.shape[0]):
        s, d = chi_square(torch.bincount(draws[:, i], minlength=probs.shape[1]), probs[i])
        stat, df = stat + s, df + d
    return stat, df


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------- the draw

def test_gumbel_argmax_is_the_categorical_distribution():
    """50k float64 Gumbel-max draws match softmax(l) (one weight is -inf: never drawn), and so does the
    reference inverse-CDF categorical."""
    logits = torch.randn(1, 10, generator=gen(0)) * 2
    logits[0, 3] = -torch.inf
    probs = torch.softmax(logits.double(), -1)[0]
    n = 50_000
    draws = sample.gumbel_argmax(logits, gen(1), rows=torch.zeros(n, dtype=torch.long), block=3 * n)  # 4 visits
    stat, df = chi_square(torch.bincount(draws, minlength=10), probs)
    assert stat < chi2_threshold(df)
    reference = sample.categorical(probs.expand(n, 10), gen(2))
    stat, df = chi_square(torch.bincount(reference, minlength=10), probs)
    assert stat < chi2_threshold(df)
    # the statistic has power: a temperature of 0.9 is rejected
    hot = sample.gumbel_argmax(logits / 0.9, gen(1), rows=torch.zeros(n, dtype=torch.long))
    assert chi_square(torch.bincount(hot, minlength=10), probs)[0] > chi2_threshold(df)


def test_gumbel_argmax_does_not_depend_on_the_block():
    """The noise is generated column by column, so the same generator gives identical draws for every block."""
    logits = torch.randn(64, 37, generator=gen(0))
    rows = torch.tensor([5, 0, 63, 5, 17])
    whole = sample.gumbel_argmax(logits, gen(7), rows, block=5 * 37)
    for block in (1, 25, 80, 10 ** 6):                          # 1 to 37 columns per visit
        assert torch.equal(sample.gumbel_argmax(logits, gen(7), rows, block=block), whole)
    all_rows = sample.gumbel_argmax(logits, gen(7), block=8 * 64)
    assert all_rows.shape == (64,) and torch.equal(all_rows, sample.gumbel_argmax(logits, gen(7), block=64 * 64))
    assert not torch.equal(sample.gumbel_argmax(logits, gen(8), rows, block=5 * 37), whole)  # it is random


def test_blocked_logsumexp():
    x = torch.randn(6, 29, generator=gen(0)) * 5
    x[2] = -torch.inf                                          # a row with no mass at all
    x[4, :20] = -torch.inf
    rows = torch.tensor([0, 2, 4, 5])
    for block in (1, 29, 60, 1000):                             # one row per visit, two, all of them
        got = sample.logsumexp_rows(x, rows, block)
        assert got.dtype == F64
        assert torch.allclose(got, torch.logsumexp(x.double()[rows], -1), atol=1e-12)
        assert torch.allclose(sample.logsumexp_rows(x, block=block), torch.logsumexp(x.double(), -1), atol=1e-12)
    assert sample.logsumexp_rows(x, rows[:0]).shape == (0,)


# ------------------------------------------------------------------------------------------------- one step
# One state z, replicated on n rows; the fused step's per-position token frequencies must match the exact
# posterior (built by the reference), and a planted bug (temperature 0.9 on the network output) must not.

n_rows, N, L = 20_000, 8, 6


def replicate(out, z):
    return out.expand(n_rows, *out.shape[1:]), z.expand(n_rows, -1)


def check_step(step, exact, out, z):
    """step(out, z, fused, generator) -> (n, L); exact (L, V). The fused and the reference step pass, the planted
    bug fails, with the same statistic and threshold."""
    for fused, seed in ((True, 1), (False, 2)):
        stat, df = per_position_chi_square(step(*replicate(out, z), fused, gen(seed)), exact)
        assert stat < chi2_threshold(df), (fused, stat, df)
    stat, df = per_position_chi_square(step(*replicate(out / 0.9, z), True, gen(3)), exact)
    assert stat > chi2_threshold(df), ("the planted bug went unnoticed", stat, df)


def test_mdlm_step_fused_matches_reference():
    z = torch.tensor([[N, N, N, N, 3, 5]])                     # four masks, two unmasked tokens
    out = subs_log_probs(torch.randn(1, L, N + 1, generator=gen(0)) * 1.5, z, N)
    a_s, a_t = torch.tensor(0.7, dtype=F64), torch.tensor(0.4, dtype=F64)
    exact = sample.mdlm_posterior(out, z, a_s, a_t)[0]         # (L, V) DiDi eq. 2
    assert torch.allclose(exact[0, N], torch.tensor(0.3 / 0.6, dtype=F64))   # stays masked: (1 - a_s)/(1 - a_t)
    check_step(lambda o, zz, fused, g: sample.mdlm_step(o, zz, a_s, a_t, g, fused, block=50_000), exact, out, z)


@pytest.mark.parametrize('final', [False, True])
def test_sedd_step_fused_matches_reference(final):
    z = torch.tensor([[N, N, N, N, 2, 7]])
    logits = torch.randn(1, L, N + 1, generator=gen(0)) + torch.tensor([-1.0, 0.0, 1.0, 2.5, 0, 0])[None, :, None]
    out = sedd_log_score(logits, z, torch.tensor([1.0]))      # sum_y s_y differs a lot between positions
    coef = torch.tensor(0.3, dtype=F64)
    exact = sample.sedd_posterior(out, z, coef, final)[0]
    if not final:   # both branches are exercised: a position that may stay masked, and one clamped to change
        assert exact[0, N] > 0.2 and exact[3, N] == 0
    check_step(lambda o, zz, fused, g: sample.sedd_step(o, zz, coef, final, g, fused, block=50_000), exact, out, z)


def test_duo_step_fused_matches_reference():
    z = torch.tensor([[0, 3, 3, 7, 1, 6]])
    out = torch.log_softmax(torch.randn(1, L, N, generator=gen(0)) * 1.5, -1)
    out[0, 1, 3] += 2.0                                         # a position whose x0_hat favours its own token
    out = out.log_softmax(-1)
    a_s, a_t = torch.tensor(0.6, dtype=F64), torch.tensor(0.3, dtype=F64)
    exact = sample.duo_posterior(out, z, a_s, a_t)[0]
    check_step(lambda o, zz, fused, g: sample.duo_step(o, zz, a_s, a_t, g, fused, block=50_000), exact, out, z)


def test_uniform_posterior_is_bayes_rule():
    """q(z_s | z_t, x0) = sum_x x0(x) q(z_t | z_s) q(z_s | x) / sum_x x0(x) q(z_t | x), by enumeration with the
    transition matrices exp(sigma Q_uni) (IDLM eq. 21), for the 3-way mixture and for the reference posterior."""
    n = 3
    x0 = torch.softmax(torch.randn(n, generator=gen(0), dtype=F64), -1)
    process = Uniform(n)
    for a_s, a_t in ((0.8, 0.3), (1.0, 0.5), (0.4, 0.1)):
        T_s = process.transition_matrix(-math.log(a_s))                   # [z_s, x]
        T_ts = process.transition_matrix(-math.log(a_t / a_s))            # [z_t, z_s]
        for i in range(n):
            bayes = T_ts[i] * (T_s @ x0)                                  # (n,) over z_s
            bayes = bayes / bayes.sum()
            c_stay, c_x, c_u = sample.duo_mixture(x0[i], a_s, a_t, n)
            mixture = c_stay * torch.nn.functional.one_hot(torch.tensor(i), n) + c_x * x0 + c_u / n
            assert torch.allclose(mixture, bayes, atol=1e-12)
            ref = sample.duo_posterior(x0.log()[None, None], torch.tensor([[i]]), torch.tensor(a_s, dtype=F64),
                                       torch.tensor(a_t, dtype=F64))[0, 0]
            assert torch.allclose(ref, bayes, atol=1e-12)


def test_sedd_euler_and_analytic_coincide_for_the_loglinear_schedule():
    """e^{sigma_t - sigma_s} - 1 = alpha_s/alpha_t - 1 = (1 - eps)(t - s)/alpha_t = (t - s) sigma'_t: with a linear
    alpha_t, SEDD's Euler and analytic steps are the same step."""
    plan = sample.time_plan(7)
    for k in range(6):
        assert torch.allclose(sample.sedd_coefficient('euler', plan, k), sample.sedd_coefficient('analytic', plan, k))
    assert plan.alpha[-1] == 1 and plan.sigma[-1] == 0 and plan.t[-1] == 0      # the last step lands on s = 0
    assert torch.allclose(plan.alpha[:-1], alpha_loglinear(torch.linspace(1, 1e-5, 8, dtype=F64))[:-1])


# ------------------------------------------------------------------------------------------------- cost

def count_operations(fn):
    """How many torch operations fn() runs: on a GPU, about the number of kernels it launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.calls


@pytest.mark.parametrize('kind', sample.KINDS)
def test_fused_steps_take_a_few_kernels_per_block_not_per_row(kind):
    """At GPT-2's vocabulary a fused step visits the logits `block` numbers at a time, many rows per kernel: the
    count of operations stays flat as B L grows within one block, and grows by a few per visit beyond it, with
    ceil(B L V / block) visits. (A loop over rows, as logsumexp_rows had at V = 50257, grows with B L.)"""
    V, a_s, a_t = 50257, torch.tensor(1.0, dtype=F64), torch.tensor(0.01, dtype=F64)

    def operations(BL, block):
        """One step where every one of the B L positions draws a token from the logits (the costliest case)."""
        g = gen(0)
        logits = torch.randn(1, BL, V + (kind != 'duo'), generator=g)
        z = torch.full((1, BL), V) if kind != 'duo' else torch.randint(0, V, (1, BL), generator=g)
        step = {'mdlm': lambda: sample.mdlm_step(logits, z, a_s, a_t, g, block=block),
                'sedd': lambda: sample.sedd_step(logits, z, a_s, False, g, block=block),   # sum_y s_y >> 1: all change
                'duo': lambda: sample.duo_step(logits.log_softmax(-1), z, a_s, a_t, g, block=block)}[kind]
        return count_operations(step)

    one_visit = operations(64, 64 * V)
    assert operations(8, 64 * V) == one_visit                   # 8 rows or 64: the same kernels, only larger
    per_visit = operations(64, 32 * V) - one_visit              # ceil(64 V / 32 V) = 2 visits
    assert 0 < per_visit <= 40, per_visit
    assert operations(64, 8 * V) <= one_visit + (8 - 1) * per_visit   # ceil(64 V / 8 V) = 8 visits


# ------------------------------------------------------------------------------------------------- whole samplers

@pytest.fixture(scope='module')
def tiny():
    """A language small enough to enumerate: N = 4 tokens, L = 4, two sparse chains. Returns (language, p_true
    over all 256 sequences in base-N order)."""
    lang = SyntheticLanguage(N=4, L=4, K=2, successors=2)
    every = torch.tensor(list(itertools.product(range(4), repeat=4)))
    return lang, lang.log_prob(every).exp()


def sequence_chi_square(x, p_true):
    index = (x * 4 ** torch.arange(3, -1, -1)).sum(-1)          # base-4 number, same order as itertools.product
    return chi_square(torch.bincount(index, minlength=256), p_true)


def draw(net, kind, n, steps, seed=0, **kw):
    x, nfe = sample.generate(net, kind, n, 4, steps, 4, gen(seed), batch_size=n, progress=False, **kw)
    assert x.shape == (n, 4) and x.dtype == torch.long and 0 <= x.min() and x.max() < 4   # no mask left
    return x, nfe


@pytest.mark.parametrize('kind, many, n', [('mdlm', 512, 8000), ('sedd', 128, 4000), ('duo', 128, 4000)])
def test_exact_denoiser_with_many_steps_samples_the_language(tiny, kind, many, n):
    """With the exact denoiser and many steps, at most one position moves per step nearly always, so ancestral
    sampling draws from p_true itself; with one step every position is drawn independently, which it is not."""
    lang, p_true = tiny
    net = sample.exact_denoiser(lang, kind)
    stat, df = sequence_chi_square(draw(net, kind, n, many)[0], p_true)
    assert stat < chi2_threshold(df), (stat, df)
    stat, df = sequence_chi_square(draw(net, kind, n, 1)[0], p_true)
    assert stat > chi2_threshold(df), (stat, df)


@pytest.mark.parametrize('kind', ['mdlm', 'sedd'])
def test_temperature_draws_from_the_sharpened_x0_hat(tiny, kind):
    """One step from all masks draws every position independently from x0_hat^(1/T), renormalised (x0_hat: the
    exact marginals given no context): the draws fit p^2 / sum p^2 at T = 0.5 and not the untempered p."""
    lang, _ = tiny
    p = lang.denoise(torch.full((1, 4), 4), 'absorbing', 0.5)[0]                # (L, N): p(x_i) with no context
    x, _ = draw(sample.exact_denoiser(lang, kind), kind, 4000, 1, temperature=0.5)
    stat, df = per_position_chi_square(x, p ** 2 / (p ** 2).sum(-1, keepdim=True))
    assert stat < chi2_threshold(df), (stat, df)
    stat, df = per_position_chi_square(x, p)
    assert stat > chi2_threshold(df), (stat, df)


@pytest.mark.parametrize('kind', sample.KINDS)
def test_temperature_one_is_the_model_and_near_zero_is_greedy(tiny, kind):
    """T = 1 changes no draw; T -> 0 takes a most likely token of x0_hat (ties split at random). SEDD's tempered
    scores keep their total mass, so whether a position unmasks does not change."""
    lang, _ = tiny
    net = sample.exact_denoiser(lang, kind)
    assert torch.equal(draw(net, kind, 50, 3, seed=1, temperature=1.0)[0], draw(net, kind, 50, 3, seed=1)[0])
    start = torch.randint(0, 4, (50, 4), generator=gen(2)) if kind == 'duo' else torch.full((50, 4), 4)
    log_x0 = net(start, sample.time_plan(1).sigma[:1].expand(50))[..., :4]
    x, _ = draw(net, kind, 50, 1, seed=2, temperature=1e-3)
    assert torch.allclose(log_x0.gather(-1, x[..., None])[..., 0], log_x0.max(-1).values)
    assert not torch.equal(x, draw(net, kind, 50, 1, seed=2)[0])
    if kind == 'sedd':
        out = torch.cat([log_x0, torch.zeros(50, 4, 1, dtype=F64)], -1)             # log-scores and the mask's 0
        assert torch.allclose(sample.temper(out, 'sedd', 0.3)[..., :4].logsumexp(-1), log_x0.logsumexp(-1))


def test_uniform_sampler_needs_the_leave_one_out_denoiser(tiny):
    """Plugging p(x_i | z) (data.SyntheticLanguage.denoise) into the uniform posterior is visibly wrong: the
    plug-in step is exact for x0_hat = p(x_i | z without z_i), the quantity exact_denoiser(.., 'duo') returns."""
    lang, p_true = tiny

    def full_posterior(z, sigma):
        return torch.log(lang.denoise(z, 'uniform', torch.exp(-sigma.double())))

    stat, df = sequence_chi_square(draw(full_posterior, 'duo', 4000, 128, time_conditioned=True)[0], p_true)
    assert stat > chi2_threshold(df)


def test_leave_one_out_denoiser_minimises_the_udlm_loss(tiny):
    """E[UDLM loss] over x ~ p, z ~ q(. | x) (all pairs enumerated, alpha = 0.5) is lower for the leave-one-out
    x0_hat than for p(x_i | z): the former is what a perfectly trained UDLM / Duo network outputs."""
    lang = SyntheticLanguage(N=3, L=3, K=2, successors=2)
    every = torch.tensor(list(itertools.product(range(3), repeat=3)))           # both the x and the z grid
    alpha = 0.5
    emit = (alpha * (every[:, None] == every[None]).double() + (1 - alpha) / 3).prod(-1)   # (x, z) q(z | x)
    weight = lang.log_prob(every).exp()[:, None] * emit                                   # (x, z) p(x, z)
    sigma = torch.full((len(every),), -math.log(alpha), dtype=F64)
    candidates = {'leave-one-out': sample.exact_denoiser(lang, 'duo')(every, sigma),
                  'p(x_i | z)': torch.log(lang.denoise(every, 'uniform', alpha))}
    col = torch.full((len(every), 1), alpha, dtype=F64)
    risk = {name: sum((weight[x, :, None] * udlm_loss(log_x0, every[x].expand(len(every), 3), every, col, -col)).sum()
                      for x in range(len(every))).item() for name, log_x0 in candidates.items()}
    assert risk['leave-one-out'] < risk['p(x_i | z)'] - 0.1


def test_exact_denoisers_are_distributions(tiny):
    lang, _ = tiny
    z = torch.tensor([[4, 1, 4, 2], [4, 4, 4, 4]])
    out = sample.exact_denoiser(lang, 'mdlm')(z, torch.zeros(2, dtype=F64))
    assert out.shape == (2, 4, 5) and out.dtype == F64
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, 4, dtype=F64)) and (out[..., 4] < -1e5).all()
    assert out[0, 1, 1] == 0 and out[0, 3, 2] == 0                          # SUBS carry-over
    sigma = torch.tensor([0.3, 2.0], dtype=F64)
    score = sample.exact_denoiser(lang, 'sedd')(z, sigma)                   # s_y = x0_hat_y / expm1(sigma)
    assert torch.allclose(score[..., :4].exp().sum(-1)[z == 4], (1 / torch.expm1(sigma))[:, None].expand(2, 4)[z == 4])
    duo = sample.exact_denoiser(lang, 'duo')(z.clamp_max(3), sigma)
    assert duo.shape == (2, 4, 4) and torch.allclose(duo.exp().sum(-1), torch.ones(2, 4, dtype=F64))


def test_caching_skips_calls_and_changes_nothing(tiny):
    """A denoiser that ignores sigma is called only when some row changed; the samples are exactly those of the
    uncached run with the same generator (the cache only skips work)."""
    lang, _ = tiny
    net = sample.exact_denoiser(lang, 'mdlm')
    cached, nfe = sample.generate(net, 'mdlm', 3, 4, 200, 4, gen(5), batch_size=3, progress=False)
    every, nfe_every = sample.generate(net, 'mdlm', 3, 4, 200, 4, gen(5), batch_size=3, progress=False,
                                       time_conditioned=True)
    assert torch.equal(cached, every)
    assert nfe_every == 200 and nfe <= 3 * 4 + 1 < 200


def test_greedy_tail_and_argument_checks(tiny):
    lang, _ = tiny
    net = sample.exact_denoiser(lang, 'duo')
    plain, nfe_plain = draw(net, 'duo', 50, 4)
    greedy, nfe = draw(net, 'duo', 50, 4, greedy_tail=True)                # the same generator seed
    assert nfe_plain == 4 and nfe == 5                         # K steps, then one call on the final z
    sigma_min = torch.full((50,), float(sample.time_plan(4).sigma_min), dtype=F64)
    assert torch.equal(greedy, net(plain, sigma_min).argmax(-1))
    assert not torch.equal(greedy, plain)
    with pytest.raises(ValueError):
        draw(sample.exact_denoiser(lang, 'mdlm'), 'mdlm', 4, 4, greedy_tail=True)
    with pytest.raises(ValueError):
        draw(sample.exact_denoiser(lang, 'sedd'), 'sedd', 4, 4, sampler='tweedie')
    with pytest.raises(ValueError):
        draw(net, 'duo', 4, 0)


# ------------------------------------------------------------------------------------------------- command line

def test_two_processes_write_the_samples_of_one_process(tiny_data, tmp_path):
    """torchrun with 2 processes (gloo, CPU) writes the very file that 1 process writes with the same --seed."""
    files = [str(tmp_path / f'samples_{nproc}.npy') for nproc in (1, 2)]
    for nproc, out in zip((1, 2), files):
        r = run_script(['sample.py', '--ckpt=exact', f'--data={tiny_data}', '--kind=mdlm', '--steps=16', '--seed=3',
                        '--num_samples=7', '--batch_size=2', f'--out={out}', '--progress=false'], nproc=nproc)
        assert r.returncode == 0, r.stderr
        assert 'NFE' in r.stdout
    one, two = np.load(files[0]), np.load(files[1])
    assert one.shape == (7, 8) and one.dtype == np.int64 and one.min() >= 0 and one.max() < 8
    assert np.array_equal(one, two)
    assert len({one[b0:b0 + 2].tobytes() for b0 in range(0, 7, 2)}) == 4     # every batch has noise of its own
    lines = open(files[1] + '.txt').read().splitlines()
    assert len(lines) == 7 and lines[0] == ' '.join(map(str, two[0]))


def test_samples_do_not_depend_on_the_number_of_processes(tiny):
    """Every world size from 1 to 5 splits the batches into runs that start where they would in one process, and
    batch j draws from (seed, j B), so the ranks' samples, in rank order, are one process's samples. The first
    batch draws what one process drew before this rule (step_generator(seed, 0)): one batch's samples are unchanged."""
    lang, _ = tiny
    net = sample.exact_denoiser(lang, 'sedd')
    n, B, seed = 11, 3, 5

    def share(rank, world):
        first, last, noise = sample.my_batches(n, B, seed, rank, world, 'cpu')
        assert first % B == 0
        return sample.generate(net, 'sedd', last - first, 4, 6, 4, noise, batch_size=B, progress=False)[0]

    one = share(0, 1)
    for world in range(2, 6):
        assert torch.equal(torch.cat([share(rank, world) for rank in range(world)]), one)
    first_batch, _ = sample.generate(net, 'sedd', B, 4, 6, 4, sample.common.step_generator(seed, 0), batch_size=B,
                                     progress=False)
    assert torch.equal(first_batch, one[:B])


def test_default_batch_fits_the_vocabulary():
    """--batch_size 0: 64 on the synthetic data (its draws are the ones an explicit 64 gives), 16 at GPT-2's
    V = 50258 and L = 1024, where one forward of the 169M DiT peaks at about 1.06 GiB a sequence."""
    assert sample.batch_for(65, 64) == 64 and sample.batch_for(258, 1024) == 64
    assert sample.batch_for(50258, 1024) == 16 and sample.batch_for(50258, 128 * 1024) == 1


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('data') / 'syn')
    prepare_synthetic(path, num_train=64, num_val=16, N=8, L=8, K=2)
    return path


def train_tiny(data, out_dir, teacher):
    import train
    train.main([f'--data={data}', f'--out_dir={out_dir}', f'--teacher={teacher}', '--model=tiny', '--max_iters=1',
                '--batch_size=4', '--eval_batches=1', '--warmup_iters=1'])
    return str(out_dir)


@pytest.mark.parametrize('teacher', ['mdlm', 'sedd', 'duo'])
def test_trained_checkpoints_sample(tiny_data, tmp_path, teacher):
    """A checkpoint of each kind loads with its EMA weights and schedule, and both implementations run on it."""
    net, kind, n, seq_len, meta, schedule = sample.load_sampler(train_tiny(tiny_data, tmp_path, teacher), 'cpu')
    assert (kind, n, seq_len, meta['vocab_size']) == (teacher, 8, 8, 8) and not net.training
    assert (schedule == 'loglinear') == (teacher != 'duo')
    for fused in (True, False):
        x, nfe = sample.generate(net, kind, 5, seq_len, 3, n, gen(0), batch_size=2, fused=fused, schedule=schedule,
                                 progress=False)
        assert x.shape == (5, 8) and 0 <= x.min() and x.max() < 8 and nfe == 3


def test_autoregressive_checkpoints_are_refused(tiny_data, tmp_path):
    with pytest.raises(sample.UserError, match='autoregressive'):
        sample.load_sampler(train_tiny(tiny_data, tmp_path, 'ar'), 'cpu')


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, 'sample.py', '--ckpt', str(tmp_path / 'nothing')], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith('error:') and len(r.stderr.strip().splitlines()) == 1
