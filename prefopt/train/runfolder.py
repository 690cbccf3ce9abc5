"""What a run folder is prefopt's to write, and one writer at a time.

* **Ownership.** A folder is a run's only when it holds :data:`MARKER` (``prefopt-run.json``, with the run's
  id), which prefopt writes into it before anything else. prefopt removes or replaces only the entries a run
  writes (:func:`run_entries`) and only in a folder it marked; any other file stays. A folder that holds
  anything but :data:`LOCK_FILE` and no marker is refused, whatever the files are named, unless it holds an
  intact checkpoint of a run written before markers existed: ``--resume`` continues it (and marks it).
* **One writer.** Every command that writes into a folder (``prefopt train``, ``prefopt eval --out``,
  ``prefopt study``) first takes an advisory ``flock`` on :data:`LOCK_FILE` (``prefopt-run.lock``) inside it, which records the
  holder (pid, host). A second writer gets :class:`RunFolderError` naming the holder; the kernel drops the
  lock when its holder dies, so a lock left by a dead process never blocks. Under torchrun or DeepSpeed rank
  0 holds it and the other ranks check the run id.
* **No writing through links.** An entry replaced as a whole (a checkpoint, ``model/``, ``eval/``) is built
  under a temporary name beside it and swapped in by renames (:func:`swap_in`); the old entry, a symbolic
  link included, is renamed aside and removed without following it. A file is written under a temporary
  name opened with ``O_NOFOLLOW`` (:func:`open_nofollow`) or, when a library writes it by path, inside a
  new folder of its own; a link at ``latest`` is not read.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import uuid
from typing import List, Optional

from .faultpoints import fault_point

MARKER = "prefopt-run.json"
LOCK_FILE = "prefopt-run.lock"
#: What a run writes into its folder (besides the marker and the lock), by name: the entries a run that
#: stopped before its first checkpoint is started again without. ``skipped_records.json`` stays (a restart
#: skips those records again).
RUN_ENTRY_RE = re.compile(r"^(config\.json|metrics\.jsonl(\.tmp)?|latest(\.tmp)?|skipped_records\.json\.tmp"
                          r"|reference(_logps)?-\d+\.safetensors(\.tmp)?|\.checkpoint-\d+\.tmp"
                          r"|\.(model|eval|reference(_logps)?-\d+\.safetensors)\..+\.tmp"
                          r"|(model|eval|checkpoint-\d+)\.old-[0-9a-f]{8}|model|eval)$")


class RunFolderError(ValueError):
    """A folder that is not this command's to write (another process holds it, or it is not a run's)."""


def read_marker(folder: str) -> Optional[str]:
    """The run id of the marked ``folder``, or None without a (regular, readable) marker."""
    path = os.path.join(folder, MARKER)
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            run_id = json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


def write_marker(folder: str) -> str:
    """Mark ``folder`` as a run's (a new run id); returns the id."""
    run_id = uuid.uuid4().hex
    write_json_atomic(os.path.join(folder, MARKER), {"run_id": run_id, "host": socket.gethostname(),
                                                      "pid": os.getpid()})
    return run_id


def contents(folder: str) -> List[str]:
    """The entries of ``folder`` that count as its contents (all but the lock file); [] when it is missing."""
    if not os.path.isdir(folder):
        return []
    return [n for n in os.listdir(folder) if n != LOCK_FILE]


def run_entries(folder: str) -> List[str]:
    """The paths in the marked ``folder`` that a run wrote before its first checkpoint (:data:`RUN_ENTRY_RE`)."""
    return [os.path.join(folder, n) for n in contents(folder) if RUN_ENTRY_RE.match(n)]


def remove_entry(path: str) -> None:
    """Remove the file, folder or symbolic link ``path`` without following a link."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.remove(path)
    else:
        shutil.rmtree(path)


def swap_in(tmp: str, final: str) -> None:
    """Put the complete entry ``tmp`` at ``final``: an old ``final`` (a link included) is renamed aside first
    and removed after, so nothing is written through it and ``final`` is never half there."""
    aside = None
    if os.path.lexists(final):
        aside = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
    os.rename(tmp, final)
    if aside is not None:
        remove_entry(aside)


def open_nofollow(path: str, mode: str):
    """``open(path, mode)`` for writing (``"w"`` or ``"a"``, UTF-8) that fails (ELOOP) rather than follow a
    symbolic link at ``path``."""
    flags = {"w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND}[mode]
    return open(os.open(path, flags | os.O_NOFOLLOW, 0o644), mode, encoding="utf-8")


class FolderLock:
    """An advisory ``flock`` on ``folder/.prefopt-lock`` (the folder is created), held until :meth:`release`
    or the process ends. :class:`RunFolderError` naming the holder when another process holds it."""

    def __init__(self, folder: str, option: str = "--out"):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LOCK_FILE)
        self.fd: Optional[int] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            line = _held_line(folder, option, self.fd)
            self.release()
            raise RunFolderError(line) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_not_held(folder: str, option: str = "--out") -> None:
    """:class:`RunFolderError` naming the holder when another process holds ``folder``'s lock (a shared
    probe, dropped at once; a folder without a lock file is not held, and none is created)."""
    try:
        fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunFolderError(_held_line(folder, option, fd)) from None
    finally:
        os.close(fd)


def _held_line(folder: str, option: str, fd: int) -> str:
    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
    return f"{option} {folder}: in use by {holder} (one writer per run folder; wait for it or choose another folder)"


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename (never half written)."""
    write_text_atomic(path, json.dumps(obj, indent=1))


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, never through a link."""
    tmp = path + ".tmp"
    try:
        fault_point(tmp)
        with open_nofollow(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


__all__ = ["MARKER", "LOCK_FILE", "RunFolderError", "FolderLock", "read_marker", "write_marker", "contents",
           "run_entries", "remove_entry", "swap_in", "check_not_held", "open_nofollow", "write_json_atomic", "write_text_atomic"]
