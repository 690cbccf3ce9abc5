"""The fault-injection test hook: named points in the trainer where a test makes the process fail.

Only the tests set :data:`FAULT_ENV`; unset, every point is a no-op.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from typing import Optional

#: Test hook: ``PREFOPT_FAULT=<point>:<kind>[:<rank>]`` makes the process (of that rank only, if given)
#: SIGKILL itself (``kill``), send itself SIGINT (``sigint``), hang (``hang``) or fail with ENOSPC/EROFS
#: (``enospc``, ``erofs``) when it reaches ``<point>``: a checkpoint or export file's name, just before it is
#: written, ``step-<n>``, the boundary after step n, or ``eval``, the start of the final evaluation; and
#: ``loss-<n>:nan`` makes step n's loss NaN. For the fault-injection tests only.
FAULT_ENV = "PREFOPT_FAULT"


def fault_kind(path: str) -> Optional[str]:
    """The kind :data:`FAULT_ENV` asks for at the point ``path`` (named by its trailing components, e.g.
    ``optimizer.json`` or ``.checkpoint-4.tmp/optimizer.json``) in this rank, or None."""
    spec = os.environ.get(FAULT_ENV, "").split(":")
    if len(spec) < 2 or not os.path.join(os.sep, path).endswith(os.sep + spec[0]):
        return None
    if len(spec) > 2 and spec[2] != os.environ.get("RANK", "0"):
        return None
    return spec[1]


def fault_point(path: str) -> None:
    """Act on :data:`FAULT_ENV` at the point ``path`` (a no-op unless that test hook names it)."""
    kind = fault_kind(path)
    if kind is None or kind == "nan":
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "sigint":
        os.kill(os.getpid(), signal.SIGINT)
    elif kind == "hang":
        while True:
            time.sleep(60)
    else:
        code = {"enospc": errno.ENOSPC, "erofs": errno.EROFS}[kind]
        raise OSError(code, os.strerror(code), path)
