"""Writing a file so that readers see the old file or the whole new one, never a torn one.

The temporary file lives in the target's folder under a short name, ``.vqfast-<tag>-<random>.tmp``
(``tag``: 8 hex digits of the SHA-1 of the target's file name), so that a target name of up to
255 bytes still fits the file system's limit, and so that a later run can find and remove the
temporary files that a killed writer of the same target left behind (``remove_stale``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Callable

PREFIX = ".vqfast-"
SUFFIX = ".tmp"

# The process's umask, read once at import (os.umask can only be read by setting it, which is not
# safe while other threads create files).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def tag(name: str) -> str:
    """The 8 hex digits that mark the temporary files of a target called ``name``."""
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def write_atomically(target: Path, write: Callable[[str], object]) -> None:
    """Call ``write(temporary_path)`` in ``target``'s folder, then rename the file to ``target``:
    a crash leaves the old file or none, never a torn one (and at worst a temporary file, which
    ``remove_stale`` deletes). An OSError (a full disk, a read-only folder) is raised again as
    the same type, naming ``target``.

    The file gets the permissions a plain ``open(target, "w")`` would give (0666 less the umask)
    rather than mkstemp's 0600, so outputs are as readable as any other file.
    """
    target = Path(target)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{PREFIX}{tag(target.name)}-", suffix=SUFFIX)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:  # a full disk, a read-only folder: name the file
            raise type(e)(e.errno, f"cannot write {target} ({e.strerror or e})") from e
        raise


def remove_stale(targets: Iterable[Path]) -> list[Path]:
    """Delete the temporary files that interrupted writers of ``targets`` left; return them.

    Only call this while no other process writes these targets (the command holds a lock)."""
    by_folder: dict[Path, set[str]] = {}
    for target in targets:
        target = Path(target)
        by_folder.setdefault(target.parent, set()).add(tag(target.name))
    removed = []
    for folder, tags in by_folder.items():
        if not folder.is_dir():
            continue
        for path in folder.glob(f"{PREFIX}*{SUFFIX}"):
            if path.name[len(PREFIX) : len(PREFIX) + 8] in tags and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
