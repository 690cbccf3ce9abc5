"""The CI dry run of ``python -m bench --preset gpu-first-contact`` on CPU: everything but the CUDA parts.

The correctness variants run under the Triton interpreter (set in conftest) at a tiny shape against the
float64 oracle, so the script's own harness (TF32 switching, shortcut toggling, the transposed fp32 head,
capturable) is exercised; the CUDA sections must say they were skipped, never pretend to have measured.
"""
import json

import pytest

from prefopt.bench import cli

pytest.importorskip("triton")


def test_first_contact_dry_run(tmp_path, capsys):
    assert cli.main(["--preset", "gpu-first-contact", "--device", "cpu", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "first_contact.json").read_text())
    assert list(results) == ["environment", "ceilings", "correctness", "kernels", "profile", "frozen", "end_to_end"]
    env = results["environment"]
    assert env["status"] == "ok" and env["torch"] and "addmm_out_dtype" in env and "do_bench_args" in env
    variants = results["correctness"]["variants"]
    assert results["correctness"]["status"] == "ok" and len(variants) == 9, variants
    assert all(v["status"] == "ok" and v["errors"]["d hidden"] <= v["tolerance"] for v in variants), variants
    for name in ("ceilings", "kernels", "profile", "frozen", "end_to_end"):
        assert results[name]["status"] == "skipped: no CUDA device", results[name]
    # the IO model's predictions for the end-to-end cells are there even without a GPU
    assert results["end_to_end"]["predicted_ms"]["dpo-ref"]["prefopt-triton"] > 0
    assert "### correctness: ok" in (tmp_path / "first_contact.md").read_text()
