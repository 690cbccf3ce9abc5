"""Where models come from: hub ids through the Hugging Face cache (with revisions, offline), remote code only
when trusted (never a prompt), one line for a model folder prefopt will not read, and for a model it does not
train."""
import json
import os
import pty
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from huggingface_hub import constants  # noqa: E402

from prefopt.train import eval as prefopt_eval  # noqa: E402
from prefopt.train.cli import main  # noqa: E402
from prefopt.train.loop import TrainConfig  # noqa: E402
from prefopt.train.models import build_model, resolve_hub_ids  # noqa: E402

from test_train_loop import write_text_data  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_SHA, V2_SHA = "a" * 40, "b" * 40


def hub_cache(root, tiny_family):
    """``root`` laid out as huggingface_hub's cache of the hub id ``org/tiny``: ``main`` (tiny Llama, seed 0) and
    the branch ``v2`` (seed 1), each a snapshot folder named by its commit."""
    from tiny_families import save_family

    repo = root / "models--org--tiny"
    for ref, sha, seed in (("main", MAIN_SHA, 0), ("v2", V2_SHA, 1)):
        snapshot = repo / "snapshots" / sha
        if seed == 0:
            shutil.copytree(tiny_family("llama"), snapshot)
        else:
            save_family("llama", snapshot, seed=1)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return repo


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_family):
    home = tmp_path_factory.mktemp("hf-home")
    hub_cache(home / "hub", tiny_family)
    return home


@pytest.fixture
def offline_cache(hf_home, monkeypatch):
    """huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported: point its constants at the cache."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def first_weight(adapter):
    return adapter.head().weight.detach().clone()


def test_hub_id_resolves_as_hugging_face_tools_do(offline_cache, tmp_path, monkeypatch):
    """``org/tiny``: the cached snapshot of ``main``, of a branch or of a commit; a local folder of that name
    comes first; a revision not in the cache (offline) is one line naming --model."""
    snapshots = offline_cache / "hub" / "models--org--tiny" / "snapshots"
    want_main = first_weight(build_model(str(snapshots / MAIN_SHA))[0])
    want_v2 = first_weight(build_model(str(snapshots / V2_SHA))[0])
    assert not torch.equal(want_main, want_v2)
    torch.testing.assert_close(first_weight(build_model("org/tiny")[0]), want_main, rtol=0, atol=0)
    torch.testing.assert_close(first_weight(build_model("org/tiny", revision="v2")[0]), want_v2, rtol=0, atol=0)
    torch.testing.assert_close(first_weight(build_model("org/tiny", revision=V2_SHA)[0]), want_v2, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^--model org/tiny: .*at revision v3 is neither in the Hugging Face cache"):
        build_model("org/tiny", revision="v3")
    with pytest.raises(ValueError, match=r"^--model org/other: "):
        build_model("org/other")
    with pytest.raises(ValueError, match=r"^--revision v2: applies to a hub id"):
        resolve_hub_ids(TrainConfig(model="tiny-llama", revision="v2"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(snapshots / V2_SHA, tmp_path / "org" / "tiny")  # a local folder named like the hub id
    torch.testing.assert_close(first_weight(build_model("org/tiny")[0]), want_v2, rtol=0, atol=0)


def test_init_from_a_hub_id_trains(offline_cache, tmp_path):
    """``--init-from org/tiny --revision v2`` starts from the v2 snapshot; the run records that folder, so a
    resume and the export use the same commit."""
    data = write_text_data(tmp_path, train=4, heldout=2)
    out = tmp_path / "run"
    assert main(["--init-from", "org/tiny", "--revision", "v2", "--method", "dpo", "--data", data, "--steps", "1",
                 "--batch-size", "2", "--probe-every", "0", "--probe-size", "2", "--eval-size", "0", "--out", str(out),
                 "--no-progress"]) == 0
    with open(out / "config.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["init_from"].endswith(os.path.join("snapshots", V2_SHA))


def test_hub_id_from_hf_home_offline_in_a_fresh_process(hf_home, tmp_path):
    """The real command with HF_HOME and HF_HUB_OFFLINE=1 in its environment: trains on the cached snapshot."""
    data = write_text_data(tmp_path, train=4, heldout=2)
    out = tmp_path / "run"
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "prefopt.cli", "train", "--model", "org/tiny", "--method", "dpo",
                           "--data", data, "--steps", "1", "--batch-size", "2", "--probe-every", "0", "--probe-size",
                           "2", "--eval-size", "0", "--out", str(out), "--no-progress", "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "config.json", encoding="utf-8") as f:
        assert json.load(f)["model"] == str(hf_home / "hub" / "models--org--tiny" / "snapshots" / MAIN_SHA)


def _eval(args, capsys):
    """``prefopt eval ARGS --json`` in-process: (exit code, the result or None, stderr lines)."""
    capsys.readouterr()
    code = prefopt_eval.main(args + ["--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err.strip().splitlines()


def test_eval_resolves_hub_ids_as_train_does(offline_cache, tmp_path, capsys):
    """``prefopt eval --model org/tiny [--revision R]``: the cached snapshot, as ``prefopt train --model``
    resolves it; --revision without a hub id, and a revision not in the cache, are one line, exit 2."""
    data = write_text_data(tmp_path, train=1, heldout=2)
    snapshots = offline_cache / "hub" / "models--org--tiny" / "snapshots"
    by_path = {sha: _eval(["--model", str(snapshots / sha), "--data", data], capsys)[1] for sha in (MAIN_SHA, V2_SHA)}
    assert by_path[MAIN_SHA]["logp_gap"] != by_path[V2_SHA]["logp_gap"]
    for extra, sha in (([], MAIN_SHA), (["--revision", "v2"], V2_SHA), (["--revision", V2_SHA], V2_SHA)):
        code, result, err = _eval(["--model", "org/tiny", "--data", data] + extra, capsys)
        assert code == 0 and result == by_path[sha], (extra, err)
    code, _, err = _eval(["--model", "org/tiny", "--revision", "v3", "--data", data], capsys)
    assert code == 2 and len(err) == 1 and "--model org/tiny: " in err[0] and "at revision v3" in err[0], err
    code, _, err = _eval(["--model", str(snapshots / V2_SHA), "--revision", "v2", "--data", data], capsys)
    assert code == 2 and err == ["prefopt eval: error: --revision v2: applies to a hub id (org/name), and --model "
                                 "is not one here"], err
    code, _, err = _eval(["--model", "org/tiny", "--revision"], capsys)  # a usage error: one line too
    assert code == 2 and err == ["prefopt eval: error: argument --revision: expected one argument"], err


# ---------------------------------------------------------------------------------------------- remote code

CUSTOM_CODE = '''
from transformers import LlamaConfig, LlamaForCausalLM

open({marker!r}, "w").close()  # proof that this code ran


class CustomConfig(LlamaConfig):
    model_type = "prefopt_custom"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


@pytest.fixture
def remote_code_folder(tiny_family, tmp_path, monkeypatch):
    """A tiny Llama whose config names classes in the folder's own custom.py (which leaves a file RAN beside it
    when run); transformers copies such code to its modules cache, here one of the test's own."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "custom"
    shutil.copytree(tiny_family("llama"), folder)
    (folder / "custom.py").write_text(CUSTOM_CODE.format(marker=str(folder / "RAN")))
    with open(folder / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    config.update(model_type="prefopt_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomForCausalLM"})
    with open(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f)
    return folder


def test_remote_code_runs_only_when_trusted(remote_code_folder):
    with pytest.raises(ValueError, match="needs the Python code it ships .* only with --trust-remote-code"):
        build_model(str(remote_code_folder))
    assert not (remote_code_folder / "RAN").exists()
    adapter, _ = build_model(str(remote_code_folder), trust_remote_code=True)
    assert type(adapter.hf_model).__name__ == "CustomForCausalLM" and (remote_code_folder / "RAN").exists()


def test_eval_runs_remote_code_only_when_trusted(remote_code_folder, tmp_path, capsys):
    """``prefopt eval`` on a model folder that ships its own code: one line and exit 2 without
    --trust-remote-code (the code never runs); evaluated with it."""
    data = write_text_data(tmp_path, train=1, heldout=2)
    code, _, err = _eval(["--model", str(remote_code_folder), "--data", data], capsys)
    assert code == 2 and len(err) == 1 and "only with --trust-remote-code" in err[0], err
    assert not (remote_code_folder / "RAN").exists()
    code, result, err = _eval(["--model", str(remote_code_folder), "--data", data, "--trust-remote-code"], capsys)
    assert code == 0 and result["pair_accuracy"] is not None and (remote_code_folder / "RAN").exists(), err


@pytest.mark.parametrize("stdin", ["devnull", "pty"])
def test_remote_code_is_refused_without_a_prompt(remote_code_folder, tmp_path, stdin):
    """The real command, with stdin not a terminal and with a terminal: one line, exit 2, never transformers'
    "run the custom code? [y/N]" (answering it would run the folder's Python)."""
    data = write_text_data(tmp_path, train=2, heldout=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    master = None
    if stdin == "pty":
        master, slave = pty.openpty()
        stdin_handle = slave
    else:
        stdin_handle = subprocess.DEVNULL
    try:
        proc = subprocess.run([sys.executable, "-m", "prefopt.cli", "train", "--model", str(remote_code_folder),
                               "--method", "dpo", "--data", data, "--out", str(tmp_path / "run")], cwd=REPO, env=env,
                              stdin=stdin_handle, capture_output=True, text=True, timeout=120)
    finally:
        if master is not None:
            os.close(master)
            os.close(slave)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--trust-remote-code" in lines[0], proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert not (remote_code_folder / "RAN").exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- bad model files


def _break_json(folder, name):
    (folder / name).write_text('{"model_type": "llama", ')


def _lying_header(folder, name):
    """A safetensors header that claims more data than the file holds."""
    import struct

    path = folder / name
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 1 << 20
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])


def _pickled_only(folder, name):
    (folder / "model.safetensors").unlink()
    (folder / name).write_bytes(b"\x80\x04K\x01.")  # a pickle; prefopt must not load it


@pytest.mark.parametrize("family,name,spoil,message", [
    ("llama", "tokenizer.json", _break_json, "not valid JSON"),
    ("llama", "tokenizer_config.json", _break_json, "not valid JSON"),
    ("llava", "processor_config.json", _break_json, "not valid JSON"),
    ("llama", "config.json", _break_json, "not valid JSON"),
    ("llama", "model.safetensors", _lying_header, "not a valid safetensors file"),
    ("llama", "pytorch_model.bin", _pickled_only, "pickled weights, which prefopt does not read; convert them to "
                                                  "safetensors"),
])
def test_bad_model_file_is_one_line_naming_it(tiny_family, tmp_path, capsys, family, name, spoil, message):
    folder = tmp_path / "model"
    shutil.copytree(tiny_family(family), folder)
    spoil(folder, name)
    data = write_text_data(tmp_path, train=2, heldout=2) if family == "llama" else "synthetic"
    capsys.readouterr()  # what building the family printed
    assert main(["--model", str(folder), "--method", "dpo", "--data", data, "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder / name}: {message}" in err[0], err
    assert not (tmp_path / "run").exists()


def test_unsupported_model_names_what_is_supported(tmp_path):
    """A model neither AutoModelForImageTextToText nor AutoModelForCausalLM loads: one line."""
    import transformers

    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported model type 'vit'; prefopt trains models that transformers' "
                                         r"AutoModelForImageTextToText or AutoModelForCausalLM loads \(tested: LLaVA"):
        build_model(str(tmp_path))
