"""bench.py as a smoke test: a tiny run prints one table row per (vocabulary, sampler) and per vocabulary for the
loop, writes the same report as markdown, and the samplers it times end with every position unmasked, fused and
reference alike. No timing is checked: timings belong to the machine, not to the code."""
import pytest
import torch

import bench
import sample
from common import UserError
from data import prepare_synthetic
from model import build_model

TINY = ['--vocab_sizes', '7,12', '--seq_len', '8', '--batch_size', '2', '--steps', '4', '--model', 'tiny',
        '--repeats', '2', '--ref_repeats', '1', '--iterations', 'false']


def table_rows(report):
    """The data rows of the report's markdown tables, as lists of cells."""
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in report.splitlines()
            if line.startswith('| ') and line[2].isdigit()]


def test_report_has_a_row_per_case_and_is_written_as_markdown(tmp_path, capsys):
    path = tmp_path / 'bench.md'
    bench.main(TINY + ['--out', str(path)])
    report, printed = path.read_text(), capsys.readouterr().out
    assert printed.startswith(report)                          # stdout = the markdown, then "wrote ..."
    rows = table_rows(report)
    steps, loops = rows[:6], rows[6:]
    # one-step table: absorbing samplers add the mask (V = N + 1), Duo's uniform process does not (V = N)
    assert [(r[0], r[1]) for r in steps] == [('8', 'mdlm'), ('8', 'sedd'), ('7', 'duo'),
                                             ('13', 'mdlm'), ('13', 'sedd'), ('12', 'duo')]
    assert [r[0] for r in loops] == ['8', '13'] and all(len(r) == 10 for r in loops)
    assert all(r[7] == '4' for r in loops)                     # NFE = K: time_conditioned=True skips no call
    assert 'Target: the fused MDLM step' in report and 'Target: loop / network' in report


def test_measurements_are_positive_and_the_loop_unmasks_everything():
    cfg = bench.common.configure(bench.DEFAULTS, TINY)
    step = bench.bench_step(cfg, 'mdlm', 7, torch.device('cpu'))
    assert step['fused_ms'] > 0 and step['reference_ms'] > 0
    assert step['reference_mib'] > 0                         # the reference builds (B, L, V) float64 tensors
    loop = bench.bench_loop(cfg, 7, torch.device('cpu'))
    assert loop['masks_left'] == 0 and loop['nfe'] == 4 and 0 < loop['in_loop_network_s'] <= loop['loop_s']


def test_fused_and_reference_end_with_the_same_number_of_unmasked_tokens():
    N, B, L, K = 9, 3, 8, 5
    torch.manual_seed(0)
    net = build_model('tiny', vocab_size=N + 1, seq_len=L, head='subs', mask_id=N).eval()
    counts = []
    for fused in (True, False):
        x, _ = sample.generate(net, 'mdlm', B, L, K, N, torch.Generator().manual_seed(1), batch_size=B,
                               fused=fused, time_conditioned=True, progress=False)
        counts.append(int((x != N).sum()))
    assert counts == [B * L, B * L]
    # the same for the last step of the benchmark's own mid-run state (alpha_s = 1: every mask goes)
    plan = sample.time_plan(K)
    _, step = bench.step_case('mdlm', N, B, L, plan, K - 1, torch.Generator().manual_seed(2))
    assert [int((step(fused) != N).sum()) for fused in (True, False)] == [B * L, B * L]


def test_bad_options_are_one_sentence_errors():
    for argv in (['--samplers', 'mdlm,gpt'], ['--vocab_sizes', '64,x'], ['--vocab_sizes', '1'], ['--repeats', '0']):
        with pytest.raises(UserError):
            bench.main(argv)


def test_iteration_section_times_every_teacher_kind(tmp_path, capsys):
    """Section 4 on tiny synthetic data: one row per teacher kind (DiDi and SDTT timed for MDLM, DCD for Duo), with a
    positive ratio (not checked against 3.5:
    on this scale the ratio says nothing)."""
    data = prepare_synthetic(str(tmp_path / 'synthetic'), num_train=32, num_val=8, N=6, L=8, K=2)
    bench.main(['--samplers', 'mdlm', '--vocab_sizes', '7', '--seq_len', '8', '--batch_size', '2', '--steps', '2',
                '--repeats', '1', '--ref_repeats', '1', '--loop', 'false', '--iteration_data', data,
                '--iteration_model', 'tiny', '--iteration_batch', '4', '--iteration_repeats', '1'])
    report = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in report.splitlines()
            if line.startswith('| ') and line.split('|')[1].strip() in ('mdlm', 'duo', 'sedd') and 'x' in line]
    rows = [r for r in rows if len(r) == 10]
    assert [r[0] for r in rows] == ['mdlm', 'duo', 'sedd']
    assert float(rows[0][6]) > 0 and rows[0][7].endswith('x')      # a DiDi iteration is timed for MDLM only
    assert rows[1][6:8] == ['-', '-'] and rows[2][6:8] == ['-', '-']
    assert float(rows[0][8]) > 0 and float(rows[1][8]) > 0 and rows[2][8:] == ['-', '-']   # SDTT and DCD
    assert all(r[1:3] == ['6', '8'] and float(r[5].rstrip('x')) > 0 for r in rows)
    assert 'Target: IDLM / teacher <= 3.5' in report


def test_dry_run_goes_through_every_phase_at_tiny_shapes(tmp_path):
    """python bench.py --dry_run owt, at the 'tiny' preset and L = 32 (the real 169M, L = 1024 run is RESULTS.md's):
    GPT-2 BPE data from the shared tokenizer file, official-layout folders read back, every method's step, the
    samplers, the judge, and the export read back to identical logits (a mismatch raises); one row per phase."""
    path = tmp_path / 'dry.md'
    bench.main(['--dry_run', 'owt', '--dry_model', 'tiny', '--dry_seq_len', '32', '--dry_steps', '1',
                '--out', str(path)])
    rows = [line.split('|')[1].strip() for line in path.read_text().splitlines()
            if line.startswith('| ') and not line.startswith('| phase') and not line.startswith('| ---')]
    kinds = {'mdlm': 5, 'duo': 4, 'sedd': 3}                  # teacher, IDLM, SDTT/DCD, DiDi (MDLM), sampler
    assert [r.split(':')[0] for r in rows[:12]] == [k for k, n in kinds.items() for _ in range(n)]
    assert rows[12].startswith('GPT-2 judge') and rows[13] == 'Hugging Face export read back'
    with pytest.raises(UserError, match='--dry_run takes owt'):
        bench.main(['--dry_run', 'wiki'])
