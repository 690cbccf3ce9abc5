"""The lean trainer: model adapters, preference data, the synthetic visual set (and the loop, see loop.py).

Public pieces: :func:`~prefopt.train.models.build_model`, :class:`~prefopt.train.models.ModelAdapter`,
:class:`~prefopt.train.models.HeadSpec`, :class:`~prefopt.train.data.PreferenceRecord`,
:func:`~prefopt.train.data.load_records` (JSONL, parquet, arrow, hub datasets: :mod:`~prefopt.train.sources`),
:class:`~prefopt.train.data.PreferenceCollator`,
:func:`~prefopt.train.synthetic.make_synthetic_records`. Import them from their modules (this package
imports nothing heavy on its own).
"""
import logging

# bitsandbytes (which peft imports) logs a warning when it is imported on a CPU with AVX512-BF16: an optional
# hub kernel it falls back from did not load. Nothing a user can act on, and it would precede every command's
# output and one-line errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
