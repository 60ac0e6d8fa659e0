"""
Round-based step distillation, the baseline both papers compare against: the student learns to do in one step what
its teacher does in two; after each round the raw student becomes the teacher and the step doubles.

    python distill_sdtt.py --teacher mdlm                  # SDTT (Deschenaux & Gulcehre 2024) on an MDLM teacher
    python distill_sdtt.py --teacher duo                   # Duo's DCD (discrete consistency distillation)
    torchrun --standalone --nproc_per_node=2 distill_sdtt.py --teacher mdlm --grad_accum 2 --batch_size 32
    python distill_sdtt.py --teacher mdlm --teacher_ckpt exact    # round 1 from the exact denoiser
    python distill_idlm.py --teacher duo --teacher_ckpt out/dcd-duo-synthetic      # then IDLM-DCD (IDLM's best row)

Rounds. Round r (r = 0, 1, ...) has a teacher that samples in K_r = start_steps / 2^r steps, so dt = 1 / K_r, and
trains the student to sample in K_r / 2; rounds run until the student's budget is min_steps, with max_iters split
evenly among them. At a round's end the student (its EMA) is saved as round<r>.pt, a checkpoint that samples and can
be distilled further like any teacher, and the RAW student weights become the teacher (SDTT's default: no EMA, no
optimizer reset). Student and teacher start as copies of the teacher checkpoint (or of --init).

SDTT (--teacher mdlm; the public code's multi_round_sdtt.py). From x_t, t ~ U(0, 1], the teacher takes two MDLM
ancestral steps t -> t - dt -> t - 2 dt (sample.mdlm_step, clamped at 0). Each position masked in x_t gets as target
the teacher's x0 log-probabilities of the step that unmasked it: the first step's prediction if it unmasked in step
1, else the second step's (also for positions still masked after both, as SDTT does). The student makes one forward
at x_t and matches the targets at the positions masked in x_t:
    kl_bwd  KL(student || target), the default;  kl_fwd  KL(target || student);
    mse     mean squared error of the probabilities;  tvd  total variation of the probabilities.
(SDTT's own mse and tvd act on log-probabilities; on probabilities they stay finite at tokens of mass ~0.)
Per position the targets carry the teacher's two-step distribution exactly: tests/test_sdtt.py enumerates it.

DCD (--teacher duo; Duo's algo.py::Distillation). t ~ U(0, 1] is moved to t + dt (clamped at 1) and s = t - dt. x_t
and x_s come from the SAME Gaussian noise eps, w_t = a_t x0 + s_t eps and w_s = a_s x0 + s_s eps, each turned into
tokens by argmax (processes.duo_latent); the student sees x_t, the teacher x_s, and the loss is the KL between their
x0 distributions over every position (kl_bwd by default). So the student at t learns to predict what the teacher
predicts a step dt later on the same noise path: a consistency target. Duo students are evaluated with and without
the greedy tail, as the papers report both.

Logged every log_every iterations: the loss, the gradient norm and the round. The EMA student is evaluated at the end
of every round (or every eval_interval iterations) on eval_streams noise streams (eval.py), and the final table
(results.md) sets it against the teacher at --teacher_steps and against the teacher tempered to its entropy
(--eval_temperatures); history.png plots the evaluations.
"""

import copy
import math
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import eval as evaluation
import train
from common import UserError
from data import ensure_data, load_data
from model import DiT, DiTConfig
from processes import alpha_loglinear, duo_latent, sample_time
from sample import mdlm_step

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value; a positional argument is a config file of `key = value` lines)
teacher = 'mdlm'          # mdlm (SDTT) | duo (DCD)
teacher_ckpt = ''         # default: out/<teacher>-<data folder name>/ckpt.pt, trained first if absent on 'synthetic';
                          # an official checkpoint, or 'exact' (MDLM on synthetic data: the exact denoiser is the
                          # teacher of round 1)
init = ''                 # the network the student is copied from; default: the teacher (with 'exact': the trained
                          # default teacher)
data = 'synthetic'
out_dir = ''              # default: out/sdtt-mdlm-<data folder name> or out/dcd-duo-<data folder name>
start_steps = 1024        # the first round's teacher samples in this many steps (dt = 1/start_steps), as SDTT
min_steps = 4             # the last round's student samples in this many steps
batch_size = 64           # sequences per micro-batch per process
grad_accum = 1            # micro-batches per iteration in total; must be divisible by the number of processes
max_iters = 1600          # over all rounds
round_iters = 0           # iterations per round; 0: max_iters split evenly among the rounds (the last round takes any
                          # remainder; a run may also stop before its last round)
lr = 3e-4                 # SDTT's config (3e-4); DCD uses 6e-5 for 169M models
warmup_iters = 20         # linear warm-up at the start of the run only, then constant
beta2 = 0.999
weight_decay = 0.0
grad_clip = 1.0           # DCD's; 0: off
loss = 'kl_bwd'           # kl_bwd | kl_fwd | mse | tvd
ema = 0.99                # EMA of the student: evaluated and saved as 'ema'; the raw student becomes the next teacher
eval_interval = 0         # 0: evaluate the EMA student at the end of every round; N: every N iterations
eval_steps = '4,8,16,32'  # K-step budgets
teacher_steps = '1024'    # extra budgets for the teacher in the final table: the many-step reference
eval_temperatures = '0.8,0.7'  # the teacher also sampled from x0_hat^(1/T) at eval_steps: under each verdict, a line
                          # against the teacher tempered to the student's entropy ('': none; README)
eval_samples = 256        # sequences per budget and noise stream; 0 skips evaluation and the final table
eval_streams = 3          # noise streams per evaluation: each cell is their mean +- sd (eval.py)
eval_batch_size = 64      # sequences generated at once in every evaluation: eval.py's default, so a run's rows are
                          # the rows eval.py prints for the same checkpoint and seed (the draws depend on it)
entropy_tolerance = 0.02  # verdicts: a student may lose this fraction of its teacher's entropy
judge = ''                # an AR checkpoint (train.py --teacher ar) for judge GenPPL; '' = none
ckpt_interval = 200
log_every = 50
seed = 0
device = 'auto'
resume = False
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

KINDS = ('mdlm', 'duo')
LOSSES = ('kl_bwd', 'kl_fwd', 'mse', 'tvd')
FLAGS = '--lr'


# ----------------------------------------------------------------------------------------------------------------
# Rounds: dt doubles, the student becomes the teacher

def num_rounds(cfg):
    """Rounds from a start_steps teacher down to a min_steps student, halving the steps each round."""
    return int(round(math.log2(cfg['start_steps'] / cfg['min_steps'])))


def iters_per_round(cfg):
    return cfg['round_iters'] or cfg['max_iters'] // num_rounds(cfg)


def round_of(it, cfg):
    """The round iteration `it` belongs to (the last round takes the remainder)."""
    return min(it // iters_per_round(cfg), num_rounds(cfg) - 1)


def round_dt(r, cfg):
    """dt of round r: the teacher's step, 1 / K_r with K_r = start_steps / 2^r."""
    return 2.0 ** r / cfg['start_steps']


def round_end(r, cfg):
    """The first iteration after round r (max_iters for the last)."""
    return cfg['max_iters'] if r == num_rounds(cfg) - 1 else (r + 1) * iters_per_round(cfg)


# ----------------------------------------------------------------------------------------------------------------
# SDTT: the teacher's two ancestral steps and the targets they leave (MDLM)

def collect_targets(x_t, x_mid, log_p1, log_p2, mask_id):
    """Each position gets the teacher's x0 log-probabilities of the step that unmasked it: log_p1 (predicted at x_t)
    where x_t is masked and x_mid is not, else log_p2 (predicted at x_mid). -> (B, L, V)"""
    first = (x_t == mask_id) & (x_mid != mask_id)
    return torch.where(first[..., None], log_p1, log_p2)


@torch.no_grad()
def two_step_targets(teacher, x_t, t, dt, generator):
    """The teacher's two ancestral steps t -> t - dt -> t - 2 dt from x_t (B, L), t (B,) float64, clamped at 0.
    -> (targets (B, L, V) log-probs, x after two steps)"""
    mask_id = teacher_mask_id(teacher, x_t)
    alpha = lambda s: alpha_loglinear(s.clamp_min(0.0))[:, None]                 # (B, 1) float64
    times = [t, t - dt, t - 2 * dt]
    log_p1 = teacher(x_t, sigma_of(times[0]))
    x_mid = mdlm_step(log_p1, x_t, alpha(times[1]), alpha(times[0]), generator)
    log_p2 = teacher(x_mid, sigma_of(times[1]))
    x_end = mdlm_step(log_p2, x_mid, alpha(times[2]), alpha(times[1]), generator)
    return collect_targets(x_t, x_mid, log_p1.float(), log_p2.float(), mask_id), x_end


def teacher_mask_id(teacher, x_t):
    config = getattr(teacher, 'config', None)
    return config.mask_id if config is not None else teacher.N


def sigma_of(t):
    """The network's noise input at t (B,): sigma_bar_t = -log alpha_t (MDLM ignores it)."""
    return -torch.log(alpha_loglinear(t.clamp_min(0.0))).float()


def divergence(student, target, kind):
    """Per-position distance between log-prob rows (..., V): kl_bwd KL(s || t), kl_fwd KL(t || s), mse and tvd on
    the probabilities. -> (...)"""
    p, q = student.exp(), target.exp()
    if kind == 'kl_bwd':
        return (p * (student - target)).sum(-1)
    if kind == 'kl_fwd':
        return (q * (target - student)).sum(-1)
    if kind == 'mse':
        return ((p - q) ** 2).sum(-1)
    return 0.5 * (p - q).abs().sum(-1)


def sdtt_loss(student, teacher, objective, x0, dt, generator, kind):
    """SDTT on a real batch x0 (B, L): x_t at t ~ U(0, 1], the teacher's two-step targets, the student's one
    forward at x_t, matched at the masked positions. -> (loss,)"""
    t = sample_time(len(x0), generator=generator, device=x0.device).double()
    x_t = objective.corrupt(x0, t.float(), generator).x_t
    targets, _ = two_step_targets(teacher, x_t, t, dt, generator)
    masked = x_t == objective.mask_id
    per_position = divergence(student(x_t, sigma_of(t)), targets, kind)
    return (per_position * masked).sum() / masked.sum().clamp_min(1),


# ----------------------------------------------------------------------------------------------------------------
# DCD: pairs on one Gaussian noise path (Duo)

def dcd_pair(objective, x0, t, s, generator):
    """x_t and x_s (B, L) from the SAME eps: argmax(a_t x0 + s_t eps) and argmax(a_s x0 + s_s eps) (IDLM eq. 22),
    with sigma = -log alpha for each. -> (x_t, sigma_t, x_s, sigma_s)"""
    onehot = F.one_hot(x0, objective.N).float()
    eps = torch.randn(onehot.shape, generator=generator, device=x0.device)
    out = []
    for time in (t, s):
        gamma = objective.gamma(time)[:, None].float()                                 # (B, 1)
        out += [duo_latent(onehot, gamma, eps).argmax(-1), -torch.log(objective.alpha(time)).float()]
    return tuple(out)


def dcd_loss(student, teacher, objective, x0, dt, generator, kind):
    """DCD on a real batch: t ~ U(0, 1] moved to min(t + dt, 1), s = t - dt; the student at x_t matches the teacher
    at x_s over every position. -> (loss,)"""
    t = (sample_time(len(x0), generator=generator, device=x0.device) + dt).clamp_max(1.0)
    x_t, sigma_t, x_s, sigma_s = dcd_pair(objective, x0, t, t - dt, generator)
    with torch.no_grad():
        target = teacher(x_s, sigma_s).float()
    return divergence(student(x_t, sigma_t), target, kind).mean(),


# ----------------------------------------------------------------------------------------------------------------
# Setup and checkpoints

def check_config(cfg, world):
    evaluation.parse_temperatures(cfg['eval_temperatures'], '--eval_temperatures')   # before any teacher trains
    if cfg['teacher'] not in KINDS:
        raise UserError(f"unknown --teacher {cfg['teacher']!r}; step distillation takes mdlm (SDTT) or duo (DCD)")
    if cfg['loss'] not in LOSSES:
        raise UserError(f"--loss is one of {', '.join(LOSSES)}, not {cfg['loss']!r}")
    ratio = cfg['start_steps'] / max(1, cfg['min_steps'])
    if cfg['min_steps'] < 1 or ratio < 2 or 2 ** round(math.log2(ratio)) != ratio:
        raise UserError(f"--start_steps {cfg['start_steps']} must be a power-of-two multiple (at least 2x) of "
                        f"--min_steps {cfg['min_steps']}: each round halves the steps")
    if iters_per_round(cfg) < 1:
        raise UserError(f"--max_iters {cfg['max_iters']} is fewer than the {num_rounds(cfg)} rounds; give each round "
                        f"at least one iteration (or set --round_iters)")
    common.check_batch(cfg, world)


def make_state(student, cfg):
    betas = (0.9, cfg['beta2'])
    return {'student': student, 'ema': common.EMA(student, cfg['ema']),
            'optimizer': torch.optim.AdamW(student.parameters(), cfg['lr'], betas, weight_decay=cfg['weight_decay'])}


def save(path, state, teacher, cfg, dataset, done, history, kind='student'):
    """A resumable checkpoint; the current teacher's weights travel with it (None while it is the exact denoiser),
    so a resume inside a later round continues from the same teacher."""
    student = common.unwrap(state['student'])
    common.save_checkpoint(path, {
        'kind': kind, 'method': 'sdtt' if cfg['teacher'] == 'mdlm' else 'dcd', 'teacher': cfg['teacher'],
        'config': cfg, 'model_config': asdict(student.config), 'model': student.state_dict(),
        'ema': state['ema'].state_dict(), 'optimizer': state['optimizer'].state_dict(),
        'teacher_model': teacher.state_dict() if isinstance(teacher, torch.nn.Module) else None,
        'round': round_of(done - 1, cfg), 'iter': done, 'rng': common.rng_state(), 'history': history,
        'data_meta': dataset.meta,
    })


def resume_from(path, cfg, state):
    ckpt = common.load_checkpoint(path)
    method = 'sdtt' if cfg['teacher'] == 'mdlm' else 'dcd'
    if ckpt.get('method') != method:
        raise UserError(f"{path} is not a {method.upper()} run of a {cfg['teacher']} teacher; pass another --out_dir")
    state['student'].load_state_dict(ckpt['model'])
    state['optimizer'].load_state_dict(ckpt['optimizer'])
    state['ema'].load_state_dict(ckpt['ema'])
    common.set_rng_state(ckpt['rng'])
    return ckpt['iter'], ckpt['history'], ckpt['teacher_model']


def network_teacher(student, weights=None):
    """A frozen copy of the student (optionally carrying other weights): the next round's teacher."""
    teacher = copy.deepcopy(common.unwrap(student)).eval().requires_grad_(False)
    if weights is not None:
        teacher.load_state_dict(weights)
    return teacher


# ----------------------------------------------------------------------------------------------------------------
# The loop

def distill(cfg):
    """Distill with config dict cfg (DEFAULTS overridden). Returns the student checkpoint's path."""
    rank, world, device = common.setup_distributed(cfg['device'])
    check_config(cfg, world)
    master = rank == 0
    if master:
        ensure_data(cfg['data'])  # prepares 'synthetic' or 'pydoc' on first use, once
    if world > 1:
        dist.barrier()
    dataset = load_data(ensure_data(cfg['data']))
    method = 'sdtt' if cfg['teacher'] == 'mdlm' else 'dcd'
    out_dir = cfg['out_dir'] or os.path.join('out', f"{method}-{cfg['teacher']}-{common.folder_name(cfg['data'])}")
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')

    original, net, teacher_ckpt = train.load_teacher(cfg['teacher_ckpt'], cfg['teacher'], dataset, cfg['data'],
                                                     cfg['device'], cfg['init'], KINDS)
    teacher_cfg = train.stored_config(teacher_ckpt['config'])
    cfg = {**cfg, **{k: teacher_cfg[k] for k in ('duo_gamma_min', 'duo_gamma_max', 'duo_spacing')}}
    objective = train.teacher_objective({**train.DEFAULTS, **cfg}, dataset.vocab_size)
    schedule = objective if cfg['teacher'] == 'duo' else 'loglinear'
    loss_fn = sdtt_loss if cfg['teacher'] == 'mdlm' else dcd_loss
    original = original.to(device) if isinstance(original, torch.nn.Module) else original
    torch.manual_seed(cfg['seed'] + rank)  # only dropout draws from the global RNG; the data noise is seeded per step
    student = copy.deepcopy(net).to(device).train().requires_grad_(True)
    state = make_state(student, cfg)
    start, history, teacher = 0, {'train': [], 'eval': []}, original
    if cfg['resume'] and os.path.exists(ckpt_path):
        start, history, weights = resume_from(ckpt_path, cfg, state)
        teacher = original if weights is None else network_teacher(student, weights)
        if master:
            print(f"resuming {ckpt_path} at iteration {start} (round {round_of(start, cfg)})")
    if world > 1:
        state['student'] = DDP(student)
    judge = evaluation.load_judge(cfg['judge'], dataset, cfg['data'], device) if cfg['judge'] else None
    bench = evaluation.Bench(dataset, judge, cfg['eval_samples'], cfg['eval_batch_size'], cfg['seed'], device)
    evaluator = evaluation.Evaluator(bench, cfg, cfg['teacher'], schedule)
    evaluate = cfg['eval_samples'] > 0 and bool(evaluator.steps())

    if master:
        print(f"{method.upper()}: teacher {cfg['teacher_ckpt'] or 'default'}, {net.num_params() / 1e6:.2f}M "
              f"parameters, {num_rounds(cfg)} rounds from {cfg['start_steps']} to {cfg['min_steps']} steps, "
              f"{iters_per_round(cfg)} iterations each, data {dataset.path}, global batch "
              f"{cfg['batch_size'] * cfg['grad_accum']}, {world} process(es), {device}")
    window, t0, local = [], time.time(), cfg['grad_accum'] // world
    bar = tqdm(range(start, cfg['max_iters']), initial=start, total=cfg['max_iters'], disable=not master,
               desc=method.upper(), dynamic_ncols=True, mininterval=5)
    for it in bar:
        r = round_of(it, cfg)
        if r > 0 and it == round_end(r - 1, cfg):
            teacher = network_teacher(state['student'])          # the raw student becomes the teacher
        dt = round_dt(r, cfg)
        fn = lambda x, g: loss_fn(state['student'], teacher, objective, x, dt, g, cfg['loss'])
        batches = common.micro_batches(dataset, cfg, it, 0, rank, world, device)
        stats = common.all_reduce_mean(common.accumulate(state['student'], batches, fn, local, device), world)
        common.check_finite(stats, method.upper(), it, ckpt_path, FLAGS)
        lr = common.learning_rate(it, cfg['lr'], cfg['warmup_iters'])
        norm = common.update(state['student'], state['optimizer'], lr, cfg['grad_clip'])
        state['ema'].update(state['student'])
        window.append([stats[0].item(), norm])
        done = it + 1
        if done == cfg['max_iters'] or common.every(done, cfg['log_every']):
            loss, gnorm = torch.tensor(window, dtype=torch.float64).mean(0).tolist()
            history['train'].append({'iter': done, 'round': r, 'dt': dt, 'loss': loss, 'grad_norm': gnorm,
                                     'minutes': (time.time() - t0) / 60})
            window = []
            bar.set_postfix(round=r, steps=int(round(0.5 / dt)), loss=f"{loss:.4f}", gnorm=f"{gnorm:.2f}")
        end_of_round = done == round_end(r, cfg)
        if master and end_of_round:
            save(os.path.join(out_dir, f"round{r}.pt"), state, teacher, cfg, dataset, done, history)
        periodic = end_of_round if cfg['eval_interval'] == 0 else common.every(done, cfg['eval_interval'])
        if evaluate and master and (periodic or done == cfg['max_iters']):
            evaluator.periodic(history, done, {'EMA': (state['ema'].averaged_copy(state['student']), None)})
        if master and (done == cfg['max_iters'] or common.every(done, cfg['ckpt_interval'])):
            save(ckpt_path, state, teacher, cfg, dataset, done, history)
            common.save_history(out_dir, history)
    bar.close()
    if master:
        if evaluate:
            label = f"{method.upper()} student @{cfg['max_iters']} (EMA)"
            tails = (False, True) if cfg['teacher'] == 'duo' else (False,)
            evaluator.final(original, [(label, state['ema'].averaged_copy(state['student']), None)], out_dir,
                            history, tails)
    return ckpt_path


def main(argv=None):
    return distill(common.configure(DEFAULTS, argv))


if __name__ == '__main__':
    common.run(main)
