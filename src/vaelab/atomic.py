"""Atomic file writes: temporary file in the same directory, flush, fsync, rename.

rename is atomic on POSIX, so a kill at any moment leaves the previous version or the new one, never a
torn file; a failed write (full disk, permissions) names the path and the OS error and leaves the old file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from vaelab.errors import VaelabError
from vaelab.tables import shell_word


class WriteError(VaelabError):
    """A file of the run could not be written (permissions, full disk); names the path and the OS error.
    ``what``: that part alone (the message without its advice), for a caller that knows better what to do;
    ``errno``: the OS error's number (``code``), where there was one."""

    def __init__(self, message: str, what: str | None = None, code: int | None = None):
        super().__init__(message)
        self.what, self.errno = what or message, code

    def remedy(self, directory: str) -> str:
        """What lets the write through (``WRITE_REMEDIES``), else the right to write in ``directory``."""
        return WRITE_REMEDIES.get(self.errno, f"make {directory} writable")


# What lets a write through, by the OS error that stopped it; any other: the right to write there. Until 2026-12-05
# only a full disk had its own: a full quota, a file over `ulimit -f` and a directory where the file goes were told
# to "make RUN writable", which it was.
WRITE_REMEDIES = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space within your disk quota",
                  errno.EFBIG: "raise the limit on a file's size (ulimit -f unlimited)",
                  errno.EISDIR: "move that directory away"}


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb", replace: bool = True) -> None:
    """Write ``path`` through ``write(handle)`` atomically: temporary file, flush, fsync, rename. ``replace`` False:
    never over a file of that name, even one another process wrote a moment ago (FileExistsError, that file
    untouched): the complete temporary file is hard-linked to the name, which fails where the name exists."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        what = f"cannot write in {path.parent}: {exc.strerror} (errno {exc.errno})"
        raise WriteError(f"{what}; choose a writable location with free space", what, exc.errno) from exc
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, FileExistsError) and not replace:
            raise
        if isinstance(exc, OSError):
            what = f"cannot write {path}: {exc.strerror} (errno {exc.errno})"
            # the remedy of that error where there is one (until 2026-12-07 "free some space" for each, a directory
            # in the file's place too)
            remedy = WRITE_REMEDIES.get(exc.errno)
            raise WriteError(f"{what}; {remedy + ' or ' if remedy else ''}write elsewhere", what, exc.errno) from exc
        raise
    # Make the rename itself durable.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _link_new(tmp: str, path: Path) -> None:
    """``tmp`` under the new name ``path`` (FileExistsError where it exists), never over a file of that name. First a
    hard link, which fails where the name exists. Where the file system has no hard links (FAT, some network and FUSE
    file systems), Linux's ``renameat2(…, RENAME_NOREPLACE)``, which fails the same way. Only where neither is had is
    the name checked, then renamed to: a second writer in between would not be noticed there."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        if _rename_no_replace(tmp, path):
            return
        if path.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1        # <fcntl.h>, <linux/fs.h>


def _rename_no_replace(tmp: str, path: Path) -> bool:
    """Rename ``tmp`` to ``path`` unless ``path`` exists (FileExistsError), in one step: True where done, False where
    this system or file system cannot (no ``renameat2`` in the C library, or the flag refused: EINVAL, ENOSYS)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):                 # not Linux, or a C library before glibc 2.28
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(path))     # EEXIST makes it a FileExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str, replace: bool = True) -> None:
    atomic_write(path, lambda handle: handle.write(text), mode="w", replace=replace)


def path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be one of vaelab's, or None where it can be. A name whose bytes are not UTF-8 (Python
    holds them as surrogates), which its files (config.json, records, logs, pages) cannot hold: until 2026-12-05
    such a --out ended the training in a traceback, leaving the new run directory behind. A name holding a control
    character (a line break, a tab): until 2026-12-05 `train --out $'a\\nb'` made the run, and every line naming it
    (the log's, an error's, a row of `runs`) was broken in two."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = os.fsencode(text[exc.start:exc.end])[0]
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        return (f"{shown} is not UTF-8 (its byte 0x{byte:02x}); vaelab writes its paths into its files and lines "
                f"as UTF-8: rename it, or give another path")
    control = next((character for character in text if ord(character) < 32 or ord(character) == 127), None)
    if control is not None:
        return (f"{text!r} holds a control character ({control!r}); vaelab names its paths in lines, logs and "
                f"tables, one line each: rename it, or give another path")
    return None


def unreadable(path: Path, exc: OSError, fix: str) -> str:
    """Why the run's file ``path`` could not be read, and what reads it: until 2026-12-05 every such error was
    "truncated or corrupted" (weights, training state) or "not valid JSON" (config.json), though a file this user
    may not read is whole (chmod), and a directory in its place must be moved before ``fix`` (a resume that writes
    it again) can work."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (f"{path} cannot be read by this user ({exc.strerror}, errno {exc.errno}); the file may be whole: "
                f"let this user read it (chmod u+r {shell_word(path)}), or run as its owner")
    if exc.errno == errno.EISDIR:
        return (f"{path} is a directory, not vaelab's file: move it away (mv {shell_word(path)} "
                f"{shell_word(path)}.moved); then {fix}")
    return f"{path} cannot be read ({exc.strerror or exc}, errno {exc.errno}); {fix}"
