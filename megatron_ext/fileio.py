"""Atomic file and folder replacement: a reader, or a process killed half-way, sees the old file
(folder) or the complete new one, never a truncated one; and what is published is on disk first
(fsync), so a power loss cannot leave a name pointing at bytes still in the page cache. And YAML
files read as one mapping, with one-line errors."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Iterator, Optional, TextIO

# Temporary names start with this (hidden, and recognisable as leftovers of a killed writer).
TMP_PREFIX = ".incomplete."
# A folder on its way out (replaced, or pruned) is renamed to this prefix first, so a kill while
# deleting it leaves a hidden leftover, never a half-deleted folder under its real name.
DISCARD_PREFIX = ".discard."
_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths atomically


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Make every file under ``path`` and every directory entry in it durable (fsync each file,
    then each directory bottom-up), so a power loss after this returns cannot lose any of it."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


@contextlib.contextmanager
def open_atomically(path: str, mode: Optional[int] = None) -> Iterator[TextIO]:
    """A text file to write that replaces ``path`` only when the block ends without an error: a
    temporary file beside it, synced, then ``os.replace``d into place. Permissions: ``mode``, else
    those of the file replaced, else the usual ones of a new file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if mode is None and os.path.exists(path):
            mode = os.stat(path).st_mode & 0o7777  # keep the replaced file's permissions
        elif mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp makes 0600; a new file gets the usual permissions
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def write_text_atomically(path: str, text: str, mode: Optional[int] = None) -> None:
    """Write ``text`` to a temporary file beside ``path``, then ``os.replace`` it into place."""
    with open_atomically(path, mode) as f:
        f.write(text)


def _exchange(a: str, b: str) -> bool:
    """Swap two directories in one atomic step where the OS and filesystem can; False otherwise."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd = -100
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0
    except (AttributeError, OSError):  # no renameat2 in this libc
        return False


def discard_folder(path: str) -> None:
    """Rename ``path`` out of the way (one atomic step, to a hidden ``DISCARD_PREFIX`` sibling),
    then delete it."""
    parent, name = os.path.split(os.path.abspath(path))
    aside = os.path.join(parent, f"{DISCARD_PREFIX}{name}.{os.getpid()}.{time.time_ns()}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def publish_folder(staged: str, final: str) -> None:
    """Make the complete folder ``staged`` (on the same file system) the folder ``final``: every
    file and folder in it synced, then one rename, then the parent of ``final`` synced. An existing
    ``final`` is swapped out in one atomic step where the OS can (then deleted); elsewhere it is
    renamed away first, so ``final`` is missing for an instant between the two renames."""
    fsync_tree(staged)  # on disk before the rename makes it the folder readers see
    if not os.path.lexists(final):
        os.rename(staged, final)
    elif _exchange(staged, final):  # `staged` now holds the old folder
        discard_folder(staged)
    else:
        discard_folder(final)
        os.rename(staged, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


@contextlib.contextmanager
def staged_folder(final: str, prefix: str = TMP_PREFIX) -> Iterator[str]:
    """Build the folder ``final`` crash-safely: yields the path to build it at (not created yet),
    inside a hidden work folder beside ``final`` (``<prefix><name>.<pid>.*``, also scratch space
    for the writer); when the block ends the result is published (``publish_folder``), when it
    raises nothing is; the work folder is deleted either way."""
    final = os.path.abspath(final)
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"{prefix}{name}.{os.getpid()}.", dir=parent)
    try:
        built = os.path.join(work, name)
        yield built
        publish_folder(built, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_yaml_mapping(path: str) -> dict:
    """The mapping a YAML file holds (an empty file: ``{}``); ValueError with one line naming the
    file (and the line, for a syntax error) otherwise."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data
