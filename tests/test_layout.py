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


def imports_of(package_root):
    """{module: the modules of the package it imports}, function-level imports included: ``from X import a``
    is an import of ``X.a`` where that is a module of the package, else of ``X``."""
    import ast
    import pathlib

    root = pathlib.Path(package_root)
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def import_circles(graph):
    """The import circles of ``graph``, each as the list of modules around it."""
    circles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return circles


def test_no_import_circles_in_prefopt():
    import prefopt

    graph = imports_of(os.path.dirname(prefopt.__file__))
    assert {"prefopt.train.loop", "prefopt.train.cli", "prefopt.train.runfolder"} <= set(graph)
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the finder finds one
    assert import_circles(graph) == []
