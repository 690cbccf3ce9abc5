"""prefopt eval: the metrics against float64 oracles that materialise the logits, hand-computed ECE and
generation judging, no [N, V] tensor in the shift computation, and the command end to end."""
import contextlib
import io
import json
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")
pytest.importorskip("PIL")

import prefopt.ops.torch_backend as torch_backend  # noqa: E402
from prefopt import linear_logprobs  # noqa: E402
from prefopt.train import eval as ev  # noqa: E402
from prefopt.train.data import PreferenceCollator, PreferenceRecord  # noqa: E402
from prefopt.train.models import build_model  # noqa: E402
from prefopt.train.synthetic import make_synthetic_records  # noqa: E402


class TensorWatch(TorchDispatchMode):
    """The element count of the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_ece_by_hand():
    # bins: [0, .1): one at .05, wrong -> |0 - .05|; [.1, .2): .15 twice, one right -> |.5 - .15|;
    # [.9, 1]: .95 and 1.0 (the last bin is closed), both right -> |1 - .975|
    conf, correct = [0.05, 0.15, 0.15, 0.95, 1.0], [0, 1, 0, 1, 1]
    assert ev.ece(conf, correct) == pytest.approx((0.05 + 2 * 0.35 + 2 * 0.025) / 5)
    bins = ev.reliability_bins(conf, correct)
    assert [b["n"] for b in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert ev.ece([], []) is None


def test_shift_and_confidence_match_float64_oracle(seed):
    n, h, v = 12, 8, 50
    hidden, ref_hidden = torch.randn(n, h), torch.randn(n, h)
    weight, ref_weight, bias = torch.randn(v, h), torch.randn(v, h), torch.randn(v)
    kw = dict(temperature=0.7, softcap=5.0)

    def z(x, w, b):
        s = x.double() @ w.double().T + (0 if b is None else b.double())
        return 5.0 * torch.tanh(s / 5.0) / 0.7

    p, q = z(hidden, weight, bias).softmax(-1), z(ref_hidden, ref_weight, None).softmax(-1)
    targets = torch.zeros(n, dtype=torch.long)
    lse = linear_logprobs(hidden, weight, targets, bias=bias, backend="torch", **kw).lse
    ref_lse = linear_logprobs(ref_hidden, ref_weight, targets, backend="torch", **kw).lse
    conf, tv = ev.shift_and_confidence(hidden, weight, lse, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                       ref_lse=ref_lse, vocab_tile=16, **kw)
    torch.testing.assert_close(conf, p.max(-1).values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tv, 0.5 * (p - q).abs().sum(-1), rtol=1e-5, atol=1e-6)


def test_shift_never_allocates_tokens_by_vocab(monkeypatch):
    """The op's KL / entropy / top-1 and the TV + confidence loop hold no [N, V] tensor."""
    n, h, v, tile = 512, 16, 2000, 256
    monkeypatch.setitem(torch_backend.CHUNK_SIZES, "cpu", (64, 256))
    hidden, ref_hidden, weight = torch.randn(n, h), torch.randn(n, h), torch.randn(v, h)
    targets = torch.randint(0, v, (n,))
    bound = max(n * tile, 64 * v, v * h)
    assert bound * 4 <= n * v
    with TensorWatch() as watch:
        stats = linear_logprobs(hidden, weight, targets, ref_hidden=ref_hidden, kl=True, entropy=True, top1=True,
                                backend="torch")
        ref_lse = linear_logprobs(ref_hidden, weight, targets, backend="torch").lse
        ev.shift_and_confidence(hidden, weight, stats.lse, ref_hidden=ref_hidden, ref_lse=ref_lse, vocab_tile=tile)
    assert watch.largest <= bound, f"a tensor of {watch.largest} elements (N x V = {n * v})"


@pytest.fixture(scope="module")
def tiny_text():
    policy, tok = build_model("tiny-llama", seed=0)
    reference, _ = build_model("tiny-llama", seed=1)
    return policy, reference, tok


def _text_records(n):
    return [PreferenceRecord(prompt=r.prompt, chosen=r.chosen, rejected=r.rejected)
            for r in make_synthetic_records("heldout", n, seed=0)]


def test_evaluate_matches_materialised_logits(tiny_text, monkeypatch):
    """Every pairwise / token metric against a float64 computation on the full logits of both models."""
    policy, reference, tok = tiny_text
    records = _text_records(10)
    monkeypatch.setattr(ev, "_generate", lambda *a, **k: {})
    out = ev.evaluate(policy, processor=tok, reference=reference, records=records, batch_size=4)

    batch = PreferenceCollator(tok)(records, mode="pair")
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    with torch.no_grad():
        logp = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        ref = reference.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logp, ref = logp.double().log_softmax(-1), ref.double().log_softmax(-1)
    tok_lp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    sums, counts = tok_lp.sum(1), mask.sum(1)
    b = len(records)
    wins = (sums[:b] > sums[b:]).double()
    assert out["pair_accuracy"] == pytest.approx(wins.mean().item())
    assert out["logp_gap"] == pytest.approx((sums[:b] - sums[b:]).mean().item(), rel=1e-4)
    p = torch.sigmoid(sums[:b] / counts[:b] - sums[b:] / counts[b:])
    assert out["ece_pair"] == pytest.approx(ev.ece(torch.maximum(p, 1 - p), (p > 0.5).double()), abs=1e-5)
    keep = mask.clone()
    keep[b:] = False
    P, Q = logp[keep].exp(), ref[keep].exp()
    assert out["entropy"] == pytest.approx(-(P * logp[keep]).sum(-1).mean().item(), rel=1e-4)
    assert out["kl_shift"] == pytest.approx((P * (logp[keep] - ref[keep])).sum(-1).mean().item(), rel=1e-3, abs=1e-6)
    assert out["tv_shift"] == pytest.approx(0.5 * (P - Q).abs().sum(-1).mean().item(), rel=1e-4)
    top1 = (logp[keep].argmax(-1) == labels[keep]).double()
    assert out["ece_token"] == pytest.approx(ev.ece(P.max(-1).values, top1), abs=1e-5)
    assert out["generation_accuracy"] is None and out["per_type"]["colour"]["n"] == 2


def test_generation_judged_by_hand(tiny_text, monkeypatch):
    """Fixed greedy answers: one right, one wrong colour (a hallucination), one unparseable, one missed shape."""
    policy, _, tok = tiny_text
    recs = [PreferenceRecord("What colour is the circle?", "The circle is red.", "The circle is blue."),
            PreferenceRecord("What colour is the square?", "The square is green.", "The square is red."),
            PreferenceRecord("What colour is the diamond?", "The diamond is blue.", "The diamond is red."),
            PreferenceRecord("Is there a circle in the image?", "I see a circle; circle? yes.", "I see a square; circle? no."),
            PreferenceRecord("Describe the shapes in the image.", "I see a red circle.", "I see a blue circle.")]
    answers = {0: "The circle is red.", 1: "The square is orange.", 2: "The diamond is blue and red.",
               3: "I see a square; circle? no."}
    seen = []

    def fake_generate(model, collator, records, *a, **k):
        seen.extend(records)
        return {i: answers[i] for i in range(len(records)) if i in answers}

    monkeypatch.setattr(ev, "_generate", fake_generate)
    out = ev.evaluate(policy, processor=tok, records=recs)
    assert out["generation_accuracy"] == pytest.approx(1 / 4) and out["hallucination_rate"] == pytest.approx(1 / 4)
    assert out["per_type"]["colour"]["generation_accuracy"] == pytest.approx(1 / 3)
    assert out["per_type"]["colour"]["hallucination_rate"] == pytest.approx(1 / 3)
    assert out["per_type"]["presence"] == {"n": 1, "pair_accuracy": out["per_type"]["presence"]["pair_accuracy"],
                                           "generation_accuracy": 0.0, "hallucination_rate": 0.0}
    assert out["per_type"]["describe"]["generation_accuracy"] is None
    assert out["tv_shift"] is None and out["kl_shift"] is None  # no reference given


def test_shuffle_images_deals_the_images_out_again():
    recs = make_synthetic_records("heldout", 12, seed=0)
    shuffled = ev._shuffle_images(recs, seed=0)
    ids = [id(r.images[0]) for r in recs]
    assert sorted(ids) == sorted(id(r.images[0]) for r in shuffled) and ids != [id(r.images[0]) for r in shuffled]
    assert [r.prompt for r in shuffled] == [r.prompt for r in recs]


def _run_cli(argv):
    from prefopt.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_eval_cli_json_on_saved_folder_and_run(tmp_path):
    """`prefopt eval --json` on a save_pretrained folder (vision model, synthetic images) and on a run folder
    (its checkpoint loaded: shift from the start is non-zero)."""
    adapter, processor = build_model("tiny-llava", seed=0)
    folder = tmp_path / "hf"
    adapter.model.save_pretrained(folder)
    processor.save_pretrained(folder)
    code, text = _run_cli(["eval", "--model", str(folder), "--size", "10", "--json", "--out", str(tmp_path / "rep"),
                           "--max-new-tokens", "4"])
    assert code == 0
    result = json.loads(text)
    for key in ev.EVAL_KEYS + ("per_type",):
        assert key in result
    assert set(result["per_type"]) == {"colour", "count", "position", "presence", "describe"}
    assert result["tv_shift"] is None and 0 <= result["pair_accuracy"] <= 1
    assert 0 < result["entropy"] <= math.log(len(processor.tokenizer)) + 1e-4
    for name in ("eval.json", "eval.md", "reliability.png", "per_type.png"):
        assert os.path.getsize(tmp_path / "rep" / name) > 0

    from prefopt.train.loop import TrainConfig, train

    run = tmp_path / "run"
    summary = train(TrainConfig(method="sft", model="tiny-llava", out=str(run), steps=2, batch_size=2, train_size=4,
                                probe_every=0, eval_size=5, progress=False, device="cpu", lr=1e-2))
    assert summary["eval_n"] == 5 and summary["eval_tv_shift"] > 0
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        last = json.loads(f.readlines()[-1])
    assert last["eval_pair_accuracy"] == summary["eval_pair_accuracy"] and "eval_colour/pair_accuracy" in last
    code, text = _run_cli(["eval", "--model", str(run), "--size", "5", "--json", "--max-new-tokens", "4"])
    result = json.loads(text)
    assert code == 0 and result["tv_shift"] == pytest.approx(summary["eval_tv_shift"], rel=1e-4)
    code, _ = _run_cli(["eval", "--model", str(tmp_path / "missing")])
    assert code == 2
