"""DiDi-Instruct's switches (distill_didi.py, sample.rerank), each checked where the maths allows: what a group
shares, the floor that label smoothing puts on the reward, the policy term against eq. 15 per token, the tau
distributions and their weight, the trainable blocks, and RGAS's selection rules."""
import math
from types import SimpleNamespace

import pytest
import torch

import distill_didi as didi
import sample
from model import discriminator_reward
from test_didi import tiny_mdlm
from test_idlm import gen

CFG = {**didi.DEFAULTS, 'group_size': 4, 'tau_dist': 'uniform'}
N, L, B = 5, 6, 16


@pytest.mark.parametrize('share', ['none', 'tau'])
def test_what_a_group_shares(share):
    """none (the paper): every row has its own tau; tau: the G rows of a group share tau and the discriminator's t,
    and only their samples differ, so eq. 7 compares samples at one time."""
    student = tiny_mdlm(N, L, perturb=0.1)
    cfg = {**CFG, 'group_share': share}
    roll = didi.make_rollout(student, torch.randint(N, (B, L), generator=gen(0)), gen(1), cfg, N)
    groups = lambda v: v.view(B // 4, 4, *v.shape[1:])
    same_tau = (groups(roll.tau) == groups(roll.tau)[:, :1]).all()
    assert bool(same_tau) == (share == 'tau') and bool((groups(roll.t) == groups(roll.t)[:, :1]).all()) == same_tau
    assert roll.tau.unique().numel() == (B if share == 'none' else B // 4)
    assert not (groups(roll.x) == groups(roll.x)[:, :1]).all()


def test_label_smoothing_puts_a_floor_on_the_reward():
    """With smoothing s, the BCE of eq. 8 on a sequence it is sure of is minimised at the logit log(s/2 / (1 - s/2)),
    -2.94 for s = 0.1, not at -inf: found here by gradient descent on the loss itself. The reward of eq. 6 of every
    sample the discriminator is sure of then sits at that floor, where eq. 7 cannot rank them."""
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
    z = torch.tensor([[0, N, N, 1, N, 2], [N, N, N, N, 3, 4]])                     # two samples, masked differently
    r = discriminator_reward(logit.detach().expand(2, L), z, N)
    assert torch.allclose(r, torch.full((2,), floor), atol=1e-3)
    assert torch.equal(didi.group_advantages(torch.full((4,), floor), 4), torch.zeros(4))


def test_the_policy_term_is_eq_15_per_token():
    """The policy term of student_loss is -mean_i[ w(t_i) A_i log p_nu(x_i) ] / L: eq. 15's per-sequence sum over
    the path (eq. 9), built here from its parts, divided by L; its gradient is 1/L of the per-sequence one."""
    student = tiny_mdlm(N, L, perturb=0.3)
    cfg = {**CFG, 'kl_weight': 0.0, 'entropy_weight': 0.0}
    roll = didi.make_rollout(student, torch.randint(N, (B, L), generator=gen(0)), gen(1), cfg, N)
    roll.r = torch.randn(B, generator=gen(2))
    student.zero_grad()
    loss, policy, *_, logp = didi.student_loss(student, student, roll, cfg, N)
    loss.backward()
    per_token = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    student.zero_grad()
    inputs, sigma = didi.step_inputs(roll, N)
    out = student(inputs, sigma)
    sequence = didi.path_log_prob(out[:1], out[1:], roll.z_tau, roll.x, N)                  # (B,) eq. 9
    weight = didi.time_weight(roll.t, cfg).float()
    advantage = didi.group_advantages(roll.r, 4, cfg['reward_clip'], cfg['adv_clip'])
    reference = -(weight * advantage * sequence).mean()                                        # eq. 15's sum
    reference.backward()
    per_sequence = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    assert torch.allclose(L * policy, reference.detach(), rtol=1e-5)
    assert torch.allclose(logp, sequence.detach().mean() / L, rtol=1e-5)                    # logged per token
    # float32 rounding differs elementwise (a few 1e-7 on entries near 0), so compare the whole gradient vector
    assert (per_sequence - L * per_token).norm() <= 1e-4 * per_sequence.norm()


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
