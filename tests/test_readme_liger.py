"""The README's "Coming from Liger-Kernel" snippet runs, and gives Liger-Kernel's numbers."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def liger_snippet() -> str:
    text = README.read_text()
    section = text.split("## Coming from Liger-Kernel", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "expected one python block in the README's Liger section"
    return blocks[0]


def test_readme_liger_snippet_runs_and_matches_liger():
    snippet = liger_snippet()
    assert "from prefopt.liger import LigerFusedLinearDPOLoss" in snippet
    scope = {}
    exec(compile(snippet, str(README), "exec"), scope)
    loss = scope["loss"]
    assert torch.isfinite(loss) and scope["hidden"].grad is not None
    liger_chunked = pytest.importorskip("liger_kernel.chunked_loss")
    # The same call through Liger itself (eager: compiled=False on CPU) gives the same loss and rewards.
    theirs = liger_chunked.LigerFusedLinearDPOLoss(beta=0.1, loss_type="sigmoid", compiled=False)(
        scope["lm_head"].weight, scope["hidden"], scope["target"], None, scope["ref_hidden"], scope["ref_head"].weight)
    torch.testing.assert_close(loss, theirs[0], atol=1e-5, rtol=5e-4)
    torch.testing.assert_close(scope["chosen_rewards"], theirs[1][5], atol=1e-5, rtol=5e-4)
