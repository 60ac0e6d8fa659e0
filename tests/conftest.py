import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

# The tests use tiny tensors, where a second thread only adds contention on a shared 2-core machine
# (measured: the same sampler test ran 30x slower with 2 threads while another process was busy).
torch.set_num_threads(1)


@pytest.fixture(scope='session')
def tiny_mdlm_teacher(tmp_path_factory):
    """A tiny MDLM teacher (20 iterations) on an N = 8, L = 8 synthetic language, trained once per session:
    (folder holding 'syn' (the data) and 'mdlm' (the teacher))."""
    import train
    from data import prepare_synthetic
    root = tmp_path_factory.mktemp('tiny-mdlm')
    prepare_synthetic(str(root / 'syn'), num_train=256, num_val=32, N=8, L=8, K=2)
    train.main([f'--data={root / "syn"}', f'--out_dir={root / "mdlm"}', '--teacher=mdlm', '--model=tiny',
                '--max_iters=20', '--batch_size=16', '--eval_batches=1', '--eval_interval=20', '--warmup_iters=2'])
    return root


@pytest.fixture(scope='module')
def teacher(tiny_mdlm_teacher, tmp_path_factory):
    """(root, data) for one test module (test_didi.py, test_mmd.py; a module with its own `teacher` overrides it):
    its own copy of the tiny teacher at root / 'mdlm', so that what one module writes beside it meets no other's."""
    root = tmp_path_factory.mktemp('module')
    shutil.copytree(tiny_mdlm_teacher / 'mdlm', root / 'mdlm')
    return root, str(tiny_mdlm_teacher / 'syn')
