"""The README's "Using prefopt inside TRL" snippet runs as written (1 step, tiny local model, local data)."""
import json
import math
import re
from pathlib import Path

import pytest

pytest.importorskip("trl")

README = Path(__file__).resolve().parents[1] / "README.md"


def trl_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Using prefopt inside TRL", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_trl_snippet_runs(tmp_path, monkeypatch):
    from prefopt.train.models import build_model

    adapter, tokenizer = build_model("tiny-llama", seed=0)
    adapter.hf_model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"prompt": "the red cube is", "chosen": " on the table", "rejected": " in the sky"},
            {"prompt": "a blue ball", "chosen": " under the chair", "rejected": " on the moon"}]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    code = trl_snippet()
    assert "PrefoptDPOTrainer" in code and 'model_path = "' in code
    code = re.sub(r'model_path = "[^"]*"', f'model_path = {str(tmp_path / "model")!r}', code)
    code = code.replace('output_dir="dpo-out"', 'output_dir="dpo-out", max_steps=1, logging_steps=1, report_to=[]')
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    losses = [entry["loss"] for entry in namespace["trainer"].state.log_history if "loss" in entry]
    assert namespace["trainer"].state.global_step == 1
    assert len(losses) == 1 and math.isfinite(losses[0])
