"""Writing a file so that readers see the old file or the whole new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

# The process's umask, read once at import (os.umask can only be read by setting it, which is not
# safe while other threads create files).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomically(target: Path, write: Callable[[str], object]) -> None:
    """Call ``write(temporary_path)`` in ``target``'s folder, then rename the file to ``target``:
    a crash leaves the old file or none, never a torn one.

    The file gets the permissions a plain ``open(target, "w")`` would give (0666 less the umask)
    rather than mkstemp's 0600, so outputs are as readable as any other file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
