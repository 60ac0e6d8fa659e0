"""
DiDi-Instruct: distill an MDLM teacher into a few-step student by a policy gradient on the integral KL between
their forward marginals, with a discriminator as the reward (Zheng et al. 2025, "DiDi" below).

    python distill_didi.py --teacher mdlm                       # CPU default (+ the teacher first if absent)
    torchrun --standalone --nproc_per_node=2 distill_didi.py --teacher mdlm --grad_accum 2 --batch_size 16
    python distill_didi.py --teacher mdlm --real bank           # teacher samples from a cached bank, not the data
    python distill_didi.py --teacher mdlm --resume true         # continue out_dir/ckpt.pt exactly where it stopped
    python sample.py --ckpt out/didi-mdlm-synthetic --steps 8 --rgas true      # the student, guided (RGAS)

Three networks: the frozen teacher p_theta, the student p_nu (a copy of it) and the discriminator D_lambda (the
teacher's trunk with a new spectral-normalised head, model.Discriminator; only its last disc_trainable_blocks
blocks and its head train). The student minimises the integral KL (eq. 4) between the forward marginals q_nu and
q_theta of its samples and the teacher's. Its gradient is a score function (Theorem 4.1, eq. 5 / 15),
    E_{t ~ pi, x ~ p_nu, z_t ~ Q(.|x)} [ omega(t) / pi(t) * R(z_t, t) * grad log p_nu(x) ],  R = log q_nu / q_theta,
so nothing is differentiated through discrete sampling. Each iteration (Algorithm 1):
  1. the student generates x in two ancestral steps z_1 (all masks) -> z_tau -> x, tau ~ pi = Beta(a, b) (eq. 9);
     teacher samples x' are training sequences (--real data, the default, as in the public code: the paper's x' ~
     p_theta would need a many-step teacher run every iteration) or a bank of teacher samples made once (--real bank);
  2. x and x' are masked at the same time t = tau (coupled time) and the discriminator takes one balanced BCE step
     (eq. 8, label smoothing);
  3. the updated discriminator scores the masked student samples (eq. 6); the rewards are clipped, standardised
     within groups of G (eq. 7) and clipped again, and the student takes the step of eq. 5 with the decomposed score
     log p_nu(x) = log P(z_tau | z_1) + log p_nu(x | z_tau) (eq. 9), weighted by omega(t) / pi(t), plus a forward
     KL to the teacher and an entropy bonus (App. F.3; both off by default here, as is label smoothing, and a group
     shares its tau: the CPU measurements behind these defaults are in RESULTS.md).
Signs: model.Discriminator reads sigmoid(logit) = P(teacher), so its reward r (eq. 6) is log q_theta / q_nu = -R,
"how teacher-like", and the student ascends it: loss = -weight * advantage * log p_nu(x).

Every trick switches off by a flag, to rerun the leave-one-out ablation (DiDi Table 2, App. F.3):
  --decompose false      one step z_1 -> x, log p_nu(x) summed over every position (the paper's baseline generator)
  --coupled_time false   the discriminator's time t ~ pi drawn independently of the generation time tau
  --omega false          omega(t) = 1;   --tau_dist uniform: tau, t ~ U(0, 1), so pi = 1 (no pi weighting)
  --kl_weight 0.05 --entropy_weight 5e-4   the paper's regularisation (config/didi_mdlm_owt.py keeps the paper's
                         values: regularisers, label smoothing 0.1, groups that mix times)
  --rgas true            also evaluate the student guided by RGAS (off by default: on the CPU teacher it raised the
                         student's GenPPL under both selection rules, and it is most of a run's evaluation time)
Ours, off by default: --reward_masks k averages eq. 6 over k fresh maskings of each sample (rollout_rewards). Its
reward ranks the samples better (corr. with the exact log p 0.25-0.27 against 0.18-0.19) and the student is no better.
--disc_steps k gives the discriminator k - 1 extra updates per iteration: nearer its optimum, it made the student
worse by GenPPL and higher in entropy (3 seeds, RESULTS.md).
Logged every log_every iterations: the discriminator's loss and its mean P(teacher) on teacher and on student
samples, the raw reward, the student's loss terms and gradient norms. Judge a run by the EMA student's GenPPL and
entropy at K steps (every eval_interval iterations, in the final table, results.md, and history.png), not by these,
and against the teacher tempered to the student's entropy (--eval_temperatures): a DiDi student that lowers both
GenPPL and entropy may be doing no more than temperature does (RESULTS.md, "Temperature").
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
from data import ensure_data, load_data
from model import Discriminator, discriminator_reward
from processes import Absorbing, alpha_loglinear, dalpha_loglinear, sigma_bar_loglinear
from sample import generate, mdlm_step

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value; a positional argument is a config file of `key = value` lines)
teacher = 'mdlm'          # DiDi-Instruct distills MDLM teachers (absorbing process, SUBS head)
teacher_ckpt = ''         # default: out/mdlm-<data folder name>/ckpt.pt, trained first if absent on 'synthetic';
                          # 'exact': the synthetic language's exact denoiser (a perfect teacher)
init = ''                 # the network student and discriminator are copied from; default: the teacher (with
                          # 'exact': the trained default teacher)
data = 'synthetic'
out_dir = ''              # default: out/didi-mdlm-<data folder name>
real = 'data'             # teacher samples x': 'data' (training sequences, as the public code) | 'bank'
bank = ''                 # --real bank: an .npy of teacher samples; default <out_dir>/bank_<steps>steps_<size>.npy,
bank_size = 2048          #   made once with the teacher at bank_steps (sample.generate) if absent
bank_steps = 256
batch_size = 32           # sequences per micro-batch per process, in groups of group_size (the paper: 8)
grad_accum = 1            # micro-batches per update in total; must be divisible by the number of processes
max_iters = 500           # about 1.1 s of one CPU core per iteration at batch 32 (L = 64, the CPU teacher)
lr = 4e-5                 # student; the paper's 1e-6 is 1% of its teacher's peak lr (1e-4): 1% of ours (4e-3)
disc_lr = 4e-4            # discriminator; 10x the student's, as the public config (1e-5)
warmup_iters = 0          # linear warm-up, then constant (the paper: no warm-up)
beta2 = 0.999
weight_decay = 0.01       # student (DiDi Table 5); the discriminator has none
grad_clip = 1.0           # both networks; 0: off
ema = 0.99                # EMA of the student, evaluated and saved as 'ema' (the paper: 0.9999 over 10k iterations)
group_size = 4            # G of eq. 7: rewards are standardised within groups of G sequences of a micro-batch
group_share = 'tau'       # what a group's G sequences share: none | tau (and the discriminator's time t) | state
                          # (tau and z_tau: G continuations of one prompt). 'tau' (ours; the paper's groups mix times):
                          # eq. 7 then ranks samples, not times (RESULTS.md, DiDi-Instruct: does the reward carry signal)
reward = 'disc'           # disc: the discriminator's log-ratio (eq. 6) | oracle: the exact log-likelihood per token
                          # of the synthetic language, standardised the same way (a control: is the fault the reward?)
logp_norm = 'token'       # log p_nu(x) per token ('token', / L) or per sequence ('sequence', eq. 15's sum)
reward_masks = 0          # 0: eq. 6 on the masking the discriminator just trained on (Algorithm 1); k: its mean over k
                          # fresh maskings of each sample at the same t (ours: eq. 5's expectation, less variance)
disc_steps = 1            # discriminator updates per student update (Algorithm 1: 1); the extra ones come first, each on
                          # fresh rollouts of the current student, so the reward is nearer the optimal log-ratio
reward_clip = 8.0         # |r| <= reward_clip before eq. 7 (public config); 0: off
adv_clip = 3.0            # |advantage| <= adv_clip after eq. 7 (public config); 0: off
label_smoothing = 0.0     # the discriminator's targets are 1 - s/2 (teacher) and s/2 (student). The public config's
                          # 0.1 floors the reward at log(s/2 / (1 - s/2)) = -2.94: 19-66% of rewards sat there (RESULTS.md)
disc_trainable_blocks = 1 # the discriminator's last blocks that train; its head always trains. The public config's 4
                          # is the whole CPU trunk: 1 gave the same student in 0.8x the time (RESULTS.md)
tau_dist = 'beta'         # pi: beta | uniform (DiDi App. F.3: Beta(2, 5) for small budgets, Beta(5, 2) for large)
tau_a = 2.0
tau_b = 5.0
omega = True              # omega(t) = -alpha'_t / (1 - alpha_t) clamped to [0.1, 10]; False: omega = 1
weight_clip = 20.0        # ours: omega/pi, normalised to mean 1 under pi, is capped here (pi -> 0 at the ends); 0: off
decompose = True          # eq. 9: two-step generation z_1 -> z_tau -> x; False: one step z_1 -> x
coupled_time = True       # the discriminator's time t = tau; False: t ~ pi independently. False keeps the teacher's
                          # entropy and, at equal entropy, beats the tempered teacher where True does not on the CPU
                          # teacher (equal on syn2 and pydoc), so it stays True (RESULTS.md, "Temperature")
kl_weight = 0.0           # forward KL(teacher || student) at both generation steps (paper 0.05, public code 0.01; per
                          # token here, so about 200x eq. 15's per-sequence balance: off by default, RESULTS.md)
entropy_weight = 0.0      # entropy bonus on the student's x0 predictions (the paper: 5e-4; off by default, as kl_weight)
rgas = False              # also evaluate the student with reward-guided ancestral sampling (sample.generate_rgas);
                          # eval.py --disc does it afterwards (RESULTS.md: it hurt the CPU students)
rgas_h = 30.0             # the tilt of RGAS's first steps, ramped from 0 (DiDi App. F.3)
rgas_tilt = 0.5           # fraction of the steps that tilt; the rest re-rank rgas_candidates candidates
rgas_candidates = 4
rgas_select = 'max'       # re-ranking keeps the highest reward ('max', App. F.3) or draws by 'softmax'
rgas_reward = 'mean'      # eq. 6 as the 'mean' or the 'sum' of the log-ratio over the masked positions
eval_interval = 250       # iterations between evaluations of the EMA student (and at the end)
eval_steps = '8,16'       # K-step budgets
teacher_steps = '1024'    # extra budgets for the teacher in the final table: the many-step reference to match
eval_temperatures = '0.8,0.7,0.6'  # the teacher also sampled from x0_hat^(1/T) at eval_steps: under each verdict, a
                          # line against the teacher tempered to the student's entropy ('': none; README); 0.6
                          # because DiDi's 8-step students sit below the teacher's entropy at T = 0.7
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
    r: Optional[torch.Tensor] = None   # (B,) float64 reward, set after the discriminator's update


def sigma_of(t):
    """The network's noise input at t (B,): sigma_bar_t, float32 (MDLM ignores it; kept for generality)."""
    return sigma_bar_loglinear(t).float()


@torch.no_grad()
def student_samples(student, B, L, mask_id, tau, generator, decompose, repeat=1):
    """x ~ p_nu by the ancestral step of sample.py (float64 draws): z_1 -> z_tau -> x at times 1 > tau > 0 (eq. 9),
    or z_1 -> x in one step without decompose. z_1 is the same for every sequence, so its x0_hat is computed once.
    tau (B,) float64. repeat = G: each z_tau is drawn once and continued G times (consecutive rows; --group_share
    state). -> (z_tau (B, L) or None, x (B, L))"""
    z1 = torch.full((B, L), mask_id, dtype=torch.long, device=tau.device)
    alpha_1 = alpha_loglinear(torch.ones((), dtype=F64, device=tau.device))
    out = student(z1[:1], sigma_of(torch.ones_like(tau[:1]))).expand(B, -1, -1)        # (B, L, V)
    if not decompose:
        return None, mdlm_step(out, z1, 1.0, alpha_1, generator)
    alpha_tau = alpha_loglinear(tau)[:, None]                                       # (B, 1)
    z_tau = mdlm_step(out[::repeat], z1[::repeat], alpha_tau[::repeat], alpha_1, generator)
    z_tau = z_tau.repeat_interleave(repeat, 0)
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
    train (the public config's 4), the rest stays the teacher's."""
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


def rollout_rewards(disc, roll, cfg, language, mask_id, generator=None):
    """The reward of each student sample: eq. 6 from the discriminator, or with --reward oracle the exact
    log-likelihood per token of the clean sample under the synthetic language (what the discriminator's log-ratio
    should rank like, were it perfect and the student close to the teacher). -> (B,) float64
    With --reward_masks k > 0, eq. 6 is averaged over k fresh maskings z ~ Q(. | x) at the same t, drawn from
    generator, instead of read off roll.z, the masking the discriminator has just taken its step on. Eq. 5 weighs
    grad log p_nu(x) by R(z_t): replacing R(z_t) by its mean over z_t given x keeps the expectation of eq. 5 and
    lowers its variance (Rao-Blackwell), and the fresh draws are ones the discriminator has not fitted."""
    if cfg['reward'] == 'oracle':
        return (language.log_prob(roll.x.cpu()) / roll.x.shape[1]).to(roll.x.device)
    sigma, k = sigma_of(roll.t), cfg['reward_masks']
    if k == 0:
        return rewards(disc, roll.z, sigma, mask_id).double()
    alpha = alpha_loglinear(roll.t)[:, None].repeat(k, 1)
    z = Absorbing(mask_id).sample(roll.x.repeat(k, 1), alpha, generator)          # (k B, L): draw j is rows j B..
    return rewards(disc, z, sigma.repeat(k), mask_id).double().view(k, -1).mean(0)


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
# The two losses of an iteration

def make_rollout(student, x_real, generator, cfg, mask_id):
    """Algorithm 1's first lines: tau ~ pi, x ~ p_nu (no gradient), then x and the teacher sample x' (B, L) masked at
    the same time t (= tau with coupled time, else a fresh draw from pi). With --group_share the G consecutive rows of
    a group share tau and t (and with 'state' also z_tau): eq. 7 then ranks samples of one prompt, not of different
    times, whose rewards differ mostly because the mask ratio does."""
    B, L = x_real.shape
    G = cfg['group_size'] if cfg['group_share'] != 'none' else 1       # rows that share their times
    tau = draw_times(B // G, generator, cfg).repeat_interleave(G)
    z_tau, x = student_samples(student, B, L, mask_id, tau, generator, cfg['decompose'],
                               G if cfg['group_share'] == 'state' else 1)
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
    A the grouped advantage of the reward roll.r (eq. 6-7), w = omega/pi (time_weight); without the / L with
    --logp_norm sequence (eq. 15's sum). Only the student gets gradient.
    -> (loss, policy term, kl, entropy, mean raw reward, mean log p_nu(x) per token)"""
    advantage = group_advantages(roll.r.float(), cfg['group_size'], cfg['reward_clip'], cfg['adv_clip'])
    weight = time_weight(roll.t, cfg).float()
    inputs, sigma = step_inputs(roll, mask_id)
    out = student(inputs, sigma)                                                     # (1 + B or 1, L, V)
    L = roll.x.shape[1]
    logp = path_log_prob(out[:1], out[1:] if roll.z_tau is not None else None, roll.z_tau, roll.x, mask_id)
    logp = logp / L if cfg['logp_norm'] == 'token' else logp
    policy = -(weight * advantage * logp).mean()
    with torch.no_grad():
        out_teacher = teacher(inputs, sigma)
    kl, entropy = regularisers(out, out_teacher, inputs, mask_id)
    loss = policy + cfg['kl_weight'] * kl - cfg['entropy_weight'] * entropy
    return loss, policy.detach(), kl.detach(), entropy.detach(), roll.r.float().mean(), logp.detach().mean() / (
        1 if cfg['logp_norm'] == 'token' else L)


def iteration(state, teacher, dataset, bank, cfg, it, rank, world, device, ckpt_path, diagnostics=None):
    """Algorithm 1 once: student samples, one discriminator update (eq. 8), one student update (eq. 5-7, 9), the
    EMA. Both phases see the same micro-batches: the rollouts of phase 1 are kept for phase 2, and appended to
    diagnostics (a list) when one is given. With --disc_steps k > 1 the discriminator first takes k - 1 updates on
    rollouts of its own (batch keys 1 .. k-1; Algorithm 1's step keeps key 0). -> LOGGED values (the
    discriminator's from its last update)"""
    student, disc, local = state['student'], state['disc'], cfg['grad_accum'] // world
    mask_id, language = dataset.vocab_size, dataset.language()
    rollouts = []

    def disc_fn(x_data, generator, keep=True):
        x_real = x_data if bank is None else \
            bank[torch.randint(len(bank), (len(x_data),), generator=generator, device=device)]
        roll = make_rollout(common.unwrap(student), x_real, generator, cfg, mask_id)
        if keep:
            rollouts.append((roll, generator))
        return discriminator_loss(disc, roll.z, roll.z_real, sigma_of(roll.t), cfg['label_smoothing'])

    def disc_step(phase, fn):
        batches = common.micro_batches(dataset, cfg, it, phase, rank, world, device)
        disc_stats = common.all_reduce_mean(common.accumulate(disc, batches, fn, local, device), world)
        common.check_finite(disc_stats, 'discriminator', it, ckpt_path, FLAGS)
        disc_norm = common.update(disc, state['disc_optimizer'], cfg['disc_lr'], cfg['grad_clip'])
        common.unwrap(disc).power_iteration()   # once per update: see model.DiscriminatorHead
        return disc_stats, disc_norm

    for j in range(cfg['disc_steps'] - 1):   # extra steps on fresh rollouts of the same student, not kept
        disc_step(1 + j, lambda x, g: disc_fn(x, g, keep=False))
    disc_stats, disc_norm = disc_step(0, disc_fn)

    for roll, generator in rollouts:   # the reward of eq. 6 from the updated discriminator, or the oracle's
        roll.r = rollout_rewards(common.unwrap(disc), roll, cfg, language, mask_id, generator)
        if diagnostics is not None:
            diagnostics.append(roll)
    student_fn = lambda roll, g: student_loss(student, teacher, roll, cfg, mask_id)
    stats = common.all_reduce_mean(common.accumulate(student, rollouts, student_fn, local, device), world)
    common.check_finite(stats, 'DiDi student', it, ckpt_path, FLAGS)
    lr = common.learning_rate(it, cfg['lr'], cfg['warmup_iters'])
    student_norm = common.update(student, state['optimizer'], lr, cfg['grad_clip'])
    state['ema'].update(student)
    return [*disc_stats.tolist(), *stats.tolist(), student_norm, disc_norm]


# ----------------------------------------------------------------------------------------------------------------
# Diagnostics: does the reward carry signal?

def correlation(a, b):
    """Pearson correlation of two centred float64 vectors (0 when either is constant)."""
    denominator = (a.pow(2).sum() * b.pow(2).sum()).sqrt()
    return (a * b).sum().item() / denominator.item() if denominator > 0 else 0.0


def reward_diagnostics(rollouts, cfg, language, bins=10):
    """Over the rollouts of a log window: how much of the reward's variance the time t explains (the between-bin
    share, t cut into `bins` quantile bins), the correlation of the reward with the exact log-likelihood of the
    sample within t-bins and within eq. 7's groups (synthetic data only), and the fractions of rewards at the clip
    and at the floor/ceiling that label smoothing s puts on the optimal logit, log(s/2 / (1 - s/2)). -> dict"""
    t = torch.cat([roll.t for roll in rollouts]).double().cpu()
    r = torch.cat([roll.r for roll in rollouts]).double().cpu()
    out = {}
    edges = torch.quantile(t, torch.linspace(0, 1, bins + 1, dtype=F64)[1:-1])
    which = torch.bucketize(t, edges)
    bin_mean = torch.zeros(bins, dtype=F64).index_add_(0, which, r) / torch.bincount(which, minlength=bins).clamp_min(1)
    total = (r - r.mean()).pow(2).sum()
    out['reward_var_by_t'] = ((bin_mean[which] - r.mean()).pow(2).sum() / total).item() if total > 0 else 0.0
    if language is not None:
        loglik = torch.cat([language.log_prob(roll.x.cpu()) / roll.x.shape[1] for roll in rollouts])
        out['reward_loglik_corr_t_bins'] = correlation(r - bin_mean[which], loglik - (
            torch.zeros(bins, dtype=F64).index_add_(0, which, loglik) / torch.bincount(which, minlength=bins)
            .clamp_min(1))[which])
        G = cfg['group_size']
        groups = lambda v: v.view(-1, G) - v.view(-1, G).mean(1, keepdim=True)
        out['reward_loglik_corr_groups'] = correlation(groups(r), groups(loglik))
    if cfg['reward'] == 'disc':
        out['reward_at_clip'] = (r.abs() >= cfg['reward_clip']).double().mean().item() if cfg['reward_clip'] > 0 else 0.0
        s = cfg['label_smoothing']
        edge = math.log(s / 2 / (1 - s / 2)) if s > 0 else -float('inf')
        out['reward_at_floor'] = ((r <= edge + 0.1) | (r >= -edge - 0.1)).double().mean().item()
    return out


@torch.no_grad()
def discriminator_accuracy(state, dataset, bank, cfg, it, device):
    """The discriminator on a held-out batch (fresh student samples and real/bank sequences, masked at the same
    times, never trained on): the fraction it labels right, each sequence by the sign of its eq. 6 reward."""
    mask_id = dataset.vocab_size
    (x_data, generator), = common.micro_batches(dataset, {**cfg, 'grad_accum': 1}, it, 10_000, 0, 1, device)
    x_real = x_data if bank is None else bank[torch.randint(len(bank), (len(x_data),), generator=generator,
                                                           device=device)]
    roll = make_rollout(common.unwrap(state['student']), x_real, generator, cfg, mask_id)
    disc = common.unwrap(state['disc'])
    sigma = sigma_of(roll.t)
    fake, real = rewards(disc, roll.z, sigma, mask_id), rewards(disc, roll.z_real, sigma, mask_id)
    return 0.5 * ((real > 0).double().mean() + (fake < 0).double().mean()).item()


def diagnostics_table(history):
    """The diagnostics of every log window, as a markdown table (appended to results.md)."""
    keys = [('reward_var_by_t', 'reward variance explained by t'), ('reward_loglik_corr_t_bins',
            'corr(reward, exact log p) within t-bins'), ('reward_loglik_corr_groups', 'within groups'),
            ('reward_at_clip', 'at the clip'), ('reward_at_floor', 'at the smoothing floor'),
            ('disc_accuracy', 'held-out disc. accuracy')]
    keys = [(k, title) for k, title in keys if any(k in row for row in history['train'])]
    lines = ['| iteration | ' + ' | '.join(title for _, title in keys) + ' |', '|---|' + '---|' * len(keys)]
    for row in history['train']:
        lines.append(f"| {row['iter']} | " + ' | '.join(f"{row[k]:.3f}" if k in row else '' for k, _ in keys) + ' |')
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------------------------------------------
# Setup: the teacher, the bank of teacher samples, checkpoints

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


def resume_from(path, state):
    ckpt = common.load_checkpoint(path)
    if ckpt.get('method') != 'didi':
        raise UserError(f"{path} is not a DiDi-Instruct student; pass another --out_dir")
    state['student'].load_state_dict(ckpt['model'])
    state['disc'].load_state_dict(ckpt['discriminator'])
    state['optimizer'].load_state_dict(ckpt['optimizer'])
    state['disc_optimizer'].load_state_dict(ckpt['disc_optimizer'])
    state['ema'].load_state_dict(ckpt['ema'])
    common.set_rng_state(ckpt['rng'])
    return ckpt['iter'], ckpt['history'], ckpt['bank']


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: the EMA student, plain and guided by a frozen copy of the current discriminator (RGAS)

def student_series(state, cfg):
    """{label: (net, discriminator or None)}: the EMA student, and with --rgas the same student guided by RGAS."""
    net = state['ema'].averaged_copy(state['student'])
    series = {'EMA': (net, None)}
    if cfg['rgas']:
        series['EMA, RGAS'] = (net, copy.deepcopy(common.unwrap(state['disc'])).eval().requires_grad_(False))
    return series


# ----------------------------------------------------------------------------------------------------------------
# The loop (Algorithm 1)

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
              (cfg['disc_trainable_blocks'] >= 0, "--disc_trainable_blocks must be at least 0"),
              (cfg['group_share'] in ('none', 'tau', 'state'), f"--group_share is none, tau or state, not "
                                                                 f"{cfg['group_share']!r}"),
              (cfg['reward'] in ('disc', 'oracle'), f"--reward is disc or oracle, not {cfg['reward']!r}"),
              (cfg['disc_steps'] >= 1, f"--disc_steps is a count of discriminator updates per student update "
                                       f"(at least 1), not {cfg['disc_steps']}"),
              (cfg['reward_masks'] >= 0, f"--reward_masks is a count of maskings (0: the discriminator's own), not "
                                         f"{cfg['reward_masks']}"),
              (cfg['logp_norm'] in ('token', 'sequence'), f"--logp_norm is token or sequence, not {cfg['logp_norm']!r}"),
              (cfg['group_share'] != 'state' or cfg['decompose'], "--group_share state needs --decompose true: the "
                                                                   "shared state is the intermediate z_tau")]
    common.check_batch(cfg, world)
    for ok, message in checks:
        if not ok:
            raise UserError(message)


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
    N = dataset.vocab_size
    out_dir = cfg['out_dir'] or os.path.join('out', f"didi-mdlm-{common.folder_name(cfg['data'])}")
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if cfg['reward'] == 'oracle' and dataset.language() is None:
        raise UserError(f"--reward oracle scores samples by the synthetic language's exact likelihood; --data "
                        f"{cfg['data']} is text: use --reward disc")
    if cfg['real'] == 'bank' and not cfg['bank']:
        cfg = {**cfg, 'bank': os.path.join(out_dir, f"bank_{cfg['bank_steps']}steps_{cfg['bank_size']}.npy")}

    teacher, net, _ = train.load_teacher(cfg['teacher_ckpt'], 'mdlm', dataset, cfg['data'], cfg['device'], cfg['init'])
    teacher = teacher.to(device) if isinstance(teacher, torch.nn.Module) else teacher
    net = net.to(device)
    torch.manual_seed(cfg['seed'])           # the discriminator's new head: the same on every rank
    student = copy.deepcopy(net).train().requires_grad_(True)
    disc = make_discriminator(net, cfg['disc_trainable_blocks'])
    torch.manual_seed(cfg['seed'] + rank)    # only dropout draws from the global RNG; the rest is seeded per step
    state = make_state(student, disc, cfg)
    start, history = 0, {'train': [], 'eval': []}
    if cfg['resume'] and os.path.exists(ckpt_path):
        start, history, bank_path = resume_from(ckpt_path, state)
        cfg = {**cfg, 'bank': bank_path or cfg['bank']}
        if master:
            print(f"resuming {ckpt_path} at iteration {start}")
    bank = teacher_bank(cfg['bank'], teacher, cfg, dataset, rank, world, device) if cfg['real'] == 'bank' else None
    if world > 1:  # two wrappers: each all-reduces only in its own phase
        state.update(student=DDP(student), disc=DDP(disc))
    judge = evaluation.load_judge(cfg['judge'], dataset, cfg['data'], device) if cfg['judge'] else None
    rgas = dict(h_max=cfg['rgas_h'], tilt_fraction=cfg['rgas_tilt'], candidates=cfg['rgas_candidates'],
                select=cfg['rgas_select'], reward=cfg['rgas_reward'])
    bench = evaluation.Bench(dataset, judge, cfg['eval_samples'], cfg['eval_batch_size'], cfg['seed'], device, rgas)
    evaluator = evaluation.Evaluator(bench, cfg, 'mdlm')
    evaluate = cfg['eval_samples'] > 0 and bool(evaluator.steps())

    if master:
        trainable = sum(p.numel() for p in disc.parameters() if p.requires_grad)
        print(f"DiDi-Instruct: teacher {cfg['teacher_ckpt'] or 'default'}, {net.num_params() / 1e6:.2f}M parameters "
              f"x 2 + a discriminator ({trainable / 1e6:.2f}M trainable), data {dataset.path} (N={N}, "
              f"L={dataset.seq_len}), teacher samples from {cfg['bank'] or 'the data'}, global batch "
              f"{cfg['batch_size'] * cfg['grad_accum']}, {world} process(es), {device}")
    window, rolled, t0 = [], [], time.time()   # numbers and rollouts since the last log line
    bar = tqdm(range(start, cfg['max_iters']), initial=start, total=cfg['max_iters'], disable=not master,
               desc='DiDi-Instruct', dynamic_ncols=True, mininterval=5)
    for it in bar:
        window.append(iteration(state, teacher, dataset, bank, cfg, it, rank, world, device, ckpt_path, rolled))
        done = it + 1
        if done == cfg['max_iters'] or common.every(done, cfg['log_every']):
            means = torch.tensor(window, dtype=F64).mean(0).tolist()
            row = {'iter': done, **dict(zip(LOGGED, means)), 'minutes': (time.time() - t0) / 60}
            if master:
                row.update(reward_diagnostics(rolled, cfg, dataset.language()))
                with torch.random.fork_rng(devices=[]):   # a diagnostic: the run's own draws stay as they were
                    row['disc_accuracy'] = discriminator_accuracy(state, dataset, bank, cfg, it, device)
            history['train'].append(row)
            window, rolled = [], []
            bar.set_postfix(reward=f"{row['reward']:.3f}", d_teacher=f"{row['d_teacher']:.3f}",
                            d_student=f"{row['d_student']:.3f}", entropy=f"{row['entropy']:.3f}")
        if evaluate and master and (done == cfg['max_iters'] or common.every(done, cfg['eval_interval'])):
            evaluator.periodic(history, done, student_series(state, cfg))
        if master and (done == cfg['max_iters'] or common.every(done, cfg['ckpt_interval'])):
            save(ckpt_path, state, cfg, dataset, done, history)
            common.save_history(out_dir, history)
    bar.close()
    if master:
        if evaluate:
            series = student_series(state, cfg)
            students = [(f"DiDi student @{cfg['max_iters']} ({label})", net, disc) for label, (net, disc) in series.items()]
            evaluator.final(teacher, students, out_dir, history)
        table = diagnostics_table(history)
        with open(os.path.join(out_dir, 'results.md'), 'a') as f:
            f.write('\nReward diagnostics (distill_didi.reward_diagnostics), per log window:\n\n' + table)
        print(table)
    return ckpt_path


def main(argv=None):
    return distill(common.configure(DEFAULTS, argv))


if __name__ == '__main__':
    common.run(main)
