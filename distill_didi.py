"""
DiDi-Instruct: distill an MDLM teacher into a few-step student by a policy gradient on the integral KL between
their forward marginals, with a discriminator as the reward (Zheng et al. 2025, "DiDi" below).

    python distill_didi.py --teacher mdlm                       # CPU default (+ the teacher first if absent)
    torchrun --standalone --nproc_per_node=2 distill_didi.py --teacher mdlm --grad_accum 2 --batch_size 16
    python distill_didi.py --teacher mdlm --real bank           # teacher samples from a cached bank, not the data
    python distill_didi.py --teacher mdlm --resume true         # continue out_dir/ckpt.pt exactly where it stopped
    python distill_didi.py config/didi_mdlm_owt.py --teacher_ckpt /models/mdlm-owt   # the paper's setting, one GPU
    python sample.py --ckpt out/didi-mdlm-synthetic --steps 8 --rgas true      # the student, guided (RGAS)

Three networks: the frozen teacher p_theta, the student p_nu (a copy of it) and the discriminator D_lambda (the
teacher's trunk with a new spectral-normalised head, model.Discriminator). The student minimises the integral KL
(eq. 4) between the forward marginals q_nu and q_theta of its samples and the teacher's. Its gradient is a score
function (Theorem 4.1, eq. 5 / 15),
    E_{t ~ pi, x ~ p_nu, z_t ~ Q(.|x)} [ omega(t) / pi(t) * R(z_t, t) * grad log p_nu(x) ],  R = log q_nu / q_theta,
so nothing is differentiated through discrete sampling. Each iteration (Algorithm 1):
  1. the student generates x in two ancestral steps z_1 (all masks) -> z_tau -> x, tau ~ pi = Beta(a, b) (eq. 9);
     the teacher samples x' are training sequences (--real data) or a bank of teacher samples made once (--real bank);
  2. x and x' are masked at the same time t = tau (coupled time); the discriminator takes one balanced BCE step (eq. 8);
  3. the updated discriminator scores the masked student samples (eq. 6); the rewards are clipped, standardised
     within groups of G (eq. 7) and clipped again, and the student takes the step of eq. 5 with the decomposed score
     log p_nu(x) = log P(z_tau | z_1) + log p_nu(x | z_tau) (eq. 9), weighted by omega(t) / pi(t), plus a forward
     KL to the teacher and an entropy bonus (eq. 15, App. F.3).
Signs: model.Discriminator reads sigmoid(logit) = P(teacher), so its reward r (eq. 6) is log q_theta / q_nu = -R,
"how teacher-like", and the student ascends it: loss = -weight * advantage * log p_nu(x).
At inference the discriminator can guide the student (RGAS, eq. 10-11: sample.generate_rgas; --rgas true here).
DiDi Table 2's leave-one-out rows: --decompose false, --coupled_time false, --omega false, --tau_dist uniform, the
regularisers (--kl_weight, --entropy_weight), and the plain rows against the RGAS rows. Judge a run by the final
table's verdicts, which also face the teacher tempered to the student's entropy, not by the logged numbers.

Where this differs from the paper, and why (RESULTS.md, "DiDi-Instruct" and "Temperature"): the teacher samples are
training sequences, as in the public code, since x' ~ p_theta would need a many-step teacher run every iteration; a
group of G shares its tau, so eq. 7 ranks samples, not times; there is no label smoothing (its floor pins confident
rewards to one value, where they cannot rank) and no regulariser (both held our students back); log p_nu(x) is per
token and omega / pi is normalised to mean 1 and capped, so the loss keeps one scale; only the discriminator's last
block trains (the same student, faster); RGAS is off in evaluation (it did not help our students).
config/didi_mdlm_owt.py keeps the paper's values.
"""

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import eval as evaluation
import train
from common import UserError
from model import Discriminator, discriminator_reward
from processes import Absorbing, alpha_loglinear, dalpha_loglinear, sigma_bar_loglinear
from sample import generate, mdlm_step

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value; a positional argument is a config file of `key = value` lines)
teacher = 'mdlm'          # DiDi-Instruct distills MDLM teachers (absorbing process, SUBS head)
teacher_ckpt = ''         # '' = out/mdlm-<data>/ckpt.pt (trained first on 'synthetic'); 'exact': the exact denoiser
init = ''                 # the network student and discriminator start from; '' = the teacher (if exact: the default)
data = 'synthetic'
out_dir = ''              # '' = out/didi-mdlm-<data folder name>
real = 'data'             # teacher samples x': 'data' (training sequences, as the public code) | 'bank'
bank = ''                 # --real bank: an .npy of teacher samples; '' = <out_dir>/bank_<steps>steps_<size>.npy
bank_size = 2048          # sequences in a new bank, made once by rank 0 with sample.generate
bank_steps = 256          # the teacher's steps for a new bank
batch_size = 32           # sequences per micro-batch per process, in groups of group_size (the paper: 8)
grad_accum = 1            # micro-batches per update in total; must be divisible by the number of processes
max_iters = 500
lr = 4e-5                 # student: 1/100 of our teacher's peak lr, the paper's ratio (1e-6 to 1e-4)
disc_lr = 4e-4            # discriminator; 10x the student's, as the public config
warmup_iters = 0          # linear warm-up, then constant (the paper: no warm-up)
beta2 = 0.999
weight_decay = 0.01       # student (DiDi Table 5); the discriminator has none
grad_clip = 1.0           # both networks; 0: off
ema = 0.99                # EMA of the student, evaluated and saved as 'ema' (the paper: 0.9999 over 10k iterations)
group_size = 4            # G of eq. 7: rewards are standardised within groups of G sequences of a micro-batch
group_share = 'tau'       # tau: a group's sequences share tau and t, so eq. 7 ranks samples | none: the paper's groups
reward_clip = 8.0         # |r| <= reward_clip before eq. 7 (public config); 0: off
adv_clip = 3.0            # |advantage| <= adv_clip after eq. 7 (public config); 0: off
label_smoothing = 0.0     # s: the discriminator's targets are 1 - s/2 (teacher) and s/2 (the public config: 0.1)
disc_trainable_blocks = 1 # the discriminator's last blocks that train, besides its head (the public config: 4)
tau_dist = 'beta'         # pi: beta | uniform (DiDi App. F.3: Beta(2, 5) for small budgets, Beta(5, 2) for large)
tau_a = 2.0
tau_b = 5.0
omega = True              # omega(t) = -alpha'_t / (1 - alpha_t) clamped to [0.1, 10]; False: omega = 1
weight_clip = 20.0        # ours: omega/pi, normalised to mean 1 under pi, is capped here (pi -> 0 at the ends); 0: off
decompose = True          # eq. 9: two-step generation z_1 -> z_tau -> x; False: one step z_1 -> x
coupled_time = True       # the discriminator's time t = tau; False: t ~ pi drawn independently
kl_weight = 0.0           # forward KL(teacher || student) per token at both generation steps (the paper: 0.05)
entropy_weight = 0.0      # entropy bonus on the student's x0 predictions (the paper: 5e-4)
rgas = False              # also evaluate the student guided by RGAS (eval.py --disc does it afterwards)
rgas_h = 30.0             # the tilt of RGAS's first steps, ramped from 0 (DiDi App. F.3)
rgas_tilt = 0.5           # fraction of the steps that tilt; the rest re-rank rgas_candidates candidates
rgas_candidates = 4
rgas_select = 'max'       # re-ranking keeps the highest reward ('max', App. F.3) or draws by 'softmax'
rgas_reward = 'mean'      # eq. 6 as the 'mean' or the 'sum' of the log-ratio over the masked positions
eval_interval = 250       # iterations between evaluations of the EMA student (and at the end)
eval_steps = '8,16'       # K-step budgets
teacher_steps = '1024'    # extra budgets for the teacher in the final table: the many-step reference to match
eval_temperatures = '0.8,0.7,0.6'  # the teacher also at x0_hat^(1/T), for verdicts at the student's entropy ('': none)
eval_samples = 256        # sequences per budget and noise stream; 0 skips evaluation and the final table
eval_streams = 3          # noise streams per evaluation: each cell is their mean +- sd (eval.py)
eval_batch_size = 64      # sequences generated at once in evaluation: eval.py's default, so the rows are eval.py's
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

F64 = torch.float64
OMEGA_RANGE = (0.1, 10.0)  # the public config's clamp of omega(t)
FLAGS = '--lr and --disc_lr'
LOGGED = ('disc_loss', 'd_teacher', 'd_student', 'loss', 'policy', 'kl', 'entropy', 'reward', 'logp',
          'student_grad_norm', 'disc_grad_norm')


# ----------------------------------------------------------------------------------------------------------------
# Times: tau ~ pi, and the weight omega(t) / pi(t) of eq. 5

def draw_times(n, generator, cfg):
    """n times from pi (Beta(tau_a, tau_b), or U(0, 1)), drawn by numpy from a seed taken off the torch generator
    (torch's Beta sampler takes no generator), so they follow the per-micro-batch seeding. -> (n,) float64"""
    rng = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device)))
    t = rng.beta(cfg['tau_a'], cfg['tau_b'], n) if cfg['tau_dist'] == 'beta' else rng.uniform(0, 1, n)
    return torch.as_tensor(t, dtype=F64, device=generator.device).clamp(1e-3, 1 - 1e-3)


def pi_density(t, cfg):
    """The density of pi at t (B,): the Beta pdf, or 1 for the uniform."""
    if cfg['tau_dist'] != 'beta':
        return torch.ones_like(t)
    a, b = cfg['tau_a'], cfg['tau_b']
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return torch.exp((a - 1) * torch.log(t) + (b - 1) * torch.log1p(-t) - log_beta)


def omega_of(t, cfg):
    """omega(t) = -alpha'_t / (1 - alpha_t) (= 1/t for the log-linear schedule), clamped to OMEGA_RANGE; 1 when off."""
    if not cfg['omega']:
        return torch.ones_like(t)
    return (-dalpha_loglinear(t) / (1 - alpha_loglinear(t))).clamp(*OMEGA_RANGE)


def time_weight(t, cfg):
    """omega(t) / pi(t) (eq. 5), divided by its mean under pi, int_0^1 omega(t) dt, so that the loss keeps a scale
    of one whatever the flags; capped at weight_clip (pi vanishes at the ends of (0, 1)). -> (B,) float64"""
    grid = torch.linspace(0, 1, 100_001, dtype=F64)[1:]
    w = omega_of(t, cfg) / pi_density(t, cfg) / omega_of(grid, cfg).mean().item()
    return w.clamp_max(cfg['weight_clip']) if cfg['weight_clip'] > 0 else w


# ----------------------------------------------------------------------------------------------------------------
# The student's generation and its decomposed log-probability (eq. 9)

@dataclass
class Rollout:
    """One micro-batch of student samples and what both updates need (B rows each)."""
    tau: torch.Tensor               # (B,) float64 generation time
    z_tau: Optional[torch.Tensor]   # (B, L) the intermediate state; None without decompose
    x: torch.Tensor                 # (B, L) the student's samples
    t: torch.Tensor                 # (B,) float64 the discriminator's time
    z: torch.Tensor                 # (B, L) x masked at t
    z_real: torch.Tensor            # (B, L) the teacher sample x' masked at t
    r: Optional[torch.Tensor] = None   # (B,) reward, set after the discriminator's update


def sigma_of(t):
    """The network's noise input at t (B,): sigma_bar_t, float32 (MDLM ignores it; kept for generality)."""
    return sigma_bar_loglinear(t).float()


@torch.no_grad()
def student_samples(student, B, L, mask_id, tau, generator, decompose):
    """x ~ p_nu by the ancestral step of sample.py (float64 draws): z_1 -> z_tau -> x at times 1 > tau > 0 (eq. 9),
    or z_1 -> x in one step without decompose. z_1 is the same for every sequence, so its x0_hat is computed once.
    tau (B,) float64. -> (z_tau (B, L) or None, x (B, L))"""
    z1 = torch.full((B, L), mask_id, dtype=torch.long, device=tau.device)
    alpha_1 = alpha_loglinear(torch.ones((), dtype=F64, device=tau.device))
    out = student(z1[:1], sigma_of(torch.ones_like(tau[:1]))).expand(B, -1, -1)        # (B, L, V)
    if not decompose:
        return None, mdlm_step(out, z1, 1.0, alpha_1, generator)
    alpha_tau = alpha_loglinear(tau)[:, None]                                       # (B, 1)
    z_tau = mdlm_step(out, z1, alpha_tau, alpha_1, generator)
    return z_tau, mdlm_step(student(z_tau, sigma_of(tau)), z_tau, 1.0, alpha_tau, generator)


def step_inputs(roll, mask_id):
    """The inputs of the generation steps in one batch, so the student runs a single forward: one row z_1 (all
    masks, the same for every sequence) and, with decompose, the B rows z_tau below it. -> (z (1 + B or 1, L), sigma)"""
    z1 = torch.full_like(roll.x[:1], mask_id)
    sigma1 = sigma_of(torch.ones_like(roll.tau[:1]))
    if roll.z_tau is None:
        return z1, sigma1
    return torch.cat([z1, roll.z_tau]), torch.cat([sigma1, sigma_of(roll.tau)])


def path_log_prob(out_1, out_tau, z_tau, x, mask_id):
    """log p_nu(x) along the student's path (eq. 9), without the terms that do not depend on nu (which positions
    unmask in a step is the schedule's coin, not the student's):
        log P(z_tau | z_1) = sum over the positions unmasked in z_tau of log x0_hat(z_1)[z_tau],
        log p(x | z_tau)   = sum over the positions still masked in z_tau of log x0_hat(z_tau)[x];
    every position counts once, in the step that unmasked it. out_1: SUBS log x0_hat (B or 1, L, V) at z_1,
    out_tau (B, L, V) at z_tau, or None: one step, the sum over all positions of log x0_hat(z_1)[x]. -> (B,)"""
    out_1 = out_1.expand(len(x), -1, -1)
    if out_tau is None:
        return out_1.gather(-1, x[..., None])[..., 0].sum(-1)
    first = out_1.gather(-1, z_tau[..., None])[..., 0]                               # (B, L)
    second = out_tau.gather(-1, x[..., None])[..., 0]
    return torch.where(z_tau != mask_id, first, second).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# The discriminator (eq. 8) and the reward (eq. 6, 7)

def make_discriminator(teacher, trainable_blocks):
    """D_lambda from the teacher's trunk (model.Discriminator); only the last trainable_blocks blocks and the head
    train, the rest stays the teacher's."""
    disc = Discriminator.from_backbone(teacher).train().requires_grad_(False)
    for module in [*disc.blocks[len(disc.blocks) - min(trainable_blocks, len(disc.blocks)):], disc.output_layer]:
        module.requires_grad_(True)
    return disc


def discriminator_loss(disc, z_student, z_teacher, sigma, smoothing):
    """eq. 8: balanced binary cross-entropy over every position of equally many masked teacher samples (label 1) and
    student samples (label 0), smoothed to 1 - s/2 and s/2. -> (loss, mean P(teacher) on teacher, on student)"""
    B = len(z_student)
    logits = disc(torch.cat([z_teacher, z_student]), torch.cat([sigma, sigma])).float()     # (2B, L)
    labels = torch.cat([torch.ones(B, device=logits.device), torch.zeros(B, device=logits.device)])
    target = (labels * (1 - smoothing) + smoothing / 2)[:, None].expand_as(logits)
    p = logits.detach().sigmoid()
    return F.binary_cross_entropy_with_logits(logits, target), p[:B].mean(), p[B:].mean()


@torch.no_grad()
def rewards(disc, z, sigma, mask_id):
    """eq. 6 for masked sequences z (B, L): the discriminator's log-ratio averaged over the masked positions, in eval
    mode. With model.Discriminator's labels this is log q_theta / q_nu = -R: how teacher-like. -> (B,)"""
    was_training = disc.training
    r = discriminator_reward(disc.eval()(z, sigma).float(), z, mask_id)
    disc.train(was_training)
    return r


def group_advantages(r, group_size, reward_clip=0.0, adv_clip=0.0, eps=1e-6):
    """eq. 7: rewards clipped to [-reward_clip, reward_clip], standardised within consecutive groups of group_size
    (mean mu_g, population std sigma_g: (r - mu_g) / (sigma_g + eps)), then clipped to [-adv_clip, adv_clip].
    A clip of 0 is off. r (B,) with B a multiple of group_size -> (B,)"""
    if reward_clip > 0:
        r = r.clamp(-reward_clip, reward_clip)
    groups = r.view(-1, group_size)
    a = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, unbiased=False, keepdim=True) + eps)
    return (a.clamp(-adv_clip, adv_clip) if adv_clip > 0 else a).flatten()


# ----------------------------------------------------------------------------------------------------------------
# The two updates of an iteration

def make_rollout(student, x_real, generator, cfg, mask_id):
    """Algorithm 1's first lines: tau ~ pi, x ~ p_nu (no gradient), then x and the teacher sample x' (B, L) masked at
    the same time t (= tau with coupled time, else a fresh draw from pi). With --group_share tau the G consecutive
    rows of a group share tau and t: eq. 7 then ranks samples, not times, whose rewards differ by their mask ratio."""
    B, L = x_real.shape
    G = cfg['group_size'] if cfg['group_share'] == 'tau' else 1       # rows that share their times
    tau = draw_times(B // G, generator, cfg).repeat_interleave(G)
    z_tau, x = student_samples(student, B, L, mask_id, tau, generator, cfg['decompose'])
    t = tau if cfg['coupled_time'] else draw_times(B // G, generator, cfg).repeat_interleave(G)
    alpha, process = alpha_loglinear(t)[:, None], Absorbing(mask_id)
    return Rollout(tau=tau, z_tau=z_tau, x=x, t=t, z=process.sample(x, alpha, generator),
                   z_real=process.sample(x_real, alpha, generator))


def regularisers(out_student, out_teacher, inputs, mask_id):
    """App. F.3: the forward KL(p_theta || p_nu) between the teacher's and the student's x0 predictions and the
    student's entropy at both generation steps: each averaged over the positions its step predicts (those masked
    in its input: row 0 is z_1, rows 1.. are z_tau), then over the steps. out_*: SUBS log x0_hat (1 + B or 1, L, V);
    the mask column is exp(NEG_INF) = 0 in both. -> (kl, entropy)"""
    kl = (out_teacher.exp() * (out_teacher - out_student)).sum(-1)                  # (1 + B, L)
    entropy = -(out_student.exp() * out_student).sum(-1)
    steps = [slice(0, 1), slice(1, None)] if len(inputs) > 1 else [slice(0, 1)]
    masked = [(inputs[s] == mask_id).float() for s in steps]
    mean = lambda v: sum((v[s] * m).sum() / m.sum().clamp_min(1) for s, m in zip(steps, masked)) / len(steps)
    return mean(kl), mean(entropy)


def student_loss(student, teacher, roll, cfg, mask_id):
    """eq. 5 / 15 on one rollout, with the decomposed score (eq. 9) and the regularisers:
        -mean_i[ w(t_i) A_i log p_nu(x_i) / L ] + kl_weight KL - entropy_weight H,
    A the grouped advantage of the reward roll.r (eq. 6-7), w = omega/pi (time_weight). Only the student gets
    gradient. -> (loss, policy term, kl, entropy, mean raw reward, mean log p_nu(x) per token)"""
    advantage = group_advantages(roll.r, cfg['group_size'], cfg['reward_clip'], cfg['adv_clip'])
    weight = time_weight(roll.t, cfg).float()
    inputs, sigma = step_inputs(roll, mask_id)
    out = student(inputs, sigma)                                                     # (1 + B or 1, L, V)
    logp = path_log_prob(out[:1], out[1:] if roll.z_tau is not None else None, roll.z_tau, roll.x, mask_id)
    logp = logp / roll.x.shape[1]                        # per token: eq. 15's sum over L positions, divided by L
    policy = -(weight * advantage * logp).mean()
    with torch.no_grad():
        out_teacher = teacher(inputs, sigma)
    kl, entropy = regularisers(out, out_teacher, inputs, mask_id)
    loss = policy + cfg['kl_weight'] * kl - cfg['entropy_weight'] * entropy
    return loss, policy.detach(), kl.detach(), entropy.detach(), roll.r.mean(), logp.detach().mean()


def iteration(state, teacher, dataset, bank, cfg, it, rank, world, device, ckpt_path):
    """Algorithm 1 once: student samples, one discriminator update (eq. 8), one student update (eq. 5-7, 9), the
    EMA. Both updates see the same micro-batches: the rollouts of the first are kept for the second. -> LOGGED"""
    student, disc, local, mask_id = state['student'], state['disc'], cfg['grad_accum'] // world, dataset.vocab_size
    rollouts = []

    def disc_fn(x_data, generator):
        x_real = x_data if bank is None else \
            bank[torch.randint(len(bank), (len(x_data),), generator=generator, device=device)]
        roll = make_rollout(common.unwrap(student), x_real, generator, cfg, mask_id)
        rollouts.append((roll, generator))
        return discriminator_loss(disc, roll.z, roll.z_real, sigma_of(roll.t), cfg['label_smoothing'])

    batches = common.micro_batches(dataset, cfg, it, 0, rank, world, device)
    disc_stats = common.all_reduce_mean(common.accumulate(disc, batches, disc_fn, local, device), world)
    common.check_finite(disc_stats, 'discriminator', it, ckpt_path, FLAGS)
    disc_norm = common.update(disc, state['disc_optimizer'], cfg['disc_lr'], cfg['grad_clip'])
    common.unwrap(disc).power_iteration()   # once per update: see model.DiscriminatorHead

    for roll, _ in rollouts:   # the reward of eq. 6, from the updated discriminator
        roll.r = rewards(common.unwrap(disc), roll.z, sigma_of(roll.t), mask_id)
    student_fn = lambda roll, _: student_loss(student, teacher, roll, cfg, mask_id)
    stats = common.all_reduce_mean(common.accumulate(student, rollouts, student_fn, local, device), world)
    common.check_finite(stats, 'DiDi student', it, ckpt_path, FLAGS)
    lr = common.learning_rate(it, cfg['lr'], cfg['warmup_iters'])
    student_norm = common.update(student, state['optimizer'], lr, cfg['grad_clip'])
    state['ema'].update(student)
    return [*disc_stats.tolist(), *stats.tolist(), student_norm, disc_norm]


# ----------------------------------------------------------------------------------------------------------------
# Setup: the optimizers, the bank of teacher samples, checkpoints, evaluation

def make_state(student, disc, cfg):
    """What iteration() updates: student and discriminator, their AdamW optimizers (the discriminator's over its
    trainable part, without weight decay) and the student's EMA."""
    betas = (0.9, cfg['beta2'])
    return {'student': student, 'disc': disc, 'ema': common.EMA(student, cfg['ema']),
            'optimizer': torch.optim.AdamW(student.parameters(), cfg['lr'], betas, weight_decay=cfg['weight_decay']),
            'disc_optimizer': torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], cfg['disc_lr'],
                                                betas, weight_decay=0.0)}


def teacher_bank(path, teacher, cfg, dataset, rank, world, device):
    """--real bank: bank_size teacher samples at bank_steps (sample.generate, float64), made once by rank 0 and
    cached at path (atomically), then read by every rank. -> (S, L) long on device"""
    N, L = dataset.vocab_size, dataset.seq_len
    if rank == 0 and not os.path.exists(path):
        print(f"making a bank of {cfg['bank_size']} teacher samples at {cfg['bank_steps']} steps: {path}")
        gen = common.step_generator(cfg['seed'] + 2, device=device)
        x, _ = generate(teacher, 'mdlm', cfg['bank_size'], L, cfg['bank_steps'], N, gen, batch_size=cfg['batch_size'])
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.npy"
        np.save(tmp, x.cpu().numpy().astype(np.int64))
        os.replace(tmp, path)
    if world > 1:
        dist.barrier()
    bank = np.load(path)
    if bank.ndim != 2 or bank.shape[1] != L or bank.min() < 0 or bank.max() >= N:
        raise UserError(f"{path} is not a bank of sequences of {L} tokens below {N}; delete it or pass another --bank")
    return torch.from_numpy(bank).long().to(device)


def save(path, state, cfg, dataset, done, history):
    student, disc = common.unwrap(state['student']), common.unwrap(state['disc'])
    common.save_checkpoint(path, {
        'kind': 'student', 'method': 'didi', 'teacher': 'mdlm', 'config': cfg,
        'model_config': asdict(student.config), 'model': student.state_dict(), 'ema': state['ema'].state_dict(),
        'optimizer': state['optimizer'].state_dict(), 'discriminator': disc.state_dict(),
        'disc_optimizer': state['disc_optimizer'].state_dict(), 'bank': cfg['bank'] if cfg['real'] == 'bank' else '',
        'iter': done, 'rng': common.rng_state(), 'history': history, 'data_meta': dataset.meta,
    })


def resume_from(path, state, rank):
    ckpt = common.load_checkpoint(path)
    if ckpt.get('method') != 'didi':
        raise UserError(f"{path} is not a DiDi-Instruct student; pass another --out_dir")
    state['student'].load_state_dict(ckpt['model'])
    state['disc'].load_state_dict(ckpt['discriminator'])
    state['optimizer'].load_state_dict(ckpt['optimizer'])
    state['disc_optimizer'].load_state_dict(ckpt['disc_optimizer'])
    state['ema'].load_state_dict(ckpt['ema'])
    common.set_rng_state(ckpt['rng'], rank)
    return ckpt['iter'], ckpt['history'], ckpt['bank']


def student_series(state, cfg):
    """{label: (net, discriminator or None)}: the EMA student, and with --rgas the same student guided by RGAS with a
    frozen copy of the current discriminator."""
    net = state['ema'].averaged_copy(state['student'])
    series = {'EMA': (net, None)}
    if cfg['rgas']:
        series['EMA, RGAS'] = (net, copy.deepcopy(common.unwrap(state['disc'])).eval().requires_grad_(False))
    return series


def final_table(evaluator, teacher, state, cfg, out_dir, history):
    """The teacher and the EMA student (and with --rgas the guided one) on the report streams -> results.md."""
    students = [(f"DiDi student @{cfg['max_iters']} ({label})", net, disc)
                for label, (net, disc) in student_series(state, cfg).items()]
    evaluator.final(teacher, students, out_dir, history)


def check_config(cfg, world):
    evaluation.parse_temperatures(cfg['eval_temperatures'], '--eval_temperatures')   # before any teacher trains
    if cfg['teacher'] != 'mdlm':
        raise UserError(f"DiDi-Instruct distills MDLM teachers; --teacher {cfg['teacher']!r} is not supported")
    checks = [(cfg['real'] in ('data', 'bank'), f"--real is data or bank, not {cfg['real']!r}"),
              (cfg['tau_dist'] in ('beta', 'uniform'), f"--tau_dist is beta or uniform, not {cfg['tau_dist']!r}"),
              (cfg['tau_a'] > 0 and cfg['tau_b'] > 0, "--tau_a and --tau_b must be positive"),
              (cfg['group_size'] >= 2 and cfg['batch_size'] % cfg['group_size'] == 0,
               f"--group_size must be at least 2 and divide --batch_size {cfg['batch_size']} (eq. 7 standardises "
               f"rewards within groups of a micro-batch)"),
              (cfg['group_share'] in ('none', 'tau'), f"--group_share is none or tau, not {cfg['group_share']!r}"),
              (cfg['disc_trainable_blocks'] >= 0, "--disc_trainable_blocks must be at least 0")]
    common.check_batch(cfg, world)
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# ----------------------------------------------------------------------------------------------------------------
# The loop (Algorithm 1)

def distill(cfg):
    """Distill with config dict cfg (DEFAULTS overridden). Returns the student checkpoint's path."""
    rank, world, device = common.setup_distributed(cfg['device'], cfg['dist_timeout'])
    check_config(cfg, world)
    master = rank == 0
    dataset = train.open_data(cfg['data'], rank, world)
    out_dir = cfg['out_dir'] or os.path.join('out', f"didi-mdlm-{common.folder_name(cfg['data'])}")
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if cfg['real'] == 'bank' and not cfg['bank']:
        cfg = {**cfg, 'bank': os.path.join(out_dir, f"bank_{cfg['bank_steps']}steps_{cfg['bank_size']}.npy")}

    teacher, net, _ = train.load_teacher(cfg['teacher_ckpt'], 'mdlm', dataset, cfg['data'], cfg['device'], cfg['init'])
    teacher = teacher.to(device) if isinstance(teacher, torch.nn.Module) else teacher   # the exact one is no module
    net = net.to(device)
    torch.manual_seed(cfg['seed'])           # the discriminator's new head: the same on every rank
    # the student runs without dropout (eval mode, gradients on): eq. 5 needs log p_nu of the policy that drew the
    # rollouts, and the K-step sampler it becomes has no dropout; the discriminator trains with the teacher's dropout
    student = copy.deepcopy(net).eval().requires_grad_(True)
    disc = make_discriminator(net, cfg['disc_trainable_blocks'])
    torch.manual_seed(cfg['seed'] + rank)    # only dropout draws from the global RNG; the rest is seeded per step
    state = make_state(student, disc, cfg)
    start, history = 0, {'train': [], 'eval': []}
    if common.resume_point(ckpt_path, cfg['resume'], rank, world, device):
        start, history, bank_path = resume_from(ckpt_path, state, rank)
        cfg = {**cfg, 'bank': bank_path or cfg['bank']}
        if master:
            print(f"resuming {ckpt_path} at iteration {start}")
    bank = teacher_bank(cfg['bank'], teacher, cfg, dataset, rank, world, device) if cfg['real'] == 'bank' else None
    if world > 1:  # two wrappers: each all-reduces only in its own phase
        state.update(student=DDP(student), disc=DDP(disc))
    rgas = dict(h_max=cfg['rgas_h'], tilt_fraction=cfg['rgas_tilt'], candidates=cfg['rgas_candidates'],
                select=cfg['rgas_select'], reward=cfg['rgas_reward'])
    evaluator = evaluation.make_evaluator(cfg, dataset, 'mdlm', device, rgas=rgas)

    if master:
        trainable = sum(p.numel() for p in disc.parameters() if p.requires_grad)
        print(f"DiDi-Instruct: teacher {cfg['teacher_ckpt'] or 'default'}, {net.num_params() / 1e6:.2f}M parameters "
              f"x 2 + a discriminator ({trainable / 1e6:.2f}M trainable), data {dataset.path} "
              f"(N={dataset.vocab_size}, L={dataset.seq_len}), teacher samples from {cfg['bank'] or 'the data'}, "
              f"global batch {cfg['batch_size'] * cfg['grad_accum']}, {world} process(es), {device}")
    window, t0 = [], time.time()   # the numbers since the last log line
    bar = tqdm(range(start, cfg['max_iters']), initial=start, total=cfg['max_iters'], disable=not master,
               desc='DiDi-Instruct', dynamic_ncols=True, mininterval=5)
    for it in bar:
        window.append(iteration(state, teacher, dataset, bank, cfg, it, rank, world, device, ckpt_path))
        done = it + 1
        if done == cfg['max_iters'] or common.every(done, cfg['log_every']):
            means = torch.tensor(window, dtype=F64).mean(0).tolist()
            row = {'iter': done, **dict(zip(LOGGED, means)), 'minutes': (time.time() - t0) / 60}
            history['train'].append(row)
            window = []
            bar.set_postfix(reward=f"{row['reward']:.3f}", d_teacher=f"{row['d_teacher']:.3f}",
                            d_student=f"{row['d_student']:.3f}", entropy=f"{row['entropy']:.3f}")
        if evaluator is not None and master and (done == cfg['max_iters'] or common.every(done, cfg['eval_interval'])):
            evaluator.periodic(history, done, student_series(state, cfg))
        if master and (done == cfg['max_iters'] or common.every(done, cfg['ckpt_interval'])):
            save(ckpt_path, state, cfg, dataset, done, history)
            common.save_history(out_dir, history)
    bar.close()
    if evaluator is not None and master:
        final_table(evaluator, teacher, state, cfg, out_dir, history)
    return ckpt_path


def main(argv=None):
    return distill(common.configure(DEFAULTS, argv))


if __name__ == '__main__':
    common.run(main)
