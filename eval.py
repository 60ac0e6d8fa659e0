"""
Judging what a model generates in K steps, as IDLM §5 and DiDi §5 do, plus the truth where we have it; and the one
place where every distiller (distill_idlm.py, distill_didi.py, distill_sdtt.py) gets its rows, verdicts, best.pt
and plots, so that their numbers are comparable by construction.

    python eval.py --ckpt out/mdlm-synthetic --steps 4,8,16,64,256,1024     # teacher rows + exact-denoiser floor
    python eval.py --ckpt out/mdlm-pydoc --data pydoc --judge out/ar-pydoc  # real text: an AR judge instead
    python eval.py --ckpt path/to/mdlm-owt --data data/owt --judge gpt2:path/to/gpt2-large --steps 16,64,1024
    python eval.py --ckpt out/didi-mdlm-synthetic --disc out/didi-mdlm-synthetic --steps 8,16   # + RGAS rows
    python eval.py --teacher out/mdlm-synthetic,out/duo-synthetic --teacher_steps 64,1024 --steps 4,8,16,32 \\
        --ckpt sdtt=out/sdtt-mdlm-synthetic,idlm=out/idlm-mdlm-s0+out/idlm-mdlm-s1,dcd=out/dcd-duo-synthetic \\
        --streams 3 --greedy_tail both --out out/compare                  # the comparison of every method
    python eval.py --runs old=out/a-s0+out/a-s1,new=out/b-s0+out/b-s1 --out out/runs  # runs over iterations
    python eval.py --teacher out/mdlm-synthetic --teacher_steps 1024 --ckpt out/idlm-mdlm-synthetic --steps 8,16 \\
        --temperature 1,0.8,0.7,0.6 --streams 3 --out out/temperature     # students against a tempered teacher

The protocol (IDLM §5, DiDi §5): each model draws --num_samples sequences x (n, L) in K steps with its own
sampler, in float64 (sample.py), and its row at each K reports
  true GenPPL   exp(mean of -log p_true(x) / L): exact, on the synthetic language only; its own samples score exp(H).
  judge GenPPL  exp(token-weighted mean NLL) under an AR judge: a train.py --teacher ar checkpoint, or GPT-2 Large
                from a local folder as the papers do (--judge gpt2:FOLDER, scored as in gpt2.py).
  entropy       the mean over sequences of the entropy (nats) of each one's own tokens: low GenPPL with low entropy
                is repetition, not quality.
  NELBO PPL     exp(validation NELBO per token) of the checkpoint (zero-shot likelihood, DiDi Table 7).
  latency       seconds per sequence and tokens per second of the whole K-step sampler.
A cell is the mean +- sd over --streams noise streams (stream s seeds the sampler with (seed + s, K), the same for
every model) and over the training seeds of a label (`label=a+b`): only a difference beyond these sds is one.

Verdicts. A student matches its teacher (the --teacher of its kind at its most steps) when its GenPPL is no worse
and its entropy at most --entropy_tolerance below. A sampler can always buy GenPPL with entropy (frontier.png),
most cheaply with temperature, x0_hat^(1/T) with T < 1 (sample.temper), and a few-step sampler has entropy to
spare. So --temperature (the distillers: --eval_temperatures) adds rows at each T and temperature.png, and each
verdict a line against the teacher tempered to the student's entropy: the student must beat that too.

A run writes <out>/results.json, table.md and, with matplotlib, plot.png, frontier.png and temperature.png.
--runs reads no model: it pools the runs' history.json over training seeds into <out>/runs.md and runs.png.
"""

import json
import math
import os
import time

import torch
from tqdm import tqdm

import common
import official
import train
from common import UserError
from data import ensure_data, exact_denoiser, load_data
from gpt2 import GPT2Judge, load_gpt2
from model import ar_log_likelihood
from sample import StudentScores, generate, generate_rgas, load_discriminator, load_sampler

# ----------------------------------------------------------------------------------------------------------------
# Defaults (override with --key value or --key=value)
ckpt = ''                 # models, comma-separated: ckpt, label=ckpt, label=ckpt1+ckpt2 (seeds pooled), or 'exact'
teacher = ''              # teachers, comma-separated: also at --teacher_steps; students face their kind's teacher
teacher_steps = ''        # extra budgets for the teachers, e.g. 64,256,1024
kind = 'mdlm'             # the exact denoiser's sampler when no model sets it: mdlm | sedd | duo
teacher_kind = ''         # mdlm | duo | sedd: what an official Lightning .ckpt without hyper_parameters holds
data = 'synthetic'        # held-out data: the reference row, NELBO, and the language for true GenPPL
steps = '4,8,16,64,256,1024'  # K-step budgets
num_samples = 256
streams = 1               # noise streams per cell (mean +- sd); 3 or more for a comparison
batch_size = 64
seed = 0
judge = ''                # an AR checkpoint (train.py --teacher ar), or gpt2:FOLDER (e.g. gpt2-large); '' = none
floor = True              # on synthetic data, add the exact denoiser's rows (a perfect teacher sampled in K steps)
nelbo_batches = 16        # validation batches for the NELBO perplexity (0: skip)
entropy_tolerance = 0.02  # verdicts: a student may lose this fraction of its teacher's entropy
sampler = 'analytic'      # SEDD only: analytic | euler
greedy_tail = 'no'        # Duo only: no | yes | both (both rows, as the papers report both)
temperature = '1'         # comma-separated T: every model (and the exact denoiser) also sampled from x0_hat^(1/T)
disc = ''                 # a DiDi-Instruct checkpoint: its discriminator guides extra RGAS rows of every MDLM model
rgas_h = 30.0             # RGAS (sample.generate_rgas): the tilt of the first steps, ramped from 0
rgas_tilt = 0.5           # fraction of the steps that tilt; the rest re-rank rgas_candidates candidates
rgas_candidates = 4
rgas_select = 'max'       # re-ranking keeps the highest reward ('max', DiDi App. F.3) or draws by 'softmax'
rgas_reward = 'mean'      # eq. 6's reward: the 'mean' or the 'sum' of the log-ratio over the masked positions
runs = ''                 # distillation runs to compare over iterations: label=out_dir or label=dir1+dir2 (seeds)
out = 'out/eval'
device = 'auto'
# ----------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))}

TAILS = {'no': (False,), 'false': (False,), 'yes': (True,), 'true': (True,), 'both': (False, True)}


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
    """exp(token-weighted mean NLL) of x under an AR judge; a GPT2Judge scores by the papers' protocol (gpt2.py)."""
    if isinstance(judge, GPT2Judge):
        return judge.genppl(x)
    device = next(judge.parameters()).device
    nll = sum(-ar_log_likelihood(judge, x[i:i + batch_size].to(device), bos_id).double().sum().item()
              for i in range(0, len(x), batch_size))
    return math.exp(nll / x.numel())


def nelbo_perplexity(ckpt_path, dataset, batches, device):
    """exp(validation NELBO per token) of a checkpoint, with train.py's fixed validation batches and noise.
    A SEDD student is scored through the scores its x0 implies (sample.StudentScores), as it is sampled."""
    model, ckpt = official.load_model(ckpt_path)
    if ckpt.get('teacher') == 'sedd' and ckpt.get('kind') == 'student':
        model = StudentScores(model)
    cfg = {**train.stored_config(ckpt['config']), 'eval_batches': batches}
    objective = train.teacher_objective(cfg, dataset.vocab_size)
    return math.exp(train.evaluate(model.to(device), objective, dataset, cfg, 0, 1, device))


def genppl_key(row):
    """The GenPPL a row carries: 'genppl_true' on the synthetic language, else 'genppl_judge', else None."""
    return next((k for k in ('genppl_true', 'genppl_judge') if k in row), None)


def load_judge(spec, dataset, data_name, device):
    """--judge: 'gpt2:FOLDER' for GPT-2 (GPT-2-token data only), else an AR checkpoint over the data's tokens."""
    N = dataset.vocab_size
    if spec.startswith('gpt2:'):
        if dataset.meta['tokenizer'] != 'gpt2':
            raise UserError(f"--judge {spec} scores GPT-2 text, but --data {data_name} is "
                            f"{dataset.meta['tokenizer']!r} tokens; use an AR judge trained on it")
        return GPT2Judge(load_gpt2(spec[len('gpt2:'):]).to(device))   # a CheckpointError is a UserError
    judge, _ = official.load_model(spec)
    if judge.config.head != 'ar' or judge.config.vocab_size != N + 1:
        raise UserError(f"--judge {spec} is not an AR model over this data's {N} tokens; "
                        f"train one with python train.py --teacher ar --data {data_name}, or pass gpt2:FOLDER")
    return judge.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# Rows: one model at K steps, over noise streams

def budgets(text, flag):
    """'4,8,16' -> [4, 8, 16], with one sentence for anything else."""
    try:
        steps = [int(s) for s in text.split(',') if s.strip()]
    except ValueError:
        steps = None
    if steps is None or any(k < 1 for k in steps):
        raise UserError(f"{flag} takes comma-separated integers >= 1 such as 4,8,16, not {text!r}")
    return steps


def parse_temperatures(text, flag='--temperature'):
    """'1,0.8,0.7' -> the temperatures other than 1, in order (the untempered rows always come); '' -> none."""
    try:
        values = [float(t) for t in str(text).split(',') if t.strip()]
    except ValueError:
        values = [0.0]
    if str(text).strip() and not (values and all(math.isfinite(T) and T > 0 for T in values)):
        raise UserError(f"{flag} takes comma-separated numbers above 0 (1: the model as it is), not {text!r}")
    return [T for T in dict.fromkeys(values) if T != 1.0]


class Bench:
    """What every row is drawn and scored with: the held-out data, the language or a judge, the number of samples,
    the noise seed, the RGAS settings. A distiller's rows are the rows eval.py prints for the same seed."""

    def __init__(self, dataset, judge, num_samples, batch_size, seed, device, rgas=None, sampler='analytic'):
        self.dataset, self.language, self.judge = dataset, dataset.language(), judge
        self.N, self.L = dataset.vocab_size, dataset.seq_len
        self.num_samples, self.batch_size, self.seed, self.device = num_samples, batch_size, seed, device
        self.rgas, self.sampler = rgas or {}, sampler

    def score(self, x):
        """The metrics of samples x (n, L): entropy, and the true / judge GenPPL where they exist."""
        x = x.cpu()
        row = {'entropy': sample_entropy(x)}
        if self.language is not None:
            row['genppl_true'] = true_genppl(self.language, x)
        if self.judge is not None:
            row['genppl_judge'] = judge_genppl(self.judge, x, self.N)
        return row

    def data_row(self):
        """The held-out data's own row: what a perfect sampler scores."""
        x = self.dataset.batch('val', torch.arange(min(self.num_samples, len(self.dataset.val))))
        return {'model': 'data (held out)', 'role': 'data', 'steps': 0, **self.score(x)}

    def draw(self, net, kind, K, generator, schedule='loglinear', disc=None, greedy_tail=False, temperature=1.0):
        """num_samples sequences in K steps: the model's own sampler from x0_hat^(1/temperature), or RGAS guided
        by disc (MDLM only). -> (x, NFE)"""
        if disc is not None:
            return generate_rgas(net, disc, self.num_samples, self.L, K, self.N, generator,
                                 batch_size=self.batch_size, progress=False, **self.rgas)
        return generate(net, kind, self.num_samples, self.L, K, self.N, generator, batch_size=self.batch_size,
                        sampler=self.sampler if kind == 'sedd' else None, greedy_tail=greedy_tail,
                        schedule=schedule, progress=False, temperature=temperature)


def mean_sd(values):
    """(mean, sample sd) of a list of floats; sd 0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def pooled_row(label, parts, streams_per_part):
    """One cell from the rows of several (checkpoint, stream) draws: every metric as mean and sd."""
    row = {k: v for k, v in parts[0].items() if not isinstance(v, float)}
    row.update(model=label, streams=streams_per_part, draws=len(parts))
    for key in ('genppl_true', 'genppl_judge', 'entropy', 'nfe', 'sec_per_seq', 'tok_per_sec', 'nelbo_ppl'):
        if key in parts[0]:
            row[key], sd = mean_sd([p[key] for p in parts])
            if key in ('genppl_true', 'genppl_judge', 'entropy') and len(parts) > 1:
                row[key + '_sd'] = sd
    row['per_draw'] = [{k: p[k] for k in ('genppl_true', 'genppl_judge', 'entropy') if k in p} for p in parts]
    return row


def model_rows(bench, label, nets, kind, steps, streams, schedule='loglinear', disc=None, greedy_tail=False,
               role='student', extra=None, temperature=1.0):
    """One row per K in steps for a model (nets: one network, or one per training seed), each the mean and sd over
    streams (stream numbers) x nets, printed as it comes. A tempered row (T != 1) is labelled "label T=..." and
    keeps 'temperature' and its untempered label as 'base'."""
    nets = nets if isinstance(nets, (list, tuple)) else [nets]
    tempered = {} if temperature == 1.0 else {'temperature': temperature, 'base': label}
    rows = []
    for K in steps:
        parts = []
        for net in nets:
            for s in streams:
                generator = common.step_generator(bench.seed + s, K, device=bench.device)
                start = time.time()
                x, nfe = bench.draw(net, kind, K, generator, schedule, disc, greedy_tail, temperature)
                seconds = time.time() - start
                parts.append({'role': role, 'kind': kind, 'greedy_tail': greedy_tail, 'steps': K, 'nfe': nfe,
                              **bench.score(x),
                              'sec_per_seq': seconds / len(x), 'tok_per_sec': x.numel() / seconds, **(extra or {})})
        rows.append({**pooled_row(label + (f" T={temperature:g}" if tempered else ''), parts, len(streams)), **tempered})
        tqdm.write(format_row(rows[-1]))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Verdicts and the choice of a snapshot

def better(row, best, reference, tolerance):
    """Does this row replace best (None: does it match at all)? It must match the reference (the teacher at its
    most steps): GenPPL no worse, entropy at least (1 - tolerance) times its; then the lower GenPPL wins."""
    key = genppl_key(row)
    return (key is not None and row[key] <= reference[key] and row['entropy'] >= (1 - tolerance) * reference['entropy']
            and (best is None or row[key] < best[key]))


def reference_row(rows, kind=None, greedy_tail=False):
    """The untempered teacher's row with the most steps (of this kind and greedy tail): a student's target, or None."""
    teachers = [r for r in rows if r.get('role') == 'teacher' and kind in (None, r.get('kind'))
                and r.get('greedy_tail', False) == greedy_tail and 'temperature' not in r]
    return max(teachers, key=lambda r: r['steps'], default=None)


def teacher_rows_at(row, rows):
    """The teacher's rows at a student row's K (same kind, greedy tail) at every temperature, sorted by entropy."""
    return sorted((r for r in rows if r.get('role') == 'teacher' and r.get('kind') == row.get('kind')
                   and r['steps'] == row['steps'] and r.get('greedy_tail', False) == row.get('greedy_tail', False)),
                  key=lambda r: r['entropy'])


def tempered_teacher(row, rows):
    """The teacher at the row's K tempered to the row's entropy: (GenPPL, lower T, higher T), interpolated linearly
    in log GenPPL against entropy between the two rows that bracket it; None without two such rows."""
    key = genppl_key(row)
    same = teacher_rows_at(row, rows)
    for lo, hi in zip(same, same[1:]):
        if lo['entropy'] <= row['entropy'] <= hi['entropy'] and hi['entropy'] > lo['entropy']:
            w = (row['entropy'] - lo['entropy']) / (hi['entropy'] - lo['entropy'])
            genppl = math.exp((1 - w) * math.log(lo[key]) + w * math.log(hi[key]))
            return genppl, lo.get('temperature', 1.0), hi.get('temperature', 1.0)
    return None


def temperature_to_add(row, rows):
    """What to add to --temperature / --eval_temperatures when tempered_teacher() cannot place a student row."""
    same = teacher_rows_at(row, rows)
    temperatures = [r.get('temperature', 1.0) for r in same]
    if row['entropy'] > same[-1]['entropy']:
        return (f"a temperature above {max(temperatures):g} (the student keeps more entropy than the teacher at "
                "every T drawn)")
    return f"a temperature below {min(temperatures):g}"


def verdicts(rows, tolerance):
    """One line per plain student row: its GenPPL and entropy against its teacher at the most steps, matched or
    not; with tempered teacher rows at its K, a second line against the teacher tempered to its entropy."""
    lines = []
    for r in rows:
        ref = reference_row(rows, r.get('kind'), r.get('greedy_tail', False))
        if r.get('role') != 'student' or ref is None or genppl_key(ref) is None or 'RGAS' in r['model']:
            continue
        key, change = genppl_key(ref), 100 * (r['entropy'] / ref['entropy'] - 1)
        verdict = 'matched' if better(r, None, ref, tolerance) else 'not matched'     # no best yet: does it match?
        lines.append(f"- {r['model']} at {r['steps']} steps: GenPPL {fmt_value(r, key)} vs {fmt_value(ref, key)}, "
                     f"entropy {fmt_value(r, 'entropy')} vs {fmt_value(ref, 'entropy')} ({change:+.2f}%) against "
                     f"{ref['model']} at {ref['steps']} steps: {verdict}")
        if any('temperature' in t for t in teacher_rows_at(r, rows)):
            at = tempered_teacher(r, rows)
            lines.append(f"  - at equal entropy: the teacher at {r['steps']} steps tempered to {r['entropy']:.3f} " +
                         (f"(between T={at[1]:g} and T={at[2]:g}) scores {at[0]:.3f}: the student's GenPPL is "
                          f"{100 * (r[key] / at[0] - 1):+.1f}% against it" if at else
                          f"is outside the range of the teacher's tempered rows: add {temperature_to_add(r, rows)}"))
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Tables

COLUMNS = [('model', 'model', '{}'), ('steps', 'steps', '{}'), ('nfe', 'NFE', '{:.1f}'),
           ('genppl_true', 'true GenPPL', '{:.3f}'), ('genppl_judge', 'judge GenPPL', '{:.2f}'),
           ('entropy', 'entropy', '{:.3f}'), ('nelbo_ppl', 'NELBO PPL', '{:.3f}'),
           ('sec_per_seq', 's/seq', '{:.4f}'), ('tok_per_sec', 'tok/s', '{:.0f}')]


def fmt_value(row, key):
    """A metric as text, with '± sd' when the row pools several draws."""
    fmt = next(f for k, _, f in COLUMNS if k == key)
    text = fmt.format(row[key])
    return text + (f" ± {fmt.format(row[key + '_sd'])}" if key + '_sd' in row else '')


def format_row(row):
    return '  '.join(f"{title} {fmt_value(row, key)}" for key, title, _ in COLUMNS if key in row)


def results_table(rows, bench, out_dir, tolerance=0.02, name='results.md'):
    """The held-out data's row above rows, then the verdicts: printed and saved as out_dir/name. -> all rows"""
    rows = [bench.data_row()] + rows
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ['| ' + ' | '.join(title for _, title, _ in cols) + ' |', '|' + '---|' * len(cols)]
    for r in rows:
        lines.append('| ' + ' | '.join(fmt_value(r, k) if k in r else '' for k, _, _ in cols) + ' |')
    draws = sorted({r['draws'] for r in rows if 'draws' in r})
    if draws and draws != [1]:
        lines.append(f"\nEach cell: mean ± sd over {' or '.join(map(str, draws))} draws (noise streams x training "
                     f"seeds where a model has several)" + f" of {bench.num_samples} samples each.")
    if bench.language is not None:
        H = bench.language.entropy_rate()[0]
        lines.append(f"\nexp(H) = {math.exp(H):.3f}: the true GenPPL of the language itself (H = {H:.4f} nats/token).")
    table = '\n'.join(lines) + '\n\n' + '\n'.join(verdicts(rows, tolerance)) + '\n'
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), 'w') as f:
        f.write(table)
    print('\n' + table)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, optional: without it a line says so and the numbers are in the tables)

def pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None


YLABEL = {'genppl_true': 'true GenPPL', 'genppl_judge': 'judge GenPPL', 'entropy': 'entropy (nats)'}


def axis_labels(ax, xlabel, ylabel):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def save_figure(fig, legend_ax, path, outside=False):
    """A small legend on legend_ax (outside: to its right, for crowded plots), tight layout, a PNG at path."""
    if outside:
        legend_ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1))
    else:
        legend_ax.legend(fontsize=7)
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches='tight' if outside else None)
    pyplot().close(fig)
    print(f"wrote {path}")


def entropy_curves(ax, curves, key, tag):
    """GenPPL (log axis) against entropy on ax: one curve per {label: rows in order}, each point labelled with
    tag(row) (its K on the frontier, its T on the temperature plot, its iteration on runs.png)."""
    for label, pts in curves.items():
        line = ax.errorbar([r['entropy'] for r in pts], [r[key] for r in pts], [r.get(key + '_sd', 0) for r in pts],
                           [r.get('entropy_sd', 0) for r in pts], marker='o', ms=3, capsize=2, label=label)
        for r in pts:
            ax.annotate(tag(r), (r['entropy'], r[key]), fontsize=6, color=line[0].get_color(),
                        xytext=(2, 2), textcoords='offset points')
    ax.set_yscale('log')
    axis_labels(ax, 'entropy (nats): higher is more diverse', f"{YLABEL[key]}: lower is better")


def plot_sweep(rows, out_dir):
    """plot.png: GenPPL and entropy against steps, one line per model (error bars: sd over draws), the data dashed.
    frontier.png: GenPPL against entropy, one curve per model over K; a method that buys GenPPL with entropy moves
    left along its curve, and the held-out data is the star to reach."""
    plt = pyplot()
    if plt is None:
        return
    key, data = genppl_key(rows[-1]), next((r for r in rows if r.get('role') == 'data'), None)
    names = dict.fromkeys(r['model'] for r in rows if r.get('role') != 'data')
    models = {m: [r for r in rows if r['model'] == m] for m in names}
    metrics = ([key] if key else []) + ['entropy']
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, k in zip(axes[0], metrics):
        for m, pts in models.items():
            ax.errorbar([r['steps'] for r in pts], [r[k] for r in pts], [r.get(k + '_sd', 0) for r in pts],
                        marker='o', capsize=2, label=m)
        if data is not None:
            ax.axhline(data[k], color='k', ls='--', lw=1, label='data')
        ax.set_xscale('log', base=2)
        if k != 'entropy':
            ax.set_yscale('log')
        axis_labels(ax, 'sampling steps K', YLABEL[k])
    save_figure(fig, axes[0][0], os.path.join(out_dir, 'plot.png'))
    if key is not None:
        fig, ax = plt.subplots(figsize=(7, 5))
        entropy_curves(ax, {m: sorted(pts, key=lambda r: r['steps']) for m, pts in models.items()}, key,
                       lambda r: str(r['steps']))
        if data is not None:
            ax.plot([data['entropy']], [data[key]], 'k*', ms=12, label='data (held out)')
        save_figure(fig, ax, os.path.join(out_dir, 'frontier.png'))


def plot_temperature(rows, path, tolerance=0.02):
    """GenPPL against entropy over the temperatures, one curve per model and K, with the untempered teacher at its
    most steps as the target: its GenPPL (dashed) and the lowest entropy it allows (dotted). A student whose curve
    lies below its teacher's at the same entropy is better than temperature alone."""
    plt = pyplot()
    key = genppl_key(rows[-1])
    if plt is None or key is None or not any('temperature' in r for r in rows):
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    curves = {}
    for r in rows:
        if r.get('role') != 'data':
            curves.setdefault((r.get('base', r['model']), r['steps']), []).append(r)
    entropy_curves(ax, {f"{model}, K={K}": sorted(pts, key=lambda r: -r.get('temperature', 1.0))   # a distiller's
                        for (model, K), pts in curves.items()                                    # students: 1 point
                        if len(pts) > 1 or pts[0].get('role') == 'student'},
                   key, lambda r: f"{r.get('temperature', 1.0):g}")
    ref = reference_row(rows)
    if ref is not None:
        ax.axhline(ref[key], color='k', ls='--', lw=1, label=f"{ref['model']}, K={ref['steps']}")
        ax.axvline((1 - tolerance) * ref['entropy'], color='k', ls=':', lw=1,
                   label=f"its entropy less {100 * tolerance:g}%: matched is right of this, below the dashed line")
    ax.set_title('temperature: each point labelled with its T')
    save_figure(fig, ax, path, outside=True)


def plot_history(evals, reference, path, tolerance=0.02, paths=False):
    """Evaluations (a distiller's history['eval'], or --runs pooled over seeds) against iterations: GenPPL and
    entropy, one line per series and K (RGAS dashed), the teacher's row (reference) and its entropy band to reach.
    paths: a third panel, the path in the (entropy, GenPPL) plane; a run that is only slower follows the same."""
    plt = pyplot()
    if plt is None or not evals:
        return
    key = genppl_key(evals[0])
    metrics, paths = ([key] if key else []) + ['entropy'], paths and key is not None
    fig, axes = plt.subplots(1, len(metrics) + paths, figsize=(5.5 * (len(metrics) + paths), 4), squeeze=False)
    curves = {f"{label}, {K} steps": [r for r in evals if r['steps'] == K and r['series'] == label]
              for label in dict.fromkeys(r['series'] for r in evals) for K in sorted({r['steps'] for r in evals})}
    curves = {label: pts for label, pts in curves.items() if pts}
    for ax, k in zip(axes[0], metrics):
        for label, pts in curves.items():
            ax.errorbar([r['iter'] for r in pts], [r[k] for r in pts], [r.get(k + '_sd', 0) for r in pts],
                        marker='o', ms=3, capsize=2, ls='--' if 'RGAS' in label else '-', label=label)
        if reference is not None:
            ax.axhline(reference[k], color='k', ls=':', lw=1.5, label=f"teacher, {reference['steps']} steps")
            if k == 'entropy':
                ax.axhspan((1 - tolerance) * reference[k], reference[k], color='k', alpha=0.08,
                           label=f"within {tolerance:.0%} of the teacher")
        axis_labels(ax, 'iteration', YLABEL[k])
    if paths:
        entropy_curves(axes[0][-1], curves, key, lambda r: str(r['iter']))
    save_figure(fig, axes[0][0], path)


# ----------------------------------------------------------------------------------------------------------------
# A distiller's evaluation: periodic rows, best.pt, the final table

class Evaluator:
    """What distill_*.py calls: the student's rows every eval_interval iterations on the selection streams (best.pt
    is chosen among them), and the final table on the disjoint report streams, with the teacher and the plots."""

    def __init__(self, bench, cfg, kind, schedule='loglinear'):
        self.bench, self.cfg, self.kind, self.schedule = bench, cfg, kind, schedule
        n = cfg['eval_streams']
        self.report_streams, self.select_streams = list(range(1, n + 1)), list(range(101, 101 + n))

    def steps(self):
        return budgets(self.cfg['eval_steps'], '--eval_steps')

    def teacher_steps(self):
        return sorted(set(self.steps()) | set(budgets(self.cfg['teacher_steps'], '--teacher_steps')))

    def has_genppl(self):
        """A GenPPL needs the synthetic language or a judge; without one there is no verdict and no best.pt."""
        return self.bench.language is not None or self.bench.judge is not None

    def temperatures(self):
        """Without a GenPPL there is no verdict to set a tempered row against."""
        given = parse_temperatures(self.cfg['eval_temperatures'], '--eval_temperatures')
        return given if self.has_genppl() else []

    def rows(self, label, net, select, steps=None, disc=None, role='student', greedy_tail=False, temperature=1.0):
        """model_rows at eval_steps (or steps) on the selection streams (select) or the report streams."""
        return model_rows(self.bench, label, net, self.kind, steps or self.steps(),
                          self.select_streams if select else self.report_streams, self.schedule, disc,
                          greedy_tail, role, temperature=temperature)

    def reference(self, teacher, steps):
        """The teacher's row at its most steps on the selection streams: what best.pt must stay near."""
        return self.rows(f"teacher {self.kind}", teacher, True, steps[-1:], role='teacher')[0]

    def periodic(self, history, done, series):
        """series: {label: (net, disc or None)} -> the rows, appended to history['eval']."""
        rows = [{'iter': done, 'series': label, **r} for label, (net, disc) in series.items()
                for r in self.rows(f"student @{done} ({label})", net, True, disc=disc)]
        history['eval'] += rows
        return rows

    def final(self, teacher, students, out_dir, history, tails=(False,)):
        """students: [(label, net, disc or None)]; tails: Duo's greedy tail off and/or on. The teacher at every
        budget and tempered at eval_steps, the students, the data row and the verdicts -> results.md, with
        history.png and temperature.png."""
        rows, temperatures, tolerance = [], self.temperatures(), self.cfg['entropy_tolerance']
        for tail in tails:
            suffix = ' + greedy tail' if tail else ''
            rows += self.rows(f"teacher {self.kind}{suffix}", teacher, False, self.teacher_steps(), role='teacher',
                              greedy_tail=tail)
            for T in temperatures:
                rows += self.rows(f"teacher {self.kind}{suffix}", teacher, False, role='teacher', greedy_tail=tail,
                                  temperature=T)
            for label, net, disc in students:
                rows += self.rows(label + suffix, net, False, disc=disc, greedy_tail=tail)
        rows = results_table(rows, self.bench, out_dir, tolerance)
        for name, drawn in (('history.png', history['eval']), ('temperature.png', temperatures)):
            if not drawn and os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))     # an earlier run's plot would pass for this one's
        plot_history(history['eval'], reference_row(rows), os.path.join(out_dir, 'history.png'), tolerance)
        plot_temperature(rows, os.path.join(out_dir, 'temperature.png'), tolerance)
        return rows


def make_evaluator(cfg, dataset, kind, device, schedule='loglinear', rgas=None):
    """A distiller's Evaluator, from its config (judge, samples, batch, seed), or None when there is nothing to
    evaluate (--eval_samples 0, or no budgets)."""
    judge = load_judge(cfg['judge'], dataset, cfg['data'], device) if cfg['judge'] else None
    bench = Bench(dataset, judge, cfg['eval_samples'], cfg['eval_batch_size'], cfg['seed'], device, rgas)
    evaluator = Evaluator(bench, cfg, kind, schedule)
    return evaluator if cfg['eval_samples'] > 0 and evaluator.steps() else None


# ----------------------------------------------------------------------------------------------------------------
# The command line: a sweep of models, or the comparison of every method

def parse_models(spec):
    """'a,label=b,label2=c+d' -> [(label, [paths])]; a bare path is labelled by its folder name."""
    models = []
    for entry in (e for e in spec.split(',') if e):
        label, _, paths = entry.rpartition('=')
        paths = [p for p in paths.split('+') if p]
        models.append((label or common.folder_name(paths[0]), paths))
    return models


def sweep(cfg):
    """Every --teacher and --ckpt model (and the exact denoiser) at every budget and temperature -> rows, bench."""
    _, _, device = common.setup_distributed(cfg['device'])
    dataset = load_data(ensure_data(cfg['data']))
    judge = load_judge(cfg['judge'], dataset, cfg['data'], device) if cfg['judge'] else None
    steps, extra = budgets(cfg['steps'], '--steps'), budgets(cfg['teacher_steps'], '--teacher_steps')
    temperatures = parse_temperatures(cfg['temperature'])
    if cfg['greedy_tail'] not in TAILS:
        raise UserError(f"--greedy_tail is no, yes or both, not {cfg['greedy_tail']!r}")
    if cfg['streams'] < 1:
        raise UserError("--streams must be at least 1")
    models = [(label, paths, 'teacher') for label, paths in parse_models(cfg['teacher'])] + \
             [(label, paths, 'student') for label, paths in parse_models(cfg['ckpt'])]
    rgas = dict(h_max=cfg['rgas_h'], tilt_fraction=cfg['rgas_tilt'], candidates=cfg['rgas_candidates'],
                select=cfg['rgas_select'], reward=cfg['rgas_reward'])
    bench = Bench(dataset, judge, cfg['num_samples'], cfg['batch_size'], cfg['seed'], device, rgas, cfg['sampler'])
    exact = any(paths == ['exact'] for _, paths, _ in models)
    if exact and bench.language is None:
        raise UserError("--ckpt exact needs synthetic data with a known language")
    disc = load_discriminator(cfg['disc'], dataset.vocab_size, device) if cfg['disc'] else None
    streams = list(range(1, cfg['streams'] + 1))
    kinds, rows = [], []
    print(format_row(bench.data_row()))
    for label, paths, role in (m for m in models if m[1] != ['exact']):
        loaded = [load_sampler(p, device, cfg['teacher_kind']) for p in paths]
        net, kind, schedule = [m[0] for m in loaded], loaded[0][1], loaded[0][5]
        kinds.append(kind)
        nelbo = {}
        if cfg['nelbo_batches'] > 0:
            nelbo['nelbo_ppl'] = mean_sd([nelbo_perplexity(p, dataset, cfg['nelbo_batches'], device) for p in paths])[0]
        for tail in TAILS[cfg['greedy_tail']] if kind == 'duo' else (False,):
            name = label + (' + greedy tail' if tail else '')
            rows += model_rows(bench, name, net, kind, sorted(set(steps) | set(extra)) if role == 'teacher' else steps,
                               streams, schedule, None, tail, role, nelbo)
            for T in temperatures:    # tempered rows at --steps only: the untempered many-step row is the reference
                rows += model_rows(bench, name, net, kind, steps, streams, schedule, None, tail, role, temperature=T)
        if disc is not None and kind == 'mdlm':
            rows += model_rows(bench, f"{label} + RGAS", net, kind, steps, streams, disc=disc, role=role)
    if (cfg['floor'] or exact) and bench.language is not None:
        for kind in dict.fromkeys(kinds or [cfg['kind']]):
            for T in [1.0] + temperatures:
                rows += model_rows(bench, f"exact {kind} denoiser", exact_denoiser(bench.language, kind), kind, steps,
                                   streams, role='floor', temperature=T)
    return rows, bench


# ----------------------------------------------------------------------------------------------------------------
# Runs over iterations: several distillation runs (and seeds of each) from their logs

def pooled_runs(label, dirs, series='EMA'):
    """The periodic rows of one label's runs (dirs: one per training seed) -> one row per K and iteration that every
    seed reached, each metric the mean and sd over seeds (with one seed, its own sd over noise streams)."""
    per_seed = []
    for d in dirs:
        path = os.path.join(d, 'history.json')
        if not os.path.exists(path):
            raise UserError(f"{path} does not exist: --runs takes the out_dir of a distill_*.py run")
        try:
            with open(path) as f:
                rows = json.load(f).get('eval', [])
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{path} is not a distiller's history (a JSON object with an 'eval' list)") from None
        per_seed.append({(r['steps'], r['iter']): r for r in rows if r.get('series') == series})
    pooled = []
    for K, it in sorted(set.intersection(*(set(p) for p in per_seed))):
        seeds = [p[(K, it)] for p in per_seed]
        row = {'run': label, 'seeds': len(dirs), 'series': f"{label} ({len(dirs)} seed{'s' * (len(dirs) > 1)})",
               'steps': K, 'iter': it}
        for k in ('genppl_true', 'genppl_judge', 'entropy'):
            if k in seeds[0]:
                one = (seeds[0][k], seeds[0].get(k + '_sd', 0.0))
                row[k], row[k + '_sd'] = mean_sd([r[k] for r in seeds]) if len(seeds) > 1 else one
        pooled.append(row)
    return pooled


def compare_runs(cfg):
    """--runs: GenPPL and entropy per run, K and iteration, as mean +- sd over the run's seeds -> runs.md, runs.png."""
    rows = [row for label, dirs in parse_models(cfg['runs']) for row in pooled_runs(label, dirs)]
    if not rows:
        raise UserError("no periodic evaluations in these runs' history.json (was --eval_samples 0?)")
    key = genppl_key(rows[0]) or 'entropy'
    lines = [f"| run | seeds | steps | iteration | {YLABEL[key]} | entropy |", "|---|---:|---:|---:|---|---|"]
    lines += [f"| {r['run']} | {r['seeds']} | {r['steps']} | {r['iter']} | {r[key]:.3f} ± {r[key + '_sd']:.3f} | "
              f"{r['entropy']:.4f} ± {r['entropy_sd']:.4f} |" for r in rows]
    os.makedirs(cfg['out'], exist_ok=True)
    with open(os.path.join(cfg['out'], 'runs.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    plot_history(rows, None, os.path.join(cfg['out'], 'runs.png'), paths=True)


def main(argv=None):
    cfg = common.configure(DEFAULTS, argv)
    if cfg['runs']:
        return compare_runs(cfg)
    if not cfg['ckpt'] and not cfg['teacher'] and not cfg['floor']:
        raise UserError("pass --ckpt (comma-separated checkpoints, or 'exact') or --teacher")
    rows, bench = sweep(cfg)
    rows = results_table(rows, bench, cfg['out'], cfg['entropy_tolerance'], name='table.md')
    with open(os.path.join(cfg['out'], 'results.json'), 'w') as f:
        json.dump({'config': cfg, 'rows': rows}, f, indent=1)
    plot_sweep(rows, cfg['out'])
    plot_temperature(rows, os.path.join(cfg['out'], 'temperature.png'), cfg['entropy_tolerance'])


if __name__ == '__main__':
    common.run(main)
