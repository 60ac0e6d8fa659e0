"""IDLM (distill_idlm.py): Theorem 3.1 by enumeration, where the gradient flows, the alternating loop, torchrun,
exact resume, one-line errors, and students that sample like their teachers."""
import copy
import dataclasses
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import types

import pytest
import torch

import common
import official
import data as data_module
import distill_idlm as idlm
import eval as evaluation
import sample
import train
from common import UserError
from data import prepare_synthetic
from losses import DuoObjective, MDLMObjective, Noisy, mdlm_loss
from model import build_model
from test_train import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
F64 = torch.float64
DUO_GAMMAS = (-3.0, 10.0)  # not the defaults for N = 8, so a student that forgot them would differ


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ Theorem 3.1
# N = 3 tokens, L = 2 positions: all 9 sequences and all noisy states are enumerated, in float64.

N3, L2, MASK = 3, 2, 3
SEQS = torch.tensor(list(itertools.product(range(N3), repeat=L2)))                          # (9, 2)
PATTERNS = [list(S) for k in range(1, L2 + 1) for S in itertools.combinations(range(L2), k)]


class ExactDenoiser(torch.nn.Module):
    """The optimal MDLM denoiser of a distribution p over the 9 sequences: posterior marginals p(x0_i | x_t) at
    masked positions (by enumeration), SUBS carry-over elsewhere. -> log x0_hat (B, L, N + 1)"""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x_t, sigma=None):
        consistent = ((x_t[:, None] == SEQS[None]) | (x_t[:, None] == MASK)).all(-1)        # (B, 9)
        w = self.p[None] * consistent / (self.p[None] * consistent).sum(-1, keepdim=True)   # p(x0 | x_t)
        post = torch.einsum('bs,sln->bln', w, torch.nn.functional.one_hot(SEQS, N3 + 1).to(F64))  # marginals
        carry = torch.nn.functional.one_hot(x_t, N3 + 1).to(F64)
        return torch.log(torch.where((x_t == MASK)[..., None], post, carry))


def nelbo(f, x0):
    """MDLM NELBO (IDLM eq. 4) of each sequence x0 (B, L) exactly, with the mask-count identity of
    losses.MDLMObjective.corrupt_by_count: sum over mask sets S of CE_S / (k C(L, k)), k = |S|. mdlm_loss with
    alpha = 1 - k/L, alpha' = -1 weighs CE by L/k, hence the remaining 1 / (L C(L, k))."""
    total = torch.zeros(len(x0), dtype=F64)
    for S in PATTERNS:
        k = len(S)
        x_t = x0.clone()
        x_t[:, S] = MASK
        alpha = torch.full((len(x0), 1), 1 - k / L2, dtype=F64)
        total += mdlm_loss(f(x_t), x0, x_t, alpha, -torch.ones_like(alpha), MASK).sum(-1) / (L2 * math.comb(L2, k))
    return total


def idlm_loss_by_code(p_theta, teacher, fake):
    """IDLM eq. 8 as distill_idlm.token_gaps computes it (teacher minus fake on ONE noisy sample), summed exactly
    over x0 ~ p_theta and every mask set instead of sampled: the per-token mean times L is the sequence sum."""
    total = torch.zeros((), dtype=F64)
    for S in PATTERNS:
        k = len(S)
        x_t = SEQS.clone()
        x_t[:, S] = MASK
        alpha = torch.full((len(SEQS), 1), 1 - k / L2, dtype=F64)
        for j in range(len(SEQS)):
            noisy = Noisy(input=x_t[j:j + 1], sigma=torch.zeros(1), x_t=x_t[j:j + 1], alpha=alpha[j:j + 1],
                          dalpha=-torch.ones_like(alpha[j:j + 1]))
            gap = idlm.token_gaps(teacher, fake, MDLMObjective(N3), SEQS[j:j + 1], noisy)[0].mean()
            total += p_theta[j] * gap * L2 / (L2 * math.comb(L2, k))
    return total


def test_theorem_3_1_by_enumeration():
    """L(theta) = E_{p_theta}[L_mdlm(f*, x0)] - min_f E_{p_theta}[L_mdlm(f, x0)] >= KL(p_theta || p*) >= 0, and
    L = 0 at p_theta = p*. With exact denoisers the inequality is even an equality: the NELBO of the exact
    denoiser of p is -log p(x) for every x (the bound is tight), so L = E_{p_theta}[-log p*] - H(p_theta) = KL;
    the conditional path term of IDLM eq. 35 vanishes since both path measures share the forward process."""
    dirichlet = torch.distributions.Dirichlet(torch.ones(9, dtype=F64))
    torch.manual_seed(0)
    p_star = dirichlet.sample()
    teacher = ExactDenoiser(p_star)
    assert torch.allclose(nelbo(teacher, SEQS), -p_star.log(), atol=1e-12)   # tight bound
    for _ in range(4):
        p_theta = dirichlet.sample()
        fake = ExactDenoiser(p_theta)                                         # the inner min: its exact denoiser
        loss = (p_theta * (nelbo(teacher, SEQS) - nelbo(fake, SEQS))).sum()
        kl = (p_theta * (p_theta / p_star).log()).sum()
        assert kl > 0.01 and loss > 0.01                                      # strictly positive off p*
        assert loss >= kl - 1e-12 and abs(loss - kl) < 1e-10
        assert abs(idlm_loss_by_code(p_theta, teacher, fake) - loss) < 1e-12
        for lam in (0.1, 0.5):  # any other fake scores p_theta's samples worse: the min is attained at f_theta
            other = ExactDenoiser((1 - lam) * p_theta + lam * p_star)
            assert (p_theta * nelbo(other, SEQS)).sum() > (p_theta * nelbo(fake, SEQS)).sum() + 1e-6
    at_optimum = (p_star * (nelbo(teacher, SEQS) - nelbo(ExactDenoiser(p_star.clone()), SEQS))).sum()
    assert abs(at_optimum) < 1e-9


# ------------------------------------------------------------------------------------------------ tiny teachers

@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
    """Tiny MDLM, Duo and SEDD teachers (20 iterations) on an N = 8, L = 8 synthetic language."""
    root = tmp_path_factory.mktemp('idlm')
    data = str(root / 'syn')
    prepare_synthetic(data, num_train=256, num_val=32, N=8, L=8, K=2)
    for kind in ('mdlm', 'duo', 'sedd'):
        train.main([f'--data={data}', f'--out_dir={root / kind}', f'--teacher={kind}', '--model=tiny',
                    '--max_iters=20', '--batch_size=16', '--eval_batches=1', '--eval_interval=20', '--warmup_iters=2',
                    f'--duo_gamma_min={DUO_GAMMAS[0]}', f'--duo_gamma_max={DUO_GAMMAS[1]}'])
    return root, data


def three_networks(path, perturb=0.0):
    """(teacher, student, fake, objective) as distill_idlm builds them; the fake optionally perturbed, so that
    teacher and fake disagree and the student's gradient is not zero."""
    teacher, ckpt = official.load_model(path)
    teacher.eval().requires_grad_(False)
    student, fake = (copy.deepcopy(teacher).train().requires_grad_(True) for _ in range(2))
    with torch.no_grad():
        fake.output_layer.linear.weight.add_(perturb * torch.randn(fake.output_layer.linear.weight.shape,
                                                                   generator=gen(1)))
    return teacher, student, fake, train.teacher_objective({**train.DEFAULTS, **ckpt['config']}, 8)


def real_batch(data, n=16):
    return data_module.load_data(data).batch('train', torch.arange(n))


# ------------------------------------------------------------------------------------------------ the student

@pytest.mark.parametrize('kind', ['mdlm', 'duo', 'sedd'])
def test_student_outputs_x0_probabilities(teachers, kind):
    """G_theta(x_t~, t~) (App. C.2) on the forward process of real data: probabilities over the 8 real tokens,
    one-hot carry-over where x_t~ is not masked (absorbing), and for SEDD proportional to exp(score) elsewhere."""
    root, data = teachers
    _, student, _, objective = three_networks(root / kind)
    noisy = idlm.student_input(objective, real_batch(data), gen(0))
    x0 = idlm.student_x0(student, objective, noisy)
    assert x0.shape == (16, 8, 8) and (x0 >= 0).all() and torch.allclose(x0.sum(-1), torch.ones(16, 8))
    if kind == 'duo':
        return
    kept = noisy.x_t != 8
    assert 0 < kept.sum() < kept.numel()
    assert torch.equal(x0[kept], torch.nn.functional.one_hot(noisy.x_t[kept], 8).float())
    if kind == 'sedd':
        scores = student(noisy.input, noisy.sigma)[~kept][:, :8].exp()           # (M, 8) s_y at masked positions
        assert torch.allclose(x0[~kept], scores / scores.sum(-1, keepdim=True), atol=1e-6)


# ------------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize('kind', ['mdlm', 'duo', 'sedd'])
def test_student_step_gives_gradient_to_the_student_only(teachers, kind):
    root, data = teachers
    teacher, student, fake, objective = three_networks(root / kind, perturb=0.5)
    loss, teacher_loss, fake_loss, *_ = idlm.student_loss(student, teacher, fake, objective, real_batch(data), gen(0))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in fake.parameters()) and all(p.requires_grad for p in fake.parameters())
    assert sum(p.grad.abs().sum() for p in student.parameters() if p.grad is not None) > 0
    assert torch.allclose(loss, teacher_loss - fake_loss)


@pytest.mark.parametrize('kind', ['mdlm', 'sedd'])
def test_absorbing_gradient_flows_through_the_target_only(teachers, kind):
    """x_t ~ q(. | sg(x0)) (IDLM App. C.1): d loss / d x0 is exactly the derivative of the soft-target term,
    MDLM: lambda_t (log fake - log teacher); SEDD: dsigma r (l_fake - l_teacher) (the K terms cancel); both at
    masked positions only, divided by B L for the per-token mean."""
    root, data = teachers
    teacher, _, fake, objective = three_networks(root / kind, perturb=0.5)
    B, L, N = 16, 8, 8
    x0 = torch.softmax(2 * torch.randn(B, L, N, generator=gen(2)), -1).requires_grad_()
    noisy = objective.corrupt(x0, torch.linspace(0.05, 1, B), gen(3))
    grad, = torch.autograd.grad(idlm.token_gaps(teacher, fake, objective, x0, noisy)[0].mean(), x0)
    with torch.no_grad():
        diff = (fake(noisy.input, noisy.sigma) - teacher(noisy.input, noisy.sigma))[..., :N]
    if kind == 'mdlm':
        weight = -noisy.dalpha / (1 - noisy.alpha)
    else:
        weight = noisy.dsigma_bar / torch.expm1(noisy.sigma_bar)
    masked = (noisy.x_t == N)[..., None]
    expected = torch.where(masked, weight[..., None] * diff, torch.zeros_like(diff)) / (B * L)
    assert 0 < masked.sum() < B * L and (grad[~masked.expand_as(grad)] == 0).all()
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7)   # float32 round-off at a gradient scale of ~0.3


def test_duo_gradient_also_flows_through_the_input(teachers):
    """Duo reparameterises w_t = a x0 + s eps (IDLM eq. 22-23): the networks' input softmax(w_t / tau) depends
    on x0, so detaching it changes the gradient. (tau = 0.3 here: at tau = 1e-3 the input is almost one-hot and
    its derivative is nearly zero except at near-ties, which would make this test a matter of luck.)"""
    root, data = teachers
    teacher, _, fake, _ = three_networks(root / 'duo', perturb=0.5)
    objective = DuoObjective(8, *DUO_GAMMAS, tau=0.3)
    x0 = torch.softmax(2 * torch.randn(16, 8, 8, generator=gen(2)), -1).requires_grad_()
    noisy = objective.corrupt(x0, torch.linspace(0.05, 0.95, 16), gen(3))
    assert noisy.input.requires_grad
    full, = torch.autograd.grad(idlm.token_gaps(teacher, fake, objective, x0, noisy)[0].mean(), x0)
    detached = dataclasses.replace(noisy, input=noisy.input.detach())
    target_only, = torch.autograd.grad(idlm.token_gaps(teacher, fake, objective, x0, detached)[0].mean(), x0)
    assert (full - target_only).abs().max() > 1e-3 * target_only.abs().max()


def test_one_iteration_moves_student_and_fake_not_teacher(teachers):
    root, data = teachers
    teacher, student, fake, objective = three_networks(root / 'mdlm')
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    start_student = {k: v.clone() for k, v in student.state_dict().items()}
    opt_s, opt_f = (torch.optim.AdamW(m.parameters(), 1e-3) for m in (student, fake))
    x, cpu = real_batch(data), torch.device('cpu')
    common.accumulate(fake, [(x, gen(0))], lambda x, g: (idlm.fake_loss(student, fake, objective, x, g),), 1, cpu)
    common.update(fake, opt_f, 1e-3, 0.0)
    common.accumulate(student, [(x, gen(1))], lambda x, g: idlm.student_loss(student, teacher, fake, objective, x, g),
                    1, cpu)
    common.update(student, opt_s, 1e-3, 0.0)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in start_student.items())
    assert any(not torch.equal(v, fake.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------------------------------------ whole runs

def args(teacher_dir, data, out_dir, kind='mdlm', **kw):
    opts = dict(teacher=kind, teacher_ckpt=teacher_dir, data=data, out_dir=out_dir, batch_size=4, grad_accum=2,
                max_iters=4, fake_steps=2, lr=1e-3, fake_lr=1e-3, warmup_iters=2, eval_samples=0, ckpt_interval=2,
                log_every=1)
    opts.update(kw)
    return [f'--{k}={v}' for k, v in opts.items()]


def load(path):
    return torch.load(os.path.join(path, 'ckpt.pt'), weights_only=False)


@pytest.fixture(scope='module')
def reference_run(teachers):
    """Four uninterrupted iterations in one process."""
    root, data = teachers
    idlm.main(args(root / 'mdlm', data, root / 'ref'))
    return load(root / 'ref')


def test_two_processes_match_one(teachers, reference_run):
    root, data = teachers
    r = run_script(['distill_idlm.py', *args(root / 'mdlm', data, root / 'two')], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    two = load(root / 'two')
    for key in ('model', 'fake'):
        assert all(torch.allclose(v, two[key][k], atol=1e-6) for k, v in reference_run[key].items()), key
    assert not torch.equal(reference_run['model']['vocab_embed.embedding'],
                           load(root / 'mdlm')['ema']['vocab_embed.embedding'])   # the student did move



def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_nodes_match_one_process_bit_for_bit(teachers, reference_run):
    """Two torchrun launchers on this machine, one process each, joined by c10d rendezvous on localhost (gloo), as two
    nodes would be: the student, the fake and the EMA equal the one-process run's exactly (grad_accum 2 over 2 ranks:
    the halves each rank all-reduces are exact in floating point)."""
    root, data = teachers
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1',
                '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{free_port()}', '--rdzv_id=idlm-test']
    nodes = [subprocess.Popen(launcher + ['distill_idlm.py', *args(root / 'mdlm', data, root / 'nodes')], cwd=ROOT,
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    two = load(root / 'nodes')
    for key in ('model', 'fake', 'ema'):
        assert all(torch.equal(v, two[key][k]) for k, v in reference_run[key].items()), key

def test_interrupted_run_resumes_bit_exactly(teachers, reference_run):
    root, data = teachers
    idlm.main(args(root / 'mdlm', data, root / 'cut', max_iters=2))
    idlm.main(args(root / 'mdlm', data, root / 'cut', resume='true'))
    resumed = load(root / 'cut')
    assert resumed['iter'] == 4
    for key in ('model', 'fake', 'ema'):
        assert all(torch.equal(v, resumed[key][k]) for k, v in reference_run[key].items()), key
    for key in ('optimizer', 'fake_optimizer'):
        ref, res = reference_run[key]['state'], resumed[key]['state']
        assert all(torch.equal(ref[i][name], res[i][name]) for i in ref for name in ref[i]), key


def test_a_run_stopped_mid_way_keeps_its_history(teachers, monkeypatch):
    """history.json is written with every checkpoint, not only at the end (eval.py --runs reads it)."""
    root, data = teachers
    real = idlm.iteration

    def stop_at_the_third(state, teacher, objective, dataset, cfg, it, *rest, **kw):
        if it == 2:
            raise KeyboardInterrupt
        return real(state, teacher, objective, dataset, cfg, it, *rest, **kw)

    monkeypatch.setattr(idlm, 'iteration', stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        idlm.main(args(root / 'mdlm', data, root / 'stopped'))
    history = json.load(open(root / 'stopped' / 'history.json'))
    assert [row['iter'] for row in history['train']] == [1, 2]


def test_resume_restores_the_dropout_rng(teachers, tmp_path, monkeypatch):
    """With dropout on, student and fake draw masks from the global RNG: a resume that did not restore it would
    drift from the uninterrupted run."""
    _, data = teachers
    train.main([f'--data={data}', f'--out_dir={tmp_path / "teacher"}', '--teacher=mdlm', '--model=tiny',
                '--dropout=0.3', '--max_iters=4', '--batch_size=8', '--eval_batches=1', '--warmup_iters=1'])
    idlm.main(args(tmp_path / 'teacher', data, tmp_path / 'whole'))
    idlm.main(args(tmp_path / 'teacher', data, tmp_path / 'cut', max_iters=2))
    idlm.main(args(tmp_path / 'teacher', data, tmp_path / 'cut', resume='true'))
    whole, resumed = load(tmp_path / 'whole'), load(tmp_path / 'cut')
    assert resumed['model_config']['dropout'] == 0.3
    for key in ('model', 'fake', 'ema'):
        assert all(torch.equal(v, resumed[key][k]) for k, v in whole[key].items()), key
    # the test can fail: the same resume without restoring the RNG state draws other masks and ends elsewhere
    monkeypatch.setattr(idlm.common, 'set_rng_state', lambda state, rank=0: None)
    idlm.main(args(tmp_path / 'teacher', data, tmp_path / 'blind', max_iters=2))
    idlm.main(args(tmp_path / 'teacher', data, tmp_path / 'blind', resume='true'))
    blind = load(tmp_path / 'blind')['model']
    assert not all(torch.equal(v, blind[k]) for k, v in whole['model'].items())


def test_wrong_teacher_kind_is_one_line(teachers):
    root, data = teachers
    r = subprocess.run([sys.executable, 'distill_idlm.py', *args(root / 'sedd', data, root / 'wrong')], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith('error:') and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "'sedd' teacher" in r.stderr and '--teacher sedd' in r.stderr


def test_teacher_of_other_data_is_refused(teachers, tmp_path):
    root, _ = teachers
    other = prepare_synthetic(str(tmp_path / 'other'), num_train=16, num_val=4, N=6, L=8, K=2)
    with pytest.raises(UserError, match='6 tokens'):
        idlm.main(args(root / 'mdlm', other, tmp_path / 'out'))


@pytest.mark.parametrize('kind', ['mdlm', 'duo', 'sedd'])
def test_students_sample_like_their_teachers(teachers, kind):
    """The student checkpoint goes through sample.load_sampler and generate like any teacher: same kind, the Duo
    teacher's gammas, and a SEDD student read through its x0 (scores with the exact mass 1/expm1(sigma))."""
    root, data = teachers
    out = root / f'student-{kind}'
    idlm.main(args(root / kind, data, out, kind=kind, max_iters=2))
    ckpt = load(out)
    assert (ckpt['kind'], ckpt['method'], ckpt['teacher']) == ('student', 'idlm', kind)
    net, got_kind, N, L, meta, schedule = sample.load_sampler(str(out), 'cpu')
    assert (got_kind, N, L) == (kind, 8, 8)
    if kind == 'duo':
        assert (schedule.gamma_min, schedule.gamma_max) == DUO_GAMMAS
    if kind == 'sedd':
        assert isinstance(net, sample.StudentScores)
        z, sigma = torch.tensor([[8, 1, 8, 2, 8, 8, 3, 8]]), torch.tensor([0.7])
        mass = net(z, sigma)[0, :, :8].exp().sum(-1)[z[0] == 8]
        assert torch.allclose(mass, 1 / torch.expm1(sigma).expand_as(mass), rtol=1e-5)
    for fused in (True, False):
        x, nfe = sample.generate(net, kind, 5, L, 3, N, gen(0), batch_size=5, fused=fused, schedule=schedule,
                                 progress=False)
        assert x.shape == (5, 8) and 0 <= x.min() and x.max() < 8


def test_sedd_student_nelbo_ignores_the_score_mass(teachers, tmp_path):
    """eval.py's NELBO perplexity reads a SEDD student through its x0, as it is sampled: adding a constant to every
    real token's raw output (the total score mass, which the IDLM loss never sees) must not change it."""
    import eval as eval_module
    root, data = teachers
    ckpt = torch.load(os.path.join(root / 'sedd', 'ckpt.pt'), weights_only=False)
    dataset = data_module.load_data(data)
    ppl = []
    for shift in (0.0, 3.0):
        weights = {k: v.clone() for k, v in ckpt['ema'].items()}
        weights['output_layer.linear.bias'][:8] += shift
        path = tmp_path / f'shift{shift}' / 'ckpt.pt'
        common.save_checkpoint(str(path), {**ckpt, 'kind': 'student', 'method': 'idlm', 'ema': weights})
        ppl.append(eval_module.nelbo_perplexity(str(path), dataset, 2, torch.device('cpu')))
    assert ppl[0] > 1 and math.isclose(ppl[0], ppl[1], rel_tol=1e-5), ppl


def test_missing_default_teacher_is_trained_then_evaluated(tmp_path, monkeypatch, capsys):
    """--teacher mdlm on 'synthetic' with no out/mdlm-synthetic: train.py's defaults (made tiny here) train it
    first; the run ends with the results table (teacher also at --teacher_steps), its verdicts and the history."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_module, 'DATA_ROOT', str(tmp_path / 'data'))
    prepare_synthetic(str(tmp_path / 'data' / 'synthetic'), num_train=64, num_val=16, N=8, L=8, K=2)
    for key, value in dict(model='tiny', max_iters=2, batch_size=8, eval_batches=1, warmup_iters=1).items():
        monkeypatch.setitem(train.DEFAULTS, key, value)
    idlm.main(['--teacher=mdlm', '--max_iters=2', '--batch_size=4', '--eval_samples=6', '--eval_steps=2,4',
               '--log_every=1', '--teacher_steps=16'])
    assert 'training one first' in capsys.readouterr().out
    assert os.path.isfile('out/mdlm-synthetic/ckpt.pt') and os.path.isfile('out/idlm-mdlm-synthetic/ckpt.pt')
    table = open('out/idlm-mdlm-synthetic/results.md').read()
    assert 'teacher mdlm' in table and 'IDLM student' in table and 'true GenPPL' in table
    assert '| teacher mdlm | 16 |' in table                        # --teacher_steps: the many-step reference row
    verdicts = [line for line in table.splitlines() if 'against teacher mdlm at 16 steps' in line]
    assert len(verdicts) == 2 and all('matched' in line for line in verdicts)   # one per student budget
    # --eval_temperatures (default 0.8,0.7): the teacher tempered at the student's budgets only, and under each
    # verdict a line against the teacher at the student's entropy
    for T in ('0.8', '0.7'):
        assert f'| teacher mdlm T={T} | 2 |' in table and f'| teacher mdlm T={T} | 4 |' in table
        assert f'| teacher mdlm T={T} | 16 |' not in table
    lines = table.splitlines()
    assert all(lines[lines.index(v) + 1].startswith('  - at equal entropy: the teacher at') for v in verdicts)
    try:
        import matplotlib  # noqa: F401  (optional: the plot is skipped without it)
        assert os.path.getsize('out/idlm-mdlm-synthetic/history.png') > 1000
        assert os.path.getsize('out/idlm-mdlm-synthetic/temperature.png') > 1000
    except ImportError:
        pass
    history = json.load(open('out/idlm-mdlm-synthetic/history.json'))
    assert len(history['train']) == 2 and {r['steps'] for r in history['eval']} == {2, 4}


def test_best_is_the_lowest_genppl_within_the_entropy_tolerance():
    reference = {'steps': 1024, 'genppl_true': 6.0, 'entropy': 3.0}
    row = lambda ppl, ent: {'steps': 16, 'genppl_true': ppl, 'entropy': ent}
    assert evaluation.better(row(5.9, 2.95), None, reference, 0.02)                  # -1.7% entropy, lower GenPPL
    assert not evaluation.better(row(5.9, 2.93), None, reference, 0.02)              # -2.3%: too much entropy lost
    assert not evaluation.better(row(6.1, 3.00), None, reference, 0.02)              # GenPPL worse than the teacher's
    assert not evaluation.better(row(5.9, 2.99), row(5.8, 2.95), reference, 0.02)    # qualifies, but not the lowest
    assert evaluation.better(row(5.7, 2.99), row(5.8, 2.95), reference, 0.02)
    judged = {'steps': 16, 'genppl_judge': 50.0, 'entropy': 3.0}               # real text: the judge's GenPPL
    assert evaluation.better(judged, None, {'steps': 64, 'genppl_judge': 60.0, 'entropy': 3.0}, 0.02)


def test_best_checkpoint_is_kept_and_reported(tmp_path, monkeypatch):
    """best.pt is a full student checkpoint of the chosen iteration (forced here: the first evaluation), loads in
    sample.py, and the final table reports it beside the last EMA student, with the teacher at --teacher_steps."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_module, 'DATA_ROOT', str(tmp_path / 'data'))
    prepare_synthetic(str(tmp_path / 'data' / 'synthetic'), num_train=64, num_val=16, N=8, L=8, K=2)
    for key, value in dict(model='tiny', max_iters=2, batch_size=8, eval_batches=1, warmup_iters=1).items():
        monkeypatch.setitem(train.DEFAULTS, key, value)
    monkeypatch.setattr(idlm.evaluation, 'better', lambda row, best, reference, tolerance: best is None)
    idlm.main(['--teacher=mdlm', '--max_iters=2', '--batch_size=4', '--eval_samples=6', '--eval_steps=2,4',
               '--eval_interval=1', '--teacher_steps=16'])
    best = torch.load('out/idlm-mdlm-synthetic/best.pt', weights_only=False)
    assert best['iter'] == 1 and best['history']['best']['iter'] == 1 and best['history']['reference']['steps'] == 16
    net, kind, N, L, _, _ = sample.load_sampler('out/idlm-mdlm-synthetic/best.pt', 'cpu')
    assert (kind, N, L) == ('mdlm', 8, 8)
    table = open('out/idlm-mdlm-synthetic/results.md').read()
    assert 'IDLM student @2 (EMA, last)' in table and 'IDLM student @1 (EMA, best.pt)' in table


def test_the_exact_teacher_runs(teachers):
    """--teacher_ckpt exact: the language's exact denoiser as f*, student and fake copied from --init. The run
    finishes and its checkpoint loads with weights_only=True."""
    root, data = teachers
    out = root / 'exact'
    idlm.main(args('exact', data, out, init=root / 'mdlm', max_iters=2))
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['teacher_ckpt'] == 'exact' and ckpt['iter'] == 2


def test_eq_11_gap_is_zero_at_initialisation_under_the_official_dropout():
    """Official teachers bring dropout 0.1. At initialisation the fake IS the teacher, so eq. 11's gap must vanish: the
    iteration scores the student's sample with the fake in eval mode, like the teacher (with the fake in train mode,
    as it is while it learns in eq. 10, the gap would be dropout noise, checked here too). The student generates
    without dropout, so two calls of it on the same input agree."""
    objective, N, L = MDLMObjective(8), 8, 8
    teacher = build_model('tiny', vocab_size=N + 1, seq_len=L, mask_id=N, head='subs', dropout=0.1).eval()
    with torch.no_grad():                    # off adaLN-zero's init, whose outputs dropout could not change
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen(3)))
    teacher.requires_grad_(False)
    student, fake = (copy.deepcopy(teacher).eval().requires_grad_(True) for _ in range(2))
    cfg = {**idlm.DEFAULTS, 'batch_size': 16, 'grad_accum': 1, 'lr': 0.0, 'fake_lr': 0.0, 'warmup_iters': 0}
    data = types.SimpleNamespace(train=torch.randint(0, N, (64, L), generator=gen(0)).numpy(),
                                 batch=lambda split, idx: torch.as_tensor(data.train[idx]))
    state = idlm.make_state(student, fake, cfg)
    gap, teacher_loss, fake_loss, *_ = idlm.iteration(state, teacher, objective, data, cfg, 0, 0, 1, torch.device('cpu'))
    assert gap == 0.0 and teacher_loss == fake_loss > 0
    x = data.batch('train', torch.arange(16))
    noisy = idlm.student_input(objective, x, gen(1))
    assert torch.equal(idlm.student_x0(student, objective, noisy), idlm.student_x0(student, objective, noisy))
    x0 = idlm.student_x0(student, objective, noisy).detach()
    corrupted = objective.corrupt(x0, torch.full((16,), 0.7), gen(2))
    fake.train()
    assert idlm.token_gaps(teacher, fake, objective, x0, corrupted)[0].abs().mean() > 1e-4   # train mode: noise
