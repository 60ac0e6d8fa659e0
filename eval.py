"""
Judging what a model generates in K steps, the way both papers do, plus the truth where we have it.

    python eval.py --ckpt out/mdlm-synthetic --steps 4,8,16,64,256,1024     # teacher rows + exact-denoiser floor
    python eval.py --ckpt out/mdlm-synthetic,out/idlm-mdlm --steps 4,8,16   # several checkpoints side by side
    python eval.py --ckpt out/mdlm-pydoc --data pydoc --judge out/ar-pydoc  # real text: an AR judge instead
    python eval.py --ckpt path/to/mdlm-owt --data data/owt --judge gpt2:path/to/gpt2-large --steps 16,64,1024
    python eval.py --ckpt out/didi-mdlm-synthetic,out/idlm-mdlm-synthetic --disc out/didi-mdlm-synthetic --steps 8,16
                                                  # + RGAS rows for every MDLM model, guided by a DiDi discriminator

Metrics for a batch of generated sequences x (num_samples, L):
  true GenPPL   exp(mean over sequences of -log p_true(x) / L), on the synthetic language only: exact, no judge.
                The language's own samples score exp(H), H its entropy rate (reference/benchmark.md).
  judge GenPPL  exp(token-weighted mean NLL) under an autoregressive judge (train.py --teacher ar here, or GPT-2
                from a local Hugging Face folder with --judge gpt2:FOLDER, scored as the papers do: gpt2.py; the
                papers use GPT-2 Large): the proxy for real text.
  entropy       per sequence, the entropy (nats) of the empirical distribution of its own tokens; the mean over
                sequences (both papers' definition). Low GenPPL with low entropy is repetition, not quality.
  NELBO PPL     exp(validation NELBO per token) of the checkpoint (zero-shot likelihood, DiDi Table 7).
  latency       seconds per sequence and tokens per second of the whole K-step sampler.
With --disc, every MDLM checkpoint also gets RGAS rows (sample.generate_rgas, DiDi eq. 10-11), drawn from the same
noise seed as its plain rows; the discriminator's calls are not counted in NFE but are in the latency.
Every row is sampled in float64 (sample.py). The sweep writes <out>/results.json, <out>/table.md and, if
matplotlib is installed, <out>/plot.png (GenPPL and entropy against steps, one line per model).
"""

import json
import math
import os
import time

import torch

import common
from common import UserError
from data import ensure_data, load_data
from gpt2 import GPT2Judge, load_gpt2
from model import ar_log_likelihood
from official import CheckpointError
from sample import StudentScores, exact_denoiser, generate, generate_rgas, load_discriminator, load_sampler

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value)
ckpt = ''                 # comma-separated checkpoints; 'exact' adds the synthetic language's exact denoiser
kind = 'mdlm'             # the sampler of --ckpt exact: mdlm | sedd | duo
data = 'synthetic'        # held-out data: the reference row, NELBO, and the language for true GenPPL
steps = '4,8,16,64,256,1024'
num_samples = 256
batch_size = 64
seed = 0
judge = ''                # an AR checkpoint (train.py --teacher ar), or gpt2:FOLDER (GPT-2, e.g. gpt2-large); '' = none
floor = True              # on synthetic data, add the exact denoiser's rows (the best any K-step sampler can do)
nelbo_batches = 16        # validation batches for the NELBO perplexity (0: skip)
fused = True
sampler = 'analytic'      # SEDD only
greedy_tail = False       # Duo only
disc = ''                 # a DiDi-Instruct checkpoint: its discriminator guides extra RGAS rows of every MDLM model
rgas_h = 30.0             # RGAS (sample.generate_rgas): the tilt of the first steps, ramped from 0
rgas_tilt = 0.5           # fraction of the steps that tilt; the rest re-rank rgas_candidates candidates
rgas_candidates = 4
out = 'out/eval'
device = 'auto'
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}


# ----------------------------------------------------------------------------------------------------------------
# Metrics

def true_genppl(language, x):
    """exp(mean over sequences of -log p(x) / L) under the synthetic language's exact likelihood."""
    return math.exp((-language.log_prob(x) / x.shape[1]).mean().item())


def sample_entropy(x):
    """Mean over sequences of the entropy (nats) of each sequence's own empirical token distribution."""
    counts = torch.zeros(x.shape[0], int(x.max()) + 1, dtype=torch.float64).scatter_add_(
        1, x.long(), torch.ones_like(x, dtype=torch.float64))
    p = counts / x.shape[1]
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1).mean().item()


@torch.no_grad()
def judge_genppl(judge, x, bos_id, batch_size=64):
    """exp(token-weighted mean NLL) of x under an autoregressive judge (every position counts). A GPT2Judge
    re-tokenises and scores by the papers' protocol instead (gpt2.py), in its own batch size."""
    if isinstance(judge, GPT2Judge):
        return judge.genppl(x)
    device = next(judge.parameters()).device
    nll = sum(-ar_log_likelihood(judge, x[i:i + batch_size].to(device), bos_id).double().sum().item()
              for i in range(0, len(x), batch_size))
    return math.exp(nll / x.numel())


def nelbo_perplexity(ckpt_path, dataset, batches, device):
    """exp(validation NELBO per token) of a checkpoint, with train.py's fixed validation batches and noise.
    A SEDD student is scored through the scores its x0 implies (sample.StudentScores), as it is sampled."""
    import train  # here, not at the top: only this metric needs the training code
    model, ckpt = common.load_model(ckpt_path)
    if ckpt.get('teacher') == 'sedd' and ckpt.get('kind') == 'student':
        model = StudentScores(model)
    cfg = {**train.stored_config(ckpt['config']), 'eval_batches': batches}
    objective = train.teacher_objective(cfg, dataset.vocab_size)
    return math.exp(train.evaluate(model.to(device), objective, dataset, cfg, 0, 1, device))


# ----------------------------------------------------------------------------------------------------------------
# The sweep

def targets(cfg, language, device):
    """(label, net, kind, schedule, checkpoint path or None) for every model in --ckpt, plus the floor."""
    names = [c for c in cfg['ckpt'].split(',') if c]
    if cfg['floor'] and language is not None and 'exact' not in names:
        names.append('exact')
    for name in names:
        if name == 'exact':
            if language is None:
                raise UserError("--ckpt exact needs synthetic data with a known language")
            yield f"exact {cfg['kind']} denoiser", exact_denoiser(language, cfg['kind']), cfg['kind'], 'loglinear', None
        else:
            net, kind, N, L, meta, schedule = load_sampler(name, device)
            yield os.path.basename(os.path.normpath(name)), net, kind, schedule, name


def genppl_key(row):
    """The GenPPL a row carries: 'genppl_true' on the synthetic language, else 'genppl_judge', else None."""
    return next((k for k in ('genppl_true', 'genppl_judge') if k in row), None)


def evaluate_samples(x, language, judge, bos_id):
    row = {'entropy': sample_entropy(x)}
    if language is not None:
        row['genppl_true'] = true_genppl(language, x)
    if judge is not None:
        row['genppl_judge'] = judge_genppl(judge, x, bos_id)
    return row


def load_judge(spec, dataset, data_name, device):
    """--judge: 'gpt2:FOLDER' for GPT-2 (GPT-2-token data only), else an AR checkpoint over the data's tokens."""
    N = dataset.vocab_size
    if spec.startswith('gpt2:'):
        if dataset.meta['tokenizer'] != 'gpt2':
            raise UserError(f"--judge {spec} scores GPT-2 text, but --data {data_name} is "
                            f"{dataset.meta['tokenizer']!r} tokens; use an AR judge trained on it")
        try:
            return GPT2Judge(load_gpt2(spec[len('gpt2:'):]).to(device))
        except CheckpointError as e:
            raise UserError(str(e)) from None
    judge, _ = common.load_model(spec)
    if judge.config.head != 'ar' or judge.config.vocab_size != N + 1:
        raise UserError(f"--judge {spec} is not an AR model over this data's {N} tokens; "
                        f"train one with python train.py --teacher ar --data {data_name}, or pass gpt2:FOLDER")
    return judge.to(device).eval()


def draw(cfg, net, kind, schedule, disc, K, L, N, generator):
    """--num_samples sequences in K steps: the model's own sampler, or RGAS guided by disc (MDLM only)."""
    if disc is not None:
        return generate_rgas(net, disc, cfg['num_samples'], L, K, N, generator, batch_size=cfg['batch_size'],
                             h_max=cfg['rgas_h'], tilt_fraction=cfg['rgas_tilt'], candidates=cfg['rgas_candidates'],
                             fused=cfg['fused'], progress=False)
    return generate(net, kind, cfg['num_samples'], L, K, N, generator, batch_size=cfg['batch_size'],
                    fused=cfg['fused'], sampler=cfg['sampler'] if kind == 'sedd' else None,
                    greedy_tail=cfg['greedy_tail'] and kind == 'duo', schedule=schedule, progress=False)


def sweep(cfg):
    _, _, device = common.setup_distributed(cfg['device'])
    dataset = load_data(ensure_data(cfg['data']))
    language, N, L = dataset.language(), dataset.vocab_size, dataset.seq_len
    judge = load_judge(cfg['judge'], dataset, cfg['data'], device) if cfg['judge'] else None
    try:
        step_list = [int(s) for s in cfg['steps'].split(',') if s]
    except ValueError:
        raise UserError(f"--steps takes comma-separated integers such as 4,8,16, not {cfg['steps']!r}") from None

    reference = dataset.batch('val', torch.arange(min(cfg['num_samples'], len(dataset.val))))
    rows = [{'model': 'data (held out)', 'steps': 0, **evaluate_samples(reference, language, judge, N)}]
    print(format_row(rows[0]))
    disc = load_discriminator(cfg['disc'], N, device) if cfg['disc'] else None
    for label, net, kind, schedule, path in targets(cfg, language, device):
        extra = {}
        if path is not None and cfg['nelbo_batches'] > 0:
            extra['nelbo_ppl'] = nelbo_perplexity(path, dataset, cfg['nelbo_batches'], device)
        guides = [None] + ([disc] if disc is not None and kind == 'mdlm' and path is not None else [])
        for guide in guides:
            for K in step_list:
                generator = common.step_generator(cfg['seed'], K, device=device)
                start = time.time()
                x, nfe = draw(cfg, net, kind, schedule, guide, K, L, N, generator)
                seconds = time.time() - start
                row = {'model': label if guide is None else f"{label} + RGAS", 'steps': K, 'nfe': nfe,
                       **evaluate_samples(x.cpu(), language, judge, N), 'sec_per_seq': seconds / len(x),
                       'tok_per_sec': x.numel() / seconds, **extra}
                rows.append(row)
                print(format_row(row))
    return rows, language


COLUMNS = [('model', 'model', '{}'), ('steps', 'steps', '{}'), ('nfe', 'NFE', '{:.1f}'),
           ('genppl_true', 'true GenPPL', '{:.3f}'), ('genppl_judge', 'judge GenPPL', '{:.2f}'),
           ('entropy', 'entropy', '{:.3f}'), ('nelbo_ppl', 'NELBO PPL', '{:.3f}'),
           ('sec_per_seq', 's/seq', '{:.4f}'), ('tok_per_sec', 'tok/s', '{:.0f}')]


def format_row(row):
    return '  '.join(f"{title} {fmt.format(row[key])}" for key, title, fmt in COLUMNS if key in row)


def markdown_table(rows, language):
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ['| ' + ' | '.join(title for _, title, _ in cols) + ' |', '|' + '---|' * len(cols)]
    for r in rows:
        lines.append('| ' + ' | '.join(fmt.format(r[k]) if k in r else '' for k, _, fmt in cols) + ' |')
    if language is not None:
        H = language.entropy_rate()[0]
        lines.append(f"\nexp(H) = {math.exp(H):.3f}: the true GenPPL of the language itself (H = {H:.4f} nats/token).")
    return '\n'.join(lines) + '\n'


def plot(rows, path):
    """GenPPL and entropy against steps, one line per model; the held-out data as dashed lines."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    key = genppl_key(rows[0])
    panels = ([key] if key else []) + ['entropy']
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    axes = axes if len(panels) > 1 else [axes]
    models = [m for m in dict.fromkeys(r['model'] for r in rows) if m != 'data (held out)']
    for ax, k in zip(axes, panels):
        for m in models:
            pts = [(r['steps'], r[k]) for r in rows if r['model'] == m]
            ax.plot(*zip(*pts), marker='o', label=m)
        ax.axhline(rows[0][k], color='k', ls='--', lw=1, label='data')
        ax.set_xscale('log', base=2)
        ax.set_xlabel('sampling steps K')
        ax.set_ylabel({'genppl_true': 'true GenPPL', 'genppl_judge': 'judge GenPPL', 'entropy': 'entropy (nats)'}[k])
        if k != 'entropy':
            ax.set_yscale('log')
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    cfg = common.configure(DEFAULTS, argv)
    if not cfg['ckpt'] and not cfg['floor']:
        raise UserError("pass --ckpt (comma-separated checkpoints, or 'exact')")
    rows, language = sweep(cfg)
    os.makedirs(cfg['out'], exist_ok=True)
    with open(os.path.join(cfg['out'], 'results.json'), 'w') as f:
        json.dump({'config': cfg, 'rows': rows}, f, indent=1)
    table = markdown_table(rows, language)
    with open(os.path.join(cfg['out'], 'table.md'), 'w') as f:
        f.write(table)
    print('\n' + table)
    plot(rows, os.path.join(cfg['out'], 'plot.png'))


if __name__ == '__main__':
    common.run(main)
