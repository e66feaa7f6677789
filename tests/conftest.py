"""Test-wide settings: one intra-op thread, since the suite's models are tiny and
oversubscribing the 2 CI cores made steps slower, not faster."""

import torch

torch.set_num_threads(1)
