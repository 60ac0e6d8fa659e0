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
from contextlib import nullcontext
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

import official
from data import DataError
from model import DiT, DiTConfig


class UserError(Exception):
    """A problem with the user's input: printed as `error: <message>` with no traceback, exit code 2."""


def run(main):
    """Call main(), turning UserError / DataError into one clear line on stderr."""
    try:
        main()
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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


def configure(defaults, argv=None):
    """Return a copy of `defaults` overridden by config files (positional) and --key value / --key=value options."""
    argv = sys.argv[1:] if argv is None else list(argv)
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

def setup_distributed(device='auto'):
    """Detect torchrun from its environment. Returns (rank, world_size, device); without torchrun, (0, 1, device)."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if 'RANK' not in os.environ:
        return 0, 1, torch.device(device)
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if dist.is_initialized():  # a second call in one process (e.g. distillation that first trained its teacher)
        on_gpu = dist.get_backend() == 'nccl'
        return rank, world, torch.device('cuda', local_rank) if on_gpu else torch.device(device)
    if device.startswith('cuda'):
        torch.cuda.set_device(local_rank)
        dist.init_process_group('nccl')
        return rank, world, torch.device('cuda', local_rank)
    dist.init_process_group('gloo')  # CPU: the same code path runs, and is testable, on a laptop
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

    def state_dict(self):
        return dict(self.shadow)

    def load_state_dict(self, state):
        for k in self.shadow:
            self.shadow[k].copy_(state[k])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

def rng_state():
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def save_checkpoint(path, state):
    """Write atomically: a temporary file in the same directory, then a rename, so a crash never leaves half a file."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load with one clear sentence for a missing or unreadable file."""
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; train one first (python train.py) or fix the path")
    try:
        # Our checkpoints hold the config, numpy RNG state and python RNG state next to tensors, so they are loaded
        # fully; only load checkpoints you trust (the official ones go through their own loader).
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(e).__name__}); "
                        f"re-create it or point to another file") from None


def load_model(path, which='ema'):
    """Rebuild a DiT from one of our checkpoints, or from an official SEDD / MDLM / Duo checkpoint in any layout
    official.py reads (Hugging Face folder, SEDD run folder, Lightning .ckpt). which='ema' takes the averaged
    weights when the file has them. Returns (model, checkpoint); an official one gets a checkpoint-like dict with
    the same 'teacher', 'config', 'model_config' and 'data_meta' entries, so every script takes either."""
    layout = official.detect_layout(path)
    if layout is None and os.path.isdir(path):
        raise UserError(str(official.unknown_layout(path)))
    if layout not in (None, 'ours'):
        try:
            return official.load_official(path, which)
        except official.CheckpointError as e:
            raise UserError(str(e)) from None
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or 'model_config' not in ckpt or 'model' not in ckpt:
        raise UserError(str(official.unknown_layout(path)))
    model = DiT(DiTConfig(**ckpt['model_config']))
    weights = ckpt['ema'] if which == 'ema' and ckpt.get('ema') else ckpt['model']
    model.load_state_dict(weights)
    return model, ckpt
