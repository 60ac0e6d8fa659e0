"""
MDLM-MMD: distill an MDLM teacher into a few-step student by a policy gradient on a kernel MMD between the teacher's
hidden states of real sequences and of the student's completions of them (public code: yandex-research/dlm-mmd).

    python distill_mmd.py --teacher mdlm                        # CPU default (trains the teacher first if absent)
    torchrun --standalone --nproc_per_node=2 distill_mmd.py --teacher mdlm --grad_accum 2 --batch_size 16
    python distill_mmd.py --teacher mdlm --teacher_ckpt exact   # the exact denoiser as the teacher to compare with
    python distill_mmd.py --teacher mdlm --resume true          # continue out_dir/ckpt.pt exactly where it stopped
    python distill_mmd.py config/mmd_mdlm_owt.py --teacher_ckpt /models/mdlm-owt     # the public OWT setting

Two networks of one architecture: the student q_theta, a copy of the teacher, and a frozen copy phi of it, the
feature extractor: phi_p(x) is the hidden state at position p after the zero-based block `feature_block`, on clean
tokens x at sigma = 0. No fake model, no discriminator. Each iteration, for every real sequence x0 of a batch:
  1. t ~ U[eps, 1] (stratified over the micro-batch) and x_t ~ q(x_t | x0); S = the masked positions, m = |S|.
  2. The student's x0 probabilities q_theta(. | x_t) propose G * B candidates y: each position of S drawn
     independently from them, x0 kept elsewhere. They form G groups of B draws.
  3. The reward of a group (mmd_reward), with the RBF kernel k(a, b) = exp(-alpha ||a - b||^2) on token features:
        R = 2 / (B m^2) sum_b sum_{p, q in S} k(phi_p(x0), phi_q(y_b))
            - 1 / (B (B - 1) m (m - 1)) sum_{b != b'} sum_{p != q in S} k(phi_p(y_b), phi_q(y_b')),     (1)
     minus an estimate of the squared MMD between the bags of token features of x0 and of the draws, without the
     real-real term (a constant). Pairs within one draw never count (its tokens are not independent);
     --exclude_same_position false keeps the same-position pairs of two draws, with m^2 for m (m - 1).
  4. REINFORCE with a leave-one-out baseline: A_g = R_g - mean_{g' != g} R_g', and the student minimises
        -sum_g A_g sum_{b in g} sum_{p in S} log q_theta(y_{b,p} | x_t) / (M G B),   M: the batch's masked tokens, (2)
     whose expectation has the gradient of -E[R] / (M B), since the other groups' rewards do not depend on group
     g's draws (tests/test_mmd.py enumerates it).
A row with m < 2 (m < 1 without the exclusion) gets no reward and no gradient. The student is multistep: at any
x_t it returns x0 probabilities, and it samples in K steps exactly like its teacher.

What (1) optimises (tests/test_mmd.py enumerates it). Without the same-position exclusion, E[-R] plus the real-real
term is the squared MMD between the mean embeddings of the two bags of token features: zero at, and only at, a
student whose bag matches the data's, such as the data's conditional. With it (the public estimator), the draws'
term loses each position's self-similarity sum_p ||mu_p||^2, which rewards sharp positions by O(1/m): at small m a
student that always draws one completion can beat the data's conditional. m is in the hundreds at OWT's L = 1024
and smaller at the CPU's L = 64, so watch the entropy (the logged draw_nll, -log q of the drawn tokens, and the table).

Where this differs from the public code, and why. The student draws and scores its candidates in one forward
without dropout (eval mode, gradients on), as the IDLM and DiDi students do: (2) is exact for the policy that
drew them, and that is the sampler the student becomes, which has no dropout. The public student trains with its
dropout; --student_dropout true does that (one forward, so still one dropout mask for draws and log-probs). The
bandwidth 2e-5 and block 3 of 12 belong to the 169M model; here --alpha median (the default) sets alpha = 1 / the
median squared distance between the token features of a real batch, once, saved in the checkpoint's config as
kernel_alpha, and the features are those of block 2 of 4, the last block whose output at a clean token the teacher's
loss ever used (block 3's feeds only the SUBS head, which overwrites clean positions). The feature extractor copies
the network the student starts from (the teacher, or --init), so --teacher_ckpt exact still has features. The
equation numbers are this file's own: the method is read from the public code, not from the paper.

Judge a run by the EMA student's GenPPL and entropy at K steps, against the teacher and against the teacher tempered
to the student's entropy (results.md, temperature.png; with --eval_interval N, history.png), not by the logged
reward.
"""

import copy
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
from losses import MDLMObjective
from processes import sample_time

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value; a positional argument is a config file of `key = value` lines)
teacher = 'mdlm'          # MDLM-MMD distills MDLM teachers (absorbing process, SUBS head)
teacher_ckpt = ''         # '' = out/mdlm-<data>/ckpt.pt (trained first on 'synthetic'); 'exact': the exact denoiser
init = ''                 # the network the student and the feature extractor copy; '' = the teacher
data = 'synthetic'
out_dir = ''              # '' = out/mmd-mdlm-<data folder name>
batch_size = 32           # real sequences per micro-batch per process (the public: 8 per GPU)
grad_accum = 1            # micro-batches per update in total; a multiple of the number of processes
max_iters = 400
lr = 1e-4                 # AdamW, constant after warm-up (the public value, also at this scale)
warmup_iters = 0
beta2 = 0.999
weight_decay = 0.0
grad_clip = 0.0           # 0 = off, as the public run; gradient norms are logged either way
ema = 0.99                # EMA of the student, evaluated and saved as 'ema' (the public: 0.9999 over 4000 steps)
feature_block = 2         # zero-based block of phi: the last whose output the teacher's loss uses (the public: 3 of 12)
alpha = 'median'          # RBF exp(-alpha ||a - b||^2): a number, or 'median' = 1 / median squared feature distance
exclude_same_position = True  # the public estimator (1); false: keep same-position pairs, the unbiased bag MMD
group_size = 4            # G: groups per real sequence, each against the mean of the others (the public: 4)
draws_per_candidate = 2   # B: draws per group, at least 2 for (1)'s within-draw term (the public: 2)
student_dropout = False   # true: the student trains with its network's dropout, as the public code
eval_interval = 0         # N: evaluate the EMA student every N iterations and at the end; 0: the final table only
eval_steps = '8,16'       # K-step budgets
teacher_steps = ''        # extra teacher budgets in the final table, e.g. '1024' (3 minutes more on this CPU)
eval_temperatures = '0.8'  # the teacher also at x0_hat^(1/T), for verdicts at the student's entropy ('': none)
eval_samples = 256        # sequences per budget and noise stream; 0 skips evaluation and the final table
eval_streams = 3          # noise streams per evaluation: each cell is their mean +- sd (eval.py)
eval_batch_size = 64      # sequences generated at once in evaluation: eval.py's default, so the rows are eval.py's
entropy_tolerance = 0.02  # verdicts: a student may lose this fraction of its teacher's entropy
judge = ''                # an AR checkpoint (train.py --teacher ar) for judge GenPPL; '' = none
ckpt_interval = 100
log_every = 25
seed = 0
device = 'auto'
dist_timeout = 120        # minutes a process waits at a collective, e.g. while rank 0 evaluates alone
resume = False
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

LOGGED = ('loss', 'reward', 'advantage', 'draw_nll', 'active', 'student_grad_norm')
FLAGS = '--lr'
MEDIAN_TOKENS = 2048      # token features whose pairwise distances set alpha = 'median'


# ----------------------------------------------------------------------------------------------------------------
# The features and the kernel

@torch.no_grad()
def token_features(net, x, block):
    """phi(x): the hidden states (B, L, d) after the zero-based block `block` of the frozen network, on clean tokens
    x (B, L) at sigma = 0: the first block + 1 blocks of model.DiT.forward, in float32."""
    c = F.silu(net.sigma_map(torch.zeros(len(x), device=x.device)))
    cos, sin = net.rotary_emb(x.shape[1], x.device)
    h = net.vocab_embed(x)
    for layer in net.blocks[:block + 1]:
        h = layer(h, c, cos, sin)
    return h.float()


def rbf(a, b, alpha):
    """k(a_p, b_q) = exp(-alpha ||a_p - b_q||^2) for every pair of positions: (n, L, d) x (n, L, d) -> (n, L, L)."""
    d2 = a.square().sum(-1)[:, :, None] + b.square().sum(-1)[:, None, :] - 2 * a @ b.transpose(1, 2)
    return torch.exp(-alpha * d2.clamp_min(0))


def mmd_reward(real, fake, masked, alpha, exclude_same_position=True):
    """(1) for each row: real features (n, L, d), the B draws' features (n, B, L, d), masked (n, L) bool.
    -> (reward (n,), active (n,) bool); reward 0 where not active (m < 2, or m < 1 without the exclusion)."""
    w, B = masked.to(real.dtype), fake.shape[1]
    m = w.sum(-1)
    pair_sum = lambda K: torch.einsum('np,npq,nq->n', w, K, w)                     # sum over p, q in S
    off = 1 - torch.eye(real.shape[1], dtype=real.dtype, device=real.device) if exclude_same_position else 1
    with torch.autocast(real.device.type, enabled=False):    # ||a||^2 + ||b||^2 - 2 a.b cancels badly in bf16
        cross = sum(pair_sum(rbf(real, fake[:, b], alpha)) for b in range(B))
        within = sum(2 * pair_sum(rbf(fake[:, b], fake[:, c], alpha) * off) for b in range(B) for c in range(b + 1, B))
    pairs = m * (m - 1) if exclude_same_position else m * m
    active = m >= (2 if exclude_same_position else 1)
    reward = 2 * cross / (B * m * m).clamp_min(1) - within / (B * (B - 1) * pairs).clamp_min(1)
    return torch.where(active, reward, torch.zeros_like(reward)), active


@torch.no_grad()
def median_alpha(net, x, block):
    """alpha = 1 / the median squared distance between the token features of the real sequences x (B, L) (at most
    MEDIAN_TOKENS of them, whole sequences first), so that the median pair has k = 1/e."""
    phi = token_features(net, x[:max(1, MEDIAN_TOKENS // x.shape[1])], block).reshape(-1, net.config.n_embd)
    phi = phi[:MEDIAN_TOKENS].double()
    d2 = (phi.square().sum(-1)[:, None] + phi.square().sum(-1)[None] - 2 * phi @ phi.T).clamp_min(0)
    return 1.0 / d2[torch.triu_indices(len(phi), len(phi), 1, device=phi.device).unbind()].median().item()


# ----------------------------------------------------------------------------------------------------------------
# The candidates and the policy gradient (2)

def draw_candidates(probs, x0, masked, n_draws, generator):
    """n_draws sequences per row: every masked position drawn independently from the student's x0 probabilities
    probs (n, L, N), x0 kept elsewhere. -> (n_draws, n, L) long"""
    n, L, N = probs.shape
    draws = torch.multinomial(probs.reshape(-1, N).float(), n_draws, replacement=True, generator=generator)
    return torch.where(masked, draws.T.reshape(n_draws, n, L), x0)


def reinforce_loss(log_probs, draws, rewards, masked, active, B):
    """(2): log_probs (n, L, N) the student's log x0_hat, draws (G * B, n, L) in groups of B consecutive draws,
    rewards (n, G), masked (n, L), active (n,). Leave-one-out baseline (none for G = 1).
    -> (surrogate loss, |advantage| mean, mean -log q of the drawn tokens)"""
    G = rewards.shape[1]
    advantage = rewards - (rewards.sum(-1, keepdim=True) - rewards) / (G - 1) if G > 1 else rewards
    advantage = advantage * active[:, None]
    token_logp = log_probs.gather(-1, draws.permute(1, 2, 0)) * masked[..., None]    # (n, L, G * B)
    logp = token_logp.sum(1).view(-1, G, B).sum(-1)                                  # (n, G): each group's sum
    tokens = masked.sum().clamp_min(1)
    loss = -(advantage * logp).sum() / (tokens * G * B)
    return loss, advantage.abs().mean(), -token_logp.detach().sum() / (tokens * G * B)


def mmd_loss(student, extractor, x0, generator, cfg):
    """Steps 1-4 on a real micro-batch x0 (n, L). -> (loss, mean reward of the active rows, |advantage|, draw_nll,
    the fraction of active rows)"""
    N, G, B = extractor.config.vocab_size - 1, cfg['group_size'], cfg['draws_per_candidate']
    noisy = MDLMObjective(N).corrupt(x0, sample_time(len(x0), generator=generator, device=x0.device), generator)
    masked = noisy.x_t == N
    log_probs = student(noisy.input, noisy.sigma)[..., :N]                           # (n, L, N) SUBS log x0_hat
    draws = draw_candidates(log_probs.detach().exp(), x0, masked, G * B, generator)  # (G * B, n, L)
    phi = token_features(extractor, torch.cat([x0, draws.flatten(0, 1)]), cfg['feature_block'])
    real, fake = phi[:len(x0)], phi[len(x0):].view(G, B, *x0.shape, -1)
    rewards, active = zip(*(mmd_reward(real, fake[g].transpose(0, 1), masked, cfg['kernel_alpha'],
                                       cfg['exclude_same_position']) for g in range(G)))
    rewards, active = torch.stack(rewards, -1), active[0]                            # (n, G), (n,)
    loss, advantage, draw_nll = reinforce_loss(log_probs, draws, rewards, masked, active, B)
    mean_reward = (rewards * active[:, None]).sum() / (active.sum() * G).clamp_min(1)
    return loss, mean_reward, advantage, draw_nll, active.float().mean()


def iteration(state, extractor, dataset, cfg, it, rank, world, device, ckpt_path):
    """One student update on grad_accum micro-batches, and the EMA. -> LOGGED"""
    student, local = state['student'], cfg['grad_accum'] // world
    loss_fn = lambda x, g: mmd_loss(student, extractor, x, g, cfg)
    batches = common.micro_batches(dataset, cfg, it, 0, rank, world, device)
    stats = common.all_reduce_mean(common.accumulate(student, batches, loss_fn, local, device), world)
    common.check_finite(stats, 'MMD', it, ckpt_path, FLAGS)
    norm = common.update(student, state['optimizer'], common.learning_rate(it, cfg['lr'], cfg['warmup_iters']),
                         cfg['grad_clip'])
    state['ema'].update(student)
    return [*stats.tolist(), norm]


# ----------------------------------------------------------------------------------------------------------------
# Setup, checkpoints, evaluation

def check_config(cfg, world):
    evaluation.parse_temperatures(cfg['eval_temperatures'], '--eval_temperatures')   # before any teacher trains
    if cfg['teacher'] != 'mdlm':
        raise UserError(f"MDLM-MMD distills MDLM teachers; --teacher {cfg['teacher']!r} is not supported")
    if cfg['group_size'] < 1 or cfg['draws_per_candidate'] < 2:
        raise UserError(f"--group_size must be at least 1 and --draws_per_candidate at least 2 (the reward compares "
                        f"draws with each other), not {cfg['group_size']} and {cfg['draws_per_candidate']}")
    if cfg['alpha'] != 'median' and not 0 < (number(cfg['alpha']) or 0) < float('inf'):
        raise UserError(f"--alpha is a positive number or 'median', not {cfg['alpha']!r}")
    common.check_batch(cfg, world)


def number(text):
    try:
        return float(text)
    except ValueError:
        return None


def check_block(cfg, net):
    if not 0 <= cfg['feature_block'] < len(net.blocks):
        raise UserError(f"--feature_block is a zero-based block of the teacher's {len(net.blocks)}, so 0 to "
                        f"{len(net.blocks) - 1}, not {cfg['feature_block']}")


def save(path, state, cfg, dataset, done, history):
    student = common.unwrap(state['student'])
    common.save_checkpoint(path, {
        'kind': 'student', 'method': 'mmd', 'teacher': 'mdlm', 'config': cfg,
        'model_config': asdict(student.config), 'model': student.state_dict(), 'ema': state['ema'].state_dict(),
        'optimizer': state['optimizer'].state_dict(),
        'iter': done, 'rng': common.rng_state(), 'history': history, 'data_meta': dataset.meta,
    })


def resume_from(path, state, rank):
    ckpt = common.load_checkpoint(path)
    if ckpt.get('method') != 'mmd':
        raise UserError(f"{path} is not an MDLM-MMD student; pass another --out_dir")
    state['student'].load_state_dict(ckpt['model'])
    state['optimizer'].load_state_dict(ckpt['optimizer'])
    state['ema'].load_state_dict(ckpt['ema'])
    common.set_rng_state(ckpt['rng'], rank)
    return ckpt['iter'], ckpt['history'], ckpt['config']['kernel_alpha']


# ----------------------------------------------------------------------------------------------------------------
# The loop

def distill(cfg):
    """Distill with config dict cfg (DEFAULTS overridden). Returns the student checkpoint's path."""
    rank, world, device = common.setup_distributed(cfg['device'], cfg['dist_timeout'])
    check_config(cfg, world)
    master = rank == 0
    dataset = train.open_data(cfg['data'], rank, world)
    out_dir = cfg['out_dir'] or os.path.join('out', f"mmd-mdlm-{common.folder_name(cfg['data'])}")
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')

    teacher, net, _ = train.load_teacher(cfg['teacher_ckpt'], 'mdlm', dataset, cfg['data'], cfg['device'], cfg['init'])
    teacher = teacher.to(device) if isinstance(teacher, torch.nn.Module) else teacher   # the exact one is no module
    check_block(cfg, net)
    extractor = copy.deepcopy(net).to(device).eval().requires_grad_(False)
    torch.manual_seed(cfg['seed'] + rank)  # only dropout draws from the global RNG; the rest is seeded per step
    # one forward both draws the candidates and scores their log-probs, so (2) is exact for the policy that drew
    # them: without dropout by default (the sampler the student becomes has none), with it under --student_dropout
    student = copy.deepcopy(net).to(device).train(cfg['student_dropout']).requires_grad_(True)
    state = {'student': student, 'ema': common.EMA(student, cfg['ema']),
             'optimizer': torch.optim.AdamW(student.parameters(), cfg['lr'], (0.9, cfg['beta2']),
                                            weight_decay=cfg['weight_decay'])}
    start, history, alpha = 0, {'train': [], 'eval': []}, number(cfg['alpha'])
    if common.resume_point(ckpt_path, cfg['resume'], rank, world, device):
        start, history, alpha = resume_from(ckpt_path, state, rank)
        if master:
            print(f"resuming {ckpt_path} at iteration {start}")
    if alpha is None:   # the same on every rank: the first sequences of the training data
        first = dataset.batch('train', range(cfg['batch_size'])).to(device)
        alpha = median_alpha(extractor, first, cfg['feature_block'])
    cfg = {**cfg, 'kernel_alpha': alpha}    # saved with the student
    if world > 1:
        state['student'] = DDP(student)
    evaluator = evaluation.make_evaluator(cfg, dataset, 'mdlm', device)
    if master:
        print(f"MDLM-MMD: teacher {cfg['teacher_ckpt'] or 'default'}, {net.num_params() / 1e6:.2f}M parameters, "
              f"features after block {cfg['feature_block']} of {len(net.blocks)}, alpha {alpha:.4g} "
              f"({cfg['alpha']}), G={cfg['group_size']} x B={cfg['draws_per_candidate']} draws, data {dataset.path} "
              f"(N={dataset.vocab_size}, L={dataset.seq_len}), global batch {cfg['batch_size'] * cfg['grad_accum']}, "
              f"{world} process(es), {device}")

    window, t0 = [], time.time()   # the numbers since the last log line
    bar = tqdm(range(start, cfg['max_iters']), initial=start, total=cfg['max_iters'], disable=not master,
               desc='MDLM-MMD', dynamic_ncols=True, mininterval=5)
    for it in bar:
        window.append(iteration(state, extractor, dataset, cfg, it, rank, world, device, ckpt_path))
        done = it + 1
        last = done == cfg['max_iters']
        if last or common.every(done, cfg['log_every']):
            means = torch.tensor(window, dtype=torch.float64).mean(0).tolist()
            row = {'iter': done, **dict(zip(LOGGED, means)), 'minutes': (time.time() - t0) / 60}
            history['train'].append(row)
            window = []
            bar.set_postfix(reward=f"{row['reward']:.4f}", draw_nll=f"{row['draw_nll']:.3f}",
                            gnorm=f"{row['student_grad_norm']:.3f}")
        if evaluator and master and cfg['eval_interval'] > 0 and (last or common.every(done, cfg['eval_interval'])):
            evaluator.periodic(history, done, {'EMA': (state['ema'].averaged_copy(student), None)})
        if master and (last or common.every(done, cfg['ckpt_interval'])):
            save(ckpt_path, state, cfg, dataset, done, history)
            common.save_history(out_dir, history)
    bar.close()
    if evaluator and master:
        label = f"MMD student @{cfg['max_iters']} (EMA, last)"
        evaluator.final(teacher, [(label, state['ema'].averaged_copy(student), None)], out_dir, history)
    return ckpt_path


def main(argv=None):
    return distill(common.configure(DEFAULTS, argv))


if __name__ == '__main__':
    common.run(main)
