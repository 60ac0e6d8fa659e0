"""eval.py's metrics against values known in closed form, and the sweep's outputs."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

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


def test_bad_steps_and_a_judge_that_is_not_autoregressive(tiny_run):
    root, data = tiny_run
    for args, message in [(['--steps=4,x'], '--steps takes comma-separated integers >= 1'),
                          ([f'--judge={root / "mdlm"}'], 'is not an AR model')]:
        r = subprocess.run([sys.executable, 'eval.py', f'--ckpt={root / "mdlm"}', f'--data={data}', *args],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr
