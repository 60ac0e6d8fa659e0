"""MDLM-MMD (distill_mmd.py): the reward against the MMD estimator written out, the policy gradient against the exact
gradient of the expected reward, what the estimator's expectation is minimised by, the features, whole runs (torchrun,
exact resume) and one-line errors. The enumerations use N = 3 tokens and float64."""
import itertools
import subprocess
import sys

import pytest
import torch

import distill_mmd as mmd
import train
from common import UserError
from model import build_model
from test_idlm import ENV, ROOT, load
from test_train import run_script

F64 = torch.float64
N3 = 3


def brute_force_reward(real, fake, masked, alpha, exclude_same_position):
    """(1) of distill_mmd.py for one row, as loops over draws and positions: real (L, d), fake (B, L, d)."""
    k = lambda a, b: torch.exp(-alpha * ((a - b) ** 2).sum()).item()
    S = [p for p in range(len(masked)) if masked[p]]
    m, B = len(S), len(fake)
    if m < (2 if exclude_same_position else 1):
        return 0.0
    cross = sum(k(real[p], fake[b, q]) for b in range(B) for p in S for q in S)
    within = sum(k(fake[b, p], fake[c, q]) for b in range(B) for c in range(B) if c != b for p in S for q in S
                 if not (exclude_same_position and p == q))
    pairs = m * (m - 1) if exclude_same_position else m * m
    return 2 * cross / (B * m * m) - within / (B * (B - 1) * pairs)


@pytest.mark.parametrize('exclude', [True, False])
def test_reward_is_the_mmd_estimator_written_out(exclude):
    torch.manual_seed(0)
    n, B, L, d, alpha = 5, 3, 6, 4, 0.3
    real, fake = torch.randn(n, L, d, dtype=F64), torch.randn(n, B, L, d, dtype=F64)
    masked = torch.rand(n, L) < 0.5
    masked[0], masked[1] = False, torch.arange(L) == 2              # rows with m = 0 and m = 1
    masked[2] = True
    reward, active = mmd.mmd_reward(real, fake, masked, alpha, exclude)
    for i in range(n):
        expected = brute_force_reward(real[i], fake[i], masked[i], alpha, exclude)
        assert abs(reward[i].item() - expected) < 1e-12, i
    assert active.tolist() == [m >= (2 if exclude else 1) for m in masked.sum(-1).tolist()]
    assert reward[0] == 0 and (reward[1] == 0) == exclude


# ------------------------------------------------------------------------------------------------ the gradient (2)
# One real sequence of L = 3 positions, the first two masked; a student that is a table of logits (L, N); token
# features that are a random table over the 27 whole sequences, so each token's feature depends on its context.

L3, S2 = 3, [0, 1]
SEQS = torch.tensor(list(itertools.product(range(N3), repeat=L3)))                       # (27, 3)
COMPLETIONS = torch.tensor(list(itertools.product(range(N3), repeat=len(S2))))           # (9, 2)


def seq_id(x):
    """The index in SEQS of sequences x (..., L3)."""
    return (x * torch.tensor([N3 ** 2, N3, 1])).sum(-1)


def complete(x0, c):
    """x0 (L3,) with its masked positions S2 set to the completions c (..., 2)."""
    x = x0.expand(*c.shape[:-1], L3).clone()
    x[..., S2] = c
    return x


def table_features(seed=0, d=3):
    torch.manual_seed(seed)
    return torch.randn(len(SEQS), L3, d, dtype=F64)


def test_reinforce_gradient_is_the_gradient_of_the_expected_reward():
    """E over every draw of the gradient of the surrogate (2), leave-one-out baseline included, equals the gradient
    of -E[R] / (m B). G = 2 groups of B = 2 draws: 9^4 joint draws, each weighted by its probability. The test can
    fail: a baseline that includes the group's own reward gives (1 - 1/G) times the gradient."""
    phi, alpha, G, B = table_features(), 0.5, 2, 2
    x0 = torch.tensor([2, 0, 1])
    masked = torch.tensor([[True, True, False]])
    logits = (0.7 * torch.randn(L3, N3, dtype=F64)).requires_grad_(True)
    log_probs = logits.log_softmax(-1)                                                   # (L, N)

    joints = torch.tensor(list(itertools.product(range(len(COMPLETIONS)), repeat=G * B)))   # (9^4, G * B)
    every = complete(x0, COMPLETIONS[joints])                                            # (9^4, G * B, L)
    real = phi[seq_id(x0)].expand(len(every), L3, -1)
    group_rewards = [mmd.mmd_reward(real, phi[seq_id(every[:, g * B:(g + 1) * B])], masked.expand(len(every), L3),
                                    alpha) for g in range(G)]                            # the rewards of every draw
    # every joint draw as one row of a batch: its probability (detached) weighs its surrogate. The advantage is linear
    # in the rewards and the batch's normaliser counts all 9^4 rows, so rewards scaled by 9^4 P(draws) give
    # sum over draws of P(draws) x (2) for that draw alone
    n = len(joints)
    weight = (n * log_probs[torch.arange(L3), every][..., S2].sum((-1, -2)).exp()).detach()       # (9^4,)
    rewards = torch.stack([r for r, _ in group_rewards], -1) * weight[:, None]                    # (9^4, G)
    expected_surrogate = mmd.reinforce_loss(log_probs.expand(n, L3, N3), every.transpose(0, 1), rewards,
                                            masked.expand(n, L3), group_rewards[0][1], B)[0]
    reinforce = torch.autograd.grad(expected_surrogate, logits)[0]

    q = logits.softmax(-1)[S2]                                                           # (2, N)
    prob = q[0][COMPLETIONS[:, 0]] * q[1][COMPLETIONS[:, 1]]                             # (9,) one draw
    J = 0
    for a, b in itertools.product(range(len(COMPLETIONS)), repeat=2):                    # E[R] of one group
        draws = complete(x0, COMPLETIONS[[a, b]])[:, None]
        fake = phi[seq_id(draws[:, 0])][None]
        J = J + prob[a] * prob[b] * mmd.mmd_reward(phi[seq_id(x0)][None], fake, masked, alpha)[0][0]
    exact = torch.autograd.grad(-J / (len(S2) * B), logits)[0]
    assert exact.abs().max() > 1e-3 and exact[2].abs().max() == 0       # not trivially zero; the kept position: 0
    assert torch.allclose(reinforce, exact, atol=1e-12, rtol=1e-9)


# ------------------------------------------------------------------------------------------------ its minimum
# The data: a distribution over the 27 sequences; the real x0 ~ its conditional P given the kept position. The
# student's draws: any distribution Q over the 9 completions of the two masked positions.

def expected_negative_reward(P, Q, x0_kept, phi, alpha, exclude):
    """E_{x0 ~ P, y_1, y_2 ~ Q iid}[-R] with R from distill_mmd.mmd_reward, every triple enumerated."""
    x0s, y1s, y2s = (c.flatten() for c in torch.meshgrid(*[torch.arange(9)] * 3, indexing='ij'))
    x0 = complete(x0_kept, COMPLETIONS[x0s])                                              # (729, L)
    fake = torch.stack([phi[seq_id(complete(x0_kept, COMPLETIONS[y]))] for y in (y1s, y2s)], 1)   # (729, 2, L, d)
    masked = torch.tensor([True, True, False]).expand(len(x0), L3)
    reward = mmd.mmd_reward(phi[seq_id(x0)], fake, masked, alpha, exclude)[0]
    return -(P[x0s] * Q[y1s] * Q[y2s] * reward).sum()


def bag_kernel(phi, x0_kept, alpha):
    """K(a, b) = 1/m^2 sum_{p, q in S} k(phi_p(a), phi_q(b)) between the 9 completions: the kernel between the mean
    token features of two sequences (their bags). -> (9, 9)"""
    f = phi[seq_id(complete(x0_kept, COMPLETIONS))][:, S2]                               # (9, m, d)
    d2 = ((f[:, None, :, None] - f[None, :, None, :]) ** 2).sum(-1)                        # (9, 9, m, m)
    return torch.exp(-alpha * d2).mean((-1, -2))


def test_expected_mmd_is_smallest_at_the_data_conditional():
    """Without the same-position exclusion, E[-R] plus the real-real term E_{x0, x0' ~ P} K(x0, x0') is exactly the
    squared MMD (P - Q)^T K (P - Q) between the mean bag embeddings: zero at Q = P and larger at every perturbed Q."""
    phi, alpha, x0_kept = table_features(1), 0.5, torch.tensor([0, 0, 1])
    torch.manual_seed(2)
    P = torch.distributions.Dirichlet(torch.ones(9, dtype=F64)).sample()
    K = bag_kernel(phi, x0_kept, alpha)
    mmd2 = lambda Q: expected_negative_reward(P, Q, x0_kept, phi, alpha, False) + P @ K @ P
    assert abs(mmd2(P)) < 1e-12
    for _ in range(20):
        Q = P * torch.exp(0.5 * torch.randn(9, dtype=F64))
        Q = Q / Q.sum()
        assert abs(mmd2(Q) - (P - Q) @ K @ (P - Q)) < 1e-12
        assert mmd2(Q) > 1e-6


def test_the_public_estimator_prefers_a_sharper_student():
    """With the public code's same-position exclusion the expectation is not an MMD: the within-draw term drops each
    position's self-similarity, and at small m a student that always draws one completion beats the data's
    conditional. Without the exclusion every such point mass is worse than the data's conditional."""
    phi, alpha, x0_kept = table_features(1), 0.5, torch.tensor([0, 0, 1])
    torch.manual_seed(2)
    P = torch.distributions.Dirichlet(torch.ones(9, dtype=F64)).sample()
    for exclude in (True, False):
        at_data = expected_negative_reward(P, P, x0_kept, phi, alpha, exclude)
        point = min(expected_negative_reward(P, torch.eye(9, dtype=F64)[j], x0_kept, phi, alpha, exclude)
                    for j in range(9))
        assert (point < at_data - 1e-3) == exclude, exclude


# ------------------------------------------------------------------------------------------------ the features

def test_features_are_the_networks_hidden_states_after_the_block():
    """token_features equals the output of block k inside DiT.forward at sigma = 0 (caught by a hook)."""
    torch.manual_seed(0)
    net = build_model('tiny', vocab_size=N3 + 1, seq_len=5, mask_id=N3, head='subs', n_layer=3).eval()
    with torch.no_grad():          # a fresh DiT's blocks are the identity (adaLN-zero): give them something to do
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    x = torch.randint(N3, (4, 5))
    for block in range(3):
        seen = []
        hook = net.blocks[block].register_forward_hook(lambda mod, inp, out: seen.append(out))
        net(x, torch.zeros(4))
        hook.remove()
        assert torch.equal(mmd.token_features(net, x, block), seen[0])
    alpha = mmd.median_alpha(net, x, 1)
    phi = mmd.token_features(net, x, 1).reshape(-1, net.config.n_embd)
    d2 = torch.cdist(phi.double(), phi.double()).square()[torch.triu_indices(20, 20, 1).unbind()]
    assert abs((d2 * alpha < 1).double().mean().item() - 0.5) < 0.03          # the median pair sits at k = 1/e


# ------------------------------------------------------------------------------------------------ whole runs

# The tiny teacher fixture is conftest.py's.


def args(root, data, out_dir, **kw):
    opts = dict(teacher_ckpt=root / 'mdlm', data=data, out_dir=out_dir, batch_size=4, grad_accum=2, max_iters=4,
                feature_block=1, lr=1e-3, eval_samples=0, ckpt_interval=2, log_every=1)
    opts.update(kw)
    return [f'--{k}={v}' for k, v in opts.items()]


@pytest.fixture(scope='module')
def reference_run(teacher):
    """Four uninterrupted iterations in one process."""
    root, data = teacher
    mmd.main(args(root, data, root / 'ref'))
    return load(root / 'ref')


def test_two_processes_match_one(teacher, reference_run):
    root, data = teacher
    r = run_script(['distill_mmd.py', *args(root, data, root / 'two')], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    two = load(root / 'two')
    assert two['config']['kernel_alpha'] == reference_run['config']['kernel_alpha']
    for key in ('model', 'ema'):
        assert all(torch.allclose(v, two[key][k], atol=1e-6) for k, v in reference_run[key].items()), key
    start = load(root / 'mdlm')['ema']
    assert not all(torch.equal(v, start[k]) for k, v in reference_run['model'].items())   # the student did move


def test_interrupted_run_resumes_bit_exactly(teacher, reference_run):
    root, data = teacher
    mmd.main(args(root, data, root / 'cut', max_iters=2))
    mmd.main(args(root, data, root / 'cut', resume='true'))
    resumed = load(root / 'cut')
    assert resumed['iter'] == 4 and [r['iter'] for r in resumed['history']['train']] == [1, 2, 3, 4]
    for key in ('model', 'ema'):
        assert all(torch.equal(v, resumed[key][k]) for k, v in reference_run[key].items()), key
    ref, res = reference_run['optimizer']['state'], resumed['optimizer']['state']
    assert all(torch.equal(ref[i][name], res[i][name]) for i in ref for name in ref[i])


def test_resume_with_the_public_dropout_is_bit_exact(teacher, tmp_path, monkeypatch):
    """--student_dropout true draws masks from the global RNG, which the checkpoint restores; the test can fail: the
    same resume without restoring it ends elsewhere."""
    root, data = teacher
    train.main([f'--data={data}', f'--out_dir={tmp_path / "teacher"}', '--teacher=mdlm', '--model=tiny',
                '--dropout=0.3', '--max_iters=4', '--batch_size=8', '--eval_batches=1', '--warmup_iters=1'])
    run = lambda out, **kw: mmd.main(args(root, data, tmp_path / out, teacher_ckpt=tmp_path / 'teacher',
                                          student_dropout='true', **kw))
    run('whole')
    run('cut', max_iters=2)
    run('cut', resume='true')
    whole, resumed = load(tmp_path / 'whole'), load(tmp_path / 'cut')
    assert resumed['model_config']['dropout'] == 0.3
    assert all(torch.equal(v, resumed['model'][k]) for k, v in whole['model'].items())
    monkeypatch.setattr(mmd.common, 'set_rng_state', lambda state, rank=0: None)
    run('blind', max_iters=2)
    run('blind', resume='true')
    blind = load(tmp_path / 'blind')['model']
    assert not all(torch.equal(v, blind[k]) for k, v in whole['model'].items())


def test_a_bad_option_is_one_line(teacher):
    root, data = teacher
    r = subprocess.run([sys.executable, 'distill_mmd.py', *args(root, data, root / 'bad', alpha='wide')], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith('error:') and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "'median'" in r.stderr
    with pytest.raises(UserError, match='0 to 1'):           # the tiny teacher has 2 blocks
        mmd.main(args(root, data, root / 'bad', feature_block=2))
    with pytest.raises(UserError, match='draws_per_candidate'):
        mmd.main(args(root, data, root / 'bad', draws_per_candidate=1))
