"""
Train a teacher: an MDLM, Duo or SEDD diffusion language model, or the autoregressive (AR) baseline and judge.
No pretrained checkpoint is reachable offline, so the distillation methods start from teachers trained here.

    python train.py --teacher mdlm                          # CPU default: the synthetic language (README: results)
    python train.py --teacher ar --data pydoc               # an AR judge on Python's own documentation
    torchrun --nproc_per_node=2 train.py --teacher mdlm     # the same global batch, split over 2 processes
    python train.py --teacher mdlm --resume true            # continue out_dir/ckpt.pt exactly where it stopped

Each iteration averages the teacher's own loss (losses.py) over `grad_accum` micro-batches of `batch_size`
sequences; under torchrun the micro-batches are divided among the processes. The randomness of a micro-batch
(which sequences, which t, which tokens are noised) is seeded by (seed, iteration, micro-batch index), so it does
not depend on how many processes share the work, and a resumed run continues bit for bit.
The reported validation loss is the NELBO per token (for AR: the exact NLL per token) of the EMA weights, the
quantity compared with the language's entropy rate H on the synthetic benchmark.
"""

import os
import time
from dataclasses import asdict

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import official
from common import UserError
from data import ensure_data, exact_denoiser, load_data
from losses import duo_curriculum_objective, make_objective
from model import PRESETS, ar_log_likelihood, build_model
from processes import sample_time

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value; a positional argument is a config file of `key = value` lines)
teacher = 'mdlm'          # mdlm | duo | sedd | ar
data = 'synthetic'        # a folder in data.py's format, or 'synthetic' / 'pydoc' (prepared on first use)
out_dir = ''              # default: out/<teacher>-<data folder name>
model = 'cpu'             # size preset in model.py: tiny | cpu | small | medium
dropout = 0.0             # the synthetic language is an infinite stream, so nothing to regularise against
batch_size = 64           # sequences per micro-batch per process
grad_accum = 1            # micro-batches per iteration in total; must be divisible by the number of processes
max_iters = 0             # 0 = the teacher's CPU default: 1600 for Duo (10 minutes here), 2200 for the others
lr = 4e-3
min_lr = 1e-4
warmup_iters = 200
lr_decay_iters = 0        # 0: decay linearly until max_iters; negative: constant after warm-up
weight_decay = 0.0
beta2 = 0.98
grad_clip = 1.0
ema = 0.99
eval_interval = 500       # iterations between validation NELBO measurements
eval_batches = 16         # validation micro-batches (fixed sequences and noise, so the numbers are comparable)
ckpt_interval = 500
seed = 0
device = 'auto'
dist_timeout = 120        # minutes a process waits at a collective, e.g. while rank 0 evaluates alone
resume = False
duo_gamma_min = 0.0       # Duo's Gaussian schedule; 0.0 and 0.0 mean "choose for this vocabulary" (losses.py)
duo_gamma_max = 0.0
duo_spacing = 'alpha'     # Duo: t spaced evenly in alpha (lower-variance NELBO) or 'gamma' (Duo's); losses.py
duo_curriculum = 0.5      # Duo: this fraction of the iterations, first, on Duo's curriculum (losses.py; the public
                          # runs: 0.5); 0 = off
duo_tau = 0.1             # Duo: the curriculum's softmax temperature (the public: 0.1 -> 0.01 by default, 1e-3 at OWT)
mask_count = True         # MDLM only: train with the mask-count estimator of the same NELBO (losses.py,
                          # MDLMObjective.corrupt_by_count), far lower variance; validation always uses t ~ U
log_every = 50
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

TEACHERS = ('mdlm', 'duo', 'sedd', 'ar')
CPU_ITERS = {'duo': 1600}   # --max_iters 0; the others train 2200 iterations


def with_iterations(cfg):
    """cfg with --max_iters 0 replaced by the teacher's CPU default, so the checkpoint records the number run."""
    return {**cfg, 'max_iters': cfg['max_iters'] or CPU_ITERS.get(cfg['teacher'], 2200)}


def teacher_objective(cfg, N):
    """The teacher's training objective (losses.py), or None for the autoregressive model."""
    if cfg['teacher'] == 'ar':
        return None
    gammas = (cfg['duo_gamma_min'], cfg['duo_gamma_max'])
    return make_objective(cfg['teacher'], N, gamma_min=None if gammas == (0.0, 0.0) else gammas[0],
                          gamma_max=None if gammas == (0.0, 0.0) else gammas[1], spacing=cfg['duo_spacing'])


def curriculum_objective(cfg, N):
    """Duo's curriculum objective for the first duo_curriculum x max_iters iterations, or None (no curriculum)."""
    if cfg['teacher'] != 'duo' or cfg['duo_curriculum'] <= 0:
        return None
    return duo_curriculum_objective(N, cfg['duo_tau'], cfg['duo_spacing'])


def stored_config(config):
    """A checkpoint's config over today's DEFAULTS. A key added since the checkpoint was written takes the value
    its run used: Duo teachers from before duo_spacing existed (and official ones) were spaced in gamma."""
    return {**DEFAULTS, 'duo_spacing': 'gamma', **config}


def duo_schedule(ckpt):
    """A teacher checkpoint's Duo schedule (its gamma range and spacing): a student saves it in its config, so that
    sample.py and eval.py rebuild the teacher's alpha(t) for it."""
    stored = stored_config(ckpt['config'])
    return {k: stored[k] for k in ('duo_gamma_min', 'duo_gamma_max', 'duo_spacing')}


def teacher_model(cfg, N, seq_len, objective):
    """A DiT whose vocabulary and head fit the teacher: V = N + 1 with a mask (absorbing) or BOS (AR) token."""
    if objective is None:
        head, V, mask_id, timed = 'ar', N + 1, N, False
    else:
        head, V, mask_id, timed = objective.head, objective.vocab_size, objective.mask_id, objective.time_conditioning
    if cfg['model'] not in PRESETS:
        raise UserError(f"unknown --model {cfg['model']!r}; choose one of {', '.join(PRESETS)}")
    return build_model(cfg['model'], vocab_size=V, seq_len=seq_len, head=head, mask_id=mask_id,
                       time_conditioning=timed, dropout=cfg['dropout'])


def batch_loss(model, objective, x0, generator, N, by_count=False):
    """Mean per-token loss of one micro-batch x0 (B, L): the teacher's NELBO estimate, or the AR NLL."""
    if objective is None:
        return -ar_log_likelihood(model, x0, bos_id=N).mean()
    if by_count:
        noisy = objective.corrupt_by_count(x0, generator=generator)
    else:
        noisy = objective.corrupt(x0, sample_time(x0.shape[0], generator=generator, device=x0.device), generator)
    out = model(noisy.input, noisy.sigma)
    return objective.loss(out, x0, noisy).mean()


@torch.no_grad()
def evaluate(model, objective, dataset, cfg, rank, world, device):
    """Validation loss per token on fixed sequences with fixed noise; the batches are shared out among ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of batch means, number of batches)
    n_val = len(dataset.val)
    for b in range(rank, cfg['eval_batches'], world):
        idx = torch.arange(b * cfg['batch_size'], (b + 1) * cfg['batch_size']) % n_val
        gen = common.step_generator(cfg['seed'] + 1, b, device=device)
        with common.autocast(device):
            loss = batch_loss(model, objective, dataset.batch('val', idx).to(device), gen, dataset.vocab_size)
        total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def check_config(cfg, world):
    if cfg['teacher'] not in TEACHERS:
        raise UserError(f"unknown --teacher {cfg['teacher']!r}; choose one of {', '.join(TEACHERS)}")
    if cfg['max_iters'] < 1 or cfg['lr'] <= 0:
        raise UserError(f"--max_iters must be at least 1 and --lr positive (got {cfg['max_iters']} and {cfg['lr']})")
    common.check_batch(cfg, world)


def open_data(data, rank, world):
    """The --data folder: rank 0 prepares 'synthetic' or 'pydoc' on first use, then every rank loads it."""
    if rank == 0:
        ensure_data(data)
    if world > 1:
        torch.distributed.barrier()
    return load_data(ensure_data(data))


def train(cfg):
    """Train a teacher with config dict cfg (DEFAULTS overridden). Returns the checkpoint path."""
    rank, world, device = common.setup_distributed(cfg['device'], cfg['dist_timeout'])
    cfg = with_iterations(cfg)
    check_config(cfg, world)
    master = rank == 0
    dataset = open_data(cfg['data'], rank, world)
    data_dir, N, L = dataset.path, dataset.vocab_size, dataset.seq_len
    out_dir = cfg['out_dir'] or os.path.join('out', f"{cfg['teacher']}-{common.folder_name(data_dir)}")
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')

    torch.manual_seed(cfg['seed'] + rank)  # only dropout draws from the global RNG; the data noise is seeded per step
    objective = teacher_objective(cfg, N)       # the loss trained on, and always the one validated
    curriculum = curriculum_objective(cfg, N)   # Duo only: the loss of the first iterations
    curriculum_iters = round(cfg['duo_curriculum'] * cfg['max_iters']) if curriculum else 0
    model = teacher_model(cfg, N, L, objective).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg['lr'], betas=(0.9, cfg['beta2']),
                                  weight_decay=cfg['weight_decay'])
    ema = common.EMA(model, cfg['ema'])
    start, history = 0, []
    if common.resume_point(ckpt_path, cfg['resume'], rank, world, device):
        start, history = resume_from(ckpt_path, cfg, model, optimizer, ema, rank)
        if master:
            print(f"resuming {ckpt_path} at iteration {start}")
    if world > 1:
        model = DDP(model)

    entropy_rate = dataset.language().entropy_rate()[0] if dataset.language() is not None else None
    if master:
        print(f"teacher {cfg['teacher']}: {common.unwrap(model).num_params() / 1e6:.2f}M parameters, data {data_dir} "
              f"(N={N}, L={L}), global batch {cfg['batch_size'] * cfg['grad_accum']}, {world} process(es), {device}")
    decay_iters = cfg['max_iters'] if cfg['lr_decay_iters'] == 0 else cfg['lr_decay_iters']
    local_accum = cfg['grad_accum'] // world
    by_count = cfg['mask_count'] and cfg['teacher'] == 'mdlm'
    t0 = time.time()
    bar = tqdm(range(start, cfg['max_iters']), initial=start, total=cfg['max_iters'], disable=not master,
               desc=f"train {cfg['teacher']}", dynamic_ncols=True, mininterval=5)
    for it in bar:
        for group in optimizer.param_groups:
            group['lr'] = common.learning_rate(it, cfg['lr'], cfg['warmup_iters'], decay_iters, cfg['min_lr'])
        if master and curriculum and it == curriculum_iters:
            bar.write(f"iter {it}: Duo's curriculum ends; the discrete Duo loss from here on")
        phase = curriculum if it < curriculum_iters else objective
        loss_sum = 0.0
        for micro in range(local_accum):
            gen = common.step_generator(cfg['seed'], it, rank * local_accum + micro, device=device)
            idx = torch.randint(len(dataset.train), (cfg['batch_size'],), generator=gen, device=device).cpu()
            x0 = dataset.batch('train', idx).to(device)
            # Under DDP, gradients are averaged across processes only on the last micro-batch.
            sync = world == 1 or micro == local_accum - 1
            with (model.no_sync() if not sync else common.nullcontext()), common.autocast(device):
                loss = batch_loss(model, phase, x0, gen, N, by_count)
                (loss / local_accum).backward()
            loss_sum += loss.item() / local_accum
        common.check_finite(torch.tensor([loss_sum]), 'training', it, ckpt_path, '--lr or raise --warmup_iters')
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)

        done = it + 1
        if master and done % cfg['log_every'] == 0:
            bar.set_postfix(loss=f"{loss_sum:.4f}", gnorm=f"{grad_norm:.2f}")
        if done % cfg['eval_interval'] == 0 or done == cfg['max_iters']:
            val = evaluate_ema(model, ema, objective, dataset, cfg, rank, world, device)
            row = {'iter': done, 'train_loss': loss_sum, 'val_nelbo': val, 'minutes': (time.time() - t0) / 60}
            if entropy_rate is not None:
                row['val_over_H'] = val / entropy_rate
            history.append(row)
            if master:
                ratio = f" = {row['val_over_H']:.3f} H" if entropy_rate else ""
                bar.write(f"iter {done}: train {loss_sum:.4f}, val {'NLL' if objective is None else 'NELBO'} "
                          f"{val:.4f}/token{ratio} ({row['minutes']:.1f} min)")
        if master and (done % cfg['ckpt_interval'] == 0 or done == cfg['max_iters']):
            save(ckpt_path, cfg, model, optimizer, ema, done, history, dataset)
            common.save_history(out_dir, history)
    bar.close()
    return ckpt_path


def evaluate_ema(model, ema, objective, dataset, cfg, rank, world, device):
    """Validation loss of the EMA weights, the ones every later script uses."""
    live = {k: v.detach().clone() for k, v in common.unwrap(model).state_dict().items()}
    ema.copy_to(model)
    val = evaluate(common.unwrap(model), objective, dataset, cfg, rank, world, device)
    common.unwrap(model).load_state_dict(live)
    return val


def save(path, cfg, model, optimizer, ema, done, history, dataset):
    common.save_checkpoint(path, {
        'kind': 'teacher', 'teacher': cfg['teacher'], 'config': cfg,
        'model_config': asdict(common.unwrap(model).config), 'model': common.unwrap(model).state_dict(),
        'ema': ema.state_dict(), 'optimizer': optimizer.state_dict(), 'iter': done,
        'rng': common.rng_state(), 'history': history, 'data_meta': dataset.meta,
    })


def resume_from(path, cfg, model, optimizer, ema, rank):
    ckpt = common.load_checkpoint(path)
    if ckpt.get('teacher') != cfg['teacher']:
        raise UserError(f"{path} holds a {ckpt.get('teacher')!r} model, not --teacher {cfg['teacher']}; "
                        f"pass --teacher {ckpt.get('teacher')} or another --out_dir")
    if ckpt['model_config'] != asdict(model.config):
        raise UserError(f"{path} was trained with a different model or data shape; resume with the same --model "
                        f"and --data, or use another --out_dir")
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    ema.load_state_dict(ckpt['ema'])
    common.set_rng_state(ckpt['rng'], rank)
    return ckpt['iter'], ckpt.get('history', [])


# ----------------------------------------------------------------------------------------------------------------
# The teacher a distiller starts from (distill_idlm.py, distill_didi.py, distill_sdtt.py)

def default_teacher_path(kind, data):
    return os.path.join('out', f"{kind}-{common.folder_name(data)}", 'ckpt.pt')


def ensure_teacher(kind, data, path, device='auto'):
    """path; if nothing is there and data is 'synthetic', first train a teacher there with this file's CPU defaults
    (under torchrun its global batch is split over the processes, so the result is the same)."""
    if os.path.exists(path) or data != 'synthetic':
        return path
    world = int(os.environ.get('WORLD_SIZE', 1))
    if int(os.environ.get('RANK', 0)) == 0:
        print(f"no teacher at {path}: training one first, as python train.py --teacher {kind} would")
    train({**DEFAULTS, 'teacher': kind, 'data': data, 'device': device, 'out_dir': os.path.dirname(path),
           'grad_accum': world, 'batch_size': max(1, DEFAULTS['batch_size'] // world)})
    return path


def load_network(path, kind, dataset, data, flag='--teacher_ckpt', other_kinds=()):
    """A frozen network of this kind (EMA weights, eval mode) and its checkpoint, checked against the data.
    other_kinds: the kinds the script would take with another --teacher (named in the error)."""
    net, ckpt = official.load_model(path, which='ema')
    found = ckpt.get('teacher')
    if found == 'ar':
        raise UserError(f"{path} holds an autoregressive model, which is a judge and cannot be distilled; pass an "
                        f"{kind} checkpoint as {flag}")
    if found != kind:
        fix = f"--teacher {found} or another {flag}" if found in other_kinds else f"an {kind} checkpoint as {flag}"
        raise UserError(f"{path} holds a {found!r} teacher, not --teacher {kind}; pass {fix}")
    common.check_teacher_data(path, ckpt, dataset, data)
    return net.eval().requires_grad_(False), ckpt


def load_teacher(spec, kind, dataset, data, device='auto', init='', other_kinds=()):
    """The frozen teacher f* of a distiller and the network its student (fake, discriminator) is copied from.
    spec: a checkpoint (ours or official, official.py), '' for default_teacher_path (trained first if absent), or
    'exact': the synthetic language's exact denoiser (data.ExactDenoiser, MDLM only), a perfect teacher that
    separates a method's own error from its teacher's. The exact denoiser has no weights, so the student then starts
    from --init (default: the trained default teacher). Returns (teacher, init network, init checkpoint)."""
    if spec == 'exact':
        language = dataset.language()
        if kind != 'mdlm' or language is None:
            raise UserError("--teacher_ckpt exact is the synthetic language's exact MDLM denoiser: it needs --teacher "
                            "mdlm and synthetic --data")
        path = init or ensure_teacher(kind, data, default_teacher_path(kind, data), device)
        net, ckpt = load_network(path, kind, dataset, data, '--init')
        return exact_denoiser(language, kind), net, ckpt
    path = spec or ensure_teacher(kind, data, default_teacher_path(kind, data), device)
    teacher, ckpt = load_network(path, kind, dataset, data, '--teacher_ckpt', other_kinds)
    if not init:
        return teacher, teacher, ckpt
    net, _ = load_network(init, kind, dataset, data, '--init')
    return teacher, net, ckpt


def main(argv=None):
    # With two CPU threads some gradients were summed in a varying order, so the same command trained another
    # teacher each time (RESULTS.md, "Real scale, exercised"); the deterministic kernels cost nothing measurable here
    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True)
    train(common.configure(DEFAULTS, argv))


if __name__ == '__main__':
    common.run(main)
