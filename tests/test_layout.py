"""The checkout's layout never changes what a name imports: ``kernels`` is the PyPI package transformers
imports (the repository's ``kernels/`` is ``prefopt.kernels``), from any working directory, the root included."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_kernels_folder_cannot_shadow_an_installed_package():
    # a folder without __init__.py is only a namespace portion: a regular package later on sys.path wins
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py"))


def test_kernels_is_the_pypi_package_with_the_root_first_on_the_path():
    pytest.importorskip("transformers")
    script = ("import sys, kernels, transformers, prefopt.kernels.linear_logprobs as K\n"
              "from transformers import LlavaForConditionalGeneration\n"
              "print(sys.path[0] == '' or sys.path[0], kernels.__file__, K.__file__, sep='\\n')")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, pypi, ours = proc.stdout.split()[-3:]
    assert first == "True", "the root was not first on sys.path: nothing was tested"
    assert not os.path.abspath(pypi).startswith(REPO + os.sep), f"import kernels found the checkout's {pypi}"
    assert os.path.basename(os.path.dirname(ours)) == "kernels" and ours.endswith("linear_logprobs.py")
