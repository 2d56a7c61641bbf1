"""The files a run reads and writes: checks made before any work starts, and staging.

Inputs must be regular files (a FIFO or a device would hang or stream forever). Outputs are
never written in place: `Staging` writes them into a hidden temporary directory beside their
destination and moves them into place together once everything succeeded, so a failed or
interrupted run leaves nothing behind and never writes through a symbolic link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ptqconv.errors import PtqError, PtqUsageError, shown

# Temporary directories: short names (a 250-character output name must still fit beside
# them), hidden, and marked as ptqconv's so nobody takes a killed run's leftovers for output.
STAGING_PREFIX = ".ptqconv-"
STAGING_SUFFIX = ".tmp"
# What POSIX guarantees when the file system does not say.
DEFAULT_NAME_MAX = 255
_INTERRUPTS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _kind(mode: int) -> str:
    """What a file that is not a regular one is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def os_reason(exc: OSError) -> str:
    """Why an OS call failed, in the words the messages use."""
    reasons = {errno.ENOENT: "no such file", errno.ELOOP: "symbolic link loop",
               errno.ENAMETOOLONG: "file name too long", errno.EACCES: "permission denied",
               errno.ENOTDIR: "a part of the path is not a directory"}
    return reasons.get(exc.errno or 0, exc.strerror or str(exc))


@contextlib.contextmanager
def temporary_directory() -> Iterator[Path]:
    """A working directory in TMPDIR (removed on the way out, interrupted or not); a
    failure to create it names TMPDIR."""
    try:
        workdir = tempfile.TemporaryDirectory(prefix="ptqconv-")
    except OSError as exc:
        raise PtqError(f"cannot create a temporary directory in {shown(tempfile.gettempdir())} "
                       f"(TMPDIR): {os_reason(exc)}") from None
    with workdir as name:
        yield Path(name)


def input_file(flag: str, value: str | os.PathLike | None, max_bytes: int | None = None,
               what: str = "file") -> Path:
    """`value` as a readable regular file given with `flag`, or the usage error naming what is
    wrong. `max_bytes` bounds what a run reads (a config is a few lines, not gigabytes)."""
    if value is None or str(value) == "" or (isinstance(value, (list, tuple)) and not value):
        raise PtqUsageError(f"{flag} is required")
    path = Path(value)
    try:
        # stat, not open: opening a FIFO blocks until someone writes to it.
        info = path.stat()
    except OSError as exc:
        raise PtqUsageError(f"{flag}: {os_reason(exc)}: {shown(path)}") from None
    if stat.S_ISDIR(info.st_mode):
        raise PtqUsageError(f"{flag}: is a directory, not a file: {shown(path)}")
    if not stat.S_ISREG(info.st_mode):
        raise PtqUsageError(f"{flag}: is {_kind(info.st_mode)}, not a regular file: "
                            f"{shown(path)}")
    if not os.access(path, os.R_OK):
        raise PtqUsageError(f"{flag}: permission denied: {shown(path)}")
    if max_bytes is not None and info.st_size > max_bytes:
        raise PtqUsageError(f"{flag}: {shown(path)} is {info.st_size} bytes; a {what} is at "
                            f"most {max_bytes} bytes")
    return path


def is_utf8(path: Path) -> bool:
    """Whether `path` can be passed to C++ libraries (onnx's checker, onnxruntime), which take
    UTF-8 strings: names of bytes that are not UTF-8 cannot."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def regular_file_size(path: Path) -> int:
    """The size of the regular file at `path`; OSError (with a reason) for anything else."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, f"is {_kind(info.st_mode)}, not a regular file")
    return info.st_size


def name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def output_file(flag: str, value: str | os.PathLike | None,
                sidecars: Iterable[str] = ()) -> Path:
    """`value` as a file this run may create or replace: its directory exists and is
    writable, its name fits, and neither it nor a sidecar named `name + suffix` (for each of
    `sidecars`) is a directory, a symbolic link or a special file. Replacing a symbolic link
    would leave its target stale, and writing through it would overwrite whatever it points
    at."""
    if value is None or str(value) == "":
        raise PtqUsageError(f"{flag} is required")
    path = Path(value)
    parent = path.parent
    if not parent.is_dir():
        raise PtqUsageError(f"{flag}: directory does not exist: {shown(parent)}")
    if path.name in ("", ".", ".."):
        raise PtqUsageError(f"{flag}: is a directory: {shown(path)}")
    limit = name_max(parent)
    for suffix in ("", *sidecars):
        target = path.with_name(path.name + suffix)
        size = len(os.fsencode(target.name))
        if size > limit:
            raise PtqUsageError(f"{flag}: file name too long ({size} bytes; the file system "
                                f"allows {limit}): {shown(target)}")
        try:
            mode = target.lstat().st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise PtqUsageError(f"{flag}: {os_reason(exc)}: {shown(target)}") from None
        if stat.S_ISDIR(mode):
            raise PtqUsageError(f"{flag}: is a directory: {shown(target)}")
        if not stat.S_ISREG(mode):
            raise PtqUsageError(f"{flag}: {shown(target)} exists and is {_kind(mode)}; "
                                "ptqconv replaces only regular files")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PtqUsageError(f"{flag}: directory is not writable: {shown(parent)}")
    return path


def output_directory(flag: str, path: Path) -> None:
    """`path` is a directory this run may write in, or one it may create: checked before any
    work, not after it."""
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    try:
        mode = existing.stat().st_mode
    except OSError as exc:
        raise PtqUsageError(f"{flag}: {os_reason(exc)}: {shown(existing)}") from None
    if not stat.S_ISDIR(mode):
        raise PtqUsageError(f"{flag}: not a directory: {shown(existing)}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PtqUsageError(f"{flag}: directory is not writable: {shown(existing)}")


class Identity:
    """The files a set of paths name, by resolved path and by device and inode, so that a
    symbolic link, a hard link or another spelling of a path is recognised."""

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}
        self._inodes: dict[tuple[int, int], str] = {}

    @staticmethod
    def _keys(path: Path) -> tuple[str, tuple[int, int] | None]:
        try:
            info = path.stat()
            inode = (info.st_dev, info.st_ino)
        except OSError:
            inode = None
        return os.path.realpath(path), inode

    def add(self, path: Path, label: str) -> None:
        real, inode = self._keys(path)
        self._paths.setdefault(real, label)
        if inode is not None:
            self._inodes.setdefault(inode, label)

    def find(self, path: Path) -> str | None:
        """The label of the known file `path` names, if any."""
        real, inode = self._keys(path)
        if real in self._paths:
            return self._paths[real]
        return self._inodes.get(inode) if inode is not None else None


def refuse_inputs(outputs: Iterable[tuple[str, Path]],
                  inputs: Iterable[tuple[str, Path]]) -> None:
    """Raise PtqUsageError when an output (`(flag, path)`) names a file the run reads."""
    read = Identity()
    for label, path in inputs:
        read.add(path, label)
    for flag, path in outputs:
        found = read.find(path)
        if found is not None:
            raise PtqUsageError(f"{flag}: {shown(path)} is {found}, which this run reads; "
                                "writing it would destroy that input: choose another path")


def write_failure(directory: Path, needed: int) -> str | None:
    """Why writing `needed` bytes into `directory` would fail, when it can be told without
    writing: no space, the file size limit (ulimit -f), or no permission."""
    with contextlib.suppress(OSError):
        if not os.access(directory, os.W_OK | os.X_OK):
            return "permission denied"
        info = os.statvfs(directory)
        if info.f_bavail * info.f_frsize < needed:
            return os.strerror(errno.ENOSPC)
        if info.f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        return f"{os.strerror(errno.EFBIG)} (the file size limit, ulimit -f, is {soft} bytes)"
    return None


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back while files move into place, so an interruption
    never leaves half of them moved; they are delivered when this block ends."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Staging:
    """Outputs written beside their destinations, then moved into place together.

    `path(final)` is where to write `final` for now: a file in a hidden temporary directory
    in `final`'s directory (one per directory, so every move is a rename on one file system).
    `commit()` renames them all into place, in the order they were asked for, and returns the
    destinations that existed before. Leaving the `with` block removes the temporary
    directories, and on failure the directories this run created: what this run wrote, and
    nothing else.
    """

    def __init__(self) -> None:
        self._dirs: dict[Path, Path] = {}
        self._files: list[tuple[Path, Path]] = []
        self._created: list[Path] = []
        self.committed = False

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        with _interrupts_deferred():
            for tmp in self._dirs.values():
                shutil.rmtree(tmp, ignore_errors=True)
            if not self.committed:
                for directory in reversed(self._created):
                    with contextlib.suppress(OSError):
                        directory.rmdir()

    def directory(self, final_dir: Path) -> Path:
        """The temporary directory for outputs of `final_dir`, created (with `final_dir`
        itself) on first use."""
        final_dir = Path(os.path.abspath(final_dir))
        if final_dir not in self._dirs:
            missing = []
            for parent in (final_dir, *final_dir.parents):
                if parent.exists():
                    break
                missing.append(parent)
            for parent in reversed(missing):
                try:
                    parent.mkdir()
                except OSError as exc:
                    raise PtqError(f"cannot create the directory {shown(parent)}: "
                                   f"{os_reason(exc)}") from None
                self._created.append(parent)
            try:
                self._dirs[final_dir] = Path(tempfile.mkdtemp(
                    prefix=STAGING_PREFIX, suffix=STAGING_SUFFIX, dir=final_dir))
            except OSError as exc:
                # The directory exists: "no such file" would be wrong about it (/proc, /sys
                # take no new files).
                reason = ("it takes no new files" if exc.errno == errno.ENOENT
                          else os_reason(exc))
                raise PtqError(f"cannot write in {shown(final_dir)}: {reason}") from None
        return self._dirs[final_dir]

    def path(self, final: Path, staged_name: str | None = None) -> Path:
        """Where to write `final` until the commit (named `staged_name` there, if given)."""
        tmp = self.directory(final.parent) / (staged_name or final.name)
        self._files.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        """Move every staged file into place, or none: a destination that exists is first
        moved aside into the staging directory, and if any move fails every destination is
        put back as it was (a model must not be replaced when its encodings file cannot be
        written)."""
        replaced: list[Path] = []
        moved: list[tuple[Path, Path | None]] = []  # destination, where its old file went
        with _interrupts_deferred():
            try:
                for tmp, final in self._files:
                    if not tmp.exists():
                        continue
                    previous = None
                    if os.path.lexists(final):
                        if final.is_dir() and not final.is_symlink():
                            raise IsADirectoryError(errno.EISDIR, "is a directory")
                        previous = tmp.with_name(tmp.name + ".previous")
                        os.replace(final, previous)
                        replaced.append(final)
                    moved.append((final, previous))
                    os.replace(tmp, final)
            except OSError as exc:
                failed = final
                for done, previous in reversed(moved):
                    with contextlib.suppress(OSError):
                        if previous is not None:
                            os.replace(previous, done)
                        elif os.path.lexists(done):
                            os.unlink(done)
                raise PtqError(f"cannot write {shown(failed)}: {os_reason(exc)}") from None
            self.committed = True
        return replaced
