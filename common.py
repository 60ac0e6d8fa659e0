"""
The plumbing every script shares, kept in one place so the scripts can stay about their method:

- configuration in the nanoGPT way: defaults at the top of a script, overridden by `--key value` / `--key=value`
  (or a config file of `key = value` lines), types checked, unknown keys refused, the result saved in checkpoints;
- torchrun: the same script runs as one process or under `torchrun --nproc_per_node=N` (gloo on CPU, NCCL on GPU);
- checkpoints written atomically (a crash never leaves half a file) with everything needed for an exact resume;
- an exponential moving average (EMA) of the weights;
- user errors reported as one sentence, not a traceback.
"""

import ast
import contextlib
import copy
import datetime
import inspect
import json
from contextlib import nullcontext
import os
import pickle
import random
import re
import sys

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input: printed as `error: <message>` with no traceback, exit code 2."""


def run(main):
    """Call main(), turning a UserError (data.DataError is one) into one clear line on stderr."""
    code = 0
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    if dist.is_initialized():
        dist.destroy_process_group()
        _exit_without_finalizing(code)
    sys.exit(code)


def _exit_without_finalizing(code):
    """End a torchrun worker without Python's interpreter shutdown.

    A gloo worker thread frees each finished collective's tensors after the caller has moved on, and freeing a
    tensor that Python has seen needs the GIL. If that happens while the interpreter is shutting down, Python ends
    the thread mid-destructor and the C++ runtime aborts the whole process (SIGABRT, "terminate called without an
    active exception"), failing a run that had finished. DDP keeps the process group, and with it those threads,
    alive to the end, so destroy_process_group() cannot stop them. Skipping the shutdown removes the race; the
    scripts close their files themselves, so only the standard streams need flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------------------------------
# Configuration

def _parse_value(key, text, default):
    """Convert a command-line string to the type of the default (bool accepts true/false/1/0/yes/no)."""
    if isinstance(default, bool):
        if text.lower() in ('true', '1', 'yes'):
            return True
        if text.lower() in ('false', '0', 'no'):
            return False
        raise UserError(f"--{key} takes true or false, not {text!r}")
    if isinstance(default, (int, float)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise UserError(f"--{key} takes a number, not {text!r}") from None
        if isinstance(default, int) and not isinstance(value, int) or not isinstance(value, (int, float)):
            raise UserError(f"--{key} takes {'an integer' if isinstance(default, int) else 'a number'}, not {text!r}")
        return type(default)(value)
    return text


def _read_config_file(path):
    """A config file is Python-looking `key = literal` lines (comments allowed), read without executing code."""
    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist; pass a path to a file of `key = value` lines")
    values = {}
    for node in ast.parse(open(path).read(), filename=path).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{path} line {node.lineno}: a config file holds only `key = value` lines")
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def help_text(defaults, source):
    """--help: the script's usage lines (the indented commands of its docstring), then its defaults block as the file
    lays it out (grouped, with the comments), written as options. A script without a block lists its defaults."""
    text = open(source, encoding='utf-8').read() if source and os.path.isfile(source) else ''
    doc = ast.get_docstring(ast.parse(text)) if text else None
    lines = [f"usage: python {os.path.basename(source or 'script.py')} [config file] [--key value | --key=value] ..."]
    commands = [line for line in (doc or '').splitlines() if line.startswith('    ') and line.strip()[:6] in
                ('python', 'torchr')]
    if doc:
        lines += ['', doc.strip().splitlines()[0], ''] + commands
    lines += ['', 'options (defaults; types are checked, unknown keys are refused):']
    block = re.search(r'^# Defaults.*?\n(.*?)^# -{20,}', text, re.S | re.M)
    if block:
        for line in block.group(1).splitlines():
            key = re.match(r'^(\w+) = ', line)
            lines.append('  --' + line if key else '    ' + line)
    else:
        lines += [f"  --{k} {v!r}" for k, v in defaults.items()]
    return '\n'.join(lines)


def configure(defaults, argv=None, source=None):
    """Return a copy of `defaults` overridden by config files (positional) and --key value / --key=value options.
    -h / --help prints the options of the calling script (source, default: the caller's file) and exits 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ('-h', '--help') for a in argv):
        print(help_text(defaults, source or inspect.stack()[1].filename))
        raise SystemExit(0)
    config = dict(defaults)

    def put(key, value):
        if key not in defaults:
            raise UserError(f"unknown option --{key}; the options are: {', '.join('--' + k for k in defaults)}")
        if isinstance(value, str) and not isinstance(defaults[key], str):
            value = _parse_value(key, value, defaults[key])
        elif isinstance(defaults[key], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(defaults[key]):
            raise UserError(f"--{key} takes a {type(defaults[key]).__name__}, not {value!r}")
        config[key] = value

    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--'):
            for key, value in _read_config_file(arg).items():
                put(key, value)
        elif '=' in arg:
            key, value = arg[2:].split('=', 1)
            put(key, value)
        else:
            if i + 1 >= len(argv):
                raise UserError(f"{arg} needs a value, as in {arg} VALUE or {arg}=VALUE")
            put(arg[2:], argv[i + 1])
            i += 1
        i += 1
    return config


# ----------------------------------------------------------------------------------------------------------------
# torchrun

def setup_distributed(device='auto', timeout_minutes=120):
    """Detect torchrun from its environment. Returns (rank, world_size, device); without torchrun, (0, 1, device).
    'auto' takes CUDA only when every process on this node can have a GPU of its own. timeout_minutes: how long a
    process waits at a collective, e.g. while rank 0 alone evaluates (NCCL's default, 10 minutes, is too short)."""
    local_world, local_rank = int(os.environ.get('LOCAL_WORLD_SIZE', 1)), int(os.environ.get('LOCAL_RANK', 0))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == 'auto':
        device = 'cuda' if gpus >= local_world else 'cpu'
    if device.startswith('cuda') and gpus == 0:
        raise UserError(f"--device {device}: this PyTorch sees no CUDA GPU; use --device cpu (or auto), or install a "
                        f"CUDA build of torch")
    if device.startswith('cuda') and local_rank >= gpus:
        raise UserError(f"--device {device}: this node runs {local_world} processes but has {gpus} GPU(s); use "
                        f"torchrun --nproc_per_node {gpus}, or --device cpu")
    if 'RANK' not in os.environ:
        return 0, 1, torch.device(device)
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if dist.is_initialized():  # a second call in one process (e.g. distillation that first trained its teacher)
        on_gpu = dist.get_backend() == 'nccl'
        return rank, world, torch.device('cuda', local_rank) if on_gpu else torch.device(device)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if device.startswith('cuda'):
        torch.cuda.set_device(local_rank)
        dist.init_process_group('nccl', timeout=timeout)
        return rank, world, torch.device('cuda', local_rank)
    dist.init_process_group('gloo', timeout=timeout)  # CPU: the same code path runs, and is testable, on a laptop
    return rank, world, torch.device(device)


def all_reduce_mean(value, world_size):
    """Average a float tensor over ranks (a no-op in a single process)."""
    if world_size > 1:
        dist.all_reduce(value)
        value = value / world_size
    return value


def autocast(device):
    """bf16 autocast on GPU; plain float32 on CPU, where bf16 is slow and only adds noise to tests."""
    if device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model):
    """The module inside a DDP wrapper (saved keys must not carry DDP's `module.` prefix)."""
    return model.module if hasattr(model, 'module') else model


def step_generator(seed, *keys, device='cpu'):
    """A generator seeded by (seed, *keys): the randomness of one micro-batch depends on which global slice it is,
    not on which rank computes it, so 1 process and N processes see the same global batch (and so does a resume)."""
    h = seed
    for k in keys:
        h = (h * 1_000_003 + int(k) + 1) % (2 ** 63 - 1)
    return torch.Generator(device=device).manual_seed(h)


# ----------------------------------------------------------------------------------------------------------------
# Learning rate, EMA

def learning_rate(it, lr, warmup_iters, decay_iters=0, min_lr=0.0):
    """Linear warm-up to lr, then constant (decay_iters = 0) or linear decay to min_lr at decay_iters."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    if decay_iters <= 0:
        return lr
    frac = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    return lr + frac * (min_lr - lr)


class EMA:
    """Exponential moving average of a model's parameters: ema <- decay * ema + (1 - decay) * param."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {k: p.detach().clone() for k, p in unwrap(model).named_parameters()}

    @torch.no_grad()
    def update(self, model):
        for k, p in unwrap(model).named_parameters():
            self.shadow[k].lerp_(p.detach(), 1.0 - self.decay)

    def copy_to(self, model):
        """Write the averaged weights into `model` (used to evaluate and to export)."""
        with torch.no_grad():
            for k, p in unwrap(model).named_parameters():
                p.copy_(self.shadow[k])

    def averaged_copy(self, model):
        """A copy of `model` (unwrapped from DDP) carrying the averaged weights, in eval mode: what is evaluated."""
        net = copy.deepcopy(unwrap(model)).eval()
        self.copy_to(net)
        return net

    def state_dict(self):
        return dict(self.shadow)

    def load_state_dict(self, state):
        for k in self.shadow:
            self.shadow[k].copy_(state[k])


# ----------------------------------------------------------------------------------------------------------------
# The loop of a distiller (distill_idlm.py, distill_didi.py, distill_sdtt.py): micro-batches, backward, update

def micro_batches(dataset, cfg, it, phase, rank, world, device):
    """This rank's micro-batches of one phase of iteration `it`: (real x0~ (B, L), generator). The generator is
    seeded by (seed, iteration, phase, global micro-batch index), so 1 and N processes, and a resumed run, see the
    same global batch whatever the number of processes."""
    local = cfg['grad_accum'] // world
    for micro in range(local):
        gen = step_generator(cfg['seed'], it, phase, rank * local + micro, device=device)
        idx = torch.randint(len(dataset.train), (cfg['batch_size'],), generator=gen, device=device).cpu()
        yield dataset.batch('train', idx).to(device), gen


def accumulate(model, batches, loss_fn, n, device):
    """Backpropagate the mean of loss_fn(x, gen)[0] over n micro-batches (DDP all-reduces on the last one only).
    Returns the mean of every value loss_fn returns, as a float64 tensor."""
    total = 0
    for i, (x, gen) in enumerate(batches):
        sync = i == n - 1 or not hasattr(model, 'no_sync')
        with (nullcontext() if sync else model.no_sync()), autocast(device):
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


def check_finite(values, what, it, ckpt_path, flags):
    """One sentence instead of a run that silently trains on nan: which loss, when, what to lower, and the last
    checkpoint, if one was written."""
    if not torch.isfinite(values).all():
        last = f"; the last good checkpoint is {ckpt_path}" if ckpt_path and os.path.exists(ckpt_path) else \
            "; no checkpoint was written yet"
        raise UserError(f"the {what} loss became {values.tolist()} at iteration {it}: lower {flags}{last}")


def every(done, interval):
    return interval > 0 and done % interval == 0


def folder_name(path):
    return os.path.basename(os.path.normpath(path))


def check_batch(cfg, world):
    """--batch_size and --grad_accum that every process can share, and a distiller's --eval_batch_size (checked here,
    before its teacher loads; train.py has none)."""
    if cfg['batch_size'] < 1 or cfg['grad_accum'] < 1:
        raise UserError(f"--batch_size and --grad_accum must be at least 1 (got {cfg['batch_size']} and "
                        f"{cfg['grad_accum']})")
    if cfg.get('eval_batch_size', 1) < 1:
        raise UserError(f"--eval_batch_size must be at least 1 (got {cfg['eval_batch_size']})")
    if cfg['grad_accum'] % world:
        raise UserError(f"--grad_accum {cfg['grad_accum']} is not divisible by the {world} processes; "
                        f"use a multiple of {world} so every process gets the same number of micro-batches")


def check_teacher_data(path, ckpt, dataset, data):
    """A model trained on data of another vocabulary or length cannot be distilled on this data."""
    meta = ckpt['data_meta']
    if (meta['vocab_size'], meta['seq_len']) != (dataset.vocab_size, dataset.seq_len):
        raise UserError(f"{path} was trained on data of {meta['vocab_size']} tokens and length {meta['seq_len']}, "
                        f"but --data {data} has {dataset.vocab_size} tokens and length {dataset.seq_len}; "
                        f"pass the teacher's --data or another checkpoint")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

def rng_state():
    """Every RNG a run draws from, as tensors and plain values only, so the checkpoint loads with
    torch.load(weights_only=True): numpy's MT19937 key becomes an int64 tensor, Python's state a list of ints."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {'torch': torch.get_rng_state(),
             'numpy': {'kind': kind, 'key': torch.from_numpy(key.astype(np.int64)), 'pos': int(pos),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
             'python': [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, rank=0):
    """Restore rng_state(). Only rank 0's state is saved; any other rank derives its own from it and its rank, so the
    ranks still draw different dropout masks after a resume (reproducibly, though not the masks an uninterrupted
    multi-process run would have drawn)."""
    torch.set_rng_state(state['torch'])
    numpy_state = state['numpy']
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state['kind'], numpy_state['key'].numpy().astype(np.uint32), numpy_state['pos'],
                       numpy_state['has_gauss'], numpy_state['cached_gaussian'])
    np.random.set_state(numpy_state)
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    if rank > 0:
        seed = int(torch.randint(2 ** 62, (1,)).item()) + rank
        torch.manual_seed(seed)          # CPU and every GPU
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)


def resume_point(path, resume, rank, world, device):
    """Whether to resume from the checkpoint at path (--resume true and the file exists). All ranks must agree: a rank
    that cannot see it (out_dir on one node's own disk) would otherwise start again from iteration 0 alone."""
    if not resume:
        return False
    seen = os.path.exists(path)
    if world > 1:
        share = all_reduce_mean(torch.tensor([float(seen)], device=device), world).item()
        if 0 < share < 1:
            raise UserError(f"--resume true: {path} is visible to {round(share * world)} of the {world} processes; "
                            f"put --out_dir on a file system every node shares, or copy the checkpoint to every node")
    if not seen and rank == 0:
        print(f"--resume true: there is no checkpoint at {path} yet, so this run starts from iteration 0")
    return seen


def save_checkpoint(path, state):
    write_atomically(path, lambda f: torch.save(state, f))


def save_history(out_dir, history):
    """out_dir/history.json, written with every checkpoint (the last one included), so a run stopped mid-way keeps
    its log and periodic evaluations (eval.py --runs reads them)."""
    write_atomically(os.path.join(out_dir, 'history.json'), lambda f: f.write(json.dumps(history, indent=1).encode()))


def write_atomically(path, write):
    """Write atomically and durably: write(f) into a temporary file in the same directory, flushed to disk (fsync),
    then a rename, so a crash or a power cut never leaves half a file under the real name."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, 'O_DIRECTORY'):  # make the rename itself durable (POSIX)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Checkpoints written before the RNG state was stored as tensors hold numpy's state as an array: these are the only
# non-tensor classes let through, and they only rebuild arrays (no callable of the file's choosing can run).
LEGACY_GLOBALS = [np.ndarray, np.dtype, (np._core if hasattr(np, '_core') else np.core).multiarray._reconstruct,
                  type(np.dtype(np.uint32))]


def load_checkpoint(path):
    """torch.load(weights_only=True): tensors and plain values only, so loading a checkpoint never runs code from
    it. One clear sentence for a missing, corrupt or unsafe file."""
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; train one first (python train.py) or fix the path")
    try:
        with torch.serialization.safe_globals(LEGACY_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' in str(e) or 'Unsupported global' in str(e):
            raise UserError(f"checkpoint {path} holds Python objects other than tensors and plain values (a pickled "
                            f"class or function), so it was refused unread: loading it could run code. Use a "
                            f"checkpoint written by this project, or export the weights as safetensors") from None
        raise UserError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint (UnpicklingError); re-create it "
                        f"or point to another file") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(e).__name__}); "
                        f"re-create it or point to another file") from None

