"""pytest-benchmark suite of the fused op: ``pytest bench/`` (kept out of CI's ``pytest tests``).

Timing only, in this process (pytest-benchmark's statistics); for memory and the peers use
``python -m bench``, which runs each implementation in its own subprocess.
"""
