"""
IDLM: inverse distillation of a diffusion language model (MDLM, Duo or SEDD-absorb) into a few-step student.

    python distill_idlm.py --teacher mdlm                       # CPU default: 4.5 min (+ 10 for the teacher if absent)
    torchrun --standalone --nproc_per_node=2 distill_idlm.py --teacher mdlm --grad_accum 2 --batch_size 32
    python distill_idlm.py --teacher duo --teacher_ckpt out/duo-synthetic --eval_steps 4,8,16,64
    python distill_idlm.py --teacher mdlm --resume true         # continue out_dir/ckpt.pt exactly where it stopped

Three networks of one architecture (IDLM §3.3): the frozen teacher f*, a fake f_hat and the student G_theta,
the last two copied from the teacher. With L_discr the teacher's own loss (losses.py), the student minimises
(IDLM eq. 8)   L(theta) = E_{x0 ~ p_theta}[L_discr(f*, x0)] - min_f E_{x0 ~ p_theta}[L_discr(f, x0)],
which is >= KL(p_theta || p*) and zero iff p_theta = p* (Theorem 3.1; tests/test_idlm.py checks it by enumeration).
The inner min is tracked by the fake in alternation (Algorithm 1, App. E); each iteration:
  1. eq. 10, `fake_steps` times: x0 = G_theta(x_t~, t~) without gradient, noisy = corrupt(x0, t); minimise
     L_discr(f_hat, x0) on noisy over f_hat: the fake learns to denoise the student's own samples.
  2. eq. 11: fresh (x_t~, t~), x0 = G_theta(x_t~, t~), noisy = corrupt(x0, t) ONCE, and minimise
     L_discr(f*, x0) - L_discr(f_hat, x0) over theta, teacher and fake scored on the same noisy sample.
Multistep student (App. C.2): G_theta eats (x_t~, t~), the forward process of a REAL sequence x0~ at t~ ~ U[0, 1]
(Duo: the soft input softmax(w/tau)), and returns x0 probabilities over the N real tokens (simplex relaxation,
§3.2), so it samples in K steps exactly like the teacher (python sample.py --ckpt out/idlm-mdlm-synthetic).
  MDLM  exp of its SUBS log-probs without the mask column (one-hot carry-over at unmasked positions).
  Duo   exp of its 'x0' head.
  SEDD  the student is the SEDD network; at a masked position s_y = x0_y / expm1(sigma_bar), so x0 = softmax of
        its log-scores over y != mask (carry-over at unmasked positions). The loss never sees the scores' total
        mass, so it is sampled through this x0 (sample.StudentScores: the SEDD analytic step with the implied
        exact-mass score, which is the MDLM ancestral step), not through its raw scores.
Where the gradient reaches theta (App. C.1): MDLM / SEDD-absorb draw x_t ~ q(. | sg(x0)) (a masked token does not
depend on x0, an unmasked one scores zero), so it flows only through the soft target x0 in the loss; Duo
reparameterises w_t = a x0 + s eps (eq. 22-23), so it flows through the fake's and teacher's input as well.
The fake's parameters are frozen during step 2 (its output stays differentiable in its input), and under torchrun
student and fake have separate DDP wrappers, each doing forward + backward only in its own phase.
Logged every log_every iterations: teacher loss, fake loss, their gap, gradient norms. The gap is NOT a
convergence signal (it oscillates around zero and may go negative, as in SiD); judge the run by the EMA student's
GenPPL and entropy at K steps, evaluated every eval_interval iterations, in the final table (results.md) against
the teacher at --teacher_steps, and plotted against iterations (history.png). On this small teacher the student keeps
lowering GenPPL by giving up entropy (IDLM's bound is a reverse KL, which seeks modes), so the run also keeps
best.pt: the evaluated EMA snapshot with the lowest GenPPL among those within --entropy_tolerance of the teacher's
entropy, chosen on one noise stream and reported in the table on another.
"""

import copy
import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import train
from common import UserError
from data import ensure_data, load_data
from eval import evaluate_samples, format_row, genppl_key, markdown_table
from losses import DuoObjective
from processes import sample_time
from sample import StudentScores, generate, generate_rgas, load_sampler

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value; a positional argument is a config file of `key = value` lines)
teacher = 'mdlm'          # mdlm | duo | sedd
teacher_ckpt = ''         # default: out/<teacher>-<data folder name>/ckpt.pt, trained first if absent on 'synthetic';
                          # or an official teacher (HF folder, SEDD run folder, Lightning .ckpt: official.py)
data = 'synthetic'        # the real data x0~ the student's inputs are made from (App. C.2)
out_dir = ''              # default: out/idlm-<teacher>-<data folder name>
batch_size = 64           # sequences per micro-batch per process
grad_accum = 1            # micro-batches per phase in total; must be divisible by the number of processes
max_iters = 150           # student updates (each after fake_steps fake updates). The CPU default stops early: the
                          # student keeps lowering GenPPL but sheds entropy past ~150 (README: IDLM, the sweep)
lr = 1e-4                 # student; the paper uses 1e-6 (3e-7 SEDD) for 169M models and far longer runs
fake_lr = 1e-4
warmup_iters = 20         # linear warm-up, then constant (IDLM App. F)
fake_steps = 1            # fake updates per student update (eq. 10 before eq. 11)
beta2 = 0.999
weight_decay = 0.0
grad_clip = 0.0           # 0: off, as in the paper; gradient norms are logged either way
ema = 0.99                # EMA of the student: evaluated and saved as 'ema' (the paper: 0.9999 over far more steps)
eval_interval = 50        # iterations between evaluations of the EMA student (and at the end)
eval_steps = '4,8,16'     # K-step budgets
teacher_steps = '1024'    # extra budgets for the teacher in the final table: the many-step reference to match
keep_best = True          # also keep best.pt: among the periodic evaluations, the EMA student with the lowest GenPPL
                          # at the largest --eval_steps whose entropy is within entropy_tolerance of the teacher's at
                          # its most steps (the student trades entropy for GenPPL as it trains: README, IDLM)
entropy_tolerance = 0.02
eval_samples = 256        # sequences per budget; 0 skips evaluation and the final table. At 128 the entropy of one
                          # model moved by 1.1% between two noise streams, half the 2% tolerance
judge = ''                # an AR checkpoint (train.py --teacher ar) for judge GenPPL; '' = none
ckpt_interval = 200
log_every = 50
seed = 0
device = 'auto'
resume = False
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

KINDS = ('mdlm', 'duo', 'sedd')
LOGGED = ('gap', 'teacher_loss', 'fake_loss', 'fake_train_loss', 'student_grad_norm', 'fake_grad_norm')


# ----------------------------------------------------------------------------------------------------------------
# The student as a generator of x0 probabilities (App. C.2), and the two losses (eq. 10, 11)

def student_input(objective, x_data, generator):
    """SamplingFunc of Algorithm 1: t~ ~ U[eps, 1] (stratified) and x_t~ ~ q(. | x0~) for a real batch x_data
    (B, L); for Duo the network input is the soft softmax(w_t~ / tau). -> Noisy"""
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


def fake_loss(student, fake, objective, x_data, generator):
    """eq. 10: the teacher's own loss for the fake on the student's samples; theta gets no gradient."""
    with torch.no_grad():
        x0 = student_x0(student, objective, student_input(objective, x_data, generator))
    noisy = objective.corrupt(x0, sample_time(len(x0), generator=generator, device=x0.device), generator)
    return objective.loss(fake(noisy.input, noisy.sigma), x0, noisy).mean()


def idlm_gap(teacher, fake, objective, x0, noisy):
    """eq. 11 for given x0 and ONE noisy sample of it: (L_discr(f*, x0) - L_discr(f_hat, x0), teacher loss, fake
    loss), per-token means. Teacher and fake parameters get no gradient; x0 does (the target, and Duo's input)."""
    teacher_loss = objective.loss(teacher(noisy.input, noisy.sigma), x0, noisy).mean()
    with frozen(fake):
        fake_loss = objective.loss(fake(noisy.input, noisy.sigma), x0, noisy).mean()
    return teacher_loss - fake_loss, teacher_loss, fake_loss


def student_loss(student, teacher, fake, objective, x_data, generator):
    """eq. 11 on a real batch: x0 = G_theta(x_t~, t~), corrupted once, scored by teacher and fake."""
    x0 = student_x0(student, objective, student_input(objective, x_data, generator))
    noisy = objective.corrupt(x0, sample_time(len(x0), generator=generator, device=x0.device), generator)
    return idlm_gap(teacher, fake, objective, x0, noisy)


# ----------------------------------------------------------------------------------------------------------------
# One phase of an iteration: micro-batches, backward, all-reduce, optimizer step

def micro_batches(dataset, cfg, it, phase, rank, world, device):
    """This rank's micro-batches of one phase: (real x0~ (B, L), generator). The generator is seeded by (seed,
    iteration, phase, global micro-batch index), so 1 and N processes, and a resumed run, see the same batch."""
    local = cfg['grad_accum'] // world
    for micro in range(local):
        gen = common.step_generator(cfg['seed'], it, phase, rank * local + micro, device=device)
        idx = torch.randint(len(dataset.train), (cfg['batch_size'],), generator=gen, device=device).cpu()
        yield dataset.batch('train', idx).to(device), gen


def accumulate(model, batches, loss_fn, n, device):
    """Backpropagate the mean of loss_fn(x, gen)[0] over n micro-batches (DDP all-reduces on the last one).
    Returns the mean of every value loss_fn returns, as a float64 tensor."""
    total = 0
    for i, (x, gen) in enumerate(batches):
        sync = i == n - 1 or not isinstance(model, DDP)
        with (nullcontext() if sync else model.no_sync()), common.autocast(device):
            losses = loss_fn(x, gen)
            (losses[0] / n).backward()
        total = total + torch.stack([l.detach().double() for l in losses]) / n
    return total


def update(model, optimizer, lr, grad_clip):
    """Set the lr, clip (if grad_clip > 0), step, zero the gradients. Returns the gradient norm."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def check_finite(values, what, it, ckpt_path):
    if not torch.isfinite(values).all():
        raise UserError(f"the {what} loss became {values.tolist()} at iteration {it}; lower --lr and --fake_lr "
                        f"(the last good checkpoint is {ckpt_path})")


def iteration(state, teacher, objective, dataset, cfg, it, rank, world, device, ckpt_path=''):
    """One iteration of Algorithm 1: `fake_steps` fake updates (eq. 10), one student update (eq. 11), the EMA.
    state holds student, fake (DDP-wrapped under torchrun), their optimizers and the EMA. Returns the LOGGED values."""
    student, fake, local = state['student'], state['fake'], cfg['grad_accum'] // world
    lr_student = common.learning_rate(it, cfg['lr'], cfg['warmup_iters'])
    lr_fake = common.learning_rate(it, cfg['fake_lr'], cfg['warmup_iters'])
    # 1. eq. 10: the fake follows the student's current distribution (student forward without gradient)
    for j in range(cfg['fake_steps']):
        fake_fn = lambda x, g: (fake_loss(common.unwrap(student), fake, objective, x, g),)
        fake_stats = accumulate(fake, micro_batches(dataset, cfg, it, 1 + j, rank, world, device), fake_fn,
                                local, device)
        fake_stats = common.all_reduce_mean(fake_stats, world)
        check_finite(fake_stats, 'fake', it, ckpt_path)
        fake_norm = update(fake, state['fake_optimizer'], lr_fake, cfg['grad_clip'])
    # 2. eq. 11: the student lowers teacher-minus-fake loss; the fake (unwrapped: no DDP) is frozen inside
    student_fn = lambda x, g: student_loss(student, teacher, common.unwrap(fake), objective, x, g)
    stats = accumulate(student, micro_batches(dataset, cfg, it, 0, rank, world, device), student_fn, local, device)
    stats = common.all_reduce_mean(stats, world)
    check_finite(stats, 'IDLM', it, ckpt_path)
    student_norm = update(student, state['optimizer'], lr_student, cfg['grad_clip'])
    state['ema'].update(student)
    return [*stats.tolist(), fake_stats[0].item(), student_norm, fake_norm]


# ----------------------------------------------------------------------------------------------------------------
# Setup: the teacher (trained first if absent), the three networks, checkpoints

def make_state(student, fake, cfg):
    """What iteration() updates: student and fake, their AdamW optimizers and the student's EMA."""
    betas = (0.9, cfg['beta2'])
    return {'student': student, 'fake': fake, 'ema': common.EMA(student, cfg['ema']),
            'optimizer': torch.optim.AdamW(student.parameters(), cfg['lr'], betas, weight_decay=cfg['weight_decay']),
            'fake_optimizer': torch.optim.AdamW(fake.parameters(), cfg['fake_lr'], betas,
                                                weight_decay=cfg['weight_decay'])}


def every(done, interval):
    return interval > 0 and done % interval == 0


def folder_name(data):
    return os.path.basename(os.path.normpath(data))


def train_teacher(cfg, path):
    """train.py with its CPU defaults for this teacher; under torchrun its global batch is split over processes."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    if int(os.environ.get('RANK', 0)) == 0:
        print(f"no teacher at {path}: training one first, as python train.py --teacher {cfg['teacher']} would")
    train.train({**train.DEFAULTS, 'teacher': cfg['teacher'], 'data': cfg['data'], 'device': cfg['device'],
                 'out_dir': os.path.dirname(path), 'grad_accum': world,
                 'batch_size': max(1, train.DEFAULTS['batch_size'] // world)})


def load_teacher(path, cfg, dataset):
    """The frozen teacher f* (EMA weights, eval mode) and its checkpoint, checked against --teacher and --data."""
    teacher, ckpt = common.load_model(path, which='ema')
    kind = ckpt.get('teacher')
    if kind == 'ar':
        raise UserError(f"{path} holds an autoregressive model, which IDLM cannot distill; pass an mdlm, duo or "
                        f"sedd --teacher_ckpt")
    if kind != cfg['teacher']:
        raise UserError(f"{path} holds a {kind!r} teacher, not --teacher {cfg['teacher']}; pass --teacher {kind} "
                        f"or another --teacher_ckpt")
    check_teacher_data(path, ckpt, dataset, cfg['data'])
    teacher.eval().requires_grad_(False)
    return teacher, ckpt


def check_teacher_data(path, ckpt, dataset, data):
    """The teacher must have been trained on data of this vocabulary and length (shared with distill_didi.py)."""
    meta = ckpt['data_meta']
    if (meta['vocab_size'], meta['seq_len']) != (dataset.vocab_size, dataset.seq_len):
        raise UserError(f"{path} was trained on data of {meta['vocab_size']} tokens and length {meta['seq_len']}, "
                        f"but --data {data} has {dataset.vocab_size} tokens and length {dataset.seq_len}; "
                        f"pass the teacher's --data or another --teacher_ckpt")


def save(path, state, cfg, dataset, done, history):
    student, fake = common.unwrap(state['student']), common.unwrap(state['fake'])
    common.save_checkpoint(path, {
        'kind': 'student', 'method': 'idlm', 'teacher': cfg['teacher'], 'config': cfg,
        'model_config': asdict(student.config), 'model': student.state_dict(), 'ema': state['ema'].state_dict(),
        'optimizer': state['optimizer'].state_dict(), 'fake': fake.state_dict(),
        'fake_optimizer': state['fake_optimizer'].state_dict(), 'iter': done, 'rng': common.rng_state(),
        'history': history, 'data_meta': dataset.meta,
    })


def resume_from(path, cfg, state):
    ckpt = common.load_checkpoint(path)
    if ckpt.get('method') != 'idlm' or ckpt.get('teacher') != cfg['teacher']:
        raise UserError(f"{path} is not an IDLM student of a {cfg['teacher']} teacher; pass another --out_dir")
    state['student'].load_state_dict(ckpt['model'])
    state['fake'].load_state_dict(ckpt['fake'])
    state['optimizer'].load_state_dict(ckpt['optimizer'])
    state['fake_optimizer'].load_state_dict(ckpt['fake_optimizer'])
    state['ema'].load_state_dict(ckpt['ema'])
    common.set_rng_state(ckpt['rng'])
    return ckpt['iter'], ckpt['history']


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: K-step samples in float64 (sample.py), scored by eval.py's metrics

def budgets(text):
    return [int(s) for s in text.split(',') if s]


def sample_rows(label, net, kind, schedule, dataset, language, judge, cfg, device, steps=None, disc=None, stream=1):
    """One row per K in steps (default --eval_steps): NFE, true GenPPL (synthetic data), entropy, judge GenPPL (with
    --judge), seconds per sequence. With a discriminator disc (distill_didi.py), the samples come from RGAS
    (cfg's rgas_h, rgas_tilt, rgas_candidates). Every model sees the same noise at a given K and stream: stream 1
    for the final table, stream 2 for the periodic evaluations that pick best.pt (so the table is not the sample
    the choice was made on)."""
    rows, N, L = [], dataset.vocab_size, dataset.seq_len
    for K in steps or budgets(cfg['eval_steps']):
        gen, start = common.step_generator(cfg['seed'] + stream, K, device=device), time.time()
        if disc is None:
            x, nfe = generate(net, kind, cfg['eval_samples'], L, K, N, gen, batch_size=cfg['batch_size'],
                              schedule=schedule, progress=True)
        else:
            x, nfe = generate_rgas(net, disc, cfg['eval_samples'], L, K, N, gen, batch_size=cfg['batch_size'],
                                   h_max=cfg['rgas_h'], tilt_fraction=cfg['rgas_tilt'],
                                   candidates=cfg['rgas_candidates'])
        rows.append({'model': label, 'steps': K, 'nfe': nfe, **evaluate_samples(x.cpu(), language, judge, N),
                     'sec_per_seq': (time.time() - start) / len(x)})
        tqdm.write(format_row(rows[-1]))
    return rows


def ema_student(student, ema, kind):
    """A copy of the student carrying the EMA weights, ready for sample.generate (SEDD: read through its x0)."""
    net = copy.deepcopy(common.unwrap(student)).eval()
    ema.copy_to(net)
    return StudentScores(net) if kind == 'sedd' else net


def load_judge(cfg, N, device):
    if not cfg['judge']:
        return None
    judge, _ = common.load_model(cfg['judge'])
    if judge.config.head != 'ar' or judge.config.vocab_size != N + 1:
        raise UserError(f"--judge {cfg['judge']} is not an AR model over this data's {N} tokens; "
                        f"train one with python train.py --teacher ar --data {cfg['data']}")
    return judge.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# The alternating loop (Algorithm 1)

def distill(cfg):
    """Distill with config dict cfg (DEFAULTS overridden). Returns the student checkpoint's path."""
    if cfg['teacher'] not in KINDS:
        raise UserError(f"unknown --teacher {cfg['teacher']!r}; IDLM distills one of {', '.join(KINDS)}")
    teacher_path = cfg['teacher_ckpt'] or os.path.join('out', f"{cfg['teacher']}-{folder_name(cfg['data'])}", 'ckpt.pt')
    if not cfg['teacher_ckpt'] and not os.path.exists(teacher_path) and cfg['data'] == 'synthetic':
        train_teacher(cfg, teacher_path)
    rank, world, device = common.setup_distributed(cfg['device'])
    master = rank == 0
    if cfg['fake_steps'] < 1:
        raise UserError("--fake_steps must be at least 1: the fake has to follow the student (eq. 10)")
    if cfg['grad_accum'] % world:
        raise UserError(f"--grad_accum {cfg['grad_accum']} is not divisible by the {world} processes; "
                        f"use a multiple of {world} so every process gets the same number of micro-batches")
    if master:
        ensure_data(cfg['data'])  # prepares 'synthetic' or 'pydoc' on first use, once
    if world > 1:
        dist.barrier()
    dataset = load_data(ensure_data(cfg['data']))
    N = dataset.vocab_size
    out_dir = cfg['out_dir'] or os.path.join('out', f"idlm-{cfg['teacher']}-{folder_name(cfg['data'])}")
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')

    teacher, teacher_ckpt = load_teacher(teacher_path, cfg, dataset)
    # Duo's schedule travels with the student, so sample.py and eval.py rebuild the teacher's from its config
    teacher_cfg = train.stored_config(teacher_ckpt['config'])
    cfg = {**cfg, **{k: teacher_cfg[k] for k in ('duo_gamma_min', 'duo_gamma_max', 'duo_spacing')}}
    objective = train.teacher_objective({**train.DEFAULTS, **cfg}, N)
    schedule = objective if cfg['teacher'] == 'duo' else 'loglinear'
    torch.manual_seed(cfg['seed'] + rank)  # only dropout draws from the global RNG; the data noise is seeded per step
    teacher = teacher.to(device)
    student, fake = (copy.deepcopy(teacher).train().requires_grad_(True) for _ in range(2))  # §3.3: both from f*
    state = make_state(student, fake, cfg)
    start, history = 0, {'train': [], 'eval': []}
    if cfg['resume'] and os.path.exists(ckpt_path):
        start, history = resume_from(ckpt_path, cfg, state)
        if master:
            print(f"resuming {ckpt_path} at iteration {start}")
    if world > 1:  # two wrappers: each all-reduces only in its own phase
        student, fake = DDP(student), DDP(fake)
        state.update(student=student, fake=fake)
    judge, language = load_judge(cfg, N, device), dataset.language()
    evaluate = cfg['eval_samples'] > 0 and any(cfg['eval_steps'].split(','))

    def rows_at_budgets(label, net, steps=None, stream=1):
        return sample_rows(label, net, cfg['teacher'], schedule, dataset, language, judge, cfg, device, steps,
                           stream=stream)

    best_path = os.path.join(out_dir, 'best.pt')
    if master and 'best' not in history and os.path.exists(best_path):
        os.remove(best_path)  # from an earlier run in this out_dir: it would pass for this run's choice
    # best.pt needs a GenPPL (the synthetic language's, or a --judge's) and the teacher's many-step row to stay near;
    # without a GenPPL (e.g. OpenWebText scored by GPT-2 afterwards) that teacher run would be wasted
    keep_best = evaluate and cfg['keep_best'] and (language is not None or judge is not None)
    if keep_best and master and 'reference' not in history:
        history['reference'] = rows_at_budgets(f"teacher {cfg['teacher']}", teacher, teacher_budgets(cfg)[-1:], 2)[0]

    if master:
        print(f"IDLM-{cfg['teacher']}: teacher {teacher_path}, {teacher.num_params() / 1e6:.2f}M parameters x 3, "
              f"data {dataset.path} (N={N}, L={dataset.seq_len}), global batch {cfg['batch_size'] * cfg['grad_accum']},"
              f" {world} process(es), {device}")
    window, t0 = [], time.time()   # per-iteration numbers since the last log line, averaged into one row
    bar = tqdm(range(start, cfg['max_iters']), initial=start, total=cfg['max_iters'], disable=not master,
               desc=f"IDLM {cfg['teacher']}", dynamic_ncols=True, mininterval=5)
    for it in bar:
        window.append(iteration(state, teacher, objective, dataset, cfg, it, rank, world, device, ckpt_path))

        done = it + 1
        if done == cfg['max_iters'] or every(done, cfg['log_every']):
            means = torch.tensor(window, dtype=torch.float64).mean(0).tolist()
            lr = common.learning_rate(it, cfg['lr'], cfg['warmup_iters'])
            row = {'iter': done, **dict(zip(LOGGED, means)), 'lr': lr, 'minutes': (time.time() - t0) / 60}
            history['train'].append(row)
            window = []
            bar.set_postfix(gap=f"{row['gap']:.4f}", teacher=f"{row['teacher_loss']:.3f}",
                            fake=f"{row['fake_loss']:.3f}", gnorm=f"{row['student_grad_norm']:.2f}")
        if evaluate and master and (done == cfg['max_iters'] or every(done, cfg['eval_interval'])):
            net = ema_student(student, state['ema'], cfg['teacher'])
            rows = rows_at_budgets(f"IDLM student @{done} (EMA)", net, stream=2)
            history['eval'] += [{'iter': done, **r} for r in rows]
            largest = max(rows, key=lambda r: r['steps'])
            if keep_best and better(largest, history.get('best'), history['reference'], cfg['entropy_tolerance']):
                history['best'] = {'iter': done, **largest}
                save(best_path, state, cfg, dataset, done, history)
                tqdm.write(f"best.pt <- iteration {done}: within {cfg['entropy_tolerance']:.0%} of the teacher's "
                           f"entropy at {history['reference']['steps']} steps, lowest GenPPL so far")
        if master and (done == cfg['max_iters'] or every(done, cfg['ckpt_interval'])):
            save(ckpt_path, state, cfg, dataset, done, history)
    bar.close()
    if master:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'history.json'), 'w') as f:
            json.dump(history, f, indent=1)
        if evaluate:
            student_rows = rows_at_budgets(f"IDLM student @{cfg['max_iters']} (EMA, last)",
                                           ema_student(student, state['ema'], cfg['teacher']))
            if 'best' in history and history['best']['iter'] != cfg['max_iters']:
                best, *_ = load_sampler(best_path, device)
                student_rows += rows_at_budgets(f"IDLM student @{history['best']['iter']} (EMA, best.pt)", best)
            elif 'best' in history:
                print(f"best.pt holds the last iteration's student ({cfg['max_iters']})")
            elif keep_best:
                print(f"no evaluation came within {cfg['entropy_tolerance']:.0%} of the teacher's entropy at no "
                      f"worse GenPPL, so there is no best.pt")
            teacher_rows = rows_at_budgets(f"teacher {cfg['teacher']}", teacher, teacher_budgets(cfg))
            rows = results_table(teacher_rows + student_rows, dataset, language, judge, cfg, out_dir,
                                 cfg['entropy_tolerance'])
            plot_history(history, rows, os.path.join(out_dir, 'history.png'), cfg['entropy_tolerance'])
    return ckpt_path


def matches(row, reference, tolerance):
    """The target: GenPPL no worse than the reference's (the teacher at its most steps) and entropy at least
    (1 - tolerance) times its entropy. GenPPL is the true one, else the judge's."""
    key = genppl_key(row)
    return key is not None and row[key] <= reference[key] and row['entropy'] >= (1 - tolerance) * reference['entropy']


def better(row, best, reference, tolerance):
    """Does this evaluation row replace best? It must match the reference; then the lower GenPPL wins."""
    return matches(row, reference, tolerance) and (best is None or row[genppl_key(row)] < best[genppl_key(row)])


def teacher_budgets(cfg):
    return sorted(set(budgets(cfg['eval_steps']) + budgets(cfg['teacher_steps'])))


def most_steps_teacher(rows):
    """The teacher's row with the most steps: the reference a student is judged against (None without one)."""
    return max((r for r in rows if r['model'].startswith('teacher')), key=lambda r: r['steps'], default=None)


def verdicts(rows, tolerance):
    """One line per plain student row: its GenPPL and entropy against the teacher's row with the most steps, and
    whether it matches() it."""
    teacher = most_steps_teacher(rows)
    key = genppl_key(teacher) if teacher is not None else None
    lines = []
    for r in rows:
        if key is None or r['model'].startswith(('teacher', 'data')) or 'RGAS' in r['model']:
            continue
        change = 100 * (r['entropy'] / teacher['entropy'] - 1)
        lines.append(f"- {r['model']} at {r['steps']} steps: GenPPL {r[key]:.3f} vs {teacher[key]:.3f}, entropy "
                     f"{r['entropy']:.3f} vs {teacher['entropy']:.3f} ({change:+.2f}%) against the teacher at "
                     f"{teacher['steps']} steps: {'matched' if matches(r, teacher, tolerance) else 'not matched'}")
    return lines


def results_table(rows, dataset, language, judge, cfg, out_dir, tolerance=0.02):
    """Teacher and (EMA) student rows, below the held-out data's own row, and verdicts (GenPPL no worse, entropy
    within tolerance of the teacher at its most steps): printed, and saved as out_dir/results.md (eval.py's table)."""
    reference = dataset.batch('val', torch.arange(min(cfg['eval_samples'], len(dataset.val))))
    rows = [{'model': 'data (held out)', 'steps': 0, **evaluate_samples(reference, language, judge,
                                                                       dataset.vocab_size)}] + rows
    table = markdown_table(rows, language) + '\n' + '\n'.join(verdicts(rows, tolerance)) + '\n'
    with open(os.path.join(out_dir, 'results.md'), 'w') as f:
        f.write(table)
    print('\n' + table)
    return rows


def plot_history(history, rows, path, tolerance=0.02):
    """GenPPL and entropy of the EMA student against iterations, one line per K (RGAS dashed), with the teacher at
    its most steps (from the final rows) as the line to match (entropy: and the tolerance band below it). Skipped
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    evals = history['eval']
    key = genppl_key(evals[0]) if evals else None
    teacher = most_steps_teacher(rows)
    panels = ([key] if key else []) + ['entropy']
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, k in zip(axes[0], panels):
        for guided in (False, True):
            for K in sorted({r['steps'] for r in evals}):
                pts = [(r['iter'], r[k]) for r in evals if r['steps'] == K and ('RGAS' in r['model']) == guided]
                if pts:
                    ax.plot(*zip(*pts), marker='o', ls='--' if guided else '-',
                            label=f"student, {K} steps{', RGAS' if guided else ''}")
        if teacher is not None:
            ax.axhline(teacher[k], color='k', ls=':', lw=1.5, label=f"teacher, {teacher['steps']} steps")
            if k == 'entropy':
                ax.axhspan((1 - tolerance) * teacher[k], teacher[k], color='k', alpha=0.08,
                           label=f"within {tolerance:.0%} of the teacher")
        ax.set_xlabel('iteration')
        ax.set_ylabel({'genppl_true': 'true GenPPL', 'genppl_judge': 'judge GenPPL', 'entropy': 'entropy (nats)'}[k])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    return distill(common.configure(DEFAULTS, argv))


if __name__ == '__main__':
    common.run(main)
