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


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """``tiny_family(name)``: the folder of the tiny random model of Hugging Face family ``name`` with its
    processor (tests/tiny_families.py), written once per session."""
    folders = {}

    def folder(name):
        if name not in folders:
            from tiny_families import save_family

            folders[name] = save_family(name, tmp_path_factory.mktemp(f"family-{name}"))
        return folders[name]

    return folder
