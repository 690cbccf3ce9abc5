"""PrefoptDPOTrainer under DeepSpeed ZeRO-3 on 2 CPU processes (gloo) against stock DPOTrainer in the same
launch: the same per-step losses and metrics, and the same trained head (partitioned by ZeRO-3, gathered
for prefopt's op in forward and again in backward), which moved. One case (tiny Llama, explicit reference,
3 steps, one pair per rank): the launch costs most of its time."""
import json
import os
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("trl")
pytest.importorskip("deepspeed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(out_dir):
    import deepspeed
    import torch
    import trl
    from datasets import Dataset

    from prefopt.integrations.trl import PrefoptDPOTrainer
    from prefopt.train.models import build_model

    data = Dataset.from_dict({
        "prompt": ["the red cube is", "a blue ball sits", "two green cones", "the small dog"],
        "chosen": [" on the table", " under the chair", " near the box", " runs fast"],
        "rejected": [" in the sky above", " on the moon", " inside the cup", " flies"],
    })
    zero3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True}
    rank = int(os.environ.get("RANK", "0"))
    result = {}
    for cls in (trl.DPOTrainer, PrefoptDPOTrainer):
        args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, max_steps=3,
                             learning_rate=1e-2, optim="sgd", logging_steps=1, report_to=[], save_strategy="no",
                             seed=0, use_cpu=True, bf16=False, disable_tqdm=True, deepspeed=zero3)
        policy, tokenizer = build_model("tiny-llama", seed=0)
        trainer = cls(model=policy.hf_model, ref_model=build_model("tiny-llama", seed=0)[0].hf_model, args=args,
                      train_dataset=data, processing_class=tokenizer)
        trainer.train()
        head = trainer.model_wrapped.module.get_output_embeddings().weight
        with deepspeed.zero.GatheredParameters([head]):
            if rank == 0:
                torch.save(head.detach().clone(), os.path.join(out_dir, f"{cls.__name__}.pt"))
        result[cls.__name__] = [e for e in trainer.state.log_history if "loss" in e]
    from prefopt.integrations.trl import _zero3_enabled

    result["zero3"] = _zero3_enabled()  # prefopt's head took its ZeRO-3 path (gathers, recompute)
    if rank == 0:
        with open(os.path.join(out_dir, "logs.json"), "w") as f:
            json.dump(result, f)
    # Both ranks leave together and close the process group: a rank that exits while its gloo threads
    # still run aborts ("terminate called without an active exception"), which failed CI once.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_zero3_two_processes_match_stock_trl(tmp_path):
    import torch

    from prefopt.train.distributed import _free_port as free_port
    from prefopt.train.models import build_model

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.abspath(__file__), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    logs = json.loads((tmp_path / "logs.json").read_text())
    assert logs["zero3"]
    stock, ours = logs["DPOTrainer"], logs["PrefoptDPOTrainer"]
    assert len(stock) == len(ours) == 3
    for a, b in zip(stock, ours):
        for key, value in a.items():
            if isinstance(value, float) and not any(t in key for t in ("time", "per_second")):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    initial = build_model("tiny-llama", seed=0)[0].hf_model.get_output_embeddings().weight.detach()
    stock_head, our_head = (torch.load(tmp_path / f"{name}.pt", weights_only=True)
                            for name in ("DPOTrainer", "PrefoptDPOTrainer"))
    update = stock_head - initial
    assert float(update.norm()) > 1e-4, "the head did not move"
    assert float((our_head - stock_head).norm()) <= 1e-5 * float(update.norm())


if __name__ == "__main__":
    worker(sys.argv[1])
