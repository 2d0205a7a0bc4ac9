"""Fixtures of the stack tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test: the stack tests run tiny ops, where threads
    only add overhead (and oversubscribe the cores under ``pytest -n 2``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
