"""Removing a folder tree of any depth, links never followed.

The API removes uploads that failed their checks, deleted datasets, models and jobs; the
sandbox removes what it unpacked when an archive is refused. Any of those trees may have
been built by a hostile archive, so neither its depth nor its links may stop the removal.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: Path) -> bool:
    """Delete ``path`` and everything below it, links never followed; True when it is gone.

    Never raises: what cannot be removed is logged. Unlike ``shutil.rmtree`` and ``os.walk``
    (recursive in Python 3.11: a tree deeper than the recursion limit raises
    ``RecursionError`` whatever ``ignore_errors`` says), this walks with an explicit stack,
    and every call is relative to one open folder, so no depth or path length stops it.
    """
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
            return True
        remover = _Remover(path)
        try:
            remover.empty()
        finally:
            os.close(remover.fd)
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
        return False
    return True


class _Remover:
    """Empties one folder tree, depth first, holding a single folder open at a time."""

    def __init__(self, root: Path) -> None:
        self.fd = os.open(root, _DIR_FLAGS)
        self.failed = 0

    def empty(self) -> None:
        # Each frame: a folder's name in its parent, and its subfolders still to remove.
        stack: list[tuple[str, list[str]]] = [("", self._clear())]
        while stack:
            name, pending = stack[-1]
            if not pending:
                stack.pop()
                if stack:
                    self._leave(name)
                continue
            child = pending.pop()
            if self._enter(child):
                stack.append((child, self._clear()))
        if self.failed:
            raise OSError(f"{self.failed} entries could not be removed")

    def _clear(self) -> list[str]:
        """Unlink the open folder's files; the names of its subfolders."""
        folders = []
        try:
            with os.scandir(self.fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.name)
                    else:
                        self._attempt(os.unlink, entry.name)
        except OSError:
            self.failed += 1
        return folders

    def _enter(self, name: str) -> bool:
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            self.failed += not isinstance(exc, FileNotFoundError)
            return False
        os.close(self.fd)
        self.fd = child
        return True

    def _leave(self, name: str) -> None:
        """Back to the parent folder, and remove the (now empty) one just left."""
        parent = os.open("..", _DIR_FLAGS, dir_fd=self.fd)
        os.close(self.fd)
        self.fd = parent
        self._attempt(os.rmdir, name)

    def _attempt(self, remove: Callable[..., None], name: str) -> None:
        try:
            remove(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except OSError:
            self.failed += 1
