"""
IDLM: inverse distillation of a diffusion language model (MDLM, Duo or SEDD-absorb) into a few-step student.

    python distill_idlm.py --teacher mdlm                       # CPU default (+ 10 min for the teacher if absent)
    torchrun --standalone --nproc_per_node=2 distill_idlm.py --teacher mdlm --grad_accum 2 --batch_size 32
    python distill_idlm.py --teacher duo --teacher_ckpt out/dcd-duo-synthetic     # IDLM-DCD: a DCD student as teacher
    python distill_idlm.py --teacher mdlm --teacher_ckpt exact  # the synthetic language's exact denoiser as f*
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
(That stop-gradient drops a score-function term for the unmasked context tokens; --context_grad adds it back. On an
enumerable space the two gradients point nearly the same way: tests/test_idlm_objective.py.)

Why the one-shot student sheds entropy, and the step objective (--student_steps K; ours, MDLM). The distribution
Theorem 3.1 speaks of is p_theta = E_{x~t~}[prod_i G_i(x~t~)]: ONE jump from a noised real sequence to x0. That is
not the distribution of the K-step sampler the student is used as. The mixture can equal p* while its all-mask
component (the sampler's first step) is collapsed onto a few modes, because the components that start from mostly
clean real sequences make up for it; so training reaches its own optimum and the K-step sampler still loses entropy
(enumerated in tests/test_idlm_objective.py: KL(p_theta || p*) -> 0 while the 3-step sampler's entropy falls below
the data's). With --student_steps K the student takes one K-step sampler step from its input instead,
t~ -> s~ = max(0, t~ - 1/K): each masked position unmasks with probability (alpha_s - alpha_t)/(1 - alpha_t), to
G_theta's probabilities. Its state x_s (partly masked) is scored by the same eq. 8, with L_discr the MDLM NELBO of
the forward process run on from s~ (each token of x_s is masked again with probability u ~ U, weight 1/u; a
position masked in x_s has no target). The teacher's denoiser is also the optimal denoiser of that sub-process
(masking coins do not depend on the tokens), so the loss is zero when one student step maps the true marginal at t~
to the true marginal at s~, and positive off it, but at most KL(p_theta(x_s) || q(x_s)), not at least: a network fake
does not know which masks of its input were already in x_s (tests/test_idlm_objective.py enumerates both facts).
A student whose every step reaches that zero makes a K-step chain that ends at p* exactly. --student_steps 0 is the paper's one-shot jump (s~ = 0).
Since eq. 8 pins down only the mixture, the weights of its components decide which optimum descent reaches:
--input_beta b draws t~ ~ Beta(1, b), b > 1 favouring mostly clean inputs. On the enumerable space b = 3 ends at a
3-step sampler with more entropy and a smaller KL to p* than U(0, 1) (tests/test_idlm_objective.py). On the CPU
teacher b = 2 slows the 16-step student's loss of entropy and b = 3 stops it at a worse GenPPL, so the default stays
the paper's U(0, 1) (RESULTS.md, "The student's input times").
--anchor_weight w (ours) picks the optimum directly: it adds w x KL(f*(x_t~) || G_theta(x_t~)), the forward KL from the
teacher's x0 probabilities to the student's at the student's own input (teacher_anchor). Among the students that
reach eq. 8's optimum it prefers the one whose per-position marginals stay nearest the teacher's, and descent stops
there instead of drifting on: on the enumerable space at w = 0.3 its 3-step sampler keeps the data's entropy and is
closer to p* than both eq. 8 alone and the teacher's own sampler (tests/test_idlm_objective.py). On the CPU teacher
w = 0.1 (the default) holds the 16-step student near the teacher's 1024-step GenPPL and entropy from about iteration
300 on, where eq. 11 alone keeps losing entropy; it costs some GenPPL at 8 steps and on languages that do not drift
(RESULTS.md, "The teacher anchor"). --anchor_time linear moves the anchor's weight to the mostly masked inputs: a
closer 2-step sampler on the enumerable space, but no gain on the CPU teacher (RESULTS.md), so flat stays the default.
The fake's speed: Theorem 3.1 needs f_hat at its optimum for the current student, and a fake that lags lets the
student drift. The fake's lr (fake_lr) is 5x the student's: on the CPU teacher this keeps the 16-step entropy within
2% of the teacher's at every evaluation through 600 iterations (2 seeds), where a fake at the student's lr dips just
below it, at 2-5% more GenPPL; more fake steps per student step did the same at 1.4x the time (RESULTS.md, "The
fake's speed").

Logged every log_every iterations: teacher loss, fake loss, their gap, gradient norms, and with track_steps > 0 how
far the fake is from its optimum for the current student (its loss on fresh student samples before and after
track_steps extra updates of a copy). The gap is NOT a convergence signal (it oscillates around zero and may go
negative, as in SiD); judge the run by the EMA student's GenPPL and entropy at K steps, evaluated every
eval_interval iterations on eval_streams noise streams (eval.py), in the final table (results.md) against the
teacher at --teacher_steps and against the teacher tempered to the student's entropy (--eval_temperatures,
temperature.png), and plotted against iterations (history.png). best.pt keeps the evaluated EMA snapshot
with the lowest GenPPL among those within --entropy_tolerance of the teacher's entropy, chosen on the selection
streams and reported on the report streams: a safeguard, not the method.
"""

import copy
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, replace

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
from losses import DuoObjective
from processes import alpha_loglinear, sample_time
from sample import StudentScores, load_sampler

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value; a positional argument is a config file of `key = value` lines)
teacher = 'mdlm'          # mdlm | duo | sedd
teacher_ckpt = ''         # default: out/<teacher>-<data folder name>/ckpt.pt, trained first if absent on 'synthetic';
                          # an official teacher (HF folder, SEDD run folder, Lightning .ckpt: official.py), a student
                          # of another method (IDLM-DCD: a distill_sdtt.py Duo student), or 'exact' (MDLM on the
                          # synthetic language: its exact denoiser, a perfect teacher)
init = ''                 # the network student and fake are copied from; default: the teacher (with 'exact': the
                          # trained default teacher)
data = 'synthetic'        # the real data x0~ the student's inputs are made from (App. C.2)
out_dir = ''              # default: out/idlm-<teacher>-<data folder name>
batch_size = 64           # sequences per micro-batch per process
grad_accum = 1            # micro-batches per phase in total; must be divisible by the number of processes
max_iters = 400           # student updates (each after fake_steps fake updates); with the anchor and the fake_lr below
                          # the entropy holds through 600 iterations and the GenPPL creeps down, so this is what fits
                          # the 20-minute first command, not an early stop (RESULTS.md)
lr = 1e-4                 # student; the paper uses 1e-6 (3e-7 SEDD) for 169M models and far longer runs
fake_lr = 5e-4            # 5x the student's: a fake that tracks the student closer keeps the 16-step entropy within
                          # 2% through 600 iterations, where 1e-4 dips below; it reaches the teacher's GenPPL at ~300
                          # iterations against ~250 (RESULTS.md, "The fake's speed")
warmup_iters = 20         # linear warm-up, then constant (IDLM App. F)
fake_steps = 1            # fake updates per student update (eq. 10 before eq. 11)
fake_ema = 0.0            # > 0: the student is scored against an EMA of the fake with this decay (0: the fake itself)
student_steps = 0         # 0: the student jumps from x_t~ to x0 (the paper); K: it takes one K-step sampler step and
                          # eq. 8 scores the state it reaches (MDLM; see the docstring)
context_grad = False      # MDLM: add the score-function term for the context tokens that App. C.1's stop-gradient drops
input_beta = 1.0          # the student's input times t~ ~ Beta(1, input_beta): 1 is U[0, 1] (the paper); larger
                          # values favour mostly clean inputs (see student_input)
anchor_weight = 0.1       # ours: + this x the forward KL from the teacher's x0 probabilities to the student's at the
                          # student's own input, per token (teacher_anchor); 0: the paper's eq. 11 alone, whose
                          # student keeps shedding entropy (RESULTS.md, "The teacher anchor")
anchor_time = 'flat'      # the anchor's weight over the input time t~: flat | linear (1.5 (1 - alpha_t~): more on the
                          # mostly masked inputs that make a sampler's first steps; see teacher_anchor)
beta2 = 0.999
weight_decay = 0.0
grad_clip = 0.0           # 0: off, as in the paper; gradient norms are logged either way
ema = 0.99                # EMA of the student: evaluated and saved as 'ema' (the paper: 0.9999 over far more steps)
eval_interval = 100       # iterations between evaluations of the EMA student (and at the end); the experiments in
                          # RESULTS.md use 50, which does not leave the first command inside 20 minutes
eval_steps = '4,8,16'     # K-step budgets
eval_raw = False          # also evaluate the raw (not averaged) student at every evaluation
teacher_steps = '1024'    # extra budgets for the teacher in the final table: the many-step reference to match
eval_temperatures = '0.8,0.7'  # the teacher also sampled from x0_hat^(1/T) at eval_steps: under each verdict, a line
                          # against the teacher tempered to the student's entropy ('': none; README). Few, for time:
                          # a student outside their range gets a line saying to add more
keep_best = True          # also keep best.pt: among the periodic evaluations, the EMA student with the lowest GenPPL
                          # at the largest --eval_steps whose entropy is within entropy_tolerance of the teacher's at
                          # its most steps
entropy_tolerance = 0.02
eval_samples = 256        # sequences per budget and noise stream; 0 skips evaluation and the final table
eval_streams = 3          # noise streams per evaluation: each cell is their mean +- sd (eval.py)
eval_batch_size = 64      # sequences generated at once in every evaluation: eval.py's default, so a run's rows are
                          # the rows eval.py prints for the same checkpoint and seed (the draws depend on it)
judge = ''                # an AR checkpoint (train.py --teacher ar) for judge GenPPL; '' = none
track_steps = 0           # > 0: every log_every iterations, measure the fake's distance from its optimum with this
                          # many extra updates of a copy (logged as fake_lag)
ckpt_interval = 200
log_every = 50
seed = 0
device = 'auto'
resume = False
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

KINDS = ('mdlm', 'duo', 'sedd')
LOGGED = ('gap', 'teacher_loss', 'fake_loss', 'context', 'anchor', 'fake_train_loss', 'student_grad_norm',
          'fake_grad_norm')
FLAGS = '--lr and --fake_lr'


# ----------------------------------------------------------------------------------------------------------------
# The student as a generator (App. C.2): x0 probabilities, and the state one sampler step reaches

def student_input(objective, x_data, generator, input_beta=1.0):
    """SamplingFunc of Algorithm 1: t~ ~ U[eps, 1] (stratified) and x_t~ ~ q(. | x0~) for a real batch x_data
    (B, L); for Duo the network input is the soft softmax(w_t~ / tau). -> (Noisy, t~ (B,))
    input_beta b != 1 draws t~ ~ Beta(1, b) instead (inverse CDF of the same stratified u: t = 1 - (1 - u)^(1/b)).
    Eq. 8 constrains only the mixture over t~ of one-jump samples, and which of its many optima descent reaches
    depends on the weights of the mixture's components (tests/test_idlm_objective.py enumerates this)."""
    t = sample_time(len(x_data), generator=generator, device=x_data.device)
    if input_beta != 1.0:
        t = 1 - (1 - t) ** (1.0 / input_beta)
    return objective.corrupt(x_data, t, generator), t


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


def student_state(student, objective, x_data, generator, student_steps, input_beta=1.0):
    """The student's sample: x0 = G_theta(x_t~) (student_steps 0), or the state x_s of one K-step sampler step
    t~ -> s~ = max(0, t~ - 1/K): a masked position of x_t~ unmasks with probability (alpha_s - alpha_t)/(1 - alpha_t)
    to G_theta's probabilities (sample.mdlm_step's coin). -> (x_s (B, L, N): probabilities, zero rows where still
    masked; still_masked (B, L) bool; the input x_t~ (Noisy); x0 = G_theta(x_t~))"""
    noisy, t = student_input(objective, x_data, generator, input_beta)
    x0 = student_x0(student, objective, noisy)
    if student_steps == 0:
        return x0, torch.zeros(x0.shape[:2], dtype=torch.bool, device=x0.device), noisy, x0
    alpha_t = alpha_loglinear(t.double())
    alpha_s = alpha_loglinear((t.double() - 1.0 / student_steps).clamp_min(0.0))
    unmask = ((alpha_s - alpha_t) / (1 - alpha_t))[:, None]                  # (B, 1)
    coin = torch.rand(noisy.x_t.shape, dtype=torch.float64, generator=generator, device=x0.device)
    still_masked = (noisy.x_t == objective.mask_id) & (coin >= unmask)
    return x0 * (~still_masked)[..., None], still_masked, noisy, x0


def corrupt_state(objective, x_s, still_masked, generator):
    """The forward process run on from the student's state: each position of x_s holding a token is masked with
    probability 1 - alpha(u), u ~ U[eps, 1] stratified, tokens drawn from sg(x_s); mdlm_loss's weight is then 1/u,
    the NELBO of this sub-process. Positions still masked in x_s stay masked and have no target (zero rows).
    With nothing still masked this is objective.corrupt(x0, t) draw for draw (the paper's eq. 10-11)."""
    u = sample_time(len(x_s), generator=generator, device=x_s.device)
    if not still_masked.any():
        return objective.corrupt(x_s, u, generator)
    filler = F.one_hot(torch.zeros_like(still_masked, dtype=torch.long), x_s.shape[-1]).to(x_s.dtype)
    noisy = objective.corrupt(torch.where(still_masked[..., None], filler, x_s), u, generator)
    x_t = noisy.x_t.masked_fill(still_masked, objective.mask_id)
    return replace(noisy, input=x_t, x_t=x_t)


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


# ----------------------------------------------------------------------------------------------------------------
# The two losses (eq. 10, 11)

def fake_loss(student, fake, objective, x_data, generator, student_steps=0, input_beta=1.0):
    """eq. 10: the teacher's own loss for the fake on the student's samples; theta gets no gradient."""
    with torch.no_grad():
        x_s, still_masked, _, _ = student_state(student, objective, x_data, generator, student_steps, input_beta)
    noisy = corrupt_state(objective, x_s, still_masked, generator)
    return objective.loss(fake(noisy.input, noisy.sigma), x_s, noisy).mean()


def idlm_gap(teacher, fake, objective, x0, noisy):
    """eq. 11 for given x0 and ONE noisy sample of it: (L_discr(f*, x0) - L_discr(f_hat, x0), teacher loss, fake
    loss), per-token means. Teacher and fake parameters get no gradient; x0 does (the target, and Duo's input)."""
    per_token = token_gaps(teacher, fake, objective, x0, noisy)
    return per_token[0].mean(), per_token[1].mean(), per_token[2].mean()


def token_gaps(teacher, fake, objective, x0, noisy):
    """(teacher - fake, teacher, fake) losses per token (B, L)."""
    teacher_loss = objective.loss(teacher(noisy.input, noisy.sigma), x0, noisy)
    with frozen(fake):
        fake_loss = objective.loss(fake(noisy.input, noisy.sigma), x0, noisy)
    return teacher_loss - fake_loss, teacher_loss, fake_loss


def context_term(x_s, noisy, gaps, mask_id):
    """The score-function term App. C.1's stop-gradient drops: the unmasked tokens of x_t were drawn from the
    student's x_s, and the loss at the masked positions depends on them. Its surrogate is
    mean_b[(r_b - r_-b) * log P_theta(context_b)], r_b the sequence's teacher-minus-fake loss (no gradient) and r_-b
    the mean of the other sequences' (a leave-one-out baseline, so the estimate stays unbiased). -> scalar"""
    context = noisy.x_t != mask_id
    drawn = x_s.gather(-1, noisy.x_t.clamp_max(x_s.shape[-1] - 1)[..., None])[..., 0]    # (B, L) P(token drawn)
    log_p = torch.where(context, drawn.clamp_min(1e-30).log(), torch.zeros_like(drawn)).sum(-1)   # (B,)
    r = gaps.detach().sum(-1) / gaps.numel()                                              # (B,), sums to the mean gap
    baseline = (r.sum() - r) / max(1, len(r) - 1)
    return ((r - baseline) * log_p).sum()


def teacher_anchor(teacher, objective, noisy, x0, linear_time=False):
    """Ours, not the paper's: the forward KL(f*(x_t~) || G_theta(x_t~)) from the teacher's x0 probabilities to the
    student's at the student's own input, summed over positions and averaged per token (MDLM and SEDD carry-over
    positions, one-hot in both, add 0). Eq. 8 pins down only the mixture of one-jump samples, and many students reach
    its optimum, most with a collapsed K-step sampler; this term picks the optimum nearest the teacher's per-position
    marginals (tests/test_idlm_objective.py enumerates both facts).
    linear_time weighs each sequence by 1.5 (1 - alpha_t~), its expected share of masked positions times 1.5: with
    t~ ~ U(0, 1) the same total weight over masked positions as flat, moved to the mostly masked inputs that make a
    sampler's first steps (enumerated against flat: a closer 2-step sampler on four languages). -> scalar"""
    with torch.no_grad():
        target = student_x0(teacher, objective, noisy)                           # (B, L, N), no gradient
    log_ratio = target.clamp_min(1e-30).log() - x0.clamp_min(1e-30).log()
    per_token = torch.where(target > 0, target * log_ratio, torch.zeros_like(log_ratio)).sum(-1)   # (B, L)
    if linear_time:
        per_token = per_token * (1.5 * (1 - noisy.alpha)).to(per_token.dtype)                # alpha (B, 1)
    return per_token.mean()


def student_loss(student, teacher, fake, objective, x_data, generator, student_steps=0, context_grad=False,
                 input_beta=1.0, anchor_weight=0.0, anchor_time='flat'):
    """eq. 11 on a real batch: the student's sample (student_state), corrupted once, scored by teacher and fake;
    plus anchor_weight x teacher_anchor. -> (loss to minimise, teacher loss, fake loss, context term, anchor KL)"""
    x_s, still_masked, source, x0 = student_state(student, objective, x_data, generator, student_steps, input_beta)
    noisy = corrupt_state(objective, x_s, still_masked, generator)
    gaps, teacher_loss, fake_loss = token_gaps(teacher, fake, objective, x_s, noisy)
    zero = torch.zeros((), device=x_s.device)
    context = context_term(x_s, noisy, gaps, objective.mask_id) if context_grad else zero
    anchor = teacher_anchor(teacher, objective, source, x0, anchor_time == 'linear') if anchor_weight > 0 else zero
    return gaps.mean() + context + anchor_weight * anchor, teacher_loss.mean(), fake_loss.mean(), context, anchor


# ----------------------------------------------------------------------------------------------------------------
# One iteration of Algorithm 1

def iteration(state, teacher, objective, dataset, cfg, it, rank, world, device, ckpt_path=''):
    """`fake_steps` fake updates (eq. 10), one student update (eq. 11), the EMAs. state holds student, fake
    (DDP-wrapped under torchrun), their optimizers, the student's EMA and, with --fake_ema, the fake's average.
    Returns the LOGGED values."""
    student, fake, local = state['student'], state['fake'], cfg['grad_accum'] // world
    lr_student = common.learning_rate(it, cfg['lr'], cfg['warmup_iters'])
    lr_fake = common.learning_rate(it, cfg['fake_lr'], cfg['warmup_iters'])
    steps, beta = cfg['student_steps'], cfg['input_beta']
    # 1. eq. 10: the fake follows the student's current distribution (student forward without gradient)
    for j in range(cfg['fake_steps']):
        fake_fn = lambda x, g: (fake_loss(common.unwrap(student), fake, objective, x, g, steps, beta),)
        batches = common.micro_batches(dataset, cfg, it, 1 + j, rank, world, device)
        fake_stats = common.all_reduce_mean(common.accumulate(fake, batches, fake_fn, local, device), world)
        common.check_finite(fake_stats, 'fake', it, ckpt_path, FLAGS)
        fake_norm = common.update(fake, state['fake_optimizer'], lr_fake, cfg['grad_clip'])
        if 'fake_avg' in state:
            state['fake_ema'].update(fake)
            state['fake_ema'].copy_to(state['fake_avg'])
    # 2. eq. 11: the student lowers teacher-minus-fake loss; the fake (unwrapped: no DDP) is frozen inside
    scorer = state.get('fake_avg', common.unwrap(fake))
    student_fn = lambda x, g: student_loss(student, teacher, scorer, objective, x, g, steps, cfg['context_grad'], beta,
                                           cfg['anchor_weight'], cfg['anchor_time'])
    batches = common.micro_batches(dataset, cfg, it, 0, rank, world, device)
    stats = common.all_reduce_mean(common.accumulate(student, batches, student_fn, local, device), world)
    common.check_finite(stats, 'IDLM', it, ckpt_path, FLAGS)
    student_norm = common.update(student, state['optimizer'], lr_student, cfg['grad_clip'])
    state['ema'].update(student)
    loss, teacher_loss, fake_value, context, anchor = stats.tolist()
    gap = loss - context - cfg['anchor_weight'] * anchor
    return [gap, teacher_loss, fake_value, context, anchor, fake_stats[0].item(), student_norm, fake_norm]


def fake_lag(state, objective, dataset, cfg, it, device):
    """How far the fake is from its optimum for the current student: its loss on a probe batch of fresh student
    samples (fixed noise), before and after cfg['track_steps'] extra updates of a copy on fresh batches (the run's
    fake and optimizer are untouched). A large drop means the fake lags the student (Theorem 3.1 needs it at the
    optimum). -> (loss before, loss after)"""
    student = common.unwrap(state['student'])
    fake = copy.deepcopy(common.unwrap(state['fake']))
    optimizer = torch.optim.AdamW(fake.parameters(), cfg['fake_lr'], (0.9, cfg['beta2']))
    optimizer.load_state_dict(copy.deepcopy(state['fake_optimizer'].state_dict()))   # no shared moment tensors
    probe_cfg = {**cfg, 'grad_accum': 1}

    def probe():
        (x, g), = common.micro_batches(dataset, probe_cfg, it, 10_000, 0, 1, device)
        with torch.no_grad():
            return fake_loss(student, fake, objective, x, g, cfg['student_steps'], cfg['input_beta']).item()

    before = probe()
    for j in range(cfg['track_steps']):
        batches = common.micro_batches(dataset, probe_cfg, it, 10_001 + j, 0, 1, device)
        fn = lambda x, g: (fake_loss(student, fake, objective, x, g, cfg['student_steps']),)
        common.accumulate(fake, batches, fn, 1, device)
        common.update(fake, optimizer, cfg['fake_lr'], cfg['grad_clip'])
    return before, probe()


# ----------------------------------------------------------------------------------------------------------------
# Setup and checkpoints

def make_state(student, fake, cfg):
    """What iteration() updates: student and fake, their AdamW optimizers, the student's EMA and (--fake_ema) the
    fake's EMA with a frozen module carrying it."""
    betas = (0.9, cfg['beta2'])
    state = {'student': student, 'fake': fake, 'ema': common.EMA(student, cfg['ema']),
             'optimizer': torch.optim.AdamW(student.parameters(), cfg['lr'], betas, weight_decay=cfg['weight_decay']),
             'fake_optimizer': torch.optim.AdamW(fake.parameters(), cfg['fake_lr'], betas,
                                                 weight_decay=cfg['weight_decay'])}
    if cfg['fake_ema'] > 0:
        state['fake_ema'] = common.EMA(fake, cfg['fake_ema'])
        state['fake_avg'] = copy.deepcopy(fake).requires_grad_(False)
    return state


def check_config(cfg, world):
    evaluation.parse_temperatures(cfg['eval_temperatures'], '--eval_temperatures')   # before any teacher trains
    if cfg['teacher'] not in KINDS:
        raise UserError(f"unknown --teacher {cfg['teacher']!r}; IDLM distills one of {', '.join(KINDS)}")
    if cfg['fake_steps'] < 1:
        raise UserError("--fake_steps must be at least 1: the fake has to follow the student (eq. 10)")
    if cfg['student_steps'] < 0 or (cfg['student_steps'] > 0 and cfg['teacher'] != 'mdlm'):
        raise UserError("--student_steps K (one sampler step per sample) is written for MDLM teachers; use K >= 1 "
                        "with --teacher mdlm, or 0 (the paper's one-shot student)")
    if cfg['context_grad'] and cfg['teacher'] != 'mdlm':
        raise UserError("--context_grad is for MDLM teachers (Duo's gradient already reaches its context)")
    if cfg['anchor_weight'] < 0:
        raise UserError(f"--anchor_weight weighs a KL and must be 0 or more, not {cfg['anchor_weight']}")
    if cfg['anchor_time'] not in ('flat', 'linear'):
        raise UserError(f"--anchor_time is flat or linear, not {cfg['anchor_time']!r}")
    if not cfg['input_beta'] > 0:
        raise UserError(f"--input_beta is the b of Beta(1, b) and must be positive, not {cfg['input_beta']} (1: U[0, 1])")
    if not 0 <= cfg['fake_ema'] < 1:
        raise UserError(f"--fake_ema is a decay in [0, 1), not {cfg['fake_ema']}")
    common.check_batch(cfg, world)


def save(path, state, cfg, dataset, done, history):
    student, fake = common.unwrap(state['student']), common.unwrap(state['fake'])
    common.save_checkpoint(path, {
        'kind': 'student', 'method': 'idlm', 'teacher': cfg['teacher'], 'config': cfg,
        'model_config': asdict(student.config), 'model': student.state_dict(), 'ema': state['ema'].state_dict(),
        'optimizer': state['optimizer'].state_dict(), 'fake': fake.state_dict(),
        'fake_optimizer': state['fake_optimizer'].state_dict(),
        'fake_ema': state['fake_ema'].state_dict() if 'fake_ema' in state else {},
        'iter': done, 'rng': common.rng_state(), 'history': history, 'data_meta': dataset.meta,
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
    if 'fake_ema' in state:
        state['fake_ema'].load_state_dict(ckpt['fake_ema'])
        state['fake_ema'].copy_to(state['fake_avg'])
    common.set_rng_state(ckpt['rng'])
    return ckpt['iter'], ckpt['history']


def student_sampler(net, kind):
    """What sample.generate draws from: the network, or for SEDD its scores read through its x0."""
    return StudentScores(net) if kind == 'sedd' else net


# ----------------------------------------------------------------------------------------------------------------
# The alternating loop (Algorithm 1)

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
    out_dir = cfg['out_dir'] or os.path.join('out', f"idlm-{cfg['teacher']}-{common.folder_name(cfg['data'])}")
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')

    teacher, net, teacher_ckpt = train.load_teacher(cfg['teacher_ckpt'], cfg['teacher'], dataset, cfg['data'],
                                                    cfg['device'], cfg['init'], KINDS)
    # Duo's schedule travels with the student, so sample.py and eval.py rebuild the teacher's from its config
    teacher_cfg = train.stored_config(teacher_ckpt['config'])
    cfg = {**cfg, **{k: teacher_cfg[k] for k in ('duo_gamma_min', 'duo_gamma_max', 'duo_spacing')}}
    objective = train.teacher_objective({**train.DEFAULTS, **cfg}, N)
    schedule = objective if cfg['teacher'] == 'duo' else 'loglinear'
    torch.manual_seed(cfg['seed'] + rank)  # only dropout draws from the global RNG; the data noise is seeded per step
    teacher = teacher.to(device) if isinstance(teacher, torch.nn.Module) else teacher
    student, fake = (copy.deepcopy(net).to(device).train().requires_grad_(True) for _ in range(2))  # §3.3
    state = make_state(student, fake, cfg)
    start, history = 0, {'train': [], 'eval': []}
    if cfg['resume'] and os.path.exists(ckpt_path):
        start, history = resume_from(ckpt_path, cfg, state)
        if master:
            print(f"resuming {ckpt_path} at iteration {start}")
    if world > 1:  # two wrappers: each all-reduces only in its own phase
        state.update(student=DDP(student), fake=DDP(fake))
    judge = evaluation.load_judge(cfg['judge'], dataset, cfg['data'], device) if cfg['judge'] else None
    bench = evaluation.Bench(dataset, judge, cfg['eval_samples'], cfg['eval_batch_size'], cfg['seed'], device)
    evaluator = evaluation.Evaluator(bench, cfg, cfg['teacher'], schedule)
    evaluate = cfg['eval_samples'] > 0 and bool(evaluator.steps())

    best_path = os.path.join(out_dir, 'best.pt')
    if master and 'best' not in history and os.path.exists(best_path):
        os.remove(best_path)  # from an earlier run in this out_dir: it would pass for this run's choice
    # best.pt needs a GenPPL (the synthetic language's, or a --judge's) and the teacher's many-step row to stay near;
    # without a GenPPL (e.g. OpenWebText scored by GPT-2 afterwards) that teacher run would be wasted
    keep_best = evaluate and cfg['keep_best'] and (bench.language is not None or judge is not None)
    if keep_best and master and 'reference' not in history:
        history['reference'] = evaluator.reference(teacher, evaluator.teacher_steps())

    if master:
        print(f"IDLM-{cfg['teacher']}: teacher {cfg['teacher_ckpt'] or 'default'}, {net.num_params() / 1e6:.2f}M "
              f"parameters x {2 if cfg['teacher_ckpt'] == 'exact' else 3}, data {dataset.path} (N={N}, "
              f"L={dataset.seq_len}), global batch {cfg['batch_size'] * cfg['grad_accum']}, {world} process(es), "
              f"{device}")
    window, t0 = [], time.time()   # per-iteration numbers since the last log line, averaged into one row
    bar = tqdm(range(start, cfg['max_iters']), initial=start, total=cfg['max_iters'], disable=not master,
               desc=f"IDLM {cfg['teacher']}", dynamic_ncols=True, mininterval=5)
    for it in bar:
        window.append(iteration(state, teacher, objective, dataset, cfg, it, rank, world, device, ckpt_path))
        done = it + 1
        if done == cfg['max_iters'] or common.every(done, cfg['log_every']):
            means = torch.tensor(window, dtype=torch.float64).mean(0).tolist()
            row = {'iter': done, **dict(zip(LOGGED, means)), 'lr': common.learning_rate(it, cfg['lr'], cfg['warmup_iters']),
                   'minutes': (time.time() - t0) / 60}
            if master and cfg['track_steps'] > 0:
                with torch.random.fork_rng(devices=[]):   # a diagnostic: the run's dropout draws stay as they were
                    row['fake_probe_before'], row['fake_probe_after'] = fake_lag(state, objective, dataset, cfg, it,
                                                                                 device)
                row['fake_lag'] = row['fake_probe_before'] - row['fake_probe_after']
            history['train'].append(row)
            window = []
            bar.set_postfix(gap=f"{row['gap']:.4f}", teacher=f"{row['teacher_loss']:.3f}",
                            fake=f"{row['fake_loss']:.3f}", gnorm=f"{row['student_grad_norm']:.2f}",
                            **({'lag': f"{row['fake_lag']:.4f}"} if 'fake_lag' in row else {}))
        if evaluate and master and (done == cfg['max_iters'] or common.every(done, cfg['eval_interval'])):
            series = {'EMA': (student_sampler(state['ema'].averaged_copy(student), cfg['teacher']), None)}
            if cfg['eval_raw']:
                series['raw'] = (student_sampler(copy.deepcopy(common.unwrap(student)).eval(), cfg['teacher']), None)
            rows = evaluator.periodic(history, done, series)
            largest = max((r for r in rows if r['series'] == 'EMA'), key=lambda r: r['steps'])
            if keep_best and evaluation.better(largest, history.get('best'), history['reference'],
                                               cfg['entropy_tolerance']):
                history['best'] = {'iter': done, **largest}
                save(best_path, state, cfg, dataset, done, history)
                tqdm.write(f"best.pt <- iteration {done}: within {cfg['entropy_tolerance']:.0%} of the teacher's "
                           f"entropy at {history['reference']['steps']} steps, lowest GenPPL so far")
        if master and (done == cfg['max_iters'] or common.every(done, cfg['ckpt_interval'])):
            save(ckpt_path, state, cfg, dataset, done, history)
            common.save_history(out_dir, history)
    bar.close()
    if master:
        if evaluate:
            last = student_sampler(state['ema'].averaged_copy(student), cfg['teacher'])
            students = [(f"IDLM student @{cfg['max_iters']} (EMA, last)", last, None)]
            if 'best' in history and history['best']['iter'] != cfg['max_iters']:
                students.append((f"IDLM student @{history['best']['iter']} (EMA, best.pt)",
                                 load_sampler(best_path, device)[0], None))
            elif 'best' in history:
                print(f"best.pt holds the last iteration's student ({cfg['max_iters']})")
            elif keep_best:
                print(f"no evaluation came within {cfg['entropy_tolerance']:.0%} of the teacher's entropy at no "
                      f"worse GenPPL, so there is no best.pt")
            tails = (False, True) if cfg['teacher'] == 'duo' else (False,)
            evaluator.final(teacher, students, out_dir, history, tails)
    return ckpt_path


def main(argv=None):
    return distill(common.configure(DEFAULTS, argv))


if __name__ == '__main__':
    common.run(main)
