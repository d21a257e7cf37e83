"""Test-wide settings: the tiny models of this suite run fastest on one thread (thread start-up dominates)."""

import torch

torch.set_num_threads(1)
