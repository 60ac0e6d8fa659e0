"""DiDi-Instruct (distill_didi.py) and RGAS (sample.py): the reward's sign, grouped normalisation (eq. 7), the
decomposed log-probability (eq. 9) against the path probability by enumeration, RGAS reducing to ancestral sampling,
the discriminator head's spectral norm, whole runs (torchrun, exact resume, the teacher bank), students that sample
like teachers, and one-line errors."""
import copy
import itertools
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
import distill_didi as didi
import eval as evaluation
import sample
import train
from common import UserError
from model import Discriminator, build_model
from processes import Absorbing, alpha_loglinear
from test_idlm import ENV, ROOT, gen, load
from test_train import run_script

F64 = torch.float64
CFG = {**didi.DEFAULTS, 'group_size': 4, 'tau_dist': 'uniform'}


def tiny_mdlm(N, L, perturb=0.0, seed=0):
    """A tiny SUBS DiT over N tokens; perturbed so that its output depends on its input (a fresh one is constant)."""
    torch.manual_seed(seed)
    net = build_model('tiny', vocab_size=N + 1, seq_len=L, mask_id=N, head='subs')
    with torch.no_grad():
        for p in net.parameters():
            p.add_(perturb * torch.randn(p.shape))
    return net


# ------------------------------------------------------------------------------------------------ the reward's sign

class IdealDiscriminator(torch.nn.Module):
    """The optimal discriminator for a student and a teacher that draw every token independently from p_s and p_t:
    at every position, logit = log q_t(z) / q_s(z) = sum over the unmasked positions of log p_t(z_l) / p_s(z_l)
    (masking is the same coin for both, so it cancels). Label 1 = teacher, as model.Discriminator."""

    def __init__(self, p_student, p_teacher, mask_id):
        super().__init__()
        self.log_ratio = torch.cat([(p_teacher / p_student).log(), torch.zeros(1)])   # the mask contributes 0
        self.mask_id = mask_id

    def forward(self, z, sigma=None):
        return self.log_ratio[z].sum(-1, keepdim=True).expand(z.shape).clone()


def test_policy_step_lowers_the_token_the_student_overproduces():
    """The student draws token 0 far more often than the (uniform) teacher; with the ideal discriminator, one
    policy-gradient step of eq. 5 (grouped advantages, eq. 7) lowers p_student(0): the reward's sign pushes the
    student away from what the discriminator calls "student"."""
    N, L, B = 4, 6, 256
    student = tiny_mdlm(N, L)
    with torch.no_grad():
        student.output_layer.linear.bias[0] = 2.0          # a fresh DiT outputs its bias everywhere: p_s(0) = 0.71
    p_student = lambda: student(torch.full((1, L), N), torch.zeros(1))[0, 0, :N].exp()
    before = p_student().detach()
    disc = IdealDiscriminator(before, torch.full((N,), 1 / N), N)
    cfg = {**CFG, 'kl_weight': 0.0, 'entropy_weight': 0.0}
    roll = didi.make_rollout(student, torch.randint(N, (B, L), generator=gen(0)), gen(1), cfg, N)
    roll.r = didi.rewards(disc, roll.z, didi.sigma_of(roll.t), N)
    loss, *_, reward, _ = didi.student_loss(student, copy.deepcopy(student), roll, cfg, N)
    assert reward < 0                                         # the student's samples look like the student's
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            p -= 0.5 * p.grad if p.grad is not None else 0
    after = p_student().detach()
    assert after[0] < before[0] - 0.01 and (after[1:] > before[1:]).all()


# ------------------------------------------------------------------------------------------------ eq. 7

def test_grouped_normalisation():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, -20.0, 0.0, 0.0, 20.0])
    got = didi.group_advantages(r, 4)
    for g in range(2):
        x = r[4 * g:4 * g + 4]
        mu, sd = x.mean(), ((x - x.mean()) ** 2).mean().sqrt()                        # population std, eq. 7
        assert torch.allclose(got[4 * g:4 * g + 4], (x - mu) / (sd + 1e-6))
        assert abs(got[4 * g:4 * g + 4].mean()) < 1e-6 and abs((got[4 * g:4 * g + 4] ** 2).mean() - 1) < 1e-4
    clipped = didi.group_advantages(r, 4, reward_clip=8.0, adv_clip=1.5)
    x = r[4:].clamp(-8, 8)                                                            # the reward clip comes first
    assert torch.allclose(clipped[4:], ((x - x.mean()) / (x.std(unbiased=False) + 1e-6)).clamp(-1.5, 1.5))
    assert clipped.abs().max() <= 1.5
    assert torch.equal(didi.group_advantages(torch.full((4,), 3.0), 4), torch.zeros(4))   # no spread, no signal
    assert torch.allclose(didi.group_advantages(r, 8), (r - r.mean()) / (r.std(unbiased=False) + 1e-6))


# ------------------------------------------------------------------------------------------------ eq. 9

def test_decomposed_log_prob_is_the_path_probability_by_enumeration():
    """N = 2 tokens, L = 3: every (z_tau, x) path of the two-step student is enumerated. The probability of a path
    is the product of the per-position posteriors (processes.Absorbing.posterior with x0_hat in place of x0, DiDi
    eq. 2); path_log_prob (through step_inputs, the training code's batched forward) must equal its log up to the
    schedule's coins, which do not depend on the student. The paths sum to one, and so does the one-step version."""
    N, L, mask = 2, 3, 2
    student = tiny_mdlm(N, L, perturb=0.3).eval()
    process = Absorbing(N)
    a1, a_tau = alpha_loglinear(torch.tensor(1.0, dtype=F64)), alpha_loglinear(torch.tensor(0.4, dtype=F64))
    z1 = torch.full((1, L), mask)
    with torch.no_grad():
        step1 = process.posterior(z1, student(z1).double().exp(), a_tau, a1)[0]        # (L, V) P(z_tau | z_1)
    total, total_one_step = 0.0, 0.0
    for z_tau in itertools.product(range(N + 1), repeat=L):
        z_tau = torch.tensor([z_tau])
        with torch.no_grad():
            step2 = process.posterior(z_tau, student(z_tau).double().exp(), 1.0, a_tau)[0]   # P(x | z_tau)
        for x in itertools.product(range(N), repeat=L):
            x = torch.tensor([x])
            path = step1[range(L), z_tau[0]].prod() * step2[range(L), x[0]].prod()
            total += path
            if path == 0:
                continue                                                               # x contradicts z_tau
            roll = didi.Rollout(tau=torch.tensor([0.4], dtype=F64), z_tau=z_tau, x=x, t=None, z=None, z_real=None)
            inputs, sigma = didi.step_inputs(roll, mask)
            with torch.no_grad():
                out = student(inputs, sigma)
            got = didi.path_log_prob(out[:1], out[1:], z_tau, x, mask)
            unmasked = (z_tau != mask).double()
            coins = (unmasked * torch.log((a_tau - a1) / (1 - a1)) + (1 - unmasked) * torch.log((1 - a_tau) / (1 - a1)))
            assert abs(got.item() + coins.sum().item() - path.log().item()) < 1e-4   # float32 network
    for x in itertools.product(range(N), repeat=L):                                   # without decompose: z_1 -> x
        x = torch.tensor([x])
        with torch.no_grad():
            logp = didi.path_log_prob(student(z1), None, None, x, mask)
        total_one_step += logp.double().exp().item()
    assert abs(total - 1) < 1e-6 and abs(total_one_step - 1) < 1e-5


# ------------------------------------------------------------------------------------------------ RGAS

class TokenZeroLover(torch.nn.Module):
    """A discriminator that finds a sequence more teacher-like the more 0s it holds (differentiable in the soft
    input): every position's logit is 2 * (number of 0s)."""

    def __init__(self, N):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=N + 1, mask_id=N)

    def forward(self, x, sigma=None):
        x = x if x.is_floating_point() else torch.nn.functional.one_hot(x, self.config.vocab_size).float()
        return 2 * x[..., 0].sum(-1, keepdim=True).expand(x.shape[:2])


def test_rgas_without_tilt_or_candidates_is_ancestral_sampling():
    """h = 0 and M = 1: the same draws as sample.generate, sample for sample (no cache there, as in RGAS); with the
    tilt and the re-ranking, a discriminator that likes token 0 gets more of it."""
    N, L = 6, 8
    net = tiny_mdlm(N, L, perturb=0.3).eval()
    disc = Discriminator.from_backbone(net).eval().requires_grad_(False)
    for fused in (True, False):
        plain, nfe = sample.generate(net, 'mdlm', 40, L, 6, N, gen(3), batch_size=16, fused=fused,
                                     time_conditioned=True, progress=False)
        again, rgas_nfe = sample.generate_rgas(net, disc, 40, L, 6, N, gen(3), batch_size=16, h_max=0.0,
                                               candidates=1, fused=fused, progress=False)
        assert torch.equal(again, plain) and rgas_nfe == nfe == 6
    assert sample.rgas_plan(8, 0.5, 30.0, 4) == [(0.0, 1), (10.0, 1), (20.0, 1), (30.0, 1)] + [(0.0, 4)] * 4
    lover, net = TokenZeroLover(N), tiny_mdlm(N, L, perturb=0.05).eval()   # a student that proposes every token
    guided, _ = sample.generate_rgas(net, lover, 200, L, 6, N, gen(4), batch_size=50, progress=False)
    tilted, _ = sample.generate_rgas(net, lover, 200, L, 6, N, gen(4), batch_size=50, candidates=1, progress=False)
    reranked, _ = sample.generate_rgas(net, lover, 200, L, 6, N, gen(4), batch_size=50, tilt_fraction=0.0,
                                       progress=False)
    base, _ = sample.generate(net, 'mdlm', 200, L, 6, N, gen(4), batch_size=50, progress=False)
    share = lambda x: (x == 0).double().mean().item()
    assert guided.shape == (200, L) and 0 <= guided.min() and guided.max() < N
    assert min(share(tilted), share(reranked)) > share(base) + 0.05 and share(guided) > share(base) + 0.1


# ------------------------------------------------------------------------------------------------ the discriminator

def test_discriminator_head_is_spectrally_normalised():
    """Both linear layers of the head have spectral norm 1 (power iteration, one step per update, on top of the
    initial ones) while the head trains; a forward in train mode does not move the power iteration's vectors."""
    teacher = tiny_mdlm(8, 8, perturb=0.1)
    disc = didi.make_discriminator(teacher, 1)
    assert not any(p.requires_grad for p in disc.blocks[0].parameters())
    assert all(p.requires_grad for p in [*disc.blocks[1].parameters(), *disc.output_layer.parameters()])
    assert not disc.vocab_embed.embedding.requires_grad
    opt = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], 1e-2)
    z = torch.randint(9, (16, 8), generator=gen(0))
    for _ in range(40):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(disc(z), (z[:, :1] < 4).float().expand(16, 8))
        loss.backward()
        opt.step()
        opt.zero_grad()
        disc.power_iteration()
    u = disc.output_layer.fc1.parametrizations.weight[0]._u.clone()
    disc.train()(z)
    assert torch.equal(u, disc.output_layer.fc1.parametrizations.weight[0]._u)
    for layer in (disc.output_layer.fc1, disc.output_layer.fc2):
        assert abs(torch.linalg.matrix_norm(layer.weight.detach(), 2).item() - 1) < 0.02
    assert disc(z).shape == (16, 8)


# ------------------------------------------------------------------------------------------------ whole runs

# The tiny teacher fixture is conftest.py's.


def args(root, data, out_dir, **kw):
    opts = dict(teacher_ckpt=root / 'mdlm', data=data, out_dir=out_dir, batch_size=8, grad_accum=2, max_iters=4,
                lr=1e-3, disc_lr=1e-3, eval_samples=0, ckpt_interval=2, log_every=1, real='bank', bank_size=12,
                bank_steps=4)
    opts.update(kw)
    return [f'--{k}={v}' for k, v in opts.items()]


@pytest.fixture(scope='module')
def reference_run(teacher):
    """Four uninterrupted iterations in one process, teacher samples from a bank."""
    root, data = teacher
    didi.main(args(root, data, root / 'ref'))
    return load(root / 'ref')


def test_two_processes_match_one(teacher, reference_run):
    root, data = teacher
    r = run_script(['distill_didi.py', *args(root, data, root / 'two')], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    two = load(root / 'two')
    for key in ('model', 'discriminator'):
        assert all(torch.allclose(v.float(), two[key][k].float(), atol=1e-6)
                   for k, v in reference_run[key].items()), key
    start = load(root / 'mdlm')['ema']
    assert not torch.equal(reference_run['model']['vocab_embed.embedding'], start['vocab_embed.embedding'])
    disc = reference_run['discriminator']
    assert not torch.equal(disc['blocks.1.attn_qkv.weight'], start['blocks.1.attn_qkv.weight'])
    assert torch.equal(disc['vocab_embed.embedding'], start['vocab_embed.embedding'])           # frozen



def test_the_student_rolls_out_and_is_scored_without_dropout(teacher, tmp_path, monkeypatch):
    """With a teacher that brings dropout, eq. 5 must weigh each rollout by the log-probability of the policy that drew
    it: the student runs in eval mode in both (the sampler it becomes has no dropout), while the discriminator still
    trains in train mode."""
    root, data = teacher
    train.main([f'--data={data}', f'--out_dir={tmp_path / "drop"}', '--teacher=mdlm', '--model=tiny', '--dropout=0.3',
                '--max_iters=2', '--batch_size=8', '--eval_batches=1', '--warmup_iters=1'])
    seen, real = [], didi.iteration

    def spy(state, *a, **kw):
        seen.append((state['student'].training, common.unwrap(state['disc']).training))
        return real(state, *a, **kw)
    monkeypatch.setattr(didi, 'iteration', spy)
    didi.main(args(root, data, tmp_path / 'run', teacher_ckpt=tmp_path / 'drop', max_iters=2))
    assert seen == [(False, True)] * 2
    assert load(tmp_path / 'run')['model_config']['dropout'] == 0.3

def test_interrupted_run_resumes_bit_exactly(teacher, reference_run):
    root, data = teacher
    didi.main(args(root, data, root / 'cut', max_iters=2))
    didi.main(args(root, data, root / 'cut', resume='true'))
    resumed = load(root / 'cut')
    assert resumed['iter'] == 4 and resumed['bank'] == str(root / 'cut' / 'bank_4steps_12.npy')
    for key in ('model', 'discriminator', 'ema'):
        assert all(torch.equal(v, resumed[key][k]) for k, v in reference_run[key].items()), key
    for key in ('optimizer', 'disc_optimizer'):
        ref, res = reference_run[key]['state'], resumed[key]['state']
        assert all(torch.equal(ref[i][name], res[i][name]) for i in ref for name in ref[i]), key


def test_every_ablation_runs_and_the_student_samples_like_a_teacher(teacher, tmp_path):
    """The Table 2 switches all at once (one step, independent times, omega = 1, uniform pi, no regularisers) and
    --real data; then the student goes through sample.py like any teacher, guided by its own discriminator or,
    with --disc, guiding another model; the run ends with the results table; eval.py --disc adds RGAS rows."""
    root, data = teacher
    out = tmp_path / 'ablated'
    didi.main(args(root, data, out, real='data', decompose='false', coupled_time='false', omega='false',
                   tau_dist='uniform', kl_weight=0, entropy_weight=0, max_iters=2, eval_samples=4, eval_steps='2',
                   rgas='true', rgas_candidates=2))
    ckpt = load(out)
    assert (ckpt['kind'], ckpt['method'], ckpt['teacher'], ckpt['bank']) == ('student', 'didi', 'mdlm', '')
    table = open(out / 'results.md').read()
    assert 'teacher mdlm' in table and 'DiDi student @2 (EMA, RGAS)' in table and 'true GenPPL' in table
    net, kind, N, L, meta, schedule = sample.load_sampler(str(out), 'cpu')
    assert (kind, N, L) == ('mdlm', 8, 8)
    for ckpt_path, disc in ((out, ''), (root / 'mdlm', out / 'ckpt.pt')):
        path = tmp_path / f'rgas-{len(str(disc))}.npy'
        sample.main([f'--ckpt={ckpt_path}', f'--disc={disc}', '--rgas=true', '--steps=4', '--num_samples=6',
                     f'--out={path}', '--progress=false'])
        x = torch.from_numpy(np.load(path))
        assert x.shape == (6, 8) and 0 <= x.min() and x.max() < 8
    with pytest.raises(UserError, match='holds no discriminator'):
        sample.main([f'--ckpt={root / "mdlm"}', '--rgas=true', '--steps=2', '--num_samples=2'])
    # eval.py --disc: an RGAS row beside every plain row of each MDLM checkpoint, none for the exact floor
    evaluation.main([f'--ckpt={root / "mdlm"},{out}', f'--disc={out}', f'--data={data}', '--steps=2,4',
                     '--num_samples=4', '--nelbo_batches=0', f'--out={tmp_path / "eval"}', '--rgas_candidates=2'])
    rows = json.load(open(tmp_path / 'eval' / 'results.json'))['rows']
    assert [(r['model'], r['steps']) for r in rows[1:]] == [
        (name, K) for name in ('mdlm', 'mdlm + RGAS', 'ablated', 'ablated + RGAS', 'exact mdlm denoiser')
        for K in (2, 4)]


def test_the_exact_teacher_and_the_papers_settings_run(teacher, tmp_path):
    """--teacher_ckpt exact with --init, and the paper's settings that are not our defaults (groups that mix times,
    label smoothing, the regularisers, the whole trunk training, pi = Beta(5, 2)), RGAS by softmax of the sum: the run
    finishes, logs every LOGGED number and keeps its config."""
    root, data = teacher
    out = tmp_path / 'paper'
    didi.main(args(root, data, out, teacher_ckpt='exact', init=root / 'mdlm', group_share='none', label_smoothing=0.1,
                   kl_weight=0.05, entropy_weight=5e-4, disc_trainable_blocks=99, tau_dist='beta', tau_a=5, tau_b=2,
                   max_iters=2, eval_samples=4, eval_steps='2', eval_streams=1, rgas='true', rgas_candidates=2,
                   rgas_select='softmax', rgas_reward='sum'))
    rows = json.load(open(out / 'history.json'))['train']
    assert [row['iter'] for row in rows] == [1, 2] and all(set(didi.LOGGED) <= set(row) for row in rows)
    assert 'DiDi student @2 (EMA, RGAS)' in open(out / 'results.md').read()
    assert torch.load(out / 'ckpt.pt', weights_only=True)['config']['group_share'] == 'none'


# ------------------------------------------------------------------------------------------------ bad input

def test_wrong_teacher_kind_is_one_line(teacher, tmp_path):
    root, data = teacher
    ckpt = load(root / 'mdlm')
    ckpt['teacher'] = 'sedd'
    common.save_checkpoint(str(tmp_path / 'sedd' / 'ckpt.pt'), ckpt)
    r = subprocess.run([sys.executable, 'distill_didi.py', *args(root, data, tmp_path / 'out'),
                        f'--teacher_ckpt={tmp_path / "sedd"}'], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith('error:') and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "'sedd' teacher" in r.stderr and 'an mdlm checkpoint' in r.stderr


@pytest.mark.parametrize('bad, message', [({'group_size': 3}, 'divide --batch_size'), ({'group_size': 1}, 'at least 2'),
                                          ({'real': 'teacher'}, '--real is data or bank'),
                                          ({'group_share': 'state'}, '--group_share is none or tau'),
                                          ({'teacher': 'duo'}, 'distills MDLM teachers')])
def test_bad_options_are_refused(teacher, tmp_path, bad, message):
    root, data = teacher
    with pytest.raises(UserError, match=message):
        didi.main(args(root, data, tmp_path / 'out', **bad))


def test_a_runs_teacher_rows_are_the_rows_eval_py_prints(teacher, tmp_path):
    """The final table draws with --eval_batch_size (eval.py's default), not the training batch: the teacher's rows
    of a run at batch 8 equal eval.py's for the same checkpoint, seed and streams (the draws depend on the batch),
    and so do its tempered rows (--eval_temperatures against eval.py's --temperature)."""
    root, data = teacher
    out = tmp_path / 'run'
    didi.main(args(root, data, out, max_iters=1, real='data', eval_samples=20, eval_steps='2', teacher_steps='4',
                   eval_streams=2, eval_temperatures='0.7'))
    evaluation.main([f'--teacher={root / "mdlm"}', f'--data={data}', '--steps=2', '--teacher_steps=4', '--num_samples=20',
                     '--streams=2', '--floor=false', '--nelbo_batches=0', '--temperature=1,0.7',
                     f'--out={tmp_path / "eval"}'])

    def cells(path, name):          # {steps: (GenPPL cell, entropy cell)} of the rows named name
        rows = [[c.strip() for c in line.strip().strip('|').split('|')] for line in open(path)]
        return {r[1]: (r[3], r[4]) for r in rows if r[0] == name}
    run, ref = cells(out / 'results.md', 'teacher mdlm'), cells(tmp_path / 'eval' / 'table.md', 'mdlm')
    assert set(run) == {'2', '4'} and run == ref
    run, ref = cells(out / 'results.md', 'teacher mdlm T=0.7'), cells(tmp_path / 'eval' / 'table.md', 'mdlm T=0.7')
    assert set(run) == {'2'} and run == ref and run['2'] != cells(out / 'results.md', 'teacher mdlm')['2']
