"""DiDi-Instruct's switches (distill_didi.py, sample.rerank), each checked where the maths allows: what a group
shares, the floor that label smoothing puts on the reward, per-token against per-sequence log p (eq. 15), the tau
distributions, the trainable blocks, the oracle reward, the reward diagnostics, and RGAS's selection rules."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import distill_didi as didi
import sample
from model import discriminator_reward
from data import SyntheticLanguage
from test_didi import tiny_mdlm
from test_idlm import gen

CFG = {**didi.DEFAULTS, 'group_size': 4, 'tau_dist': 'uniform'}
N, L, B = 5, 6, 16


@pytest.mark.parametrize('share', ['none', 'tau', 'state'])
def test_what_a_group_shares(share):
    """none: every row has its own tau; tau: the G rows of a group share tau and the discriminator's t; state: they
    also share z_tau, and only the last step (and the masking at t) differs."""
    student = tiny_mdlm(N, L, perturb=0.1)
    cfg = {**CFG, 'group_share': share}
    roll = didi.make_rollout(student, torch.randint(N, (B, L), generator=gen(0)), gen(1), cfg, N)
    groups = lambda v: v.view(B // 4, 4, *v.shape[1:])
    same_tau = (groups(roll.tau) == groups(roll.tau)[:, :1]).all()
    same_state = (groups(roll.z_tau) == groups(roll.z_tau)[:, :1]).all()
    assert bool(same_tau) == (share != 'none') and bool((groups(roll.t) == groups(roll.t)[:, :1]).all()) == same_tau
    assert bool(same_state) == (share == 'state')
    assert roll.tau.unique().numel() == (B if share == 'none' else B // 4)
    if share == 'state':
        assert not (groups(roll.x) == groups(roll.x)[:, :1]).all()          # the samples themselves still differ


def test_label_smoothing_puts_a_floor_on_the_reward():
    """With smoothing s, the BCE of eq. 8 on a sequence it is sure of is minimised at the logit log(s/2 / (1 - s/2)),
    -2.94 for s = 0.1, not at -inf: found here by gradient descent on the loss itself, and then counted as 'at the
    floor' by the diagnostics."""
    s = 0.1
    logit = torch.zeros(1, L, requires_grad=True)
    disc = lambda z, sigma: torch.cat([torch.full((len(z) // 2, L), 10.0), logit.expand(len(z) // 2, L)])
    optimizer = torch.optim.SGD([logit], lr=100.0)   # the BCE is flat near its optimum
    for _ in range(1000):
        optimizer.zero_grad()
        loss, *_ = didi.discriminator_loss(disc, torch.zeros(1, L), torch.zeros(1, L), torch.zeros(1), s)
        loss.backward()
        optimizer.step()
    floor = math.log(s / 2 / (1 - s / 2))
    assert abs(logit.mean().item() - floor) < 1e-3 and abs(floor + 2.944) < 1e-3
    rolls = [SimpleNamespace(t=torch.rand(8, dtype=torch.float64), r=torch.tensor([floor] * 4 + [0.0] * 4))]
    got = didi.reward_diagnostics(rolls, {**CFG, 'reward': 'disc', 'label_smoothing': s}, None, bins=2)
    assert got['reward_at_floor'] == 0.5 and got['reward_at_clip'] == 0.0


def test_sequence_normalisation_is_eq_15s_sum():
    """--logp_norm sequence makes the policy term L times the per-token one, with the same gradient direction."""
    student = tiny_mdlm(N, L, perturb=0.3)
    cfg = {**CFG, 'kl_weight': 0.0, 'entropy_weight': 0.0}
    roll = didi.make_rollout(student, torch.randint(N, (B, L), generator=gen(0)), gen(1), cfg, N)
    roll.r = torch.randn(B, generator=gen(2), dtype=torch.float64)
    grads = {}
    for norm in ('token', 'sequence'):
        student.zero_grad()
        loss, policy, *_, logp = didi.student_loss(student, student, roll, {**cfg, 'logp_norm': norm}, N)
        loss.backward()
        grads[norm] = (policy, logp, torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
    assert torch.allclose(grads['sequence'][0], L * grads['token'][0], rtol=1e-5)
    assert torch.allclose(grads['sequence'][1], grads['token'][1], rtol=1e-5)     # logged per token either way
    # float32 rounding differs elementwise (a few 1e-7 on entries near 0), so compare the whole gradient vector
    seq, tok = grads['sequence'][2], L * grads['token'][2]
    assert (seq - tok).norm() <= 1e-4 * tok.norm()


@pytest.mark.parametrize('dist,a,b,mean', [('beta', 2.0, 5.0, 2 / 7), ('beta', 5.0, 2.0, 5 / 7),
                                           ('uniform', 2.0, 5.0, 0.5)])
def test_tau_distributions_and_their_weight(dist, a, b, mean):
    """tau ~ pi has pi's mean, and the weight omega/pi of eq. 5 has mean 1 under pi (before the cap)."""
    cfg = {**CFG, 'tau_dist': dist, 'tau_a': a, 'tau_b': b, 'weight_clip': 0.0}
    t = didi.draw_times(200_000, gen(0), cfg)
    assert abs(t.mean().item() - mean) < 0.005
    grid = torch.linspace(1e-5, 1 - 1e-5, 200_001, dtype=torch.float64)
    integral = (didi.time_weight(grid, cfg) * didi.pi_density(grid, cfg)).mean().item()
    assert abs(integral - 1) < 0.01


@pytest.mark.parametrize('blocks', [0, 1, 2, 99])
def test_only_the_last_blocks_train(blocks):
    disc = didi.make_discriminator(tiny_mdlm(N, L), blocks)
    trains = [any(p.requires_grad for p in block.parameters()) for block in disc.blocks]
    n = min(blocks, len(disc.blocks))
    assert trains == [False] * (len(trains) - n) + [True] * n
    assert all(p.requires_grad for p in disc.output_layer.parameters())


def test_the_oracle_reward_is_the_exact_log_likelihood_per_token():
    language = SyntheticLanguage(N=N, L=L, K=2, successors=2, seed=3)
    x = language.sample(B, gen(0))
    roll = SimpleNamespace(x=x)
    got = didi.rollout_rewards(None, roll, {**CFG, 'reward': 'oracle'}, language, N)
    assert torch.allclose(got, language.log_prob(x) / L)


def test_reward_diagnostics_on_constructed_rewards():
    """A reward that is a function of t alone: t explains all its variance, and within t-bins it says nothing. A
    reward equal to the exact log-likelihood: correlation 1 within t-bins and within groups."""
    language = SyntheticLanguage(N=N, L=L, K=2, successors=2, seed=3)
    x = language.sample(400, gen(0))
    t = torch.tensor([0.25, 0.75], dtype=torch.float64).repeat(200)            # two times, one per t-bin below
    loglik = language.log_prob(x) / L
    cfg = {**CFG, 'reward': 'oracle'}
    by_t = didi.reward_diagnostics([SimpleNamespace(t=t, r=10 * t, x=x)], cfg, language, bins=2)
    assert abs(by_t['reward_var_by_t'] - 1) < 1e-12 and by_t['reward_loglik_corr_t_bins'] == 0.0
    exact = didi.reward_diagnostics([SimpleNamespace(t=t, r=loglik, x=x)], cfg, language, bins=2)
    assert exact['reward_loglik_corr_t_bins'] > 0.999 and exact['reward_loglik_corr_groups'] > 0.999


class ScoreDisc(torch.nn.Module):
    """A discriminator whose log-ratio at every position is score[token]: a candidate's mean reward is known."""

    def __init__(self, score):
        super().__init__()
        self.score, self.config = score, SimpleNamespace(mask_id=len(score) - 1)

    def forward(self, z, sigma):
        return self.score[z]


def test_rgas_selection_rules():
    """max keeps the candidate with the highest reward; softmax draws candidate m with probability softmax_m(R);
    'sum' and 'mean' differ when candidates hold different numbers of masks."""
    score = torch.tensor([0.0, 1.0, 2.0, 0.5])                 # token 3 is the mask
    candidates = torch.tensor([[[0, 3, 3]], [[2, 3, 3]], [[1, 3, 3]]]).expand(3, 4000, 3).contiguous()
    sigma = torch.zeros(())
    kept = sample.rerank(ScoreDisc(score), candidates, sigma, gen(0), 'max', 'mean')
    assert (kept[:, 0] == 0).all()     # rewards count masked positions only: 0.5 each, a tie, and max takes the first
    drawn = sample.rerank(ScoreDisc(score), candidates, sigma, gen(0), 'softmax', 'mean')
    share = torch.bincount(drawn[:, 0], minlength=3).double() / 4000
    assert (share[[0, 2, 1]] - 1 / 3).abs().max() < 0.03        # equal rewards: uniform
    unmasked = torch.tensor([[[0, 0, 3]], [[2, 2, 3]], [[1, 1, 3]]]).expand(3, 4000, 3).contiguous()
    full = torch.tensor([[[0, 0, 0]], [[2, 2, 2]], [[1, 1, 1]]]).expand(3, 4000, 3).contiguous()
    assert (sample.rerank(ScoreDisc(score), full, sigma, gen(0), 'max', 'mean')[:, 0] == 2).all()
    drawn = sample.rerank(ScoreDisc(score), full, sigma, gen(1), 'softmax', 'mean')
    p = torch.softmax(torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64), 0)
    share = torch.stack([(drawn[:, 0] == token).double().mean() for token in (0, 2, 1)])
    assert (share - p).abs().max() < 0.03
    mixed = torch.stack([unmasked[0], full[1], full[2]])           # one mask against none: mean and sum part ways
    assert torch.allclose(
        discriminator_reward(score[mixed.reshape(-1, 3)], mixed.reshape(-1, 3), 3, 'sum').view(3, -1)[:, 0],
        torch.tensor([0.5, 6.0, 3.0]))


class LeftTokenDiscriminator(torch.nn.Module):
    """A logit read off the token to a position's left: the reward of a sample then depends on its masking."""
    def forward(self, z, sigma):
        return torch.linspace(-1, 1, N + 1)[torch.cat([torch.full_like(z[:, :1], N), z[:, :-1]], 1)]


def test_reward_masks_average_eq_6_over_fresh_maskings():
    """--reward_masks k: eq. 6 averaged over k maskings of x at the sample's t, drawn from the micro-batch's
    generator, not read off roll.z. Over repeated draws for fixed samples the k-mean has the 1-draw mean and about
    1/k of its variance (independent draws: the Rao-Blackwell argument in rollout_rewards); 0 keeps roll.z."""
    disc = LeftTokenDiscriminator()
    student = tiny_mdlm(N, L, perturb=0.1)
    roll = didi.make_rollout(student, torch.randint(N, (B, L), generator=gen(0)), gen(1), CFG, N)
    assert torch.equal(didi.rollout_rewards(disc, roll, CFG, None, N),
                       discriminator_reward(disc(roll.z, None), roll.z, N).double())
    k = 4
    got = didi.rollout_rewards(disc, roll, {**CFG, 'reward_masks': k}, None, N, gen(2))
    z = didi.Absorbing(N).sample(roll.x.repeat(k, 1), didi.alpha_loglinear(roll.t)[:, None].repeat(k, 1), gen(2))
    assert torch.allclose(got, discriminator_reward(disc(z, None), z, N).double().view(k, B).mean(0))
    draws = lambda k: torch.stack([didi.rollout_rewards(disc, roll, {**CFG, 'reward_masks': k}, None, N, gen(s))
                                   for s in range(3, 803)])                  # (800, B): repeated draws per sample
    one, four = draws(1), draws(4)
    spread = one.std(0) / math.sqrt(800)
    assert ((one.mean(0) - four.mean(0)).abs() < 5 * spread + 1e-9).all()
    ratio = (four.var(0) / one.var(0))[one.var(0) > 1e-4]
    assert len(ratio) > B // 2 and 0.15 < ratio.mean() < 0.35


def test_disc_steps_update_the_discriminator_first_on_rollouts_of_its_own():
    """--disc_steps k: k discriminator updates per iteration, the first k - 1 on rollouts it does not keep; the
    student's rollouts are those of one step (the same samples as k = 1), rewarded by the discriminator after all k."""
    data = torch.randint(N, (64, L), generator=gen(0))
    dataset = SimpleNamespace(vocab_size=N, language=lambda: None, train=data, batch=lambda split, idx: data[idx])
    teacher = tiny_mdlm(N, L)
    runs = {}
    for k in (1, 3):
        cfg = {**CFG, 'disc_steps': k, 'batch_size': B, 'grad_accum': 1, 'seed': 0}
        student = tiny_mdlm(N, L, perturb=0.1)
        state = didi.make_state(student, didi.make_discriminator(teacher, 1), cfg)
        kept = []
        didi.iteration(state, teacher, dataset, None, cfg, 5, 0, 1, torch.device('cpu'), '', kept)
        steps = {int(s['step']) for s in state['disc_optimizer'].state.values()}
        runs[k] = state, kept, cfg
        assert steps == {k} and len(kept) == 1
    (_, [a], _), (three, [b], cfg) = runs[1], runs[3]
    assert torch.equal(a.x, b.x) and torch.equal(a.z, b.z)                    # the same phase-0 rollout
    assert torch.equal(b.r, didi.rollout_rewards(three['disc'], b, cfg, None, N))  # scored after all 3 updates
    assert not torch.allclose(a.r, b.r)
