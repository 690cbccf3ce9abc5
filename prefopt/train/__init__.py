"""The lean trainer: model adapters, preference data, the synthetic visual set (and the loop, see loop.py).

Public pieces: :func:`~prefopt.train.models.build_model`, :class:`~prefopt.train.models.ModelAdapter`,
:class:`~prefopt.train.models.HeadSpec`, :class:`~prefopt.train.data.PreferenceRecord`,
:func:`~prefopt.train.data.load_records` (JSONL, parquet, arrow, hub datasets: :mod:`~prefopt.train.sources`),
:class:`~prefopt.train.data.PreferenceCollator`,
:func:`~prefopt.train.synthetic.make_synthetic_records`. Import them from their modules (this package
imports nothing heavy on its own).
"""
