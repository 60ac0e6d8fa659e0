"""A newcomer's first hour: --help everywhere, checkpoints that load without running code, students exported in the
official Hugging Face layout, data written by an outside program, and one sentence for each bad input."""
import ast
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import distill_didi as didi
import distill_idlm as idlm
import distill_sdtt as sdtt
import official
import sample
import train
from common import UserError
from data import prepare_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
SCRIPTS = ['train.py', 'distill_idlm.py', 'distill_didi.py', 'distill_sdtt.py', 'distill_mmd.py', 'sample.py', 'eval.py',
           'bench.py', 'data.py']


def run(args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def options_of(script):
    """The keys a script accepts: its DEFAULTS block (data.py: the dict in its main)."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    if script == 'data.py':
        call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'id', '') == 'dict'
                    and any(k.arg == 'dataset' for k in n.keywords))
        return [k.arg for k in call.keywords]
    return [n.targets[0].id for n in tree.body if isinstance(n, ast.Assign) and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name) and n.targets[0].id.islower() and n.targets[0].id != 'F64']


@pytest.mark.parametrize('script', SCRIPTS)
@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_every_script_has_help(script, flag):
    r = run([script, flag], timeout=120)
    assert r.returncode == 0 and r.stderr == '', r.stderr
    assert r.stdout.startswith(f'usage: python {script}')
    for key in options_of(script):
        assert f'--{key}' in r.stdout, key


# ------------------------------------------------------------------------------------------------ checkpoints

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """One tiny checkpoint of every kind this project writes: teacher, IDLM (+ best.pt), DiDi, SDTT, DCD."""
    root = tmp_path_factory.mktemp('kinds')
    data = str(root / 'syn')
    prepare_synthetic(data, num_train=128, num_val=16, N=8, L=8, K=2)
    for kind in ('mdlm', 'duo'):
        train.main([f'--data={data}', f'--out_dir={root / kind}', f'--teacher={kind}', '--model=tiny',
                    '--max_iters=4', '--batch_size=8', '--eval_batches=1', '--warmup_iters=1'])
    common_args = [f'--data={data}', '--batch_size=4', '--max_iters=2', '--eval_samples=0']
    idlm.main([f'--teacher_ckpt={root / "mdlm"}', f'--out_dir={root / "idlm"}', *common_args])
    didi.main([f'--teacher_ckpt={root / "mdlm"}', f'--out_dir={root / "didi"}', *common_args])
    for kind in ('mdlm', 'duo'):
        sdtt.main([f'--teacher={kind}', f'--teacher_ckpt={root / kind}', f'--out_dir={root / ("sdtt-" + kind)}',
                   '--start_steps=4', '--min_steps=2', *common_args])
    return root, data


def test_every_checkpoint_loads_with_weights_only(runs):
    root, _ = runs
    files = [root / name / 'ckpt.pt' for name in ('mdlm', 'duo', 'idlm', 'didi', 'sdtt-mdlm', 'sdtt-duo')]
    files.append(root / 'sdtt-mdlm' / 'round0.pt')
    for path in files:
        ckpt = torch.load(path, weights_only=True)
        assert 'model' in ckpt and 'rng' in ckpt, path
    # and the RNG state survives the trip: restoring it replays the same numbers
    state = torch.load(root / 'idlm' / 'ckpt.pt', weights_only=True)['rng']
    common.set_rng_state(state)
    first = (np.random.rand(), torch.rand(1).item(), __import__('random').random())
    common.set_rng_state(state)
    assert first == (np.random.rand(), torch.rand(1).item(), __import__('random').random())


class Payload:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(runs, tmp_path):
    root, data = runs
    marker = tmp_path / 'pwned'
    ckpt = torch.load(root / 'mdlm' / 'ckpt.pt', weights_only=True)
    ckpt['config'] = {**ckpt['config'], 'note': Payload(marker)}
    crafted = tmp_path / 'crafted' / 'ckpt.pt'
    crafted.parent.mkdir()
    torch.save(ckpt, crafted)
    for args in (['sample.py', f'--ckpt={crafted.parent}', '--steps=2', '--num_samples=2'],
                 ['distill_idlm.py', f'--teacher_ckpt={crafted.parent}', f'--data={data}', '--max_iters=1']):
        r = run(args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert 'refused unread' in r.stderr and 'Traceback' not in r.stderr
    assert not marker.exists()
    # the same payload in a Lightning .ckpt (read by official.py) is inert too
    lightning = tmp_path / 'crafted.ckpt'
    torch.save({'state_dict': {}, 'hyper_parameters': {'config': Payload(marker)}}, lightning)
    with pytest.raises(UserError):
        official.load_model(str(lightning))
    assert not marker.exists()


@pytest.mark.parametrize('kind', ['mdlm', 'duo'])
def test_export_to_the_official_layout_and_back_gives_the_same_logits(runs, tmp_path, kind):
    root, _ = runs
    r = run(['sample.py', f'--ckpt={root / kind}', f'--export_hf={tmp_path / "hf"}'])
    assert r.returncode == 0, r.stderr
    config = json.load(open(tmp_path / 'hf' / 'config.json'))
    assert config['model_type'] == kind and config['n_blocks'] == 2
    weights = official.read_safetensors(str(tmp_path / 'hf' / 'model.safetensors'))
    assert all(k.startswith('backbone.') for k in weights)
    ours, _ = official.load_model(str(root / kind))
    theirs, ckpt = official.load_official(str(tmp_path / 'hf'))
    z = torch.randint(0, 8, (5, 8), generator=torch.Generator().manual_seed(0))
    sigma = torch.rand(5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.eval()(z, sigma), theirs(z, sigma))
    assert ckpt['teacher'] == kind and ckpt['data_meta']['vocab_size'] == 8


# ------------------------------------------------------------------------------------------------ your own data

def test_a_folder_written_by_an_outside_program_trains_and_decodes(tmp_path):
    """token ids from 'another tokenizer' (here: 5 amino-acid letters), written with plain numpy and json."""
    folder = tmp_path / 'protein'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (('train', 64), ('val', 8)):
        rng.integers(0, 5, (n, 12)).astype(np.uint16).tofile(folder / f'{split}.bin')
    json.dump({'vocab_size': 5, 'seq_len': 12, 'tokenizer': 'none', 'vocab': list('ACDEF'), 'separator': ''},
              open(folder / 'meta.json', 'w'))
    train.main([f'--data={folder}', f'--out_dir={tmp_path / "t"}', '--model=tiny', '--max_iters=3', '--batch_size=8',
                '--eval_batches=1', '--warmup_iters=1'])
    r = run(['sample.py', f'--ckpt={tmp_path / "t"}', '--steps=4', '--num_samples=3', f'--out={tmp_path / "s.npy"}'])
    assert r.returncode == 0, r.stderr
    lines = open(tmp_path / 's.npy.txt').read().split()
    assert len(lines) == 3 and all(len(line) == 12 and set(line) <= set('ACDEF') for line in lines)


def test_text_as_bytes_needs_no_tokenizer(tmp_path):
    text = tmp_path / 'a.txt'
    text.write_text('the quick brown fox jumps over the lazy dog\n' * 40)
    r = run(['data.py', '--dataset=text', f'--files={text}', '--tokenizer=bytes', '--seq_len=32',
             f'--out={tmp_path / "bytes"}'])
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / 'bytes' / 'meta.json'))
    assert (meta['tokenizer'], meta['vocab_size'], meta['seq_len']) == ('bytes', 256, 32)


# ------------------------------------------------------------------------------------------------ bad input

def bad_meta(tmp_path, **meta):
    folder = tmp_path / 'bad'
    folder.mkdir(exist_ok=True)
    np.zeros((4, 8), dtype=np.uint16).tofile(folder / 'train.bin')
    np.zeros((2, 8), dtype=np.uint16).tofile(folder / 'val.bin')
    json.dump({'vocab_size': 5, 'seq_len': 8, 'tokenizer': 'none', **meta}, open(folder / 'meta.json', 'w'))
    return folder


def one_line(r, *words):
    assert r.returncode == 2 and r.stderr.startswith('error:') and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for word in words:
        assert word in r.stderr, r.stderr


def test_bad_inputs_get_one_sentence(runs, tmp_path):
    root, data = runs
    one_line(run(['train.py', '--batch_size', '0', f'--data={data}', f'--out_dir={tmp_path / "b0"}']),
             '--batch_size and --grad_accum must be at least 1')
    assert not (tmp_path / 'b0').exists()
    one_line(run(['distill_idlm.py', '--eval_batch_size', '0', f'--data={data}', f'--out_dir={tmp_path / "e0"}']),
             '--eval_batch_size must be at least 1')
    one_line(run(['distill_didi.py', '--group_share', 'state', f'--data={data}', f'--out_dir={tmp_path / "r"}']),
             '--group_share is none or tau')
    one_line(run(['distill_didi.py', '--tau_dist', 'gamma', f'--data={data}', f'--out_dir={tmp_path / "d"}']),
             '--tau_dist is beta or uniform')
    one_line(run(['distill_sdtt.py', '--eval_temperatures', '0.8,-1', f'--data={data}',    # no teacher: refused
                  f'--out_dir={tmp_path / "t"}']), '--eval_temperatures takes comma-separated numbers')  # before that
    assert not (tmp_path / 't').exists()
    ckpt = torch.load(root / 'mdlm' / 'ckpt.pt', weights_only=True)
    ckpt['model_config'] = {**ckpt['model_config'], 'n_head': 3}             # 32 wide does not split into 3 heads
    common.save_checkpoint(str(tmp_path / 'malformed' / 'ckpt.pt'), ckpt)
    one_line(run(['sample.py', f'--ckpt={tmp_path / "malformed"}']), 'model_config', 're-create it')
    one_line(run(['train.py', f'--data={bad_meta(tmp_path, tokenizer="protein")}']), "tokenizer 'protein'",
             '"tokenizer": "none"')
    one_line(run(['train.py', f'--data={bad_meta(tmp_path, vocab=["A", "B"])}']), '"vocab" must be a list of 5')
    weights = {f'backbone.{k}': v for k, v in ckpt['model'].items()}
    torch.save({'state_dict': weights}, tmp_path / 'bare.ckpt')
    one_line(run(['sample.py', f'--ckpt={tmp_path / "bare.ckpt"}']), '--teacher_kind mdlm')
    r = run(['sample.py', f'--ckpt={tmp_path / "bare.ckpt"}', '--teacher_kind=mdlm', '--steps=2', '--num_samples=2',
             f'--out={tmp_path / "bare.npy"}'])
    assert r.returncode == 0, r.stderr
    one_line(run(['sample.py', '--steps']), '--steps needs a value')
    one_line(run(['sample.py', f'--ckpt={root / "mdlm"}', '--temperature=0', '--steps=2']), 'temperature must be above 0')
    one_line(run(['sample.py', f'--ckpt={root / "didi"}', '--temperature=0.8', '--rgas=true']), 'drop one of the two')
