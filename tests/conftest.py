"""Per-test setup: every test starts from the same torch seed.

Helpers live in :mod:`tests.helpers`; the environment is set by the root ``conftest.py``.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
