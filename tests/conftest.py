import os
import random
import sys

import pytest

# Triton kernels run on CPU tensors under the interpreter; set before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def seed():
    """A fresh seed per test run (fresh random inputs); tests put it in every failure message."""
    import torch

    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    return value
