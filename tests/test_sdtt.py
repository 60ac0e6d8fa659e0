"""Round-based step distillation (distill_sdtt.py): SDTT's two-step targets against the teacher's two-step
distribution by enumeration, DCD's coupled pairs, the round schedule, exact resume across a round boundary,
torchrun, the exact teacher, and students that sample and can be distilled further."""
import itertools
import os

import pytest
import torch

import common
import distill_idlm as idlm
import distill_sdtt as sdtt
import sample
import train
from common import UserError
from data import prepare_synthetic
from losses import DuoObjective
from processes import Absorbing, duo_latent
from test_train import run_script

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ SDTT's targets
# N = 2 tokens, L = 3 positions, mask id 2: every intermediate and final state of two steps is enumerated.

N2, L3, MASK = 2, 3, 2
SEQS = torch.tensor(list(itertools.product(range(N2), repeat=L3)))
STATES = torch.tensor(list(itertools.product(range(N2 + 1), repeat=L3)))


class TableDenoiser:
    """A fixed, arbitrary MDLM denoiser: for each state, random x0 log-probabilities at masked positions, SUBS
    carry-over elsewhere. -> log x0_hat (B, L, N + 1), float64"""

    def __init__(self, seed):
        self.N = N2
        logits = torch.randn(len(STATES), L3, N2, generator=gen(seed), dtype=F64) * 1.5
        self.table = {tuple(s.tolist()): logits[i].log_softmax(-1) for i, s in enumerate(STATES)}

    def __call__(self, z, sigma=None):
        rows = torch.stack([self.table[tuple(r.tolist())] for r in z])                      # (B, L, N)
        out = torch.cat([rows, torch.full_like(rows[..., :1], -1e6)], -1)
        carry = torch.full_like(out, -1e6).scatter(-1, z[..., None], 0.0)
        return torch.where((z == MASK)[..., None], out, carry)


def test_sdtt_targets_carry_the_teachers_two_step_distribution():
    """For every x_t, summing over the teacher's first step, the targets collect_targets assigns (step 1's
    prediction where step 1 unmasked, step 2's elsewhere) reproduce the teacher's two-step transition
    P(x_end | x_t) = sum_mid q(x_mid | x_t, x0_hat(x_t)) q(x_end | x_mid, x0_hat(x_mid)), computed from the absorbing
    posterior (processes.py). A target taken from the wrong step breaks the equality."""
    teacher = TableDenoiser(0)
    process = Absorbing(N2)
    a_t, a_mid, a_end = 0.2, 0.5, 0.75                     # alpha at t, t - dt, t - 2 dt
    a, b = (a_mid - a_t) / (1 - a_t), (a_end - a_mid) / (1 - a_mid)   # unmask probabilities of the two steps
    for x_t in STATES:
        x_t = x_t[None]
        p1 = teacher(x_t)
        post1 = process.posterior(x_t, p1.exp()[..., :N2], a_mid, a_t)[0]                  # (L, V)
        reference = torch.zeros(len(STATES), dtype=F64)
        by_targets = torch.zeros(len(STATES), dtype=F64)
        for x_mid in STATES:
            x_mid = x_mid[None]
            p_mid = post1[torch.arange(L3), x_mid[0]].prod()
            if p_mid == 0:
                continue
            p2 = teacher(x_mid)
            post2 = process.posterior(x_mid, p2.exp()[..., :N2], a_end, a_mid)[0]
            targets = sdtt.collect_targets(x_t, x_mid, p1, p2, MASK)[0].exp()                # (L, V)
            for j, x_end in enumerate(STATES):
                reference[j] += p_mid * post2[torch.arange(L3), x_end].prod()
                path = 1.0
                for i in range(L3):
                    if x_t[0, i] != MASK:                                 # clean at t: stays (both steps)
                        path *= float(x_mid[0, i] == x_t[0, i] and x_end[i] == x_t[0, i])
                    elif x_mid[0, i] != MASK:                             # unmasked by step 1, from its target
                        path *= a * targets[i, x_mid[0, i]] * float(x_end[i] == x_mid[0, i])
                    elif x_end[i] != MASK:                                # unmasked by step 2, from its target
                        path *= (1 - a) * b * targets[i, x_end[i]]
                    else:
                        path *= (1 - a) * (1 - b)
                by_targets[j] += path
        assert torch.allclose(by_targets, reference, atol=1e-12), x_t
        assert abs(reference.sum() - 1) < 1e-12
    # the test can fail: step 2's predictions everywhere (a wrong collection) give another distribution
    x_t = torch.full((1, L3), MASK)
    x_mid = torch.tensor([[0, MASK, MASK]])
    wrong = teacher(x_mid)[0, 0].exp()
    right = sdtt.collect_targets(x_t, x_mid, teacher(x_t), teacher(x_mid), MASK)[0, 0].exp()
    assert not torch.allclose(wrong, right)


def test_two_step_targets_draws_the_teachers_two_steps():
    """two_step_targets runs the sampler's ancestral steps at the right alphas: its x_end frequencies match the
    enumerated two-step transition from all masks (8000 draws, total variation within sampling noise)."""
    teacher = TableDenoiser(1)
    t, dt = torch.full((8000,), 0.8, dtype=F64), 0.3
    x_t = torch.full((8000, L3), MASK)
    targets, x_end = sdtt.two_step_targets(teacher, x_t, t, dt, gen(2))
    alpha = lambda s: 1 - (1 - 1e-3) * s
    process = Absorbing(N2)
    post1 = process.posterior(x_t[:1], teacher(x_t[:1]).exp()[..., :N2], alpha(0.5), alpha(0.8))[0]
    reference = torch.zeros(len(STATES), dtype=F64)
    for x_mid in STATES:
        p_mid = post1[torch.arange(L3), x_mid].prod()
        post2 = process.posterior(x_mid[None], teacher(x_mid[None]).exp()[..., :N2], alpha(0.2), alpha(0.5))[0]
        reference += p_mid * torch.stack([post2[torch.arange(L3), s].prod() for s in STATES])
    index = {tuple(s.tolist()): i for i, s in enumerate(STATES)}
    counts = torch.bincount(torch.tensor([index[tuple(r.tolist())] for r in x_end]), minlength=len(STATES))
    assert 0.5 * (counts / 8000 - reference).abs().sum() < 0.04
    assert targets.shape == (8000, L3, N2 + 1)


@pytest.mark.parametrize('kind', sdtt.LOSSES)
def test_every_loss_is_zero_at_the_target_and_positive_off_it(kind):
    target = torch.randn(5, 4, 6, generator=gen(0)).log_softmax(-1)
    other = torch.randn(5, 4, 6, generator=gen(1)).log_softmax(-1)
    assert sdtt.divergence(target, target, kind).abs().max() < 1e-6
    assert (sdtt.divergence(other, target, kind) > 0).all()


# ------------------------------------------------------------------------------------------------ DCD's pairs

def test_dcd_pairs_share_their_noise_and_are_argmax_tokens():
    objective = DuoObjective(8, spacing='alpha')
    x0 = torch.randint(0, 8, (64, 16), generator=gen(0))
    t = torch.full((64,), 0.6)
    x_t, sigma_t, x_s, sigma_s = sdtt.dcd_pair(objective, x0, t, t - 0.2, gen(5))
    eps = torch.randn(64, 16, 8, generator=gen(5))              # the same generator draws the same eps
    onehot = torch.nn.functional.one_hot(x0, 8).float()
    for x, time in ((x_t, t), (x_s, t - 0.2)):
        gamma = objective.gamma(time)[:, None].float()
        assert torch.equal(x, duo_latent(onehot, gamma, eps).argmax(-1))
    assert torch.allclose(sigma_t, -torch.log(objective.alpha(t)).float())
    assert (x_s == x0).float().mean() > (x_t == x0).float().mean()          # s < t: less noise
    same, _, same_s, _ = sdtt.dcd_pair(objective, x0, t, t, gen(5))
    assert torch.equal(same, same_s)                                         # s = t: one path, one state
    independent = duo_latent(onehot, objective.gamma(t - 0.2)[:, None].float(),
                             torch.randn(64, 16, 8, generator=gen(6))).argmax(-1)
    assert not torch.equal(independent, x_s)                                 # another eps: another state


# ------------------------------------------------------------------------------------------------ rounds

def test_round_schedule_doubles_dt_and_halves_the_steps():
    cfg = {**sdtt.DEFAULTS, 'start_steps': 64, 'min_steps': 4, 'max_iters': 40, 'round_iters': 0}
    assert sdtt.num_rounds(cfg) == 4
    assert [sdtt.round_of(it, cfg) for it in (0, 9, 10, 29, 30, 39)] == [0, 0, 1, 2, 3, 3]
    assert [sdtt.round_dt(r, cfg) for r in range(4)] == [1 / 64, 1 / 32, 1 / 16, 1 / 8]
    assert [sdtt.round_end(r, cfg) for r in range(4)] == [10, 20, 30, 40]


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp('sdtt')
    data = str(root / 'syn')
    prepare_synthetic(data, num_train=256, num_val=32, N=8, L=8, K=2)
    for kind in ('mdlm', 'duo'):
        train.main([f'--data={data}', f'--out_dir={root / kind}', f'--teacher={kind}', '--model=tiny',
                    '--max_iters=20', '--batch_size=16', '--eval_batches=1', '--eval_interval=20', '--warmup_iters=2'])
    return root, data


def args(root, data, out, **kw):
    opts = dict(teacher='mdlm', teacher_ckpt=root / kw.get('teacher', 'mdlm'), data=data, out_dir=out, batch_size=4,
                grad_accum=2, max_iters=8, round_iters=4, start_steps=8, min_steps=2, lr=1e-3, warmup_iters=2,
                eval_samples=0, ckpt_interval=2, log_every=1)
    opts.update(kw)
    return [f'--{k}={v}' for k, v in opts.items()]


def load(path, name='ckpt.pt'):
    return torch.load(os.path.join(path, name), weights_only=False)


@pytest.fixture(scope='module', params=['mdlm', 'duo'])
def reference_run(request, teachers):
    root, data = teachers
    out = root / f'ref-{request.param}'
    sdtt.main(args(root, data, out, teacher=request.param))
    return request.param, out


def test_the_raw_student_becomes_the_teacher_and_dt_doubles(reference_run):
    kind, out = reference_run
    final, round0 = load(out), load(out, 'round0.pt')
    assert (final['method'], round0['round'], final['round']) == ({'mdlm': 'sdtt', 'duo': 'dcd'}[kind], 0, 1)
    # round 1's teacher is round 0's raw student (not its EMA)
    assert all(torch.equal(v, final['teacher_model'][k]) for k, v in round0['model'].items())
    assert not all(torch.equal(v, round0['model'][k]) for k, v in round0['ema'].items())
    dts = {row['round']: row['dt'] for row in final['history']['train']}
    assert dts == {0: 1 / 8, 1: 1 / 4}


def test_resume_is_bit_exact_across_a_round_boundary(teachers, reference_run):
    kind, out = reference_run
    root, data = teachers
    cut = root / f'cut-{kind}'
    sdtt.main(args(root, data, cut, teacher=kind, max_iters=4))            # stops at the end of round 0
    sdtt.main(args(root, data, cut, teacher=kind, resume='true'))
    whole, resumed = load(out), load(cut)
    assert resumed['iter'] == 8
    for key in ('model', 'ema', 'teacher_model'):
        assert all(torch.equal(v, resumed[key][k]) for k, v in whole[key].items()), key
    ref, res = whole['optimizer']['state'], resumed['optimizer']['state']
    assert all(torch.equal(ref[i][name], res[i][name]) for i in ref for name in ref[i])


def test_two_processes_match_one(teachers, reference_run):
    kind, out = reference_run
    root, data = teachers
    r = run_script(['distill_sdtt.py', *args(root, data, root / f'two-{kind}', teacher=kind)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = load(out), load(root / f'two-{kind}')
    for key in ('model', 'teacher_model'):
        assert all(torch.allclose(v, two[key][k], atol=1e-6) for k, v in one[key].items()), key


def test_students_sample_and_are_distilled_further(teachers, reference_run, tmp_path):
    """A round checkpoint samples like a teacher, and IDLM takes it as its teacher (IDLM-DCD for Duo)."""
    kind, out = reference_run
    root, data = teachers
    net, loaded_kind, N, L, _, _ = sample.load_sampler(str(out / 'round0.pt'), 'cpu')
    assert (loaded_kind, N, L) == (kind, 8, 8)
    x, _ = sample.generate(net, kind, 6, L, 2, N, gen(0), progress=False)
    assert x.shape == (6, 8) and 0 <= x.min() and x.max() < 8
    idlm.main([f'--teacher={kind}', f'--teacher_ckpt={out}', f'--data={data}', f'--out_dir={tmp_path / "idlm"}',
               '--batch_size=4', '--max_iters=2', '--eval_samples=0'])
    assert load(tmp_path / 'idlm')['iter'] == 2


def test_sdtt_round_one_from_the_exact_teacher(teachers, tmp_path):
    root, data = teachers
    sdtt.main(args(root, data, tmp_path / 'exact', teacher_ckpt='exact', init=root / 'mdlm', grad_accum=1))
    ckpt = load(tmp_path / 'exact')
    assert load(tmp_path / 'exact', 'round0.pt')['teacher_model'] is None        # round 0: the exact denoiser
    assert ckpt['teacher_model'] is not None                                     # round 1: the student


def test_the_exact_teacher_is_the_languages_exact_denoiser(teachers):
    root, data = teachers
    from data import load_data
    dataset = load_data(data)
    teacher, net, _ = train.load_teacher('exact', 'mdlm', dataset, data, init=str(root / 'mdlm'))
    z = torch.randint(0, 9, (16, 8), generator=gen(3))                          # masks (id 8) and tokens
    out = teacher(z, torch.zeros(16)).exp()
    exact = dataset.language().denoise(z, 'absorbing', 0.5)
    masked = z == 8
    assert torch.allclose(out[..., :8][masked], exact[masked], atol=1e-12)
    assert torch.equal(out[~masked].argmax(-1), z[~masked]) and (out[..., 8] == 0).all()
    with pytest.raises(UserError, match='exact MDLM denoiser'):
        train.load_teacher('exact', 'duo', dataset, data, init=str(root / 'duo'))


@pytest.mark.parametrize('bad, message', [({'loss': 'l2'}, '--loss is one of'),
                                          ({'start_steps': 12}, 'power-of-two multiple'),
                                          ({'teacher': 'sedd'}, 'takes mdlm \\(SDTT\\) or duo'),
                                          ({'max_iters': 1, 'round_iters': 0}, 'fewer than the 2 rounds')])
def test_bad_options_are_one_sentence(teachers, tmp_path, bad, message):
    root, data = teachers
    with pytest.raises(UserError, match=message):
        sdtt.main(args(root, data, tmp_path / 'bad', **bad))
