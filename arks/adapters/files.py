"""When a mounted file changed: a Secret's or ConfigMap's key is swapped in through a symlink,
so its identity changes with it, not only its size and time."""

from __future__ import annotations

import os

Stamp = tuple[int, int, int, int]  # device, inode, size, modification time (ns)


def stamp(path: str | os.PathLike[str]) -> Stamp | None:
    """What `path` names now (symlinks followed); None when it cannot be looked at."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
