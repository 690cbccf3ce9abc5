"""Export and init-from: every run ends with a Hugging Face folder that ``from_pretrained`` loads to the
trained model's logits (full fine-tuning of the tiny VLM; LoRA merged and kept as an adapter, across
CW-DPO's adapter merge at its reference point); ``prefopt export`` does it for any checkpoint;
``--init-from`` starts from such a folder or a run and keeps the tiny family's defaults.
"""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from prefopt.cli import main as prefopt_main  # noqa: E402
from prefopt.train import checkpoint as ckpt  # noqa: E402
from prefopt.train.config import TINY_BASE_LR, TINY_CW_FLOOR, TINY_LR  # noqa: E402
from prefopt.train.data import PreferenceCollator, model_inputs  # noqa: E402
from prefopt.train.export import METADATA_FILE, load_trained_model, model_family  # noqa: E402
from prefopt.train.loop import TrainConfig, prepare  # noqa: E402
from prefopt.train.models import TINY_BASE  # noqa: E402
from prefopt.train.synthetic import make_synthetic_records  # noqa: E402
from test_train_loop import config, text_data, text_records  # noqa: E402,F401


def trained(cfg):
    """(the Run after training, its summary): the run keeps its trained policy in memory."""
    run = prepare(cfg)
    summary = run.execute()
    return run, summary


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**model_inputs(batch), use_cache=False).logits


def test_run_ends_with_a_folder_that_loads_to_the_trained_logits(tmp_path):
    """tiny-llava, full fine-tuning: OUT/model/ has config, weights, processor and prefopt.json, and
    LlavaForConditionalGeneration.from_pretrained gives the trained model's logits on image records."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    run, summary = trained(TrainConfig(method="dpo", model="tiny-llava", out=str(tmp_path / "run"), steps=2,
                                       batch_size=2, train_size=8, eval_size=4, probe_size=2, progress=False,
                                       device="cpu"))
    folder = summary["model_folder"]
    assert folder == str(tmp_path / "run" / "model")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", METADATA_FILE):
        assert os.path.isfile(os.path.join(folder, name)), name
    with open(os.path.join(folder, METADATA_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["family"] == "tiny" and meta["method"] == "dpo" and meta["step"] == 2
    loaded = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    batch = PreferenceCollator(processor)(make_synthetic_records("heldout", 2), mode="pair")
    expected = logits(run.policy.model, batch)
    got = logits(loaded, batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    initial = logits(LlavaForConditionalGeneration._from_config(loaded.config), batch)
    assert (initial - expected).abs().max() > 1e-3, "the comparison must be able to fail"


@pytest.mark.parametrize("keep_adapter", [False, True])
def test_lora_export_merged_or_as_adapter(tmp_path, text_data, keep_adapter):  # noqa: F811
    """LoRA CW-DPO with --reference adapters (adapters merged into the base at the end of stage 1):
    the export, merged or kept as a peft adapter, gives the trained policy's logits."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    cfg = config(tmp_path / "run", text_data, method="cw-dpo", lora=True, reference="adapters", steps=4,
                 keep_adapter=keep_adapter, options=dict(sftc_fraction=0.5, onpolicy_fraction=0.0))
    run, summary = trained(cfg)
    folder = summary["model_folder"]
    assert os.path.isfile(os.path.join(folder, "adapter_config.json")) == keep_adapter
    loaded = LlamaForCausalLM.from_pretrained(folder)
    batch = PreferenceCollator(AutoTokenizer.from_pretrained(folder))(text_records("heldout", 3), mode="pair")
    expected = logits(run.policy.model, batch)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=1e-5)
    with run.policy.disable_adapters():
        assert (logits(run.policy.model, batch) - expected).abs().max() > 1e-3, "the adapters must matter"


def test_export_command_for_any_checkpoint(tmp_path, text_data, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    trained(config(run_dir, text_data, method="sft", steps=2, save_every=1, keep_checkpoints=0))
    out = tmp_path / "exported"
    assert prefopt_main(["export", str(run_dir / "checkpoint-1"), str(out)]) == 0
    from safetensors.torch import load_file

    first, last = load_file(str(out / "model.safetensors")), load_file(str(run_dir / "model" / "model.safetensors"))
    assert first.keys() == last.keys() and any(not torch.equal(first[k], last[k]) for k in first)
    adapter, _, _ = load_trained_model(str(run_dir / "checkpoint-1"))
    for name, p in adapter.model.state_dict().items():
        if name in first:
            torch.testing.assert_close(first[name], p, rtol=0, atol=0, msg=name)
    capsys.readouterr()
    assert prefopt_main(["export", str(run_dir / "checkpoint-1"), str(out)]) == 2  # out not empty
    assert "already holds files" in capsys.readouterr().err
    with open(run_dir / "checkpoint-2" / ckpt.WEIGHTS_FILE, "r+b") as f:
        f.seek(200)
        f.write(b"\0" * 8)
    assert prefopt_main(["export", str(run_dir / "checkpoint-2"), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0]


def test_init_from_a_run_or_its_folder_keeps_the_tiny_defaults(tmp_path, text_data):  # noqa: F811
    """SFT, then DPO from it: the new run starts from the SFT run's weights (its last checkpoint or its
    exported folder) and keeps lr 1e-3 and CW-DPO's floor -6; an HF folder without prefopt.json is "hf"."""
    sft_dir = tmp_path / "sft"
    _, sft = trained(config(sft_dir, text_data, method="sft", steps=2))
    trained_weights, _, _ = load_trained_model(sft["checkpoint"])
    for init_from in (str(sft_dir), sft["model_folder"]):
        cfg = config(tmp_path / "dpo", text_data, method="dpo", model=init_from, init_from=init_from)
        assert cfg.family() == "tiny" and cfg.learning_rate() == TINY_LR
        assert cfg.method_options().cw_floor == TINY_CW_FLOOR
        run = prepare(cfg)
        start = dict(run.policy.model.named_parameters())
        for name, p in trained_weights.model.named_parameters():
            torch.testing.assert_close(start[name], p, rtol=0, atol=0, msg=name)
    plain = tmp_path / "plain"
    trained_weights.model.save_pretrained(str(plain))
    assert model_family(str(plain)) == "hf"
    assert TrainConfig(model=str(plain)).learning_rate() == 5e-6
    # The shipped SFT base has its own family (a fine-tuning rate, the default floor); an export of a run
    # from it says so, and a run from that export keeps them.
    assert model_family(TINY_BASE) == "tiny-sft"
    (plain / METADATA_FILE).write_text(json.dumps({"family": "tiny-sft"}))
    from_base = TrainConfig(model=str(plain), init_from=str(plain))
    assert from_base.learning_rate() == TINY_BASE_LR and from_base.method_options().cw_floor is None


def test_init_from_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert prefopt_main(["train", "--init-from", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model folder" in err[0]
    assert prefopt_main(["train", "--init-from", str(tmp_path), "--model", "tiny-llama",
                         "--out", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err
    assert prefopt_main(["train", "--keep-adapter", "--out", str(tmp_path / "o")]) == 2
    assert "--keep-adapter needs --lora" in capsys.readouterr().err


def test_eval_loads_a_run_started_from_another_run(tmp_path, text_data):  # noqa: F811
    """``prefopt eval --model RUN`` on a run started ``--init-from`` another run: the evaluated model is the
    run's last checkpoint, and the reference it is compared with is the model it started from."""
    from prefopt.train.eval import load_run

    _, sft = trained(config(tmp_path / "sft", text_data, method="sft", steps=2))
    sft_model, _, _ = load_trained_model(sft["checkpoint"])
    dpo_dir = tmp_path / "dpo"
    _, dpo = trained(config(dpo_dir, text_data, method="dpo", steps=1, model=str(tmp_path / "sft"),
                            init_from=str(tmp_path / "sft")))
    dpo_model, _, _ = load_trained_model(dpo["checkpoint"])
    adapter, _, start = load_run(str(dpo_dir))
    for want, got in ((dpo_model, adapter), (sft_model, start())):
        params = dict(got.model.named_parameters())
        for name, p in want.model.named_parameters():
            torch.testing.assert_close(params[name], p, rtol=0, atol=0, msg=name)


def test_resume_refuses_when_init_from_a_run_resolves_elsewhere(tmp_path, text_data):  # noqa: F811
    """--init-from RUN resolves to the run's newest checkpoint: once that run has trained on, a paused run
    started from it would resume from other weights, so --resume names the change."""
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    trained(config(sft_dir, text_data, method="sft", steps=2))
    dpo = dict(method="dpo", steps=2, model=str(sft_dir), init_from=str(sft_dir))
    trained(config(dpo_dir, text_data, stop_after=1, **dpo))
    trained(config(sft_dir, text_data, method="sft", steps=3, resume=True))  # the source run trains on
    with pytest.raises(ValueError, match="--init-from resolves to"):
        prepare(config(dpo_dir, text_data, resume=True, **dpo))
