"""
What sampling costs beyond the network, measured in one run so that every result is a ratio of two things timed
side by side on the same (possibly busy) machine.

    python bench.py                              # N = 50257 (GPT-2) and 64 (synthetic); L = 256, B = 8, K = 1024
    python bench.py --vocab_sizes 64 --steps 64  # a quick run
    python bench.py --out bench.md               # the same report, also as a markdown file (for the README)
    python bench.py --dry_run owt                # the papers' shapes once on random weights (section 5; CPU: ~15 min)
    python bench.py --gpu_check true             # on a GPU machine: the tests, then the dry run, into gpu_check.md

Sampling runs in float64 (Zheng et al. 2024; IDLM App. F): float32
Gumbel noise truncates the tail and lowers the effective temperature, which flatters GenPPL. Built naively, a step
makes the posterior (B, L, V) in float64, 0.8 GB at V = 50258, B = 8, L = 256, and several such tensors on the way;
sample.py's fused step decides per position which tokens change and draws only those, so it never does.

1. One step without the network: a fixed network output (random logits through the real heads: SUBS, SEDD's
   log-scores, Duo's log-softmax over V = N), a mid-run z (t = 1/2, each position masked with prob 1 - alpha_t)
   and the K-step grid's step t -> t - 1/K. Median time.perf_counter() of `repeats` fused and `ref_repeats`
   reference steps, after a warm-up call. Target: the fused MDLM step >= 10x faster than the reference at V = 50258.
   Beside them, one float32 read of the logits: the median of `repeats` out.amax(-1), which reads every logit once
   and writes (B, L) numbers; 'fused / read' is a step's cost in such reads (the floor of any step that looks at
   every logit). On a CPU a float64 exp costs several reads, so SEDD and Duo, which need one per logit of a masked
   (SEDD) or of every (Duo) position, cannot come near 1; MDLM touches only the rows that change.
2. The K-step loop against the network alone: K forward passes on a fixed (B, L) batch, then sample.generate with
   time_conditioned=True, so that the loop calls the network at every step (MDLM's cache would skip calls and
   flatter the ratio). Target: loop / network <= 1.10. A stopwatch around the network splits the same loop into
   network and sampler time. The cached loop (allowed for MDLM's sigma-blind network) is reported beside it.
   Every position is drawn exactly once whatever K is, so the sampler's total work is a fixed part (the draws)
   plus a per-step part (the Bernoulli decisions); the loop's excess over the network, (fixed + K per-step) /
   (K network), therefore shrinks as K grows, and a loop of `--loop_steps` K' < K bounds the ratio at K from above.
3. Peak memory of one step beyond what exists before it (so not the network output both paths read). Torch's CPU
   allocations are invisible to tracemalloc, and the resident set size hides reuse of freed pages; the torch
   profiler with profile_memory=True records every allocation and free with a time stamp, and their running sum
   peaks at the step's peak. On CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
4. One distillation iteration against one teacher-training step at the same batch (train.py's `batch_size`):
   the teacher step is train.py's (the mask-count NELBO for MDLM, backward, clip, AdamW); the IDLM iteration is
   distill_idlm.iteration (fake update, student update, EMA). They are timed in alternation, so a change in the
   machine's load hits both. Target (IDLM issue): IDLM / teacher <= 3.5. For an MDLM teacher a DiDi-Instruct
   iteration (distill_didi.iteration: rollout, discriminator update, student update) joins the rotation at the
   same batch, for the DiDi / IDLM ratio.
5. The real-shape dry run: the 169M DiT at L = 1024 and V = 50258 with dropout 0.1, random weights written in the
   official Hugging Face layouts and read back by official.py, GPT-2 BPE data made from Python's docs in the
   OpenWebText format. Per teacher (MDLM, Duo, SEDD): a teacher-training step, one IDLM iteration with its OWT config
   at micro-batch 1, SDTT's or DCD's step, DiDi's iteration (MDLM), fused sampling with the network; then the GPT-2
   judge at GPT-2 Large's shape and a Hugging Face export read back. Each phase: wall time, and its peak memory
   (CPU: the resident set's peak; CUDA: the allocator's) also in units of one (B, L, V) float32 tensor.
On CUDA every timer is bracketed by torch.cuda.synchronize(). Only ratios carry over between machines.
"""

import copy
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

import common
import distill_didi
import distill_idlm
import distill_sdtt
import official
import sample
import train
from common import UserError
from data import R50K_CACHE_NAME, ensure_data, gpt2_encoding, load_data, prepare, pydoc_text
from gpt2 import CONV1D, GPT2, GPT2Config, GPT2Judge, load_gpt2
from model import PRESETS, build_model, sedd_log_score, subs_log_probs

ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value; a positional argument is a config file of `key = value` lines)
vocab_sizes = '50257,64'  # N real tokens, comma-separated: GPT-2's vocabulary and the synthetic language's
seq_len = 256             # L
batch_size = 8            # B
steps = 1024              # K: the grid of the one-step benchmark
loop_steps = 0            # K of the timed loop; 0: --steps. (At V = 50257 a CPU network call takes seconds, so
                          # 1024 calls take most of an hour; a shorter loop bounds the ratio, see section 2)
samplers = 'mdlm,sedd,duo'  # the one-step benchmark; the loop benchmark is MDLM's
block = 0                 # numbers per visit of a fused step's float64 work; 0: sample.default_block
model = 'cpu'             # DiT size preset of the loop benchmark (model.PRESETS)
repeats = 20              # timed fused steps (median)
ref_repeats = 3           # timed reference steps: a handful, each one takes seconds at V = 50258
loop = True               # False: the one-step benchmark only
cached = True             # also time MDLM's cached loop
threads = 1               # torch CPU threads of sections 1-4 (0 = torch's default; the dry run uses every core)
iterations = True         # also time a teacher-training step against a distillation iteration (section 4)
iteration_data = 'synthetic'  # the data (and so N, L) of section 4: a folder in data.py's format, or a name
iteration_model = 'cpu'   # DiT preset of section 4 (the CPU teachers')
iteration_batch = 64      # sequences per update in section 4 (train.py's and distill_idlm.py's default batch)
iteration_repeats = 10    # alternating timed repeats of each, after one warm-up
iteration_kinds = 'mdlm,duo,sedd'  # the teachers of section 4
dry_run = ''              # 'owt': the real-shape dry run (section 5) instead of sections 1-4
dry_model = 'small'       # its DiT preset: 'small' is the papers' 169M (tests use 'tiny')
dry_seq_len = 1024        # its L
dry_batch = 2             # its sequences for the samplers and the judge
dry_steps = 4             # its fused sampler steps (each with a network call)
gpu_check = False         # the GPU check: the tests, then the dry run on CUDA, into --out (default gpu_check.md)
gpu_test_timeout = 360    # seconds the GPU check gives the test suite
device = 'auto'
seed = 0
out = ''                  # also write the report to this markdown file
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

# ----------------------------------------------------------------------------------------------------------------
# Stopwatches

def sync(device):
    """Wait for queued GPU work, so that a timer measures the work and not its launch."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def seconds(fn, device):
    """(wall time of fn(), its result); on CUDA the timer waits for the queued work on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median_seconds(fn, n, device):
    """Median wall time of n calls of fn(), after one untimed warm-up call (allocator, lazy initialisation)."""
    fn()
    return statistics.median(seconds(fn, device)[0] for _ in range(n))


def peak_bytes(fn, device):
    """Peak memory that fn() allocates beyond what exists before it (module docstring, 3.)."""
    if device.type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw allocator events (nbytes > 0: allocation, < 0: free); the per-operator tables net them out.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


class Stopwatch(torch.nn.Module):
    """The network with a stopwatch: `seconds` spent inside its forward passes. A torch module, so sample.py
    still runs it under autocast on GPU."""

    def __init__(self, net, device):
        super().__init__()
        self.net, self.device, self.seconds = net, device, 0.0

    def forward(self, z, sigma):
        elapsed, out = seconds(lambda: self.net(z, sigma), self.device)
        self.seconds += elapsed
        return out


# ----------------------------------------------------------------------------------------------------------------
# 1. One step without the network

def step_case(kind, N, B, L, plan, k, generator, block=0):
    """A mid-run state of one sampler at step k of the plan (t_k -> t_{k+1}), and step(fused) -> z_s that takes
    the step from it. Returns (out, step): the network output (B, L, V) float32 that the step reads, and step."""
    device = generator.device
    alpha_t, alpha_s = plan.alpha[k], plan.alpha[k + 1]
    V = N if kind == 'duo' else N + 1
    logits = torch.randn(B, L, V, generator=generator, device=device)                    # (B, L, V) float32
    z = torch.randint(0, N, (B, L), generator=generator, device=device)
    if kind == 'duo':
        out = logits.log_softmax(-1)
        return out, lambda fused: sample.duo_step(out, z, alpha_s, alpha_t, generator, fused, block)
    masked = torch.rand(B, L, dtype=torch.float64, generator=generator, device=device) >= alpha_t  # z_t ~ q(. | x0)
    z = torch.where(masked, N, z)
    if kind == 'mdlm':
        out = subs_log_probs(logits, z, N)
        return out, lambda fused: sample.mdlm_step(out, z, alpha_s, alpha_t, generator, fused, block)
    out = sedd_log_score(logits, z, plan.sigma[k].expand(B))
    coef = sample.sedd_coefficient('analytic', plan, k)
    return out, lambda fused: sample.sedd_step(out, z, coef, False, generator, fused, block)


def bench_step(cfg, kind, N, device):
    """Fused and reference step of one sampler, and one float32 read of its logits: median ms, the ratios, and
    peak MiB of each step."""
    plan = sample.time_plan(cfg['steps'], device=device)
    generator = common.step_generator(cfg['seed'], N, device=device)
    out, step = step_case(kind, N, cfg['batch_size'], cfg['seq_len'], plan, cfg['steps'] // 2, generator,
                          cfg['block'])
    read_s = median_seconds(lambda: out.amax(-1), cfg['repeats'], device)
    fused_s = median_seconds(lambda: step(True), cfg['repeats'], device)
    reference_s = median_seconds(lambda: step(False), cfg['ref_repeats'], device)
    return dict(V=out.shape[-1], sampler=kind, fused_ms=1e3 * fused_s, reference_ms=1e3 * reference_s,
                speedup=reference_s / fused_s, read_ms=1e3 * read_s, reads=fused_s / read_s,
                fused_mib=peak_bytes(lambda: step(True), device) / 2 ** 20,
                reference_mib=peak_bytes(lambda: step(False), device) / 2 ** 20)


# ----------------------------------------------------------------------------------------------------------------
# 2. The K-step loop against K network calls

@torch.no_grad()
def bench_loop(cfg, N, device):
    """K forward passes of the network, the K-step MDLM loop (every step calls it), and the cached loop."""
    B, L, K = cfg['batch_size'], cfg['seq_len'], cfg['loop_steps'] or cfg['steps']
    torch.manual_seed(cfg['seed'])  # the weights; their values do not change the cost
    net = build_model(cfg['model'], vocab_size=N + 1, seq_len=L, head='subs', mask_id=N).to(device).eval()
    generator = common.step_generator(cfg['seed'], N, device=device)
    z = torch.randint(0, N, (B, L), generator=generator, device=device)
    z = torch.where(torch.rand(B, L, generator=generator, device=device) < 0.5, N, z)      # a mid-run batch
    sigma = torch.full((B,), 0.7, device=device)

    def network_alone():
        for _ in range(K):
            sample.call_network(net, z, sigma)

    def loop(network, time_conditioned):
        return sample.generate(network, 'mdlm', B, L, K, N, generator, batch_size=B, fused=True,
                               time_conditioned=time_conditioned, progress=False)

    sample.call_network(net, z, sigma)                                                  # warm-up
    network_s, _ = seconds(network_alone, device)
    stopwatch = Stopwatch(net, device)
    loop_s, (x, nfe) = seconds(lambda: loop(stopwatch, True), device)
    result = dict(V=N + 1, network_s=network_s, loop_s=loop_s, ratio=loop_s / network_s, nfe=nfe,
                  masks_left=int((x == N).sum()), in_loop_network_s=stopwatch.seconds,
                  same_run_ratio=loop_s / stopwatch.seconds, sampler_ms=1e3 * (loop_s - stopwatch.seconds) / K)
    if cfg['cached']:
        result['cached_s'], (_, result['cached_nfe']) = seconds(lambda: loop(net, False), device)
    return result


# ----------------------------------------------------------------------------------------------------------------
# 4. A distillation iteration against a teacher-training step

def prime(*optimizers):
    """Create each optimizer's state now (one step on zero gradients: no parameter moves at weight decay 0), so
    that a case's first measured call holds only what every call allocates: gradients, activations, logits."""
    for optimizer in optimizers:
        params = [p for group in optimizer.param_groups for p in group['params'] if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        lr = [group['lr'] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group['lr'] = 0.0
        optimizer.step()
        for group, value in zip(optimizer.param_groups, lr):
            group['lr'] = value
        optimizer.zero_grad(set_to_none=True)


def iteration_cases(cfg, kind, device, teacher_path='', configs=None):
    """(dataset, {name: builder}): each builder makes the models of one real update and returns a closure that runs
    it, at the same batch: 'teacher' (train.py's step), 'idlm' (distill_idlm.iteration), 'step' (distill_sdtt's
    update: SDTT for MDLM, DCD for Duo) and, for MDLM, 'didi' (distill_didi.iteration). By default the teacher has
    random weights of the CPU teachers' shape (their values do not change the cost); teacher_path reads one instead
    (the dry run's official folders), and configs {'idlm': cfg, 'didi': cfg} replace the scripts' defaults."""
    configs = configs or {}
    data_dir = ensure_data(cfg['iteration_data'])
    dataset = load_data(data_dir)
    N, B = dataset.vocab_size, cfg['iteration_batch']
    run_cfg = {**train.DEFAULTS, **configs.get('idlm', distill_idlm.DEFAULTS), 'teacher': kind, 'data': data_dir,
               'model': cfg['iteration_model'], 'batch_size': B, 'grad_accum': 1}
    torch.manual_seed(cfg['seed'])
    if teacher_path:
        teacher, _, ckpt = train.load_teacher(teacher_path, kind, dataset, data_dir, str(device))
        run_cfg.update(train.duo_schedule(ckpt))
        objective = train.teacher_objective(run_cfg, N)
    else:
        objective = train.teacher_objective(run_cfg, N)
        teacher = train.teacher_model(run_cfg, N, dataset.seq_len, objective)
    teacher = teacher.to(device).eval().requires_grad_(False)
    copy_of_teacher = lambda mode=False: copy.deepcopy(teacher).train(mode).requires_grad_(True)
    counter = iter(range(10 ** 9))

    def batch():
        gen = common.step_generator(cfg['seed'], next(counter), device=device)
        idx = torch.randint(len(dataset.train), (B,), generator=gen, device=device).cpu()
        return dataset.batch('train', idx).to(device), gen

    def teacher_case():  # train.py's loop body, one micro-batch
        trainee = copy_of_teacher(True)
        optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-4, betas=(0.9, run_cfg['beta2']))
        prime(optimizer)

        def step():
            x, gen = batch()
            with common.autocast(device):
                train.batch_loss(trainee, objective, x, gen, N, by_count=kind == 'mdlm').backward()
            torch.nn.utils.clip_grad_norm_(trainee.parameters(), run_cfg['grad_clip'])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def idlm_case():
        state = distill_idlm.make_state(copy_of_teacher(), copy_of_teacher(), run_cfg)
        prime(state['optimizer'], state['fake_optimizer'])
        return lambda: distill_idlm.iteration(state, teacher, objective, dataset, run_cfg, next(counter), 0, 1, device)

    def step_case():  # one SDTT (MDLM) or DCD (Duo) update, in the first round (dt = 1/1024)
        student = copy_of_teacher(True)
        state = distill_sdtt.make_state(student, {**distill_sdtt.DEFAULTS, 'batch_size': B})
        prime(state['optimizer'])
        loss_fn = distill_sdtt.sdtt_loss if kind == 'mdlm' else distill_sdtt.dcd_loss

        def step():
            fn = lambda x, g: loss_fn(student, teacher, objective, x, 1 / 1024, g, 'kl_bwd')
            common.accumulate(student, [batch()], fn, 1, device)
            common.update(student, state['optimizer'], 1e-4, 1.0)
            state['ema'].update(student)
        return step

    def didi_case():
        didi_cfg = configs.get('didi', {**distill_didi.DEFAULTS, 'batch_size': B, 'grad_accum': 1})
        disc = distill_didi.make_discriminator(teacher, didi_cfg['disc_trainable_blocks'])
        state = distill_didi.make_state(copy_of_teacher(), disc, didi_cfg)
        prime(state['optimizer'], state['disc_optimizer'])
        return lambda: distill_didi.iteration(state, teacher, dataset, None, didi_cfg, next(counter), 0, 1, device, '')

    cases = {'teacher': teacher_case, 'idlm': idlm_case}
    if kind in distill_sdtt.KINDS:
        cases['step'] = step_case
    if kind == 'mdlm':  # DiDi-Instruct distills MDLM teachers only
        cases['didi'] = didi_case
    return dataset, cases


def bench_iterations(cfg, kind, device):
    """Median milliseconds of each case of iteration_cases, timed in alternation (round-robin)."""
    dataset, builders = iteration_cases(cfg, kind, device)
    cases = {name: build() for name, build in builders.items()}
    for fn in cases.values():                                                              # warm-up
        fn()
    times = {name: [] for name in cases}
    for _ in range(cfg['iteration_repeats']):
        for name, fn in cases.items():
            times[name].append(seconds(fn, device)[0])
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    return dict(teacher=kind, N=dataset.vocab_size, L=dataset.seq_len, ms=ms)


# ----------------------------------------------------------------------------------------------------------------
# 5. The real-shape dry run (--dry_run owt) and the GPU check (--gpu_check true)

OFFICIAL_V = 50258        # GPT-2's 50257 tokens + the mask (MDLM, SEDD) or Duo's [PAD]
JUDGE_SHAPES = {'small': dict(n_embd=1280, n_layer=36, n_head=20)}   # GPT-2 Large; other presets: a tiny judge
SHARED_BPE = os.path.join(ROOT, '..', 'shared', 'tokenizers', 'r50k_base.tiktoken')


def resident(field):
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in bytes (Linux)."""
    with open('/proc/self/status') as f:
        return int(next(line for line in f if line.startswith(field + ':')).split()[1]) * 1024


def measured(fn, device):
    """(seconds, peak bytes, kept bytes) of one call of fn(), both above what was allocated before: the peak, and
    what the call leaves allocated (the optimizer state a first step creates). CUDA: the allocator's statistics;
    CPU: the resident set's, its peak reset through /proc/self/clear_refs."""
    def allocated():
        gc.collect()
        if device.type == 'cuda':
            return torch.cuda.memory_allocated(device)
        ctypes.CDLL('libc.so.6').malloc_trim(0)   # hand freed heap pages back, so that reusing them shows in the peak
        return resident('VmRSS')

    before = allocated()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    elapsed = seconds(fn, device)[0]
    peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else resident('VmHWM')
    return elapsed, peak - before, allocated() - before


def official_folder(path, kind, cfg):
    """Random weights at the papers' shape in the official Hugging Face layout, read by official.py as it reads
    kuleshov-group/mdlm-owt, s-sahoo/duo or louaaron/sedd-small (dropout 0.1, as they bring)."""
    torch.manual_seed(cfg['seed'])
    head = {'mdlm': 'subs', 'duo': 'x0', 'sedd': 'sedd'}[kind]
    net = build_model(cfg['dry_model'], vocab_size=OFFICIAL_V, seq_len=cfg['dry_seq_len'], head=head, dropout=0.1,
                      mask_id=-1 if kind == 'duo' else OFFICIAL_V - 1, time_conditioning=kind != 'mdlm')
    with torch.no_grad():                    # off adaLN-zero's init, so that the outputs depend on the input
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    official.export_hf(net, {'teacher': kind}, path)
    config_path = os.path.join(path, 'config.json')
    config = json.load(open(config_path))
    del config['project']                    # the official folders have no field for this project's metadata
    json.dump(config, open(config_path, 'w'))
    return path


def judge_folder(path, cfg):
    """Random GPT-2 weights (GPT-2 Large's shape with --dry_model small) in the Hugging Face layout."""
    torch.manual_seed(cfg['seed'])
    shape = {**JUDGE_SHAPES.get(cfg['dry_model'], dict(n_embd=32, n_layer=2, n_head=2)), 'vocab_size': 50257,
             'n_positions': 1024}
    weights = {'transformer.' + k: (v.t().contiguous() if k.endswith(CONV1D) else v)
               for k, v in GPT2(GPT2Config(**shape)).state_dict().items()}
    os.makedirs(path, exist_ok=True)
    json.dump({'model_type': 'gpt2', **shape}, open(os.path.join(path, 'config.json'), 'w'))
    official.write_safetensors(os.path.join(path, 'model.safetensors'), weights)
    return path


def owt_data(path, seq_len):
    """Real text, Python's bundled documentation, in GPT-2's BPE and data.py's OpenWebText format. Without a
    network and a TIKTOKEN_CACHE_DIR, the BPE file comes from ../shared/tokenizers where there is one."""
    if 'TIKTOKEN_CACHE_DIR' not in os.environ and os.path.exists(SHARED_BPE):
        os.makedirs(os.path.join(path, 'tiktoken'))
        shutil.copy(SHARED_BPE, os.path.join(path, 'tiktoken', R50K_CACHE_NAME))
        os.environ['TIKTOKEN_CACHE_DIR'] = os.path.join(path, 'tiktoken')
        gpt2_encoding.cache_clear()
    text = os.path.join(path, 'pydoc.txt')
    with open(text, 'w') as f:
        f.write(pydoc_text())
    return prepare('owt', os.path.join(path, 'owt'), files=text, seq_len=seq_len, val_fraction=0.05)


def dry_cases(cfg, root, device):
    """Yields (phase, batch, build): build() loads what the phase needs and returns the closure that is measured.
    Per official teacher: a teacher-training step, the IDLM iteration of its OWT config (micro-batch 1), SDTT or
    DCD's step, DiDi's iteration (MDLM) and dry_steps fused sampler steps with the network; then the GPT-2 judge on
    dry_batch sequences, and a Hugging Face export read back."""
    data_dir = owt_data(os.path.join(root, 'data'), cfg['dry_seq_len'])
    B, K = cfg['dry_batch'], cfg['dry_steps']
    names = {'teacher': 'teacher training step', 'idlm': 'IDLM iteration', 'step': 'SDTT / DCD step',
             'didi': 'DiDi-Instruct iteration'}
    for kind in ('mdlm', 'duo', 'sedd'):
        folder = official_folder(os.path.join(root, kind), kind, cfg)
        configs = {name: common.configure(module.DEFAULTS, [os.path.join(ROOT, 'config', f'{name}_{kind}_owt.py'),
                                                           *extra], source=module.__file__)
                   for name, module, extra in (('idlm', distill_idlm, ['--batch_size=1', '--grad_accum=1']),
                                               ('didi', distill_didi, ['--batch_size=2', '--group_size=2']))
                   if kind == 'mdlm' or name == 'idlm'}
        _, builders = iteration_cases({**cfg, 'iteration_data': data_dir, 'iteration_batch': 1}, kind, device,
                                      teacher_path=folder, configs=configs)
        for name, build in builders.items():
            yield f"{kind}: {names[name]}", 2 if name == 'didi' else 1, build
        yield f"{kind}: {K} fused sampler steps with the network", B, partial(sampler_case, folder, kind, B, K, device)
        del builders
    yield f"GPT-2 judge ({'GPT-2 Large' if cfg['dry_model'] in JUDGE_SHAPES else 'tiny'} shape)", B, \
        partial(judge_case, os.path.join(root, 'judge'), data_dir, cfg, device)
    yield "Hugging Face export read back", 1, partial(export_case, os.path.join(root, 'mdlm'), root, device)


def sampler_case(folder, kind, B, K, device):
    net, kind, N, L, _, schedule = sample.load_sampler(folder, device, kind)
    return lambda: sample.generate(net, kind, B, L, K, N, torch.Generator(device).manual_seed(0), batch_size=B,
                                   schedule=schedule)


def judge_case(path, data_dir, cfg, device):
    judge = GPT2Judge(load_gpt2(judge_folder(path, cfg)).to(device), batch_size=cfg['dry_batch'])
    x = load_data(data_dir).batch('val', torch.arange(cfg['dry_batch']))
    return lambda: judge.genppl(x)


def export_case(folder, root, device):
    """sample.py --export_hf's writer, then official.py's reader: the same logits."""
    net, ckpt = official.load_model(folder)
    net, z = net.to(device), torch.randint(0, OFFICIAL_V - 1, (1, net.config.seq_len), device=device)

    def round_trip():
        back, _ = official.load_model(official.export_hf(net, ckpt, os.path.join(root, 'export')))
        with torch.no_grad():
            if not torch.equal(net(z, torch.zeros(1, device=device)), back.to(device)(z, torch.zeros(1, device=device))):
                raise RuntimeError("the Hugging Face export does not read back to the same logits")
    return round_trip


def report_dry_run(cfg, device, emit):
    """Wall time and peak memory of each phase; the peak also in units of one (B, L, V) float32 tensor."""
    L, root = cfg['dry_seq_len'], tempfile.mkdtemp(prefix='dry-run-')
    emit(f"## Real-shape dry run: DiT preset '{cfg['dry_model']}', L = {L}, V = {OFFICIAL_V}, dropout 0.1", '',
         f"Random weights in the official layouts; GPT-2 BPE data from Python's docs; {device}"
         f"{' with bf16 autocast' if device.type == 'cuda' else ', float32'}. Peak: memory above what the phase found "
         f"allocated after loading its models; kept: what it left allocated (the optimizer state of a first step); "
         f"their difference is the step's transient memory (activations, gradients, logits).", '',
         row(['phase', 'B', 'seconds', 'tokens/s', 'peak GiB', 'kept GiB', '(peak - kept) / (B, L, V) float32']),
         row(['---', '---:', '---:', '---:', '---:', '---:', '---:']))
    try:
        for name, B, build in dry_cases(cfg, root, device):
            elapsed, peak, kept = measured(build(), device)
            rate = f"{B * L / elapsed:.0f}" if 'sampler' in name else ''
            emit(row([name, B, f"{elapsed:.1f}", rate, f"{peak / 2 ** 30:.2f}", f"{kept / 2 ** 30:.2f}",
                      f"{(peak - kept) / (B * L * OFFICIAL_V * 4):.1f}"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    emit('')


def run_gpu_check(cfg, emit):
    """The test suite (on CUDA wherever a test's device is 'auto'), then the dry run on CUDA with bf16 autocast."""
    if not torch.cuda.is_available():
        raise UserError("--gpu_check true needs a CUDA GPU; on a CPU, python bench.py --dry_run owt runs the dry run")
    emit(f"# GPU check: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}", '')
    start = time.time()
    tests = subprocess.run([sys.executable, '-m', 'pytest', '-q', 'tests'], cwd=ROOT, capture_output=True, text=True,
                           timeout=cfg['gpu_test_timeout'])
    emit('## Test suite', '', f"exit code {tests.returncode} after {time.time() - start:.0f} s:", '', '```',
         *(tests.stdout + tests.stderr).strip().splitlines()[-12:], '```', '')
    report_dry_run(cfg, torch.device('cuda'), emit)


# ----------------------------------------------------------------------------------------------------------------
# Report: markdown tables, readable as they are on a terminal and pasted as they are into the README

def row(cells):
    return '| ' + ' | '.join(str(cell) for cell in cells) + ' |'


def report_steps(cfg, vocabs, kinds, device, emit):
    K = cfg['steps']
    emit(f"## One step without the network (t = 0.5 -> {0.5 - 1 / K:.4f}, about half the positions masked)", '',
         f"Median of {cfg['repeats']} fused and {cfg['ref_repeats']} reference steps; read: one float32 read of the "
         f"logits (out.amax(-1)); MiB: the step's peak allocation beyond its inputs; fused steps visit "
         f"{cfg['block'] or sample.default_block(device)} numbers at a time.", '')
    names = ['V', 'sampler', 'fused ms', 'reference ms', 'reference / fused', 'read ms', 'fused / read', 'fused MiB',
             'reference MiB']
    emit(row(names), row(['---:'] * len(names)))
    for N in vocabs:
        for kind in kinds:
            r = bench_step(cfg, kind, N, device)
            emit(row([r['V'], kind, f"{r['fused_ms']:.3f}", f"{r['reference_ms']:.1f}", f"{r['speedup']:.1f}x",
                      f"{r['read_ms']:.3f}", f"{r['reads']:.1f}x", f"{r['fused_mib']:.2f}",
                      f"{r['reference_mib']:.1f}"]))
            if kind == 'mdlm' and N == max(vocabs):
                target = f"{r['speedup']:.0f}x at V = {r['V']}, {'met' if r['speedup'] >= 10 else 'MISSED'}"
    if 'mdlm' in kinds:
        emit('', f"Target: the fused MDLM step >= 10x faster than the reference: {target}.")


def report_loop(cfg, vocabs, device, emit):
    K = cfg['loop_steps'] or cfg['steps']
    emit('', f"## The K = {K} step MDLM loop against {K} network calls ('{cfg['model']}' DiT)", '',
         "network: K calls on a fixed batch; loop: sample.generate with time_conditioned=True (a call at every "
         "step); in-loop network: the part of the same run spent inside the network, so 'loop / in-loop' is "
         "not moved by the machine's load changing between runs; sampler: the rest of the loop, per step.", '')
    names = ['V', 'network s', 'loop s', 'loop / network', 'in-loop network s', 'loop / in-loop', 'sampler ms / step',
             'NFE']
    names += ['cached loop s (NFE)', 'cached / network'] if cfg['cached'] else []
    emit(row(names), row(['---:'] * len(names)))
    verdicts = []
    for N in vocabs:
        r = bench_loop(cfg, N, device)
        cells = [r['V'], f"{r['network_s']:.2f}", f"{r['loop_s']:.2f}", f"{r['ratio']:.3f}x",
                 f"{r['in_loop_network_s']:.2f}", f"{r['same_run_ratio']:.3f}x", f"{r['sampler_ms']:.3f}",
                 f"{r['nfe']:.0f}"]
        if cfg['cached']:
            cells += [f"{r['cached_s']:.2f} ({r['cached_nfe']:.0f})", f"{r['cached_s'] / r['network_s']:.3f}x"]
        emit(row(cells))
        verdicts += [f"V = {r['V']}: {r['ratio']:.3f}x ({r['same_run_ratio']:.3f}x in the same run), "
                     f"{'met' if max(r['ratio'], r['same_run_ratio']) <= 1.10 else 'MISSED'}"]
    emit('', f"Target: loop / network <= 1.10. {'; '.join(verdicts)}.")


def report_iterations(cfg, device, emit):
    emit('', f"## One distillation iteration against one teacher-training step (batch {cfg['iteration_batch']}, "
         f"'{cfg['iteration_model']}' DiT, data {cfg['iteration_data']})", '',
         f"Median of {cfg['iteration_repeats']} of each, timed round-robin. IDLM iteration: one fake update and one "
         f"student update (fake_steps = 1). DiDi iteration (MDLM only): two-step student rollout, one discriminator "
         f"update, one student update, at distill_didi.py's other defaults. SDTT (MDLM) / DCD (Duo) iteration: the "
         f"teacher's two ancestral steps (SDTT) or one forward (DCD) and one student update.", '')
    names = ['teacher', 'N', 'L', 'teacher step ms', 'IDLM iteration ms', 'IDLM / teacher', 'DiDi iteration ms',
             'DiDi / IDLM', 'SDTT / DCD iteration ms', 'SDTT / DCD / teacher']
    emit(row(names), row(['---:'] * len(names)))
    verdicts = []
    for kind in cfg['iteration_kinds'].split(','):
        r = bench_iterations(cfg, kind, device)
        ms, ratio = r['ms'], r['ms']['idlm'] / r['ms']['teacher']
        didi = [f"{ms['didi']:.1f}", f"{ms['didi'] / ms['idlm']:.2f}x"] if 'didi' in ms else ['-', '-']
        step = [f"{ms['step']:.1f}", f"{ms['step'] / ms['teacher']:.2f}x"] if 'step' in ms else ['-', '-']
        emit(row([kind, r['N'], r['L'], f"{ms['teacher']:.1f}", f"{ms['idlm']:.1f}", f"{ratio:.2f}x", *didi, *step]))
        verdicts.append(f"{kind} {ratio:.2f}x {'met' if ratio <= 3.5 else 'MISSED'}")
    emit('', f"Target: IDLM / teacher <= 3.5: {'; '.join(verdicts)}.")


def main(argv=None):
    cfg = common.configure(DEFAULTS, argv)
    try:
        vocabs = [int(n) for n in cfg['vocab_sizes'].split(',')]
    except ValueError:
        raise UserError(f"--vocab_sizes takes comma-separated integers, not {cfg['vocab_sizes']!r}") from None
    kinds = [kind.strip() for kind in cfg['samplers'].split(',')]
    if min(vocabs) < 2:
        raise UserError("--vocab_sizes: every vocabulary needs at least 2 real tokens")
    if any(kind not in sample.KINDS for kind in kinds):
        raise UserError(f"--samplers are taken from {', '.join(sample.KINDS)}, not {cfg['samplers']!r}")
    if min(cfg['seq_len'], cfg['batch_size'], cfg['steps'], cfg['repeats'], cfg['ref_repeats']) < 1:
        raise UserError("--seq_len, --batch_size, --steps, --repeats and --ref_repeats must be at least 1")
    if cfg['block'] < 0:
        raise UserError("--block must be 0 (sample.py's default) or a positive number of elements")
    if cfg['loop_steps'] < 0:
        raise UserError("--loop_steps must be 0 (the same as --steps) or a positive number of steps")
    if cfg['dry_run'] not in ('', 'owt'):
        raise UserError(f"--dry_run takes owt (the papers' OpenWebText setting), not {cfg['dry_run']!r}")
    for key in ('model', 'iteration_model', 'dry_model'):
        if cfg[key] not in PRESETS:
            raise UserError(f"--{key} is one of {', '.join(PRESETS)}, not {cfg[key]!r}")
    if cfg['device'] == 'auto':
        cfg['device'] = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(cfg['device'])
    if cfg['threads'] > 0 and not cfg['dry_run']:   # the dry run's 169M matmuls use every core
        torch.set_num_threads(cfg['threads'])
    lines = []

    def emit(*texts):
        for text in texts:
            print(text, flush=True)
            lines.append(text)

    if cfg['gpu_check']:
        run_gpu_check(cfg, emit)
        cfg['out'] = cfg['out'] or 'gpu_check.md'
    elif cfg['dry_run']:
        report_dry_run(cfg, device, emit)
    else:
        emit(f"# Sampler benchmark: B = {cfg['batch_size']}, L = {cfg['seq_len']}, K = {cfg['steps']}", '',
             f"torch {torch.__version__} on {device}, {torch.get_num_threads()} CPU threads; sampling in float64.", '')
        report_steps(cfg, vocabs, kinds, device, emit)
        if cfg['loop']:
            report_loop(cfg, vocabs, device, emit)
        if cfg['iterations']:
            report_iterations(cfg, device, emit)
    if cfg['out']:
        with open(cfg['out'], 'w') as f:
            f.write('\n'.join(lines) + '\n')
        print(f"wrote {cfg['out']}")


if __name__ == '__main__':
    common.run(main)
