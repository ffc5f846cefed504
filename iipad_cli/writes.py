"""Writing artifacts when the file system says no: one-line errors, checks before the work, and
HDF5 files that are closed cleanly even after a failed write.

Every artifact write goes through `artifacts.atomic_path` (which reports through
`reporting_write_errors`) or through an HDF5 writer that wraps its writes in `hdf5_writes`.
A failed write (full disk, file-size limit, read-only file system, permissions, quota) becomes an
`IipadError` naming the file, the errno's meaning and what to do; no `NAME.tmp` is left and the
earlier artifacts are untouched. A stage checks that it can write (`check_writable`, done by
`runlock.run_lock`) and that the space is there (`require_space`) before its work, not after.

HDF5 needs more care than plain files: once a write has failed, the library can neither close
the file nor free its objects (it retries the write, fails, and h5py crashes the interpreter:
exit 139, even after space was freed). So free space is checked before every large HDF5 write,
and a write that fails all the same (another process filled the disk) abandons the file: it is
never closed, and the CLI leaves with `os._exit` after printing the one-line error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from iipad_cli.errors import IipadError

# errno -> (what it means, what the user can do about it)
WRITE_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free some space and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free some space within your quota and rerun"),
    errno.EFBIG: ("file too large for the file-size limit (`ulimit -f`)", "raise the limit and rerun"),
    errno.EROFS: ("read-only file system", "write the run somewhere writable (-o DIR)"),
    errno.EACCES: ("permission denied", "fix the permissions or write the run somewhere else (-o DIR)"),
    errno.EPERM: ("operation not permitted", "fix the permissions or write the run somewhere else (-o DIR)"),
}
# Room an HDF5 file needs beyond its data (metadata, chunk index) when checking free space.
HDF5_MARGIN_BYTES = 1 << 20

# h5py and safetensors put the errno into the message rather than into OSError.errno.
_ERRNO_PATTERNS = (re.compile(r"errno = (\d+)"), re.compile(r"\(os error (\d+)\)"), re.compile(r"\[Errno (\d+)\]"))
_FILENAME_PATTERN = re.compile(r"filename = '([^']*)'")

# HDF5 files given up on after a failed write (see `hdf5_writes`); never closed or freed.
_abandoned: list[object] = []


def error_errno(error: BaseException) -> int | None:
    """The errno of an OSError, or the one that h5py/safetensors/torch wrote into their message."""
    code = getattr(error, "errno", None)
    if isinstance(code, int) and code in WRITE_ERRNOS:
        return code
    text = str(error)
    for pattern in _ERRNO_PATTERNS:
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    return code if isinstance(code, int) else None


def write_failure(error: BaseException, path: Path | str | None = None) -> IipadError | None:
    """The one-line error for a failed write, or None when `error` is not a write failure.

    It names `path` when given (the artifact, not its `.tmp`), else the file the error names.
    """
    code = error_errno(error)
    if code not in WRITE_ERRNOS:
        return None
    meaning, remedy = WRITE_ERRNOS[code]
    filename = getattr(error, "filename", None)
    match = _FILENAME_PATTERN.search(str(error))
    name = path or filename or (match.group(1) if match else None)
    where = f"{name}: cannot write" if name else "a write failed"
    return IipadError(f"{where}: {meaning} ({errno.errorcode[code]}); {remedy}")


@contextlib.contextmanager
def reporting_write_errors(path: Path | str, *, on_failure: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn a write failure inside the block into a one-line IipadError naming `path`.

    `on_failure` runs first, for a writer that must act on the failure itself (`hdf5_writes`).
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        failure = write_failure(error, path)
        if failure is None:
            raise
        if on_failure is not None:
            on_failure()
        raise failure from None


def check_writable(directory: Path) -> None:
    """Fail now, before any work, when files cannot be created in `directory`.

    `os.access` is not enough (it says yes to root on a read-only bind mount, and nothing about
    quotas), so a file is created and removed.
    """
    with reporting_write_errors(directory):
        fd, name = tempfile.mkstemp(dir=directory, prefix=".iipad-write-check-")
        os.close(fd)
        os.unlink(name)


def writable_directory(directory: Path) -> Path:
    """`directory`, created if needed and checked writable (one-line IipadError otherwise)."""
    directory = Path(directory)
    with reporting_write_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
    check_writable(directory)
    return directory


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def require_space(path: Path, needed: int) -> None:
    """Fail before writing `needed` bytes to `path` when its file system, or the file-size limit
    (`ulimit -f`), cannot take them."""
    path = Path(path)
    limit, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and limit < needed:
        raise IipadError(
            f"{path}: needs about {_size(needed)} but the file-size limit (`ulimit -f`) is {_size(limit)}; raise it and rerun"
        )
    stats = os.statvfs(path.parent)
    free = stats.f_bavail * stats.f_frsize
    if free < needed:
        raise IipadError(
            f"{path}: needs about {_size(needed)} but {path.parent} has {_size(free)} free; "
            "free some space or write the run elsewhere (-o DIR)"
        )


@contextlib.contextmanager
def hdf5_writes(path: Path, handle: object) -> Iterator[None]:
    """Report a failed write to the open HDF5 file `handle` inside the block as one line naming `path`.

    After a failed write the HDF5 library cannot close the file, and trying to (or letting
    Python free the handle) crashes the interpreter. So the handle is abandoned: kept referenced,
    never closed, and `hdf5_left_open()` tells the CLI to leave with `os._exit` once the error is
    printed. Check the free space first (`require_space`) so that this stays the exception.
    """
    with reporting_write_errors(path, on_failure=lambda: _abandoned.append(handle)):
        yield


def abandoned(handle: object) -> bool:
    """True for a handle `hdf5_writes` gave up on: close it never."""
    return any(item is handle for item in _abandoned)


def hdf5_left_open() -> bool:
    """True once an HDF5 file was abandoned after a failed write: the process must leave with
    `os._exit`, as h5py's finalisers would crash the interpreter."""
    return bool(_abandoned)


def quiet_hdf5_write_errors(unraisable: object) -> None:
    """`sys.unraisablehook` that drops the write errors h5py reports while freeing objects (a
    dataset's cache is written when it is freed). They would bury the one-line error under
    tracebacks, and the failure surfaces anyway at the file's next flush, through `hdf5_writes`."""
    error = getattr(unraisable, "exc_value", None)
    if error is not None and "h5py" in repr(getattr(unraisable, "object", "")) and write_failure(error) is not None:
        return
    sys.__unraisablehook__(unraisable)  # type: ignore[arg-type]
