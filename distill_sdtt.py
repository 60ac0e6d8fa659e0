"""
Round-based step distillation (SDTT, Duo's DCD), the baseline that IDLM and DiDi-Instruct compare against.
The student learns to do in one step what its teacher does in two; after each round the student becomes the teacher
and the step doubles.

    python distill_sdtt.py --teacher mdlm                  # SDTT (Deschenaux & Gulcehre 2024) on an MDLM teacher
    python distill_sdtt.py --teacher duo                   # Duo's DCD (discrete consistency distillation)
    torchrun --standalone --nproc_per_node=2 distill_sdtt.py --teacher mdlm --grad_accum 2 --batch_size 32
    python distill_sdtt.py --teacher mdlm --teacher_ckpt exact    # round 0 from the exact denoiser
    python distill_idlm.py --teacher duo --teacher_ckpt out/dcd-duo-synthetic      # then IDLM-DCD (IDLM's best row)

Rounds (SDTT §3, Duo §4). Student and teacher start as copies of the teacher checkpoint (or of --init). Round r
has a teacher that samples in K_r = start_steps / 2^r steps (dt = 1 / K_r) and trains the student to sample in
K_r / 2, down to min_steps. At a round's end the EMA student is saved as round<r>.pt (it samples, and can be distilled
further) and the RAW student weights become the teacher; the optimizer runs on.

SDTT (SDTT §3, --teacher mdlm). From x_t, t ~ U(0, 1], the teacher takes two MDLM ancestral steps t -> t - dt ->
t - 2 dt. Each position masked in x_t gets as target the teacher's x0 log-probabilities of the step that unmasked it
(the second step's where neither did); the student makes one forward at x_t and matches the targets at the masked
positions with one of SDTT's divergences (--loss). The targets carry the teacher's two-step distribution exactly
(tests/test_sdtt.py enumerates it).

DCD (Duo §4, --teacher duo). t ~ U(0, 1] moves to t + dt, and s = t - dt. x_t and x_s are the argmax tokens of
a_t x0 + s_t eps and a_s x0 + s_s eps with the SAME Gaussian noise eps, and the student at x_t matches the teacher's
x0 distribution at x_s at every position: what the teacher predicts a step later on the same noise path.

Where this differs from the papers, and why. Both methods share one round schedule sized for a CPU run: max_iters
split evenly over the rounds (the papers: 10k steps a round, SDTT from 1024 steps, DCD from 512), a short warm-up,
EMA 0.99 and SDTT's lr. mse and tvd compare probabilities, not SDTT's log-probabilities, so they stay finite at tokens
of mass ~0. On synthetic data round 0 may distill the exact denoiser. Duo students are also evaluated with the greedy
tail, as Duo reports both. The measurements: RESULTS.md, "SDTT and DCD: the round-based baselines".
"""

import copy
import math
import os
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import eval as evaluation
import train
from common import UserError
from processes import alpha_loglinear, duo_latent, sample_time
from sample import mdlm_step

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value; a positional argument is a config file of `key = value` lines)
teacher = 'mdlm'          # mdlm (SDTT) | duo (DCD)
teacher_ckpt = ''         # '' = out/<teacher>-<data>/ckpt.pt (trained first on synthetic), an official one, or 'exact'
init = ''                 # the network the student starts from; '' = the teacher's (with 'exact': the default teacher)
data = 'synthetic'
out_dir = ''              # '' = out/sdtt-mdlm-<data> or out/dcd-duo-<data>
start_steps = 1024        # the first round's teacher samples in this many steps (dt = 1/start_steps), as SDTT
min_steps = 4             # the last round's student samples in this many steps
batch_size = 64           # sequences per micro-batch per process
grad_accum = 1            # micro-batches per iteration in total; must be divisible by the number of processes
max_iters = 1600          # over all rounds
round_iters = 0           # iterations per round; 0 = max_iters split evenly (the last round takes the remainder)
lr = 3e-4                 # SDTT's; DCD uses 6e-5 at 169M
warmup_iters = 20         # linear warm-up at the start of the run only, then constant
beta2 = 0.999
weight_decay = 0.0
grad_clip = 1.0           # DCD's; 0 = off
loss = 'kl_bwd'           # SDTT's divergences: kl_bwd | kl_fwd | mse | tvd
ema = 0.99                # EMA of the student, evaluated and saved as 'ema'; the raw student becomes the next teacher
eval_interval = 0         # 0 = evaluate the EMA student at the end of every round; N = every N iterations
eval_steps = '4,8,16,32'  # K-step budgets
teacher_steps = '1024'    # extra budgets for the teacher in the final table: the many-step reference
eval_temperatures = '0.8,0.7'  # the teacher also sampled from x0_hat^(1/T), to meet the student's entropy; '' = none
eval_samples = 256        # sequences per budget and noise stream; 0 skips evaluation and the final table
eval_streams = 3          # noise streams per evaluation: each cell is their mean +- sd (eval.py)
eval_batch_size = 64      # sequences generated at once: eval.py's, so a run's rows are eval.py's for the same seed
entropy_tolerance = 0.02  # verdicts: a student may lose this fraction of its teacher's entropy
judge = ''                # an AR checkpoint (train.py --teacher ar) for judge GenPPL; '' = none
ckpt_interval = 200
log_every = 50
seed = 0
device = 'auto'
dist_timeout = 120        # minutes a process waits at a collective, e.g. while rank 0 evaluates alone
resume = False
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

METHODS = {'mdlm': 'sdtt', 'duo': 'dcd'}   # teacher kind -> method
KINDS = tuple(METHODS)
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
# SDTT: the teacher's two ancestral steps and the targets they leave (MDLM; SDTT §3)

def collect_targets(x_t, x_mid, log_p1, log_p2, mask_id):
    """Each position gets the teacher's x0 log-probabilities of the step that unmasked it: log_p1 (predicted at x_t)
    where x_t is masked and x_mid is not, else log_p2 (predicted at x_mid). -> (B, L, V)"""
    first = (x_t == mask_id) & (x_mid != mask_id)
    return torch.where(first[..., None], log_p1, log_p2)


@torch.no_grad()
def two_step_targets(teacher, x_t, t, dt, generator):
    """The teacher's two ancestral steps t -> t - dt -> t - 2 dt from x_t (B, L), t (B,) float64, clamped at 0.
    -> (targets (B, L, V) log-probs, x after two steps)"""
    config = getattr(teacher, 'config', None)          # a DiT, or the exact denoiser (mask id N)
    mask_id = config.mask_id if config is not None else teacher.N
    alpha = lambda s: alpha_loglinear(s.clamp_min(0.0))[:, None]                 # (B, 1) float64
    times = [t, t - dt, t - 2 * dt]
    log_p1 = teacher(x_t, sigma_of(times[0]))
    x_mid = mdlm_step(log_p1, x_t, alpha(times[1]), alpha(times[0]), generator)
    log_p2 = teacher(x_mid, sigma_of(times[1]))
    x_end = mdlm_step(log_p2, x_mid, alpha(times[2]), alpha(times[1]), generator)
    return collect_targets(x_t, x_mid, log_p1.float(), log_p2.float(), mask_id), x_end


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
    return ((p - q) ** 2).sum(-1) if kind == 'mse' else 0.5 * (p - q).abs().sum(-1)    # tvd


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
# DCD: pairs on one Gaussian noise path (Duo §4)

def dcd_pair(objective, x0, t, s, generator):
    """x_t and x_s (B, L) from the SAME eps: argmax(a_t x0 + s_t eps) and argmax(a_s x0 + s_s eps) (IDLM eq. 22),
    with sigma = -log alpha for each. -> (x_t, sigma_t, x_s, sigma_s)"""
    onehot = F.one_hot(x0, objective.N).float()
    eps = torch.randn(onehot.shape, generator=generator, device=x0.device)
    out = []
    for u in (t, s):
        gamma = objective.gamma(u)[:, None].float()                                    # (B, 1)
        out += [duo_latent(onehot, gamma, eps).argmax(-1), -torch.log(objective.alpha(u)).float()]
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
# Setup, checkpoints, evaluation

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


def save(path, state, teacher, cfg, dataset, done, history):
    """A resumable checkpoint; the current teacher's weights travel with it (None while it is the exact denoiser),
    so a resume inside a later round continues from the same teacher."""
    student = common.unwrap(state['student'])
    common.save_checkpoint(path, {
        'kind': 'student', 'method': METHODS[cfg['teacher']], 'teacher': cfg['teacher'], 'config': cfg,
        'model_config': asdict(student.config), 'model': student.state_dict(), 'ema': state['ema'].state_dict(),
        'optimizer': state['optimizer'].state_dict(), 'round': round_of(done - 1, cfg), 'iter': done,
        'teacher_model': teacher.state_dict() if isinstance(teacher, torch.nn.Module) else None,
        'rng': common.rng_state(), 'history': history, 'data_meta': dataset.meta})


def resume_from(path, cfg, state, original, rank):
    """Restores the student, its EMA, the optimizer and the RNG. -> (iteration, history, the current teacher)"""
    ckpt = common.load_checkpoint(path)
    method = METHODS[cfg['teacher']]
    if ckpt.get('method') != method:
        raise UserError(f"{path} is not a {method.upper()} run of a {cfg['teacher']} teacher; pass another --out_dir")
    state['student'].load_state_dict(ckpt['model'])
    state['optimizer'].load_state_dict(ckpt['optimizer'])
    state['ema'].load_state_dict(ckpt['ema'])
    common.set_rng_state(ckpt['rng'], rank)
    if rank == 0:
        print(f"resuming {path} at iteration {ckpt['iter']} (round {round_of(ckpt['iter'], cfg)})")
    weights = ckpt['teacher_model']
    return ckpt['iter'], ckpt['history'], original if weights is None else network_teacher(state['student'], weights)


def network_teacher(student, weights=None):
    """A frozen copy of the student (optionally carrying other weights): the next round's teacher."""
    teacher = copy.deepcopy(common.unwrap(student)).eval().requires_grad_(False)
    if weights is not None:
        teacher.load_state_dict(weights)
    return teacher


def final_table(evaluator, teacher, state, cfg, out_dir, history):
    """results.md: the EMA student against its teacher (Duo: with and without the greedy tail)."""
    label = f"{METHODS[cfg['teacher']].upper()} student @{cfg['max_iters']} (EMA)"
    tails = (False, True) if cfg['teacher'] == 'duo' else (False,)
    evaluator.final(teacher, [(label, state['ema'].averaged_copy(state['student']), None)], out_dir, history, tails)


# ----------------------------------------------------------------------------------------------------------------
# The loop

def distill(cfg):
    """Distill with config dict cfg (DEFAULTS overridden). Returns the student checkpoint's path."""
    rank, world, device = common.setup_distributed(cfg['device'], cfg['dist_timeout'])
    check_config(cfg, world)
    master = rank == 0
    dataset = train.open_data(cfg['data'], rank, world)
    method = METHODS[cfg['teacher']]
    out_dir = cfg['out_dir'] or os.path.join('out', f"{method}-{cfg['teacher']}-{common.folder_name(cfg['data'])}")
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')

    original, net, teacher_ckpt = train.load_teacher(cfg['teacher_ckpt'], cfg['teacher'], dataset, cfg['data'],
                                                     cfg['device'], cfg['init'], KINDS)
    cfg = {**cfg, **train.duo_schedule(teacher_ckpt)}   # saved with the student: sample.py rebuilds Duo's alpha(t)
    objective = train.teacher_objective({**train.DEFAULTS, **cfg}, dataset.vocab_size)
    loss_fn = sdtt_loss if cfg['teacher'] == 'mdlm' else dcd_loss
    original = original.to(device) if isinstance(original, torch.nn.Module) else original
    torch.manual_seed(cfg['seed'] + rank)  # only dropout draws from the global RNG; the data noise is seeded per step
    student = copy.deepcopy(net).to(device).train().requires_grad_(True)
    state = make_state(student, cfg)
    start, history, teacher = 0, {'train': [], 'eval': []}, original
    if common.resume_point(ckpt_path, cfg['resume'], rank, world, device):
        start, history, teacher = resume_from(ckpt_path, cfg, state, original, rank)
    if world > 1:
        state['student'] = DDP(student)
    schedule = objective if cfg['teacher'] == 'duo' else 'loglinear'
    evaluator = evaluation.make_evaluator(cfg, dataset, cfg['teacher'], device, schedule)

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
        window.append([stats[0].item(), common.update(state['student'], state['optimizer'], lr, cfg['grad_clip'])])
        state['ema'].update(state['student'])
        done = it + 1
        if done == cfg['max_iters'] or common.every(done, cfg['log_every']):
            loss, gnorm = torch.tensor(window, dtype=torch.float64).mean(0).tolist()   # since the last log line
            window = []
            history['train'].append({'iter': done, 'round': r, 'dt': dt, 'loss': loss, 'grad_norm': gnorm,
                                     'minutes': (time.time() - t0) / 60})
            bar.set_postfix(round=r, steps=int(round(0.5 / dt)), loss=f"{loss:.4f}", gnorm=f"{gnorm:.2f}")
        end_of_round = done == round_end(r, cfg)
        if master and end_of_round:
            save(os.path.join(out_dir, f"round{r}.pt"), state, teacher, cfg, dataset, done, history)
        periodic = end_of_round if cfg['eval_interval'] == 0 else common.every(done, cfg['eval_interval'])
        if evaluator and master and (periodic or done == cfg['max_iters']):
            evaluator.periodic(history, done, {'EMA': (state['ema'].averaged_copy(state['student']), None)})
        if master and (done == cfg['max_iters'] or common.every(done, cfg['ckpt_interval'])):
            save(ckpt_path, state, teacher, cfg, dataset, done, history)
            common.save_history(out_dir, history)
    bar.close()
    if master and evaluator:
        final_table(evaluator, original, state, cfg, out_dir, history)
    return ckpt_path


def main(argv=None):
    return distill(common.configure(DEFAULTS, argv))


if __name__ == '__main__':
    common.run(main)
