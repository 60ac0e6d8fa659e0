"""
Judging what a model generates in K steps, the way both papers do, plus the truth where we have it; and the one
place where every distiller (distill_idlm.py, distill_didi.py, distill_sdtt.py) gets its rows, tables, verdicts,
snapshot choice and plots, so that their numbers are comparable by construction.

    python eval.py --ckpt out/mdlm-synthetic --steps 4,8,16,64,256,1024     # teacher rows + exact-denoiser floor
    python eval.py --ckpt out/mdlm-pydoc --data pydoc --judge out/ar-pydoc  # real text: an AR judge instead
    python eval.py --ckpt path/to/mdlm-owt --data data/owt --judge gpt2:path/to/gpt2-large --steps 16,64,1024
    python eval.py --ckpt out/didi-mdlm-synthetic --disc out/didi-mdlm-synthetic --steps 8,16   # + RGAS rows
    python eval.py --teacher out/mdlm-synthetic,out/duo-synthetic --teacher_steps 64,1024 --steps 4,8,16,32 \\
        --ckpt sdtt=out/sdtt-mdlm-synthetic,idlm=out/idlm-mdlm-s0+out/idlm-mdlm-s1,dcd=out/dcd-duo-synthetic \\
        --streams 3 --greedy_tail both --out out/compare                  # the comparison of every method
    python eval.py --runs old=out/a-s0+out/a-s1,new=out/b-s0+out/b-s1 --out out/runs  # runs over iterations
    python eval.py --teacher out/mdlm-synthetic --teacher_steps 1024 --ckpt out/idlm-mdlm-synthetic --steps 8,16 \
        --temperature 1,0.8,0.7,0.6 --streams 3 --out out/temperature     # students against a tempered teacher

Metrics for a batch of generated sequences x (num_samples, L):
  true GenPPL   exp(mean over sequences of -log p_true(x) / L), on the synthetic language only: exact, no judge.
                The language's own samples score exp(H), H its entropy rate (data.SyntheticLanguage).
  judge GenPPL  exp(token-weighted mean NLL) under an autoregressive judge (train.py --teacher ar here, or GPT-2
                from a local Hugging Face folder with --judge gpt2:FOLDER, scored as the papers do: gpt2.py; the
                papers use GPT-2 Large): the proxy for real text.
  entropy       per sequence, the entropy (nats) of the empirical distribution of its own tokens; the mean over
                sequences (both papers' definition). Low GenPPL with low entropy is repetition, not quality.
  NELBO PPL     exp(validation NELBO per token) of the checkpoint (zero-shot likelihood, DiDi Table 7).
  latency       seconds per sequence and tokens per second of the whole K-step sampler.

Noise. A few-step GenPPL of 256 samples moves by several percent from one noise stream to the next, so every cell
is drawn from --streams noise streams (stream s seeds the sampler with (seed + s, K): every model sees the same
noise at a given K and stream) and reported as mean +- sd. Several checkpoints of one label (`label=a+b`, training
seeds) are pooled into the same cell. Only a difference larger than these sds is a difference.

Verdicts. A student row matches its teacher (the row of a --teacher of the same kind with the most steps) when
its GenPPL is no worse and its entropy is within --entropy_tolerance below; both halves are printed, because a
sampler can always buy GenPPL with entropy. The frontier plot (GenPPL against entropy, one curve per model over K)
shows that trade at a glance.

Temperature. The cheapest way to buy GenPPL with entropy is to sample x0_hat^(1/T) with T < 1 (sample.temper), and
a few-step sampler has entropy to spare: it draws the positions of a step independently, so its samples are noisier
(higher entropy) than the many-step chain's. --temperature 1,0.8,0.7 adds rows for every model at each T (labelled
"T=0.8"; verdicts still against the untempered teacher) and temperature.png, GenPPL against entropy over T at each
K: a distilled student is better than its teacher only if it beats the tempered teacher at equal entropy. The
distillers' final tables do the same with --eval_temperatures (the teacher tempered at their eval_steps).

Every row is sampled in float64 (sample.py). A run writes <out>/results.json, <out>/table.md, and with matplotlib
<out>/plot.png (GenPPL and entropy against steps), <out>/frontier.png and, with --temperature, temperature.png.
--runs reads no model: it gathers the periodic evaluations that distill_*.py logged in history.json, and across
training seeds gives mean +- sd.
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
ckpt = ''                 # comma-separated models: a checkpoint, label=checkpoint, or label=ckpt1+ckpt2 (training
                          # seeds pooled into one row); 'exact' adds the synthetic language's exact denoiser
teacher = ''              # comma-separated teachers: evaluated at --steps and --teacher_steps; students are judged
                          # against the teacher of their kind at its most steps
teacher_steps = ''        # extra budgets for the teachers, e.g. 64,256,1024
kind = 'mdlm'             # the sampler of --ckpt exact: mdlm | sedd | duo
teacher_kind = ''         # mdlm | duo | sedd: what an official Lightning .ckpt without hyper_parameters holds
data = 'synthetic'        # held-out data: the reference row, NELBO, and the language for true GenPPL
steps = '4,8,16,64,256,1024'
num_samples = 256
streams = 1               # noise streams per cell (mean +- sd); 3 or more for a comparison
batch_size = 64
seed = 0
judge = ''                # an AR checkpoint (train.py --teacher ar), or gpt2:FOLDER (GPT-2, e.g. gpt2-large); '' = none
floor = True              # on synthetic data, add the exact denoiser's rows (a perfect teacher sampled in K steps)
nelbo_batches = 16        # validation batches for the NELBO perplexity (0: skip)
entropy_tolerance = 0.02  # verdicts: a student may lose this fraction of its teacher's entropy
fused = True
sampler = 'analytic'      # SEDD only
greedy_tail = 'no'        # Duo only: no | yes | both (both rows, as the papers report both)
temperature = '1'         # comma-separated T: every model (and the exact denoiser) is also sampled from x0_hat^(1/T)
disc = ''                 # a DiDi-Instruct checkpoint: its discriminator guides extra RGAS rows of every MDLM model
rgas_h = 30.0             # RGAS (sample.generate_rgas): the tilt of the first steps, ramped from 0
rgas_tilt = 0.5           # fraction of the steps that tilt; the rest re-rank rgas_candidates candidates
rgas_candidates = 4
rgas_select = 'max'       # re-ranking: 'max' keeps the candidate with the highest reward (DiDi App. F.3), 'softmax'
                          # draws one from the softmax of the rewards
rgas_reward = 'mean'      # the reward of eq. 6: 'mean' or 'sum' of the log-ratio over the masked positions
runs = ''                 # comma-separated distillation runs to compare over iterations: label=out_dir or
                          # label=dir1+dir2 (training seeds) -> <out>/runs.md and runs.png from their history.json
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
    model, ckpt = official.load_model(ckpt_path)
    if ckpt.get('teacher') == 'sedd' and ckpt.get('kind') == 'student':
        model = StudentScores(model)
    cfg = {**train.stored_config(ckpt['config']), 'eval_batches': batches}
    objective = train.teacher_objective(cfg, dataset.vocab_size)
    return math.exp(train.evaluate(model.to(device), objective, dataset, cfg, 0, 1, device))


def genppl_key(row):
    """The GenPPL a row carries: 'genppl_true' on the synthetic language, else 'genppl_judge', else None."""
    return next((k for k in ('genppl_true', 'genppl_judge') if k in row), None)


def score(x, language, judge, bos_id):
    """The metrics of one batch of samples x (n, L): entropy, and true / judge GenPPL where they exist."""
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
        except official.CheckpointError as e:
            raise UserError(str(e)) from None
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


class Bench:
    """What every row is drawn and scored with: the data's held-out set, the language (true GenPPL) or a judge,
    the number of samples, the noise seed, and the RGAS settings. A distiller builds one from its config, so its
    rows are the rows eval.py would print for the same checkpoint and seed."""

    def __init__(self, dataset, judge, num_samples, batch_size, seed, device, rgas=None, fused=True,
                 sampler='analytic'):
        self.dataset, self.language, self.judge = dataset, dataset.language(), judge
        self.N, self.L = dataset.vocab_size, dataset.seq_len
        self.num_samples, self.batch_size, self.seed, self.device = num_samples, batch_size, seed, device
        self.rgas = rgas or {}
        self.fused, self.sampler = fused, sampler

    def score(self, x):
        return score(x.cpu(), self.language, self.judge, self.N)

    def data_row(self):
        """The held-out data's own row: what a perfect sampler scores."""
        x = self.dataset.batch('val', torch.arange(min(self.num_samples, len(self.dataset.val))))
        return {'model': 'data (held out)', 'role': 'data', 'steps': 0, **self.score(x)}

    def draw(self, net, kind, K, generator, schedule='loglinear', disc=None, greedy_tail=False, progress=False,
             temperature=1.0):
        """num_samples sequences in K steps: the model's own sampler (from x0_hat^(1/temperature)), or RGAS guided
        by disc (MDLM only)."""
        if disc is not None:
            return generate_rgas(net, disc, self.num_samples, self.L, K, self.N, generator,
                                 batch_size=self.batch_size, fused=self.fused, progress=progress, **self.rgas)
        return generate(net, kind, self.num_samples, self.L, K, self.N, generator, batch_size=self.batch_size,
                        fused=self.fused, sampler=self.sampler if kind == 'sedd' else None,
                        greedy_tail=greedy_tail, schedule=schedule, progress=progress, temperature=temperature)


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
               role='student', extra=None, progress=False, temperature=1.0):
    """One row per K in steps for a model (nets: one network, or several training seeds of it), each the mean and
    sd over `streams` (a list of stream numbers) x nets. Printed as they come. With temperature T != 1 the label
    gains " T=..." and the row keeps 'temperature' and its untempered label as 'base'. -> list of row dicts"""
    nets = nets if isinstance(nets, (list, tuple)) else [nets]
    rows = []
    for K in steps:
        parts = []
        for net in nets:
            for s in streams:
                generator = common.step_generator(bench.seed + s, K, device=bench.device)
                start = time.time()
                x, nfe = bench.draw(net, kind, K, generator, schedule, disc, greedy_tail, progress, temperature)
                seconds = time.time() - start
                parts.append({'role': role, 'kind': kind, 'greedy_tail': greedy_tail, 'steps': K, 'nfe': nfe,
                              **bench.score(x),
                              'sec_per_seq': seconds / len(x), 'tok_per_sec': x.numel() / seconds, **(extra or {})})
        tempered = {} if temperature == 1.0 else {'temperature': temperature, 'base': label}
        rows.append({**pooled_row(label + (f" T={temperature:g}" if tempered else ''), parts, len(streams)), **tempered})
        tqdm.write(format_row(rows[-1]))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Verdicts and the choice of a snapshot

def matches(row, reference, tolerance):
    """The target: GenPPL no worse than the reference's (the teacher at its most steps) and entropy at least
    (1 - tolerance) times its entropy. GenPPL is the true one, else the judge's."""
    key = genppl_key(row)
    return key is not None and row[key] <= reference[key] and row['entropy'] >= (1 - tolerance) * reference['entropy']


def better(row, best, reference, tolerance):
    """Does this evaluation row replace best? It must match the reference; then the lower GenPPL wins."""
    return matches(row, reference, tolerance) and (best is None or row[genppl_key(row)] < best[genppl_key(row)])


def reference_row(rows, kind=None, greedy_tail=False):
    """The untempered teacher's row with the most steps (of the given kind, and sampled with the same greedy tail):
    what a student is judged against, or None."""
    teachers = [r for r in rows if r.get('role') == 'teacher' and kind in (None, r.get('kind'))
                and r.get('greedy_tail', False) == greedy_tail and 'temperature' not in r]
    return max(teachers, key=lambda r: r['steps'], default=None)


def teacher_rows_at(row, rows):
    """The teacher's rows at every temperature that a student row is set against: same kind, same K, same greedy
    tail; sorted by entropy."""
    return sorted((r for r in rows if r.get('role') == 'teacher' and r.get('kind') == row.get('kind')
                   and r['steps'] == row['steps'] and r.get('greedy_tail', False) == row.get('greedy_tail', False)),
                  key=lambda r: r['entropy'])


def tempered_teacher(row, rows):
    """The teacher at the row's K steps tempered to the row's entropy: (GenPPL, lower T, higher T), the GenPPL
    interpolated linearly in log GenPPL against entropy between the two temperatures whose rows bracket it; None
    without two such rows."""
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
    """One line per plain student row: its GenPPL and entropy against its teacher's row with the most steps, and
    whether it matches() it; with tempered teacher rows at its K (--temperature, or a distiller's
    --eval_temperatures), a second line against the teacher tempered to the student's entropy (tempered_teacher):
    the trade a student must beat."""
    lines = []
    for r in rows:
        ref = reference_row(rows, r.get('kind'), r.get('greedy_tail', False))
        if r.get('role') != 'student' or ref is None or genppl_key(ref) is None or 'RGAS' in r['model']:
            continue
        key, change = genppl_key(ref), 100 * (r['entropy'] / ref['entropy'] - 1)
        lines.append(f"- {r['model']} at {r['steps']} steps: GenPPL {fmt_value(r, key)} vs {fmt_value(ref, key)}, "
                     f"entropy {fmt_value(r, 'entropy')} vs {fmt_value(ref, 'entropy')} ({change:+.2f}%) against "
                     f"{ref['model']} at {ref['steps']} steps: {'matched' if matches(r, ref, tolerance) else 'not matched'}")
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


def markdown_table(rows, language, num_samples=None):
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ['| ' + ' | '.join(title for _, title, _ in cols) + ' |', '|' + '---|' * len(cols)]
    for r in rows:
        lines.append('| ' + ' | '.join(fmt_value(r, k) if k in r else '' for k, _, _ in cols) + ' |')
    draws = sorted({r['draws'] for r in rows if 'draws' in r})
    if draws and draws != [1]:
        lines.append(f"\nEach cell: mean ± sd over {' or '.join(map(str, draws))} draws (noise streams x training "
                     f"seeds where a model has several)" + (f" of {num_samples} samples each." if num_samples else "."))
    if language is not None:
        H = language.entropy_rate()[0]
        lines.append(f"\nexp(H) = {math.exp(H):.3f}: the true GenPPL of the language itself (H = {H:.4f} nats/token).")
    return '\n'.join(lines) + '\n'


def results_table(rows, bench, out_dir, tolerance=0.02, name='results.md'):
    """The held-out data's row above rows, then the verdicts: printed and saved as out_dir/name. -> all rows"""
    rows = [bench.data_row()] + rows
    table = markdown_table(rows, bench.language, bench.num_samples) + '\n' + '\n'.join(verdicts(rows, tolerance)) + '\n'
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


def save_figure(fig, legend_ax, path, outside=False):
    """The end of every plot here: a small legend on legend_ax (outside: to its right, for crowded plots), tight
    layout, a PNG at path."""
    if outside:
        legend_ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1))
    else:
        legend_ax.legend(fontsize=7)
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches='tight' if outside else None)
    pyplot().close(fig)
    print(f"wrote {path}")


def plot_sweep(rows, path):
    """GenPPL and entropy against steps, one line per model (error bars: sd over draws); data as dashed lines."""
    plt = pyplot()
    data = next((r for r in rows if r.get('role') == 'data'), None)
    key = genppl_key(rows[-1])
    if plt is None:
        return
    panels = ([key] if key else []) + ['entropy']
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    models = [m for m in dict.fromkeys(r['model'] for r in rows if r.get('role') != 'data')]
    for ax, k in zip(axes[0], panels):
        for m in models:
            pts = [r for r in rows if r['model'] == m]
            ax.errorbar([r['steps'] for r in pts], [r[k] for r in pts], [r.get(k + '_sd', 0) for r in pts],
                        marker='o', capsize=2, label=m)
        if data is not None:
            ax.axhline(data[k], color='k', ls='--', lw=1, label='data')
        ax.set_xscale('log', base=2)
        ax.set_xlabel('sampling steps K')
        ax.set_ylabel(YLABEL[k])
        if k != 'entropy':
            ax.set_yscale('log')
        ax.grid(alpha=0.3)
    save_figure(fig, axes[0][0], path)


def entropy_curves(ax, curves, key, tag):
    """GenPPL (log axis) against entropy on ax: one curve per {label: rows in order}, each point labelled with
    tag(row) (its K on the frontier, its T on the temperature plot)."""
    for label, pts in curves.items():
        line = ax.errorbar([r['entropy'] for r in pts], [r[key] for r in pts], [r.get(key + '_sd', 0) for r in pts],
                           [r.get('entropy_sd', 0) for r in pts], marker='o', ms=3, capsize=2, label=label)
        for r in pts:
            ax.annotate(tag(r), (r['entropy'], r[key]), fontsize=6, color=line[0].get_color(),
                        xytext=(2, 2), textcoords='offset points')
    ax.set_yscale('log')
    ax.set_xlabel('entropy (nats): higher is more diverse')
    ax.set_ylabel(f"{YLABEL[key]}: lower is better")
    ax.grid(alpha=0.3)


def plot_frontier(rows, path):
    """GenPPL against entropy, one curve per model over K (each point labelled with its K): a method that buys
    GenPPL with entropy moves left along its curve. The held-out data is the star to reach."""
    plt = pyplot()
    key = genppl_key(rows[-1])
    if plt is None or key is None:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    models = dict.fromkeys(r['model'] for r in rows if r.get('role') != 'data')
    entropy_curves(ax, {m: sorted((r for r in rows if r['model'] == m), key=lambda r: r['steps']) for m in models},
                   key, lambda r: str(r['steps']))
    data = next((r for r in rows if r.get('role') == 'data'), None)
    if data is not None:
        ax.plot([data['entropy']], [data[key]], 'k*', ms=12, label='data (held out)')
    save_figure(fig, ax, path)


def plot_temperature(rows, path, tolerance=0.02):
    """GenPPL against entropy over the temperatures, one curve per model and K (each point labelled with its T),
    with the untempered teacher at its most steps as the target: its GenPPL (dashed) and the lowest entropy it
    allows (dotted). Where a student's curve lies below its teacher's at the same entropy, it is better
    than temperature alone."""
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


def plot_history(history, reference, path, tolerance=0.02):
    """A distiller's evaluations against iterations: GenPPL and entropy of the EMA student, one line per K (RGAS
    dashed; error bars: sd over streams), with the teacher at its most steps (reference) as the line to match and,
    for entropy, the tolerance band below it."""
    plt = pyplot()
    evals = history['eval']
    if plt is None or not evals:
        return
    key = genppl_key(evals[0])
    panels = ([key] if key else []) + ['entropy']
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, k in zip(axes[0], panels):
        for label in dict.fromkeys(r['series'] for r in evals):
            for K in sorted({r['steps'] for r in evals}):
                pts = [r for r in evals if r['steps'] == K and r['series'] == label]
                if pts:
                    ax.errorbar([r['iter'] for r in pts], [r[k] for r in pts], [r.get(k + '_sd', 0) for r in pts],
                                marker='o', ms=3, capsize=2, ls='--' if 'RGAS' in label else '-',
                                label=f"{label}, {K} steps")
        if reference is not None:
            ax.axhline(reference[k], color='k', ls=':', lw=1.5, label=f"teacher, {reference['steps']} steps")
            if k == 'entropy':
                ax.axhspan((1 - tolerance) * reference[k], reference[k], color='k', alpha=0.08,
                           label=f"within {tolerance:.0%} of the teacher")
        ax.set_xlabel('iteration')
        ax.set_ylabel(YLABEL[k])
        ax.grid(alpha=0.3)
    save_figure(fig, axes[0][0], path)


# ----------------------------------------------------------------------------------------------------------------
# A distiller's evaluation: periodic rows, best.pt, the final table

class Evaluator:
    """What distill_*.py calls: rows of the EMA student every eval_interval iterations on the selection streams,
    best.pt among them, and the final table on the report streams, with the teacher and the plots. The selection
    streams and the report streams are disjoint, so the table is not the sample a snapshot was chosen on."""

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
        return model_rows(self.bench, label, net, self.kind, steps or self.steps(),
                          self.select_streams if select else self.report_streams, self.schedule, disc,
                          greedy_tail, role, temperature=temperature)

    def reference(self, teacher, steps):
        """The teacher's row at its most steps on the selection streams: what best.pt must stay near."""
        return self.rows(f"teacher {self.kind}", teacher, True, steps[-1:], role='teacher')[0]

    def periodic(self, history, done, series):
        """series: {label: (net, disc or None)} -> the rows, appended to history['eval']."""
        rows = []
        for label, (net, disc) in series.items():
            for r in self.rows(f"student @{done} ({label})", net, True, disc=disc):
                rows.append({'iter': done, 'series': label, **r})
        history['eval'] += rows
        return rows

    def final(self, teacher, students, out_dir, history, tails=(False,)):
        """students: [(label, net, disc or None)]. The teacher at every budget, and tempered at eval_steps (so each
        verdict also faces the teacher at the student's entropy), the students, the data row, verdicts ->
        results.md; history.png, temperature.png. tails: Duo's greedy tail off and/or on."""
        rows, temperatures = [], self.temperatures()
        for tail in tails:
            suffix = ' + greedy tail' if tail else ''
            rows += self.rows(f"teacher {self.kind}{suffix}", teacher, False, self.teacher_steps(), role='teacher',
                              greedy_tail=tail)
            for T in temperatures:
                rows += self.rows(f"teacher {self.kind}{suffix}", teacher, False, role='teacher', greedy_tail=tail,
                                  temperature=T)
            for label, net, disc in students:
                rows += self.rows(label + suffix, net, False, disc=disc, greedy_tail=tail)
        rows = results_table(rows, self.bench, out_dir, self.cfg['entropy_tolerance'])
        plot_history(history, reference_row(rows), os.path.join(out_dir, 'history.png'),
                     self.cfg['entropy_tolerance'])
        path = os.path.join(out_dir, 'temperature.png')
        if not temperatures and os.path.exists(path):
            os.remove(path)           # an earlier run's plot would pass for this one's
        plot_temperature(rows, path, self.cfg['entropy_tolerance'])
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


def parse_temperatures(text, flag='--temperature'):
    """'1,0.8,0.7' -> the temperatures other than 1, in order (the untempered rows always come); '' -> none."""
    try:
        values = [float(t) for t in str(text).split(',') if t.strip()]
    except ValueError:
        values = [0.0]
    if str(text).strip() and not (values and all(math.isfinite(T) and T > 0 for T in values)):
        raise UserError(f"{flag} takes comma-separated numbers above 0 (1: the model as it is), not {text!r}")
    return [T for T in dict.fromkeys(values) if T != 1.0]


def sweep(cfg):
    _, _, device = common.setup_distributed(cfg['device'])
    dataset = load_data(ensure_data(cfg['data']))
    language = dataset.language()
    judge = load_judge(cfg['judge'], dataset, cfg['data'], device) if cfg['judge'] else None
    steps, extra = budgets(cfg['steps'], '--steps'), budgets(cfg['teacher_steps'], '--teacher_steps')
    if cfg['greedy_tail'] not in TAILS:
        raise UserError(f"--greedy_tail is no, yes or both, not {cfg['greedy_tail']!r}")
    if cfg['streams'] < 1:
        raise UserError("--streams must be at least 1")
    rgas = dict(h_max=cfg['rgas_h'], tilt_fraction=cfg['rgas_tilt'], candidates=cfg['rgas_candidates'],
                select=cfg['rgas_select'], reward=cfg['rgas_reward'])
    bench = Bench(dataset, judge, cfg['num_samples'], cfg['batch_size'], cfg['seed'], device, rgas, cfg['fused'],
                  cfg['sampler'])
    disc = load_discriminator(cfg['disc'], dataset.vocab_size, device) if cfg['disc'] else None
    streams = list(range(1, cfg['streams'] + 1))
    temperatures = parse_temperatures(cfg['temperature'])
    models = [(label, paths, 'teacher') for label, paths in parse_models(cfg['teacher'])] + \
             [(label, paths, 'student') for label, paths in parse_models(cfg['ckpt'])]
    kinds, rows = [], []
    print(format_row(bench.data_row()))
    for label, paths, role in models:
        if paths == ['exact']:
            continue
        loaded = [load_sampler(p, device, cfg['teacher_kind']) for p in paths]
        net, kind, schedule = [m[0] for m in loaded], loaded[0][1], loaded[0][5]
        kinds.append(kind)
        nelbo = {}
        if cfg['nelbo_batches'] > 0:
            nelbo['nelbo_ppl'] = mean_sd([nelbo_perplexity(p, dataset, cfg['nelbo_batches'], device) for p in paths])[0]
        model_steps = sorted(set(steps) | set(extra)) if role == 'teacher' else steps
        for tail in TAILS[cfg['greedy_tail']] if kind == 'duo' else (False,):
            rows += model_rows(bench, label + (' + greedy tail' if tail else ''), net, kind, model_steps, streams,
                               schedule, None, tail, role, nelbo)
            for T in temperatures:    # tempered rows at --steps only: the untempered many-step row is the reference
                rows += model_rows(bench, label + (' + greedy tail' if tail else ''), net, kind, steps, streams,
                                   schedule, None, tail, role, temperature=T)
        if disc is not None and kind == 'mdlm':
            rows += model_rows(bench, f"{label} + RGAS", net, kind, steps, streams, disc=disc, role=role)
    wanted_floor = cfg['floor'] or any(paths == ['exact'] for _, paths, _ in models)
    if wanted_floor and language is not None:
        for kind in dict.fromkeys(kinds or [cfg['kind']]):
            for T in [1.0] + temperatures:
                rows += model_rows(bench, f"exact {kind} denoiser", exact_denoiser(language, kind), kind, steps,
                                   streams, role='floor', temperature=T)
    elif any(paths == ['exact'] for _, paths, _ in models):
        raise UserError("--ckpt exact needs synthetic data with a known language")
    return rows, bench


# ----------------------------------------------------------------------------------------------------------------
# Runs over iterations: several distillation runs (and seeds of each) from their logs

def run_curves(dirs, series='EMA'):
    """The periodic rows of one label's runs (one per training seed) -> {(steps, iter): [row per seed]}: only the
    iterations every seed reached."""
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
    common_keys = set.intersection(*(set(p) for p in per_seed))
    return {k: [p[k] for p in per_seed] for k in sorted(common_keys)}


def seed_mean_sd(rows, key):
    """Mean over training seeds, and their sd; with one seed, its sd over noise streams."""
    if len(rows) == 1:
        return rows[0][key], rows[0].get(key + '_sd', 0.0)
    return mean_sd([r[key] for r in rows])


def compare_runs(cfg):
    """--runs: a markdown table (label, steps, iteration, GenPPL and entropy as mean +- sd over seeds) and a plot
    of both against iterations, one line per label and K."""
    curves = [(label, len(dirs), run_curves(dirs)) for label, dirs in parse_models(cfg['runs'])]
    first = next((rows[0] for _, _, c in curves for rows in c.values()), None)
    if first is None:
        raise UserError("no periodic evaluations in these runs' history.json (was --eval_samples 0?)")
    key = genppl_key(first) or 'entropy'
    lines = [f"| run | seeds | steps | iteration | {YLABEL[key]} | entropy |", "|---|---:|---:|---:|---|---|"]
    for label, seeds, curve in curves:
        for (K, it), rows in curve.items():
            g, e = seed_mean_sd(rows, key), seed_mean_sd(rows, 'entropy')
            lines.append(f"| {label} | {seeds} | {K} | {it} | {g[0]:.3f} ± {g[1]:.3f} | {e[0]:.4f} ± {e[1]:.4f} |")
    os.makedirs(cfg['out'], exist_ok=True)
    with open(os.path.join(cfg['out'], 'runs.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    plot_runs(curves, key, os.path.join(cfg['out'], 'runs.png'))


def plot_runs(curves, key, path):
    """GenPPL and entropy against iterations, and the path each run takes in the (GenPPL, entropy) plane: a run
    that is only slower follows the same path, one that trades less entropy for its GenPPL runs above it."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4), squeeze=False)
    for i, (label, seeds, curve) in enumerate(curves):
        for j, K in enumerate(sorted({K for K, _ in curve})):
            its = [it for KK, it in curve if KK == K]
            g = [seed_mean_sd(curve[(K, it)], key) for it in its]
            e = [seed_mean_sd(curve[(K, it)], 'entropy') for it in its]
            style = dict(color=f"C{i}", marker='o', ms=3, capsize=2, ls=['-', '--', ':', '-.'][j % 4],
                         label=f"{label} ({seeds} seed{'s' * (seeds > 1)}), {K} steps")
            for ax, stats in zip(axes[0], (g, e)):
                ax.errorbar(its, [m for m, _ in stats], [sd for _, sd in stats], **style)
            axes[0][2].errorbar([m for m, _ in g], [m for m, _ in e], [sd for _, sd in e], [sd for _, sd in g],
                                **style)
    for ax, (x, y) in zip(axes[0], [('iteration', YLABEL[key]), ('iteration', YLABEL['entropy']),
                                    (YLABEL[key] + ' (log)', YLABEL['entropy'])]):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0][2].set_xscale('log')
    save_figure(fig, axes[0][0], path)


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
    plot_sweep(rows, os.path.join(cfg['out'], 'plot.png'))
    plot_frontier(rows, os.path.join(cfg['out'], 'frontier.png'))
    plot_temperature(rows, os.path.join(cfg['out'], 'temperature.png'), cfg['entropy_tolerance'])


if __name__ == '__main__':
    common.run(main)
