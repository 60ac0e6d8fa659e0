"""eval.py's metrics against values known in closed form, and the sweep's outputs."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import common
import eval as evaluation
import train
from data import SyntheticLanguage, prepare_synthetic
from model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sample_entropy_of_known_sequences():
    x = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2], [0, 1, 2, 3]])
    expected = (math.log(2) + 0.0 + math.log(4)) / 3
    assert abs(evaluation.sample_entropy(x) - expected) < 1e-12


def test_true_genppl_of_the_languages_own_samples_is_exp_H():
    language = SyntheticLanguage(N=8, L=8, K=2, successors=3)
    H, se = language.entropy_rate()
    x = language.sample(20000, generator=torch.Generator().manual_seed(7))
    nll = -language.log_prob(x) / language.L
    tol = 4 * (nll.std().item() / len(x) ** 0.5 + se)
    assert abs(math.log(evaluation.true_genppl(language, x)) - H) < tol
    repeated = torch.full((10, 8), int(x[0, 0]))  # a degenerate sampler is punished by the true likelihood
    assert evaluation.true_genppl(language, repeated) > 3 * math.exp(H)


def test_an_untrained_judge_is_uniform():
    """A fresh AR model predicts uniformly over the N real tokens (zero output layer, BOS never predicted),
    so any text has judge GenPPL exactly N."""
    judge = build_model('tiny', vocab_size=11, head='ar', mask_id=10).eval()
    x = torch.randint(0, 10, (5, 7))
    assert abs(evaluation.judge_genppl(judge, x, bos_id=10) - 10) < 1e-4


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('eval')
    data = str(root / 'syn')
    prepare_synthetic(data, num_train=256, num_val=64, N=8, L=8, K=2)
    for teacher in ('mdlm', 'ar'):
        train.main([f'--teacher={teacher}', f'--data={data}', f'--out_dir={root / teacher}', '--model=tiny',
                    '--max_iters=10', '--batch_size=16', '--eval_interval=10', '--eval_batches=2'])
    return root, data


def test_sweep_writes_rows_table_and_plot(tiny_run):
    root, data = tiny_run
    out = root / 'sweep'
    evaluation.main([f'--ckpt={root / "mdlm"}', f'--data={data}', '--steps=2,4', '--num_samples=16',
                     f'--judge={root / "ar"}', f'--out={out}', '--nelbo_batches=2'])
    rows = json.load(open(out / 'results.json'))['rows']
    assert [(r['model'], r['steps']) for r in rows] == [
        ('data (held out)', 0), ('mdlm', 2), ('mdlm', 4), ('exact mdlm denoiser', 2), ('exact mdlm denoiser', 4)]
    for r in rows[1:]:
        assert {'genppl_true', 'genppl_judge', 'entropy', 'sec_per_seq', 'tok_per_sec', 'nfe'} <= set(r)
    assert rows[1]['nelbo_ppl'] > 1 and 'nelbo_ppl' not in rows[3]
    assert (out / 'table.md').read_text().count('\n|') >= 5
    pytest.importorskip('matplotlib')
    assert (out / 'plot.png').stat().st_size > 1000


def test_tempered_rows_are_judged_against_the_untempered_teacher(tiny_run):
    """--temperature adds rows at --steps for every model and for the exact denoiser; the verdicts still compare
    with the untempered teacher at its most steps, and sharpening x0_hat lowers the entropy."""
    root, data = tiny_run
    out = root / 'tempered'
    evaluation.main([f'--teacher={root / "mdlm"}', '--teacher_steps=8', f'--ckpt=s={root / "mdlm"}', f'--data={data}',
                     '--steps=2', '--num_samples=64', '--temperature=1,0.5', f'--out={out}', '--nelbo_batches=0'])
    rows = json.load(open(out / 'results.json'))['rows']
    assert [(r['model'], r['steps']) for r in rows] == [
        ('data (held out)', 0), ('mdlm', 2), ('mdlm', 8), ('mdlm T=0.5', 2), ('s', 2), ('s T=0.5', 2),
        ('exact mdlm denoiser', 2), ('exact mdlm denoiser T=0.5', 2)]
    assert rows[5]['temperature'] == 0.5 and rows[5]['base'] == 's' and 'temperature' not in rows[4]
    assert rows[7]['entropy'] < rows[6]['entropy'] - 0.05
    ref = evaluation.reference_row(rows)
    assert (ref['model'], ref['steps']) == ('mdlm', 8)
    assert '- s T=0.5 at 2 steps: ' in (out / 'table.md').read_text() and 'against mdlm at 8 steps' in \
        (out / 'table.md').read_text()
    pytest.importorskip('matplotlib')
    assert (out / 'temperature.png').stat().st_size > 1000


def test_a_student_is_set_against_the_teacher_tempered_to_its_entropy():
    """The teacher's GenPPL at the student's entropy, interpolated in log GenPPL between the bracketing temperatures."""
    def row(model, role, steps, genppl, entropy, T=None):
        return {'model': model, 'role': role, 'kind': 'mdlm', 'steps': steps, 'genppl_true': genppl,
                'entropy': entropy, **({'temperature': T} if T else {})}
    rows = [row('t', 'teacher', 8, 20.0, 3.4), row('t T=0.8', 'teacher', 8, 10.0, 3.3, 0.8),
            row('t', 'teacher', 64, 6.0, 3.35), row('s', 'student', 8, 6.0, 3.325), row('s2', 'student', 8, 9.0, 3.2)]
    genppl, lo, hi = evaluation.tempered_teacher(rows[3], rows)
    assert abs(genppl - 10.0 * 2 ** 0.25) < 1e-9 and (lo, hi) == (0.8, 1.0)      # a quarter of the way up, in log
    assert evaluation.tempered_teacher(rows[4], rows) is None
    lines = evaluation.verdicts(rows, 0.02)
    assert lines[1] == ("  - at equal entropy: the teacher at 8 steps tempered to 3.325 (between T=0.8 and T=1) "
                        f"scores {genppl:.3f}: the student's GenPPL is {100 * (6.0 / genppl - 1):+.1f}% against it")
    assert lines[3].endswith('outside the range of the teacher\'s tempered rows: add a temperature below 0.8')
    rows[3]['entropy'] = 3.45                         # above the untempered teacher's: only T > 1 would bracket it
    assert evaluation.verdicts(rows, 0.02)[1].endswith('add a temperature above 1 (the student keeps more entropy '
                                                       'than the teacher at every T drawn)')


def test_temperature_lists_the_plot_and_runs_without_a_genppl(monkeypatch, tmp_path):
    """'' means none and nan/inf/0 are refused; a distiller's single student row is drawn on temperature.png; a run
    with neither a language nor a judge draws no tempered rows (no verdict could use them)."""
    assert evaluation.parse_temperatures('') == [] and evaluation.parse_temperatures('1,0.8') == [0.8]
    for bad in ('nan', '0.8,inf', '0', ',', 'x'):
        with pytest.raises(common.UserError, match='--eval_temperatures takes comma-separated numbers above 0'):
            evaluation.parse_temperatures(bad, '--eval_temperatures')
    from types import SimpleNamespace
    cfg = {'eval_streams': 1, 'eval_temperatures': '0.8,0.7'}
    assert evaluation.Evaluator(SimpleNamespace(language=None, judge=None), cfg, 'mdlm').temperatures() == []
    assert evaluation.Evaluator(SimpleNamespace(language=object(), judge=None), cfg, 'mdlm').temperatures() == [0.8, 0.7]
    pytest.importorskip('matplotlib')
    drawn = {}
    monkeypatch.setattr(evaluation, 'entropy_curves', lambda ax, curves, key, tag: drawn.update(curves))
    row = lambda model, role, T=None: {'model': model + (f' T={T}' if T else ''), 'role': role, 'kind': 'mdlm',
                                       'steps': 8, 'genppl_true': 10.0, 'entropy': 3.3,
                                       **({'temperature': T, 'base': model} if T else {})}
    evaluation.plot_temperature([row('t', 'teacher'), row('t', 'teacher', 0.8), row('s', 'student')],
                                str(tmp_path / 'temperature.png'))
    assert set(drawn) == {'t, K=8', 's, K=8'} and len(drawn['s, K=8']) == 1


def test_bad_steps_and_a_judge_that_is_not_autoregressive(tiny_run):
    root, data = tiny_run
    for args, message in [(['--steps=4,x'], '--steps takes comma-separated integers >= 1'),
                          ([f'--judge={root / "mdlm"}'], 'is not an AR model'),
                          (['--temperature=1,0'], '--temperature takes comma-separated numbers above 0')]:
        r = subprocess.run([sys.executable, 'eval.py', f'--ckpt={root / "mdlm"}', f'--data={data}', *args],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr


def write_history(folder, points):
    """A history.json as distill_*.py logs it: {(steps, iter): (genppl, entropy)} of the EMA series."""
    os.makedirs(folder, exist_ok=True)
    rows = [{'iter': it, 'series': 'EMA', 'steps': K, 'genppl_true': g, 'genppl_true_sd': 0.5, 'entropy': e,
             'entropy_sd': 0.01} for (K, it), (g, e) in points.items()]
    rows.append({'iter': 50, 'series': 'raw', 'steps': 8, 'genppl_true': 99.0, 'entropy': 1.0})   # not the EMA
    with open(os.path.join(folder, 'history.json'), 'w') as f:
        json.dump({'train': [], 'eval': rows}, f)


def test_runs_pools_training_seeds_over_iterations(tmp_path):
    """--runs: per label and K, the mean and sd over seeds at the iterations every seed reached; one seed keeps
    its sd over noise streams."""
    write_history(tmp_path / 'a0', {(8, 50): (10.0, 3.0), (8, 100): (8.0, 3.2), (8, 150): (7.0, 3.1)})
    write_history(tmp_path / 'a1', {(8, 50): (12.0, 3.2), (8, 100): (6.0, 3.0)})
    write_history(tmp_path / 'b', {(16, 50): (5.0, 3.3)})
    evaluation.main([f'--runs=A={tmp_path / "a0"}+{tmp_path / "a1"},B={tmp_path / "b"}', f'--out={tmp_path / "o"}'])
    table = (tmp_path / 'o' / 'runs.md').read_text().splitlines()
    sd = math.sqrt(2.0)
    assert f"| A | 2 | 8 | 50 | 11.000 ± {sd:.3f} | 3.1000 ± {math.sqrt(0.02):.4f} |" in table
    assert f"| A | 2 | 8 | 100 | 7.000 ± {sd:.3f} | 3.1000 ± {math.sqrt(0.02):.4f} |" in table
    assert not any('| A | 2 | 8 | 150 |' in row for row in table)       # seed a1 never reached it
    assert "| B | 1 | 16 | 50 | 5.000 ± 0.500 | 3.3000 ± 0.0100 |" in table
    assert (tmp_path / 'o' / 'runs.png').exists() or evaluation.pyplot() is None
    with pytest.raises(common.UserError, match='history.json does not exist'):
        evaluation.main([f'--runs=A={tmp_path / "nowhere"}', f'--out={tmp_path / "o"}'])
