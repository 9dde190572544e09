"""Notice that a config file changed, however it was saved.

Editors and config managers save by writing a temp file and renaming it over the
old one, so a watch on the file's inode (inotify on the file) goes stale after
the first save. We poll the *path* instead: `os.stat` by name every
`interval_s` sees in-place writes, renames over the file and a file deleted then
recreated alike, needs no dependency, and costs ~1 µs per poll. A missing file
is a change too: the reload that follows fails and says so, the daemon goes on.

A change is reported once the file has stayed the same for one more poll, so an
editor that writes in several steps (truncate, write, chmod, rename) causes one
reload, 0.5–1 s after the save with the default interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.5

FileSignature = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)


def file_signature(path: str | Path) -> FileSignature | None:
    """What identifies one version of the file at `path`; None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ChangeDetector:
    """Polled by its owner; `poll()` is True once per settled change of the file.

    Create it *before* reading the file, so that a save racing with the first
    read is reported (one extra reload at worst, never a missed one).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen = file_signature(self.path)
        self._pending: FileSignature | None = None
        self._changing = False

    def poll(self) -> bool:
        signature = file_signature(self.path)
        if signature == self._seen:
            self._changing = False  # changed and changed back: nothing to reload
            return False
        if not self._changing or signature != self._pending:
            self._changing, self._pending = True, signature  # still moving: wait a poll
            return False
        self._seen, self._changing = signature, False
        return True


async def watch_file(changes: ChangeDetector, on_change: Callable[[], object],
                     interval_s: float = DEFAULT_INTERVAL_S) -> None:
    """Call `on_change()` on the event loop after each settled change; runs until cancelled.

    An exception from `on_change` is logged and the watch goes on.
    """
    while True:
        await asyncio.sleep(interval_s)
        if not changes.poll():
            continue
        try:
            on_change()
        except Exception:  # a reload bug must not end the watch (or the daemon)
            log.exception("config %s: handling a change failed", changes.path)
