"""
IDLM: inverse distillation of a diffusion language model (MDLM, Duo or SEDD-absorb) into a few-step student.

    python distill_idlm.py --teacher mdlm                       # CPU default (trains the teacher first if absent)
    torchrun --standalone --nproc_per_node=2 distill_idlm.py --teacher mdlm --grad_accum 2 --batch_size 32
    python distill_idlm.py --teacher duo --teacher_ckpt out/dcd-duo-synthetic     # IDLM-DCD: a DCD student as teacher
    python distill_idlm.py --teacher mdlm --teacher_ckpt exact  # the synthetic language's exact denoiser as f*
    python distill_idlm.py --teacher mdlm --resume true         # continue out_dir/ckpt.pt exactly where it stopped

Three networks of one architecture (IDLM §3.3): the frozen teacher f*, a fake f_hat and the student G_theta, the
last two copied from the teacher. With L_discr the teacher's own loss (losses.py), the student minimises (eq. 8)
    L(theta) = E_{x0 ~ p_theta}[L_discr(f*, x0)] - min_f E_{x0 ~ p_theta}[L_discr(f, x0)],
which is zero iff p_theta = p* (Theorem 3.1; tests/test_idlm.py enumerates it). The fake tracks the inner min in
alternation (Algorithm 1). Each iteration:
  1. eq. 10, fake_steps times: x0 = G_theta(x_t~, t~) without gradient, noisy = corrupt(x0, t); the fake minimises
     L_discr(f_hat, x0) on it, so it learns to denoise the student's own samples.
  2. eq. 11: fresh (x_t~, t~), x0 = G_theta(x_t~, t~), ONE noisy = corrupt(x0, t); the student minimises
     L_discr(f*, x0) - L_discr(f_hat, x0), teacher and fake scored on the same noisy sample.
The student is multistep (App. C.2): it eats x_t~, a real sequence noised at t~ ~ U[0, 1] (Duo: the soft input
softmax(w/tau)), and returns x0 probabilities over the N real tokens (the simplex relaxation, §3.2), so it samples
in K steps exactly like its teacher. MDLM: exp of its SUBS log-probs without the mask column. Duo: exp of its x0
head. SEDD: x0 = softmax of its log-scores over y != mask (s_y = x0_y / expm1(sigma_bar)), and it is sampled through
that x0 (sample.StudentScores). The gradient reaches theta through the soft target x0 in the loss (App. C.1: MDLM
and SEDD draw x_t ~ q(. | sg(x0))), and for Duo also through its reparameterised input w_t = a x0 + s eps (eq. 22-23).

Where this differs from the paper, and why. --anchor_weight 0.1 (ours) adds w x KL(f*(x_t~) || G_theta(x_t~)), the
forward KL from the teacher's x0 probabilities to the student's at the student's own input. Eq. 8 pins down only the
mixture of one-jump samples, not the K-step sampler the student is used as, and among its many optima the anchor
picks the one nearest the teacher's marginals (tests/test_idlm_objective.py enumerates both facts); with eq. 11 alone
the few-step student keeps shedding entropy as it trains. 0 is the paper's objective. The fake trains at 5x the
student's learning rate (fake_lr) so that it stays near the optimum Theorem 3.1 assumes. The small CPU models train at
lr 1e-4 for hundreds of iterations instead of 1e-6 for tens of thousands. RESULTS.md has the measurements ("The
teacher anchor", "The fake's speed", "The first hour").

The logged gap is not a convergence signal (it oscillates around zero, as in SiD). Judge a run by the EMA student's
GenPPL and entropy at K steps, every eval_interval iterations (history.png) and in the final table (results.md):
against the teacher at --teacher_steps, and against the teacher tempered to the student's entropy (temperature.png).
best.pt keeps the evaluated student with the lowest GenPPL within entropy_tolerance of the teacher's entropy.
"""

import copy
import os
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import eval as evaluation
import train
from common import UserError
from losses import DuoObjective
from processes import sample_time
from sample import StudentScores, load_sampler

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value; a positional argument is a config file of `key = value` lines)
teacher = 'mdlm'          # mdlm | duo | sedd
teacher_ckpt = ''         # '' = out/<teacher>-<data>/ckpt.pt (trained first on 'synthetic'), an official or DCD model, or 'exact'
init = ''                 # the network student and fake are copied from; '' = the teacher (with 'exact': the trained one)
data = 'synthetic'        # the real sequences the student's inputs are made from (App. C.2)
out_dir = ''              # '' = out/idlm-<teacher>-<data>
batch_size = 64           # sequences per micro-batch per process
grad_accum = 1            # micro-batches per phase in total; a multiple of the number of processes
max_iters = 400           # student updates, each after fake_steps fake updates
lr = 1e-4                 # the student's (the paper: 1e-6 at 169M, over far longer runs)
fake_lr = 5e-4            # the fake's: 5x the student's, so it keeps up with the student it scores (RESULTS.md)
warmup_iters = 20         # linear warm-up, then constant (IDLM App. F)
fake_steps = 1            # fake updates per student update (eq. 10 before eq. 11)
anchor_weight = 0.1       # ours: + this x KL(teacher x0 || student x0) at the student's input; 0 = the paper's eq. 11
grad_clip = 0.0           # 0 = off, as in the paper; gradient norms are logged either way
ema = 0.99                # EMA of the student, evaluated and saved as 'ema' (the paper: 0.9999 over far more steps)
eval_interval = 100       # iterations between evaluations of the EMA student (and at the end)
eval_steps = '4,8,16'     # K-step budgets
teacher_steps = '1024'    # extra budgets for the teacher in the final table: the many-step reference to match
eval_temperatures = '0.8,0.7'  # the teacher also sampled from x0_hat^(1/T) at eval_steps ('' = none; README)
keep_best = True          # keep best.pt (see evaluate); false skips the teacher's many-step reference row it needs
entropy_tolerance = 0.02  # a verdict's, and best.pt's, allowed relative entropy loss against the teacher
eval_samples = 256        # sequences per budget and noise stream; 0 skips evaluation and the final table
eval_streams = 3          # noise streams per evaluation: each cell is their mean +- sd (eval.py)
eval_batch_size = 64      # sequences generated at once: eval.py's default, so the rows match eval.py's for a seed
judge = ''                # an AR checkpoint (train.py --teacher ar) for judge GenPPL; '' = none
ckpt_interval = 200
log_every = 50
seed = 0
device = 'auto'
dist_timeout = 120        # minutes a process waits at a collective, e.g. while rank 0 evaluates alone
resume = False
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

KINDS = ('mdlm', 'duo', 'sedd')
LOGGED = ('gap', 'teacher_loss', 'fake_loss', 'anchor', 'fake_train_loss', 'student_grad_norm', 'fake_grad_norm')
FLAGS = '--lr and --fake_lr'


# ----------------------------------------------------------------------------------------------------------------
# The student as a generator (App. C.2)

def student_input(objective, x_data, generator):
    """SamplingFunc of Algorithm 1: t~ ~ U[eps, 1] (stratified) and x_t~ ~ q(. | x0~) for a real batch x_data (B, L);
    for Duo the network input is the soft softmax(w_t~ / tau). -> Noisy"""
    t = sample_time(len(x_data), generator=generator, device=x_data.device)
    return objective.corrupt(x_data, t, generator)


def student_x0(student, objective, noisy):
    """G_theta(x_t~, t~): x0 probabilities (B, L, N) over the real tokens, differentiable in theta."""
    out = student(noisy.input, noisy.sigma)                                  # (B, L, V)
    N = objective.N
    if isinstance(objective, DuoObjective):
        return out.exp()                                                     # 'x0' head: log-softmax over N
    if objective.head == 'subs':
        return out[..., :N].exp()            # the mask column is exp(-1e6) = 0; carry-over rows are one-hot
    masked = (noisy.x_t == objective.mask_id)[..., None]                     # SEDD: x0_y proportional to s_y
    carry = F.one_hot(noisy.x_t.clamp_max(N - 1), N).to(out.dtype)
    return torch.where(masked, out[..., :N].softmax(-1), carry)


@contextmanager
def frozen(model):
    """No parameter of `model` enters the graph while inside (its output stays differentiable in its input)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def student_sample(student, objective, x_data, generator):
    """x0 = G_theta(x_t~, t~) for fresh inputs made from x_data, and one noisy = corrupt(x0, t), t ~ U[eps, 1]
    (tokens drawn from sg(x0)). -> (x0, noisy, the student's input)"""
    source = student_input(objective, x_data, generator)
    x0 = student_x0(student, objective, source)
    t = sample_time(len(x0), generator=generator, device=x0.device)
    return x0, objective.corrupt(x0, t, generator), source


# ----------------------------------------------------------------------------------------------------------------
# The two losses (eq. 10, 11) and the anchor

def fake_loss(student, fake, objective, x_data, generator):
    """eq. 10: the teacher's own loss for the fake on the student's samples; theta gets no gradient."""
    with torch.no_grad():
        x0, noisy, _ = student_sample(student, objective, x_data, generator)
    return objective.loss(fake(noisy.input, noisy.sigma), x0, noisy).mean()


def token_gaps(teacher, fake, objective, x0, noisy):
    """eq. 11's integrand for given x0 and ONE noisy sample of it: (teacher - fake, teacher, fake) losses per token
    (B, L). Teacher and fake parameters get no gradient; x0 does (the target, and Duo's input)."""
    teacher_loss = objective.loss(teacher(noisy.input, noisy.sigma), x0, noisy)
    with frozen(fake):
        fake_loss = objective.loss(fake(noisy.input, noisy.sigma), x0, noisy)
    return teacher_loss - fake_loss, teacher_loss, fake_loss


def teacher_anchor(teacher, objective, noisy, x0):
    """Ours, not the paper's: the forward KL(f*(x_t~) || G_theta(x_t~)) from the teacher's x0 probabilities to the
    student's at the student's own input, summed over positions and averaged per token (MDLM and SEDD carry-over
    positions, one-hot in both, add 0). Eq. 8 pins down only the mixture of one-jump samples, and many students reach
    its optimum, most with a collapsed K-step sampler; this term picks the optimum nearest the teacher's per-position
    marginals (tests/test_idlm_objective.py enumerates both facts). -> scalar"""
    with torch.no_grad():
        target = student_x0(teacher, objective, noisy)                           # (B, L, N), no gradient
    log_ratio = target.clamp_min(1e-30).log() - x0.clamp_min(1e-30).log()
    return torch.where(target > 0, target * log_ratio, torch.zeros_like(log_ratio)).sum(-1).mean()


def student_loss(student, teacher, fake, objective, x_data, generator, anchor_weight=0.0):
    """eq. 11 on a real batch, plus anchor_weight x teacher_anchor.
    -> (loss to minimise, teacher loss, fake loss, anchor KL)"""
    x0, noisy, source = student_sample(student, objective, x_data, generator)
    gaps, teacher_loss, fake_loss = token_gaps(teacher, fake, objective, x0, noisy)
    anchor = teacher_anchor(teacher, objective, source, x0) if anchor_weight > 0 else torch.zeros((), device=x0.device)
    return gaps.mean() + anchor_weight * anchor, teacher_loss.mean(), fake_loss.mean(), anchor


# ----------------------------------------------------------------------------------------------------------------
# One iteration of Algorithm 1

def iteration(state, teacher, objective, dataset, cfg, it, rank, world, device, ckpt_path=''):
    """fake_steps fake updates (eq. 10), one student update (eq. 11), the EMA. state holds student and fake
    (DDP-wrapped under torchrun), their optimizers and the student's EMA. Returns the LOGGED values."""
    student, fake, local = state['student'], state['fake'], cfg['grad_accum'] // world
    # 1. eq. 10: the fake follows the student's current distribution (student forward without gradient). It trains
    #    with the teacher's dropout, as the teacher did; the student never uses dropout (see distill)
    fake.train()
    for j in range(cfg['fake_steps']):
        fake_fn = lambda x, g: (fake_loss(common.unwrap(student), fake, objective, x, g),)
        batches = common.micro_batches(dataset, cfg, it, 1 + j, rank, world, device)
        fake_stats = common.all_reduce_mean(common.accumulate(fake, batches, fake_fn, local, device), world)
        common.check_finite(fake_stats, 'fake', it, ckpt_path, FLAGS)
        lr_fake = common.learning_rate(it, cfg['fake_lr'], cfg['warmup_iters'])
        fake_norm = common.update(fake, state['fake_optimizer'], lr_fake, cfg['grad_clip'])
    # 2. eq. 11: the student lowers teacher-minus-fake loss. The fake (unwrapped: no DDP) is frozen inside and scores
    #    in eval mode like the teacher, so at initialisation (fake = teacher) the gap is exactly zero
    fake.eval()
    student_fn = lambda x, g: student_loss(student, teacher, common.unwrap(fake), objective, x, g, cfg['anchor_weight'])
    batches = common.micro_batches(dataset, cfg, it, 0, rank, world, device)
    stats = common.all_reduce_mean(common.accumulate(student, batches, student_fn, local, device), world)
    common.check_finite(stats, 'IDLM', it, ckpt_path, FLAGS)
    lr_student = common.learning_rate(it, cfg['lr'], cfg['warmup_iters'])
    student_norm = common.update(student, state['optimizer'], lr_student, cfg['grad_clip'])
    state['ema'].update(student)
    loss, teacher_loss, fake_value, anchor = stats.tolist()
    return [loss - cfg['anchor_weight'] * anchor, teacher_loss, fake_value, anchor, fake_stats[0].item(), student_norm,
            fake_norm]


# ----------------------------------------------------------------------------------------------------------------
# Setup, checkpoints, evaluation

def check_config(cfg, world):
    evaluation.parse_temperatures(cfg['eval_temperatures'], '--eval_temperatures')   # before any teacher trains
    if cfg['teacher'] not in KINDS:
        raise UserError(f"unknown --teacher {cfg['teacher']!r}; IDLM distills one of {', '.join(KINDS)}")
    if cfg['fake_steps'] < 1:
        raise UserError("--fake_steps must be at least 1: the fake has to follow the student (eq. 10)")
    if cfg['anchor_weight'] < 0:
        raise UserError(f"--anchor_weight weighs a KL and must be 0 or more, not {cfg['anchor_weight']}")
    common.check_batch(cfg, world)


def make_state(student, fake, cfg):
    """What iteration() updates: student and fake, their AdamW optimizers (IDLM App. F: betas (0.9, 0.999), no
    weight decay), and the student's EMA."""
    adamw = lambda net, lr: torch.optim.AdamW(net.parameters(), lr, (0.9, 0.999), weight_decay=0.0)
    return {'student': student, 'fake': fake, 'ema': common.EMA(student, cfg['ema']),
            'optimizer': adamw(student, cfg['lr']), 'fake_optimizer': adamw(fake, cfg['fake_lr'])}


def save(path, state, cfg, dataset, done, history):
    student, fake = common.unwrap(state['student']), common.unwrap(state['fake'])
    common.save_checkpoint(path, {
        'kind': 'student', 'method': 'idlm', 'teacher': cfg['teacher'], 'config': cfg,
        'model_config': asdict(student.config), 'model': student.state_dict(), 'ema': state['ema'].state_dict(),
        'optimizer': state['optimizer'].state_dict(), 'fake': fake.state_dict(),
        'fake_optimizer': state['fake_optimizer'].state_dict(),
        'iter': done, 'rng': common.rng_state(), 'history': history, 'data_meta': dataset.meta,
    })


def resume_from(path, cfg, state, rank):
    ckpt = common.load_checkpoint(path)
    if ckpt.get('method') != 'idlm' or ckpt.get('teacher') != cfg['teacher']:
        raise UserError(f"{path} is not an IDLM student of a {cfg['teacher']} teacher; pass another --out_dir")
    for key, name in (('student', 'model'), ('fake', 'fake'), ('optimizer', 'optimizer'),
                      ('fake_optimizer', 'fake_optimizer'), ('ema', 'ema')):
        state[key].load_state_dict(ckpt[name])
    common.set_rng_state(ckpt['rng'], rank)
    return ckpt['iter'], ckpt['history']


def student_sampler(state, kind):
    """The EMA student as sample.generate draws from it: the network, or for SEDD its scores read through its x0."""
    net = state['ema'].averaged_copy(common.unwrap(state['student']))
    return StudentScores(net) if kind == 'sedd' else net


def evaluate(evaluator, state, teacher, cfg, dataset, done, history, out_dir):
    """Rows of the EMA student at every budget, and best.pt: the evaluated student with the lowest GenPPL at the
    largest budget among those within entropy_tolerance of the teacher's entropy at its most steps (which needs a
    GenPPL: the synthetic language's, or a judge's; the teacher's reference row is drawn once, at the first call)."""
    rows = evaluator.periodic(history, done, {'EMA': (student_sampler(state, cfg['teacher']), None)})
    if not (cfg['keep_best'] and evaluator.has_genppl()):
        return
    if 'reference' not in history:
        history['reference'] = evaluator.reference(teacher, evaluator.teacher_steps())
    largest = max(rows, key=lambda r: r['steps'])
    if evaluation.better(largest, history.get('best'), history['reference'], cfg['entropy_tolerance']):
        history['best'] = {'iter': done, **largest}
        save(os.path.join(out_dir, 'best.pt'), state, cfg, dataset, done, history)
        tqdm.write(f"best.pt <- iteration {done}: within {cfg['entropy_tolerance']:.0%} of the teacher's entropy at "
                   f"{history['reference']['steps']} steps, lowest GenPPL so far")


def final_table(evaluator, state, teacher, cfg, history, out_dir):
    """The last EMA student, and best.pt when it is another iteration's, against the teacher (eval.Evaluator.final);
    Duo also with the greedy tail."""
    students = [(f"IDLM student @{cfg['max_iters']} (EMA, last)", student_sampler(state, cfg['teacher']), None)]
    best = history.get('best')
    if best and best['iter'] != cfg['max_iters']:
        best_net = load_sampler(os.path.join(out_dir, 'best.pt'), evaluator.bench.device)[0]
        students.append((f"IDLM student @{best['iter']} (EMA, best.pt)", best_net, None))
    elif best:
        print(f"best.pt holds the last iteration's student ({cfg['max_iters']})")
    elif cfg['keep_best'] and evaluator.has_genppl():
        print(f"no evaluation came within {cfg['entropy_tolerance']:.0%} of the teacher's entropy at no worse "
              f"GenPPL, so there is no best.pt")
    evaluator.final(teacher, students, out_dir, history, (False, True) if cfg['teacher'] == 'duo' else (False,))


# ----------------------------------------------------------------------------------------------------------------
# The alternating loop (Algorithm 1)

def distill(cfg):
    """Distill with config dict cfg (DEFAULTS overridden). Returns the student checkpoint's path."""
    rank, world, device = common.setup_distributed(cfg['device'], cfg['dist_timeout'])
    check_config(cfg, world)
    master = rank == 0
    dataset = train.open_data(cfg['data'], rank, world)
    out_dir = cfg['out_dir'] or os.path.join('out', f"idlm-{cfg['teacher']}-{common.folder_name(cfg['data'])}")
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')

    teacher, net, teacher_ckpt = train.load_teacher(cfg['teacher_ckpt'], cfg['teacher'], dataset, cfg['data'],
                                                    cfg['device'], cfg['init'], KINDS)
    cfg = {**cfg, **train.duo_schedule(teacher_ckpt)}   # saved with the student: sample.py rebuilds Duo's alpha(t)
    objective = train.teacher_objective({**train.DEFAULTS, **cfg}, dataset.vocab_size)
    torch.manual_seed(cfg['seed'] + rank)  # only dropout draws from the global RNG; the data noise is seeded per step
    teacher = teacher.to(device) if isinstance(teacher, torch.nn.Module) else teacher
    # §3.3: student and fake are copies of the teacher. The student runs without dropout (eval mode, gradients on):
    # its samples are those of the sampler it becomes, which has no dropout; the fake's mode is set per phase
    student, fake = (copy.deepcopy(net).to(device).eval().requires_grad_(True) for _ in range(2))
    state = make_state(student, fake, cfg)
    start, history = 0, {'train': [], 'eval': []}
    if common.resume_point(ckpt_path, cfg['resume'], rank, world, device):
        start, history = resume_from(ckpt_path, cfg, state, rank)
        if master:
            print(f"resuming {ckpt_path} at iteration {start}")
    if world > 1:  # two wrappers: each all-reduces only in its own phase
        state.update(student=DDP(student), fake=DDP(fake))
    schedule = objective if cfg['teacher'] == 'duo' else 'loglinear'
    evaluator = evaluation.make_evaluator(cfg, dataset, cfg['teacher'], device, schedule)
    if master and 'best' not in history and os.path.exists(os.path.join(out_dir, 'best.pt')):
        os.remove(os.path.join(out_dir, 'best.pt'))  # an earlier run's would pass for this run's choice
    if master:
        print(f"IDLM-{cfg['teacher']}: teacher {cfg['teacher_ckpt'] or 'default'}, {net.num_params() / 1e6:.2f}M "
              f"parameters, data {dataset.path} (N={dataset.vocab_size}, L={dataset.seq_len}), global batch "
              f"{cfg['batch_size'] * cfg['grad_accum']}, {world} process(es), {device}")

    window, t0 = [], time.time()   # per-iteration numbers since the last log line, averaged into one row
    bar = tqdm(range(start, cfg['max_iters']), initial=start, total=cfg['max_iters'], disable=not master,
               desc=f"IDLM {cfg['teacher']}", dynamic_ncols=True, mininterval=5)
    for it in bar:
        window.append(iteration(state, teacher, objective, dataset, cfg, it, rank, world, device, ckpt_path))
        done = it + 1
        last = done == cfg['max_iters']
        if last or common.every(done, cfg['log_every']):
            row = dict(zip(LOGGED, torch.tensor(window, dtype=torch.float64).mean(0).tolist()))
            history['train'].append({'iter': done, **row, 'lr': common.learning_rate(it, cfg['lr'], cfg['warmup_iters']),
                                     'minutes': (time.time() - t0) / 60})
            window = []
            bar.set_postfix(gap=f"{row['gap']:.4f}", teacher=f"{row['teacher_loss']:.3f}",
                            fake=f"{row['fake_loss']:.3f}", gnorm=f"{row['student_grad_norm']:.2f}")
        if evaluator and master and (last or common.every(done, cfg['eval_interval'])):
            evaluate(evaluator, state, teacher, cfg, dataset, done, history, out_dir)
        if master and (last or common.every(done, cfg['ckpt_interval'])):
            save(ckpt_path, state, cfg, dataset, done, history)
            common.save_history(out_dir, history)
    bar.close()
    if evaluator and master:
        final_table(evaluator, state, teacher, cfg, history, out_dir)
    return ckpt_path


def main(argv=None):
    return distill(common.configure(DEFAULTS, argv))


if __name__ == '__main__':
    common.run(main)
