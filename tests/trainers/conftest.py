"""Fixtures of every post-training test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: threads cost more in synchronisation than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
