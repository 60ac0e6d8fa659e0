"""
Sampling: K steps of the reverse process turn a diffusion language model's denoiser into sequences.

    python sample.py --ckpt out/mdlm-synthetic --steps 64 --num_samples 256 --out samples.npy
    python sample.py --ckpt exact --kind mdlm --steps 1024         # the synthetic language's exact denoiser
    torchrun --standalone --nproc_per_node=2 sample.py --ckpt out/mdlm-synthetic --num_samples 256   # same file
    python sample.py --ckpt out/idlm-mdlm-synthetic --disc out/didi-mdlm-synthetic --rgas true   # guided (RGAS)

A denoiser is any callable net(z (B, L) ids, sigma (B,)) -> (B, L, V) in log space, as model.DiT returns it:
'subs' log x0_hat (MDLM), 'x0' log x0_hat (Duo / UDLM, V = N), 'sedd' log-scores. Sampling starts from pure noise
(all masks, or uniform tokens) at t = 1 and walks the grid t_0 = 1 > ... > t_K = 0, drawing every position of z_s
independently from p(z_s | z_t) = q(z_s | z_t, x = x0_hat(z_t)) (IDLM §2.1):

  MDLM ancestral (DiDi eq. 2):  a mask unmasks with prob (alpha_s - alpha_t)/(1 - alpha_t), to a token ~ x0_hat.
  SEDD analytic / Euler:        with the scores s_y = exp(l_y) (IDLM eq. 3, Q_abs of eq. 12), a mask unmasks with
                                prob min(1, c sum_{y != m} s_y), to a token ~ s_y; c = e^{sigma_t - sigma_s} - 1
                                (analytic) or (t - s) sigma'_t (Euler): equal for the log-linear schedule.
  Duo / UDLM ancestral:         q(z_s | z_t, x0_hat) of the uniform process (IDLM eq. 17-21), per position a
                                mixture "keep z_t / draw from x0_hat / draw uniformly".
  RGAS (DiDi eq. 10-11):        the MDLM step guided by a DiDi-Instruct discriminator: tilted x0 logits in the
                                first steps, the best of M candidates in the last ones.

Every draw is float64 (Zheng et al. 2024, IDLM App. F): float32 Gumbel noise truncates the tail and lowers the
effective temperature, which flatters generative perplexity. The reference step builds the (B, L, V) float64
posterior; the fused step (default, tested against it in distribution) decides per position whether it changes,
then draws only those positions by a float64 Gumbel-max, visiting the logits --block numbers at a time, many rows
per kernel: memory O(block), about B L V / block visits. Batch j (sequences j B to j B + B - 1) draws its noise
from (--seed, j B), and torchrun gives each process a run of whole batches: any number of processes writes the
same file.

Where this differs from the papers: the last step lands on s = 0 exactly, so every remaining mask is unmasked
(MDLM), SEDD takes its denoising step to sigma = 0, the uniform posterior becomes p(x | z_t), and every sampler
makes exactly K network calls (fewer with MDLM's cache, one more with Duo's greedy tail): a K-step student meets a
K-step teacher at equal cost. --temperature T draws from x0_hat^(1/T) (SEDD keeps its score mass, so T changes
which token, not whether a position unmasks); the papers sample at T = 1, and a tempered teacher is the baseline a
student must beat at equal entropy (RESULTS.md, "Temperature").
"""

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import official
from common import UserError
from data import DataError, TokenData, ensure_data, exact_denoiser, load_data
from losses import DuoObjective  # only for Duo's alpha(t) schedule, stored with the checkpoint
from model import NEG_INF, Discriminator, DiTConfig, discriminator_reward
from processes import Absorbing, Uniform, alpha_loglinear, dsigma_bar_loglinear, sigma_bar_loglinear, time_grid

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value; a positional argument is a config file of `key = value` lines)
ckpt = ''                 # a checkpoint (file or folder), or 'exact': the synthetic language's exact denoiser
kind = 'mdlm'             # only with --ckpt exact: mdlm | sedd | duo (duo = UDLM, uniform process, log-linear schedule)
data = 'synthetic'        # only with --ckpt exact: the synthetic data folder whose language is sampled
steps = 64                # K: network calls per sequence
num_samples = 64          # in total, over all processes
batch_size = 0            # sequences per network call; 0: 64, or fewer at large L V (batch_for)
seed = 0                  # batch j draws its noise from (seed, j * batch_size), on any number of processes
out = ''                  # default: <ckpt folder>/samples_<steps>.npy (decoded text beside it, as .txt)
fused = True              # False: the reference sampler (full float64 posteriors), slow but obviously right
sampler = 'analytic'      # SEDD only: analytic | euler
greedy_tail = False       # Duo only: end with every token set to argmax x0_hat (lower entropy)
temperature = 1.0         # draw tokens from x0_hat^(1/T) (temper); < 1 trades entropy for GenPPL
block = 0                 # numbers per visit of a fused step's float64 work (its memory); 0: default_block
device = 'auto'
progress = True
rgas = False              # MDLM only: reward-guided ancestral sampling with a DiDi-Instruct discriminator (eq. 10-11)
disc = ''                 # with --rgas: the checkpoint holding the discriminator; default: --ckpt (a DiDi student)
rgas_h = 30.0             # the tilt h of the first steps, ramped linearly from 0 (DiDi App. F.3)
rgas_tilt = 0.5           # fraction of the steps (the first ones) that tilt; the others re-rank candidates
rgas_candidates = 4       # M candidates per re-ranking step
rgas_select = 'max'       # keep the candidate with the highest reward ('max', DiDi App. F.3) or draw by 'softmax'
rgas_reward = 'mean'      # eq. 6's reward: the 'mean' or the 'sum' of the log-ratio over the masked positions
teacher_kind = ''         # mdlm | duo | sedd: what an official Lightning .ckpt without hyper_parameters holds
export_hf = ''            # a folder: write --ckpt's EMA weights there in the official Hugging Face layout, no sampling
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

KINDS = ('mdlm', 'sedd', 'duo')
F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# Drawing tokens in float64, a block of numbers at a time

def categorical(probs, generator):
    """Reference draw: one token per row of probs (..., V), by inverting the float64 CDF. Rows need not be
    normalised. -> (...) long"""
    cdf = probs.to(F64).cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), dtype=F64, generator=generator, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)


def default_block(device):
    """Numbers per visit of a fused step: 2^20 on a CPU (an 8 MiB float64 buffer, 20 rows at V = 50k, stays in its
    last-level cache); 2^24 on a GPU, where a step at B L = 16k positions and V = 50k is then about 50 visits."""
    return 2 ** 24 if torch.device(device).type == 'cuda' else 2 ** 20


def visits(n, width, block):
    """[0, n) as at most ceil(n * width / block) near-equal slices: n rows (or columns) of `width` numbers each,
    visited about `block` numbers (at least one row) at a time. -> list of slices"""
    count = max(1, (n * width + block - 1) // block)
    per = max(1, -(-n // count))
    return [slice(i, min(i + per, n)) for i in range(0, n, per)]


def gumbel_argmax(log_weights, generator, rows=None, block=0):
    """One categorical draw per row, proportional to exp(log_weights), by the Gumbel-max trick in float64:
    argmax_y (l_y + g_y), g_y = -log(-log u_y). log_weights (R, V), any float dtype, unnormalised, -inf allowed;
    rows: the (M,) rows to draw, default all. -> (M,) long (a row that is all -inf returns 0).

    All M rows are visited together, a slice of columns at a time (about M V / block visits), with a running max.
    The noise comes column by column (M numbers each), so on CPU the draws are the same for every block."""
    device, block = log_weights.device, block or default_block(log_weights.device)
    rows = torch.arange(log_weights.shape[0], device=device) if rows is None else rows
    best = torch.full((len(rows),), -torch.inf, dtype=F64, device=device)
    best_id = torch.zeros(len(rows), dtype=torch.long, device=device)
    for cols in visits(log_weights.shape[1], len(rows), block):
        g = torch.rand(cols.stop - cols.start, len(rows), dtype=F64, generator=generator, device=device)  # (C, M)
        g.log_().neg_().log_().neg_()                                                  # Gumbel noise
        value, index = g.add_(log_weights[:, cols].index_select(0, rows).T).max(0)     # (M,) best in these columns
        better = value > best
        best = torch.where(better, value, best)
        best_id = torch.where(better, index + cols.start, best_id)
    return best_id


def logsumexp_rows(log_weights, rows=None, block=0):
    """log sum_y exp(l_y) in float64 for the given rows of log_weights (R, V), default all. -> (M,) float64
    The rows are visited about block / V at a time (about M V / block visits) through one float64 buffer."""
    V, device, block = log_weights.shape[1], log_weights.device, block or default_block(log_weights.device)
    M = log_weights.shape[0] if rows is None else len(rows)
    parts = visits(M, V, block)
    result = torch.empty(M, dtype=F64, device=device)
    buffer = torch.empty(parts[0].stop if parts else 0, V, dtype=F64, device=device)   # the first visit is the longest
    for part in parts:
        x = buffer[:part.stop - part.start]
        x.copy_(log_weights[part] if rows is None else log_weights.index_select(0, rows[part]))   # (r, V) float64
        top = x.amax(-1, keepdim=True)
        top.masked_fill_(top == -torch.inf, 0.0)                                          # a row of -inf gives -inf
        result[part] = x.sub_(top).exp_().sum(-1).log_().add_(top[:, 0])
    return result


def change_tokens(log_weights, z, change_prob, generator, block=0):
    """The fused draw shared by the absorbing samplers: position (b, i) changes with probability change_prob
    (B, L) float64, and then takes a token drawn from exp(log_weights) (B, L, N). Untouched positions keep z."""
    u = torch.rand(z.shape, dtype=F64, generator=generator, device=z.device)
    rows = (u < change_prob).flatten().nonzero()[:, 0]                 # (M,) flat positions that change
    z_new = z.flatten().clone()
    z_new[rows] = gumbel_argmax(log_weights.flatten(0, 1), generator, rows, block)
    return z_new.view_as(z)


# ----------------------------------------------------------------------------------------------------------------
# One step of each sampler: the full posterior (reference) and the fused draw

def mdlm_posterior(out, z, alpha_s, alpha_t):
    """q(z_s | z_t, x0_hat), DiDi eq. 2 (processes.Absorbing.posterior): a masked token stays masked with
    prob (1 - alpha_s)/(1 - alpha_t), else becomes y with prob (alpha_s - alpha_t) x0_hat_y/(1 - alpha_t).
    out: SUBS log x0_hat (B, L, N + 1). -> (B, L, N + 1) float64"""
    return Absorbing(out.shape[-1] - 1).posterior(z, torch.softmax(out.to(F64), -1), alpha_s, alpha_t)


def mdlm_step(out, z, alpha_s, alpha_t, generator, fused=True, block=0):
    """One MDLM ancestral step t -> s (DiDi eq. 2). Fused: unmask each masked position with probability
    (alpha_s - alpha_t)/(1 - alpha_t), then draw its token from x0_hat without the mask column (SUBS: no mass)."""
    if not fused:
        return categorical(mdlm_posterior(out, z, alpha_s, alpha_t), generator)
    mask_id = out.shape[-1] - 1
    unmask = torch.where(z == mask_id, (alpha_s - alpha_t) / (1 - alpha_t), 0.0)        # (B, L)
    return change_tokens(out[..., :mask_id], z, unmask, generator, block)


def sedd_posterior(out, z, coef, final):
    """SEDD's reverse transition at a masked position (IDLM eq. 3's score s_y = exp(l_y), Q_abs of eq. 12):
    p(y) = coef * s_y for y != m and p(m) = 1 - coef * sum_{y != m} s_y, clamped at 0 as in the SEDD code; the
    final (denoising) step gives the mask no mass at all. Unmasked positions stay. out: log-scores (B, L, N + 1).
    -> (B, L, N + 1) float64, rows normalised"""
    mask_id = out.shape[-1] - 1
    probs = coef * torch.exp(out.to(F64))
    stay = (1 - probs[..., :mask_id].sum(-1)).clamp_min(0)
    probs[..., mask_id] = 0.0 if final else stay
    probs = probs / probs.sum(-1, keepdim=True)
    keep = torch.nn.functional.one_hot(z, out.shape[-1]).to(F64)
    return torch.where((z == mask_id)[..., None], probs, keep)


def sedd_step(out, z, coef, final, generator, fused=True, block=0):
    """One SEDD step with log-scores out (B, L, N + 1); coef: analytic or Euler (sedd_coefficient). Fused:
    P(change) = min(1, coef * sum_{y != m} s_y) from a float64 logsumexp over the masked rows only, then the new
    token ~ s_y. final: the denoising step to sigma = 0, which unmasks every remaining position."""
    if not fused:
        return categorical(sedd_posterior(out, z, coef, final), generator)
    mask_id = out.shape[-1] - 1
    scores = out[..., :mask_id]                                        # (B, L, N) a view: the mask is no target
    rows = (z == mask_id).flatten().nonzero()[:, 0]                    # (M,) the masked positions
    change = torch.zeros(z.numel(), dtype=F64, device=z.device)
    change[rows] = 1.0 if final else (coef * logsumexp_rows(scores.flatten(0, 1), rows, block).exp()).clamp(0, 1)
    return change_tokens(scores, z, change.view_as(z), generator, block)


def duo_posterior(out, z, alpha_s, alpha_t):
    """q(z_s | z_t, x0_hat) of the uniform process (processes.Uniform.posterior, Bayes' rule with x0_hat in
    place of x0). out: log x0_hat (B, L, N). -> (B, L, N) float64"""
    return Uniform(out.shape[-1]).posterior(z, torch.softmax(out.to(F64), -1), alpha_s, alpha_t)


def duo_mixture(x0_at_z, alpha_s, alpha_t, N):
    """The uniform posterior as a 3-way mixture c_stay onehot(z_t) + c_x x0_hat + c_u uniform (Uniform.posterior's
    numerator grouped by its three vectors): D = N a_t x_i + 1 - a_t, c_stay = (N a_t x_i + a_t/a_s - a_t)/D,
    c_x = (a_s - a_t)/D, c_u = (1 - a_t/a_s)(1 - a_s)/D; x_i = x0_hat at the current token, x0_at_z (B, L)."""
    D = N * alpha_t * x0_at_z + 1 - alpha_t
    c_stay = (N * alpha_t * x0_at_z + alpha_t / alpha_s - alpha_t) / D
    c_x = (alpha_s - alpha_t) / D
    c_u = (1 - alpha_t / alpha_s) * (1 - alpha_s) / D
    return c_stay, c_x, c_u


def duo_step(out, z, alpha_s, alpha_t, generator, fused=True, block=0):
    """One Duo / UDLM ancestral step t -> s. Fused: pick the mixture component per position (duo_mixture), then
    draw tokens from x0_hat (Gumbel-max) only where the component is x0_hat, uniformly where it is 'uniform'.
    x_i needs x0_hat normalised in float64: one logsumexp over every row."""
    if not fused:
        return categorical(duo_posterior(out, z, alpha_s, alpha_t), generator)
    N = out.shape[-1]
    flat, ids = out.flatten(0, 1), z.flatten()                          # (B L, N), (B L,)
    log_x_i = flat.gather(1, ids[:, None])[:, 0].to(F64) - logsumexp_rows(flat, block=block)
    _, c_x, c_u = duo_mixture(torch.exp(log_x_i), alpha_s, alpha_t, N)
    u = torch.rand(ids.shape, dtype=F64, generator=generator, device=z.device)
    from_x0 = u < c_x
    from_uniform = ~from_x0 & (u < c_x + c_u)
    z_new = ids.clone()
    z_new[from_x0] = gumbel_argmax(flat, generator, from_x0.nonzero()[:, 0], block)
    z_new[from_uniform] = torch.randint(0, N, (int(from_uniform.sum()),), generator=generator, device=z.device)
    return z_new.view_as(z)


# ----------------------------------------------------------------------------------------------------------------
# The K-step loop

@dataclass
class TimePlan:
    """The K-step grid: t (K + 1,), alpha_t and the network's sigma = -log alpha_t, all float64, with the last
    point moved to s = 0 (alpha = 1, sigma = 0). sigma_min is sigma at the grid's own t_min (greedy tail)."""
    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    sigma_min: torch.Tensor


def time_plan(steps, schedule='loglinear', device='cpu'):
    """schedule 'loglinear' (MDLM, SEDD, UDLM): alpha_t = 1 - (1 - eps) t, sigma = sigma_bar_t. Or a DuoObjective:
    alpha_t from Duo's Gaussian latent (IDLM eq. 22), sigma = -log alpha_t (what the Duo network is fed)."""
    t = time_grid(steps).to(device)
    if schedule == 'loglinear':
        alpha, sigma = alpha_loglinear(t), sigma_bar_loglinear(t)
    else:
        alpha = schedule.alpha(t).to(F64)
        sigma = -torch.log(alpha)
    sigma_min = sigma[-1].clone()
    t[-1], alpha[-1], sigma[-1] = 0.0, 1.0, 0.0
    return TimePlan(t, alpha, sigma, sigma_min)


def sedd_coefficient(sampler, plan, k):
    """coef of step k (t -> s): analytic e^{sigma_t - sigma_s} - 1, Euler (t - s) dsigma_bar/dt (at t)."""
    t, s = plan.t[k], plan.t[k + 1]
    if sampler == 'euler':
        return (t - s) * dsigma_bar_loglinear(t)
    return torch.expm1(plan.sigma[k] - plan.sigma[k + 1])


def temper(out, kind, temperature):
    """The network's output with x0_hat replaced by x0_hat^(1/T), renormalised over the N real tokens at every
    position (an MDLM's mask column and carry-over stay). SEDD: the tempered log-scores keep their total mass, so
    whether a position unmasks does not change. T = 1 returns out itself, any other T float64 copies (B, L, V)."""
    if temperature == 1.0:
        return out
    if kind == 'duo':
        return (out.to(F64) / temperature).log_softmax(-1)
    real = out[..., :-1].to(F64)
    shape = (real / temperature).log_softmax(-1)
    if kind == 'sedd':
        shape = shape + real.logsumexp(-1, keepdim=True)
    return torch.cat([shape.clamp_min(NEG_INF), out[..., -1:].to(F64)], dim=-1)


def take_step(kind, out, z, plan, k, generator, fused, sampler, block):
    """Step k of the grid, t_k -> t_{k+1}, for any kind of model."""
    alpha_t, alpha_s = plan.alpha[k], plan.alpha[k + 1]
    if kind == 'mdlm':
        return mdlm_step(out, z, alpha_s, alpha_t, generator, fused, block)
    if kind == 'sedd':
        final = k == len(plan.t) - 2
        return sedd_step(out, z, sedd_coefficient(sampler, plan, k), final, generator, fused, block)
    return duo_step(out, z, alpha_s, alpha_t, generator, fused, block)


def call_network(net, z, sigma):
    """net(z, sigma) under bf16 autocast on GPU for a torch module; exact (float64) denoisers run as they are."""
    amp = common.autocast(z.device) if isinstance(net, torch.nn.Module) else nullcontext()
    with amp:
        return net(z, sigma)


def sample_batch(net, kind, B, L, N, plan, generator, fused, sampler, greedy_tail, cache, block, bar=None,
                 temperature=1.0):
    """The K steps on one batch from pure noise. cache: the network ignores sigma (MDLM's released model, the exact
    absorbing denoiser), so rows of the batch that did not change since the last call keep their output, and a step
    where no row changed makes no call. -> (z (B, L) long, number of network calls)"""
    device = generator.device
    if kind == 'duo':
        z = torch.randint(0, N, (B, L), generator=generator, device=device)    # the uniform prior at t = 1
    else:
        z = torch.full((B, L), N, dtype=torch.long, device=device)             # all masks
    out, stale, calls = None, torch.ones(B, dtype=torch.bool, device=device), 0
    for k in range(len(plan.t) - 1):
        sigma = plan.sigma[k].expand(B)
        if out is None or not cache:
            out, calls = call_network(net, z, sigma), calls + 1
        elif stale.any():
            out[stale], calls = call_network(net, z[stale], sigma[stale]), calls + 1
        z_new = take_step(kind, temper(out, kind, temperature), z, plan, k, generator, fused, sampler, block)
        stale, z = (z_new != z).any(-1), z_new
        if bar is not None:
            bar.update(1)
    if greedy_tail:
        # Duo's greedy tail: one more call on the final z, then every token becomes argmax x0_hat
        z, calls = call_network(net, z, plan.sigma_min.expand(B)).argmax(-1), calls + 1
    return z, calls


def require(checks):
    """Raise ValueError with the message of the first (condition, message) whose condition is false."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@torch.no_grad()
def generate(net, kind, num_samples, seq_len, steps, N, generator, batch_size=64, fused=True, sampler=None,
             greedy_tail=False, time_conditioned=None, schedule='loglinear', block=0, progress=True,
             temperature=1.0):
    """num_samples sequences of seq_len tokens in `steps` steps from the denoiser net (module docstring), on the
    generator's device. kind: 'mdlm' | 'sedd' | 'duo'; N real tokens (absorbing models add mask id N); generator:
    one torch.Generator for every batch in turn, or b0 -> the generator of the batch starting at sequence b0
    (my_batches); sampler (SEDD): 'analytic' | 'euler'; schedule: 'loglinear', or a Duo model's DuoObjective;
    time_conditioned: None reads net.config.time_conditioning, and only False allows MDLM's cache; temperature: draw
    from x0_hat^(1/T) (temper). -> (LongTensor (num_samples, seq_len), NFE: network calls per batch, on average)"""
    sampler = sampler or ('analytic' if kind == 'sedd' else 'ancestral')
    allowed = ('analytic', 'euler') if kind == 'sedd' else ('ancestral',)
    require([(kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {kind!r}"),
             (isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}"),
             (temperature > 0, f"temperature must be above 0 (1 samples the model as it is), got {temperature!r}"),
             (sampler in allowed, f"the {kind} sampler is one of {', '.join(allowed)}, got {sampler!r}"),
             (not greedy_tail or kind == 'duo', "greedy_tail is Duo's option; absorbing samplers end with no noise"),
             (schedule == 'loglinear' or kind == 'duo', "absorbing samplers use the log-linear schedule; a "
                                                        "DuoObjective schedule is for kind 'duo'")])
    if time_conditioned is None:
        config = getattr(net, 'config', None)
        time_conditioned = getattr(config, 'time_conditioning', getattr(net, 'time_conditioned', True))
    cache = kind == 'mdlm' and not time_conditioned
    noise = generator if callable(generator) else lambda b0: generator
    plan = time_plan(steps, schedule, noise(0).device)
    batches = range(0, num_samples, batch_size)
    bar = tqdm(total=len(batches) * steps, desc=f"sample {kind} K={steps}", disable=not progress,
               dynamic_ncols=True, mininterval=2)
    runs = [sample_batch(net, kind, min(batch_size, num_samples - b0), seq_len, N, plan, noise(b0), fused, sampler,
                         greedy_tail, cache, block, bar, temperature) for b0 in batches]
    bar.close()
    samples = torch.cat([z for z, _ in runs]) if runs else torch.zeros(0, seq_len, dtype=torch.long)
    return samples, sum(calls for _, calls in runs) / max(1, len(runs))


# ----------------------------------------------------------------------------------------------------------------
# Reward-guided ancestral sampling (RGAS; DiDi-Instruct eq. 10-11, Algorithm 2, App. F.3), MDLM denoisers only:
# the reward R (DiDi eq. 6) is a DiDi-Instruct discriminator's log-ratio averaged over the masked positions. With
# h = 0 and M = 1 it is the ancestral sampler above, draw for draw.

def rgas_plan(steps, tilt_fraction, h_max, candidates):
    """(h, M) for each step: the first int(steps * tilt_fraction) steps tilt, h ramped linearly from 0 to h_max,
    M = 1; the others re-rank, h = 0, M = candidates."""
    n_tilt = int(steps * tilt_fraction)
    return [(h_max * k / max(1, n_tilt - 1), 1) if k < n_tilt else (0.0, candidates) for k in range(steps)]


def reward_gradient(disc, z, sigma, reward='mean'):
    """grad R(z, t) of eq. 10: the gradient of the reward of eq. 6 (the discriminator's log-ratio averaged over the
    masked positions of z (B, L)) with respect to its one-hot input onehot(z) (B, L, V). Entry (l, y) says, to first
    order, how much more teacher-like the sequence gets if position l holds y. -> (B, L, V) float32, like logits"""
    with torch.enable_grad():
        x = torch.nn.functional.one_hot(z, disc.config.vocab_size).float().requires_grad_(True)
        logits = call_network(disc, x, sigma)                                          # (B, L)
        grad, = torch.autograd.grad(discriminator_reward(logits, z, disc.config.mask_id, reward).sum(), x)
    return grad.float()


def tilt(out, z, grad, h):
    """eq. 10's tilted denoiser: log x0_hat + h * clamp(grad, -1, 1) at masked positions (the clamp is the public
    code's); unmasked rows and the mask column stay. Logits in the network's dtype; the draw from them is float64
    (mdlm_step). out: SUBS log x0_hat (B, L, N + 1). -> (B, L, N + 1) unnormalised log-weights"""
    mask_id = out.shape[-1] - 1
    step = (h * grad.to(out.dtype).clamp(-1, 1)).masked_fill((z != mask_id)[..., None], 0.0)
    step[..., mask_id] = 0.0
    return out + step


def rerank(disc, candidates, sigma_s, generator, select='max', reward='mean'):
    """eq. 11: for each sequence, one of its M candidate states (M, B, L), by the reward R(z^(m), t_s)
    (model.discriminator_reward, in float64): select='max' keeps the highest ("selecting the one with the highest
    reward", App. F.3), 'softmax' draws one with probabilities softmax over m. -> (B, L)"""
    M, B, L = candidates.shape
    flat = candidates.reshape(M * B, L)
    logits = call_network(disc, flat, sigma_s.expand(M * B)).to(F64)                   # (M B, L)
    rewards = discriminator_reward(logits, flat, disc.config.mask_id, reward).view(M, B)
    if select == 'max':
        choice = rewards.argmax(0)                                                      # (B,)
    else:
        choice = categorical(torch.softmax(rewards.T, dim=-1), generator)
    return candidates[choice, torch.arange(B, device=candidates.device)]


def rgas_batch(net, disc, B, L, N, plan, schedule, generator, fused, block, select, reward, bar=None):
    """Algorithm 2 on one batch, from all masks: one student call per step (no cache: the tilt changes the
    denoiser), plus a discriminator forward and backward (tilt) or M forwards (re-rank). -> z (B, L) long"""
    z = torch.full((B, L), N, dtype=torch.long, device=generator.device)
    for k, (h, M) in enumerate(schedule):
        sigma = plan.sigma[k].expand(B)
        out = call_network(net, z, sigma)
        if h > 0:
            out = tilt(out, z, reward_gradient(disc, z, sigma, reward), h)
        draws = [mdlm_step(out, z, plan.alpha[k + 1], plan.alpha[k], generator, fused, block) for _ in range(M)]
        z = draws[0] if M == 1 else rerank(disc, torch.stack(draws), plan.sigma[k + 1], generator, select, reward)
        if bar is not None:
            bar.update(1)
    return z


@torch.no_grad()
def generate_rgas(net, disc, num_samples, seq_len, steps, N, generator, batch_size=64, h_max=30.0,
                  tilt_fraction=0.5, candidates=4, fused=True, block=0, progress=True, select='max', reward='mean'):
    """generate() for an MDLM denoiser net (a DiDi-Instruct student, or any other) guided by the discriminator
    disc (model.Discriminator over the same N + 1 tokens); generator as in generate; select and reward: see
    rerank. Returns (LongTensor (num_samples, seq_len), NFE = student calls per sequence = steps; the
    discriminator's calls come on top)."""
    require([(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}"),
             (candidates >= 1 and 0 <= tilt_fraction <= 1 and h_max >= 0,
              "RGAS needs candidates >= 1, a tilt fraction in [0, 1] and h >= 0"),
             (select in ('max', 'softmax') and reward in ('mean', 'sum'),
              f"RGAS selects by 'max' or 'softmax' of a 'mean' or 'sum' reward, not {select!r} / {reward!r}"),
             (disc.config.vocab_size == N + 1,
              f"the discriminator reads {disc.config.vocab_size - 1} tokens, the sampled model {N}")])
    noise = generator if callable(generator) else lambda b0: generator
    plan, schedule = time_plan(steps, 'loglinear', noise(0).device), rgas_plan(steps, tilt_fraction, h_max, candidates)
    batches = range(0, num_samples, batch_size)
    bar = tqdm(total=len(batches) * steps, desc=f"RGAS K={steps}", disable=not progress, dynamic_ncols=True,
               mininterval=2)
    samples = [rgas_batch(net, disc, min(batch_size, num_samples - b0), seq_len, N, plan, schedule, noise(b0), fused,
                          block, select, reward, bar) for b0 in batches]
    bar.close()
    return torch.cat(samples) if samples else torch.zeros(0, seq_len, dtype=torch.long), float(steps)


def load_discriminator(path, N, device):
    """The discriminator saved with a DiDi-Instruct student (distill_didi.py), frozen, in eval mode, on device."""
    ckpt = common.load_checkpoint(path)
    if 'discriminator' not in ckpt:
        raise UserError(f"{path} holds no discriminator; pass a DiDi-Instruct checkpoint (distill_didi.py) as --disc")
    disc = Discriminator(DiTConfig(**ckpt['model_config']))
    disc.load_state_dict(ckpt['discriminator'])
    if disc.config.vocab_size != N + 1:
        raise UserError(f"the discriminator in {path} reads {disc.config.vocab_size - 1} tokens but the model to "
                        f"guide has {N}; pass a discriminator trained on the same data")
    return disc.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# What to sample: a checkpoint, or the synthetic language's exact denoiser (data.exact_denoiser)

def duo_schedule(config, N):
    """The DuoObjective (for its alpha(t)) a Duo checkpoint was trained with; 0.0 / 0.0 means 'chosen for N', and
    a checkpoint without duo_spacing was spaced in gamma (losses.DuoObjective)."""
    gammas = (config.get('duo_gamma_min', 0.0), config.get('duo_gamma_max', 0.0))
    spacing = config.get('duo_spacing', 'gamma')
    return DuoObjective(N, spacing=spacing) if gammas == (0.0, 0.0) else DuoObjective(N, *gammas, spacing=spacing)


class StudentScores(torch.nn.Module):
    """A SEDD student distilled by IDLM (distill_idlm.py) read through its x0_hat = softmax over y != m of its
    log-scores (the loss cannot see their total mass), as the scores l_y = log x0_hat_y - log expm1(sigma) that
    x0_hat implies; with them the SEDD analytic step is the MDLM ancestral step. Unmasked positions stay as they are."""

    def __init__(self, net):
        super().__init__()
        self.net, self.config = net, net.config

    def forward(self, z, sigma):
        out = self.net(z, sigma)                                                    # (B, L, N + 1)
        mask_id = out.shape[-1] - 1
        log_mass = torch.log(torch.expm1(sigma.double().clamp_min(1e-8))).to(out.dtype)
        scores = out[..., :mask_id].log_softmax(-1) - log_mass[:, None, None]
        scores = torch.cat([scores, out[..., mask_id:]], dim=-1)
        return torch.where((z == mask_id)[..., None], scores, out)


def load_sampler(ckpt_path, device, teacher_kind=None):
    """A checkpoint (ours, or official: official.load_model) as (net, kind, N, seq_len, data meta, schedule), EMA
    weights in eval mode on device. kind: its 'teacher' field (teacher_kind for an official file without one);
    schedule: 'loglinear', or a Duo model's DuoObjective. A SEDD student comes wrapped in StudentScores."""
    net, ckpt = official.load_model(ckpt_path, which='ema', kind=teacher_kind or None)
    kind = ckpt.get('teacher')
    if kind == 'ar':
        raise UserError(f"{ckpt_path} holds an autoregressive model: it is sampled left to right, one token per call, "
                        f"and is not a diffusion sampler target; sample an mdlm, sedd or duo checkpoint")
    if kind not in KINDS:
        raise UserError(f"{ckpt_path} says its model is {kind!r}; sample.py knows {', '.join(KINDS)}")
    meta = ckpt['data_meta']
    N, seq_len = meta['vocab_size'], meta['seq_len']
    config = ckpt.get('config', {})
    # an official Duo model samples on the log-linear alpha grid, as the Duo code does (official.py)
    timed_by_gamma = kind == 'duo' and config.get('sampling_schedule') != 'loglinear'
    schedule = duo_schedule(config, N) if timed_by_gamma else 'loglinear'
    if kind == 'sedd' and ckpt.get('kind') == 'student':
        net = StudentScores(net)
    return net.to(device).eval(), kind, N, seq_len, meta, schedule


def open_target(cfg, rank, world, device):
    """(net, kind, N, seq_len, meta, schedule, default output folder) for --ckpt, including --ckpt exact."""
    if cfg['ckpt'] != 'exact':
        if not cfg['ckpt']:
            raise UserError("pass --ckpt: a checkpoint (file or folder) or 'exact' for the synthetic language")
        folder = cfg['ckpt'] if os.path.isdir(cfg['ckpt']) else os.path.dirname(cfg['ckpt'])
        return (*load_sampler(cfg['ckpt'], device, cfg['teacher_kind']), folder)
    if cfg['kind'] not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, not {cfg['kind']!r}")
    if rank == 0:
        ensure_data(cfg['data'])                 # prepares 'synthetic' on first use, once
    if world > 1:
        dist.barrier()
    dataset = load_data(ensure_data(cfg['data']))
    language = dataset.language()
    if language is None:
        raise UserError(f"--ckpt exact needs synthetic data with a known language; {cfg['data']} is text")
    folder = os.path.join('out', f"exact-{cfg['kind']}-{os.path.basename(os.path.normpath(dataset.path))}")
    return exact_denoiser(language, cfg['kind']), cfg['kind'], language.N, language.L, dataset.meta, 'loglinear', folder


# ----------------------------------------------------------------------------------------------------------------
# Command line (one process, or torchrun: every rank samples a run of whole batches, rank 0 writes one file)

def batch_for(V, L, numbers=2 ** 30):
    """--batch_size 0: 64 sequences, halved while the (B, L, V) float32 logits would hold more than `numbers`
    (4 GiB): 64 on the synthetic data, 16 at GPT-2's V = 50258 and L = 1024, where one forward of the 169M DiT
    peaks at about 1.06 GiB a sequence."""
    B = 64
    while B > 1 and B * L * V > numbers:
        B //= 2
    return B


def my_batches(num_samples, batch_size, seed, rank, world, device):
    """(first, last, noise): this rank's sequences [first, last), a run of whole batches that start where they would
    in one process (the ranks in order, as even as whole batches allow), and noise(b0), the generator of the batch
    that starts at its sequence b0: common.step_generator(seed, first + b0), by the global index alone."""
    batches = -(-num_samples // batch_size)
    first, last = (-(-batches * r // world) * batch_size for r in (rank, rank + 1))
    return first, min(num_samples, last), lambda b0: common.step_generator(seed, first + b0, device=device)


def gather_samples(x, world):
    """All ranks' samples, in rank order, on every rank (numpy: works for gloo and NCCL alike)."""
    if world == 1:
        return x.cpu().numpy()
    parts = [None] * world
    dist.all_gather_object(parts, x.cpu().numpy())
    return np.concatenate(parts)


def save_samples(path, samples, meta):
    """(num_samples, seq_len) int64 .npy, plus the decoded text beside it (<path>.txt, one sequence a line;
    synthetic tokens are written as ids)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, samples.astype(np.int64))
    try:
        text = TokenData(None, meta, None, None).decode(samples)   # decoding needs only the meta
    except DataError as e:  # e.g. GPT-2 BPE files not available offline: the ids are saved all the same
        print(f"no decoded text written: {e}")
        return
    with open(path + '.txt', 'w') as f:
        f.write('\n'.join(text) + '\n')


def rgas_discriminator(cfg, kind, N, device):
    """--disc, or the discriminator saved in --ckpt itself, for an MDLM model."""
    if kind != 'mdlm':
        raise UserError(f"--rgas guides the MDLM ancestral sampler; {cfg['ckpt']} is a {kind} model")
    path = cfg['disc'] or cfg['ckpt']
    if path == 'exact':
        raise UserError("--rgas with --ckpt exact needs --disc, a DiDi-Instruct checkpoint with its discriminator")
    return load_discriminator(path, N, device)


def export(cfg):
    """--export_hf: the checkpoint's EMA weights as an official-layout Hugging Face folder (official.export_hf)."""
    if not cfg['ckpt'] or cfg['ckpt'] == 'exact':
        raise UserError("--export_hf writes a checkpoint's network: pass it with --ckpt (the exact denoiser has none)")
    net, ckpt = official.load_model(cfg['ckpt'], which='ema', kind=cfg['teacher_kind'] or None)
    folder = official.export_hf(net, ckpt, cfg['export_hf'])   # a CheckpointError is a UserError: one line
    print(f"wrote {folder}/config.json and {folder}/model.safetensors: a {ckpt['teacher']} model in the official "
          f"Hugging Face layout ({net.num_params() / 1e6:.2f}M parameters, EMA weights)")


def main(argv=None):
    cfg = common.configure(DEFAULTS, argv)
    if cfg['export_hf']:
        return export(cfg)
    if cfg['num_samples'] < 1 or cfg['steps'] < 1 or min(cfg['batch_size'], cfg['block']) < 0:
        raise UserError("--num_samples and --steps must be at least 1, --batch_size and --block at least 0 (automatic)")
    if cfg['rgas'] and cfg['temperature'] != 1.0:
        raise UserError("--temperature applies to the plain sampler, not to --rgas; drop one of the two")
    rank, world, device = common.setup_distributed(cfg['device'])
    net, kind, N, L, meta, schedule, folder = open_target(cfg, rank, world, device)
    B = cfg['batch_size'] or batch_for(N + 1, L)
    first, last, noise = my_batches(cfg['num_samples'], B, cfg['seed'], rank, world, device)
    share = last - first
    both = dict(batch_size=B, fused=cfg['fused'], block=cfg['block'], progress=cfg['progress'] and rank == 0)
    start = time.time()
    try:
        if cfg['rgas']:
            x, nfe = generate_rgas(net, rgas_discriminator(cfg, kind, N, device), share, L, cfg['steps'], N, noise,
                                   h_max=cfg['rgas_h'], tilt_fraction=cfg['rgas_tilt'], select=cfg['rgas_select'],
                                   candidates=cfg['rgas_candidates'], reward=cfg['rgas_reward'], **both)
        else:
            x, nfe = generate(net, kind, share, L, cfg['steps'], N, noise, sampler=cfg['sampler'] if kind == 'sedd'
                              else None, greedy_tail=cfg['greedy_tail'], schedule=schedule,
                              temperature=cfg['temperature'], **both)
    except ValueError as e:
        raise UserError(str(e)) from None
    seconds = time.time() - start
    samples = gather_samples(x, world)
    if rank == 0:
        tag = '' if cfg['temperature'] == 1.0 else f"_T{cfg['temperature']:g}"
        path = cfg['out'] or os.path.join(folder, f"{'rgas' if cfg['rgas'] else 'samples'}_{cfg['steps']}{tag}.npy")
        save_samples(path, samples, meta)
        print(f"wrote {len(samples)} samples of {L} tokens to {path} (+ .txt): {kind}, K={cfg['steps']}, batch {B}, "
              f"NFE {nfe:.1f} per batch, {seconds / max(1, share):.4f} s per sequence on rank 0")


if __name__ == '__main__':
    common.run(main)
