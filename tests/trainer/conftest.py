"""Trainer tests: one torch thread per process.

On this 2-core machine, with other processes busy, torch's default two OpenMP threads spin-wait
on each other and run 3D convolutions ~20x slower than one thread does.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
