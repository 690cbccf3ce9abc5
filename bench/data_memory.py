"""Peak anonymous memory of a run over a large parquet set: the up-front checks and a few steps.

    python -m bench.data_memory                      # 1,000 and 20,000 records, one fresh process each
    python -m bench.data_memory --records 1000 5000 --steps 3

Each size gets a generated parquet file (an RLAIF-V-like layout: question / chosen / rejected and a 32x32 PNG
of random pixels embedded per row), then a fresh process runs ``prepare`` (load, check every record, build
tiny-llava) and ``--steps`` DPO steps on it, sampling ``RssAnon`` (anonymous resident memory, from
/proc/self/status; memory-mapped files are not in it) every 10 ms. Prints one JSON line per size: the peak,
the time of the up-front checks (``prepare``) and of the steps. Linux only; not a test (minutes of CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def write_parquet(path: str, n: int, seed: int = 0) -> None:
    """``n`` RLAIF-V-like rows with an embedded 32x32 PNG of random pixels each, written in chunks."""
    import io

    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    features = datasets.Features({"question": datasets.Value("string"), "chosen": datasets.Value("string"),
                                  "rejected": datasets.Value("string"), "image": datasets.Image()})
    schema = features.arrow_schema
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, 500):
            rows = {"question": [], "chosen": [], "rejected": [], "image": []}
            for i in range(start, min(n, start + 500)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                rows["question"].append(f"What is in picture {i}?")
                rows["chosen"].append(f"Noise number {i}.")
                rows["rejected"].append(f"A cat number {i}.")
                rows["image"].append({"bytes": buf.getvalue(), "path": None})
            writer.write_table(pa.Table.from_pydict(rows, schema=schema), row_group_size=100)


def measure(data: str, out: str, steps: int) -> dict:
    """In this process: prepare and train ``steps`` steps on ``data``, sampling RssAnon."""
    import threading

    from prefopt.train.loop import TrainConfig, prepare

    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = TrainConfig(method="dpo", model="tiny-llava", data=data, out=out, steps=steps, batch_size=4,
                      probe_every=0, probe_size=4, eval_size=0, progress=False, device="cpu", save_minutes=0,
                      data_columns="prompt=question,images=image")
    t0 = time.perf_counter()
    run = prepare(cfg)
    t1 = time.perf_counter()
    run.execute()
    t2 = time.perf_counter()
    done.set()
    sampler.join()
    return {"records": len(run.records), "peak_rss_anon_mib": round(peak[0] / 1024, 1),
            "prepare_s": round(t1 - t0, 1), "steps_s": round(t2 - t1, 1), "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, nargs="+", default=[1000, 20000])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.steps)), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_DATASETS_CACHE=os.path.join(tmp, "cache"), OMP_NUM_THREADS="1")
        for n in args.records:
            data = os.path.join(tmp, f"prefs-{n}.parquet")
            write_parquet(data, n)
            child = subprocess.run([sys.executable, "-m", "bench.data_memory", "--steps", str(args.steps), "--child",
                                    data, os.path.join(tmp, f"run-{n}")], env=env, capture_output=True, text=True)
            if child.returncode:
                sys.stderr.write(child.stderr)
                return child.returncode
            result = json.loads(child.stdout.strip().splitlines()[-1])
            result["parquet_mib"] = round(os.path.getsize(data) / 2**20, 1)
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
