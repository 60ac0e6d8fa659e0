import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

# The tests use tiny tensors, where a second thread only adds contention on a shared 2-core machine
# (measured: the same sampler test ran 30x slower with 2 threads while another process was busy).
torch.set_num_threads(1)
