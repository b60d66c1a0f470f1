"""A folder as a zip archive, made while it uploads: nothing is written to disk and only a
chunk is held in memory. Images are already compressed, so entries are stored."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Generator
from pathlib import Path

CHUNK = 1 << 20


class _Sink:
    """Where zipfile writes: append-only and not seekable, so entries get data descriptors
    and sizes need not be known before their bytes."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.buffer += data
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        pass

    def close(self) -> None:
        # zipfile never closes a stream it was handed; this completes the writable-stream
        # shape it asks for.
        pass


def folder_files(folder: Path) -> list[Path]:
    """The folder's files, in a stable order; hidden files and folders are left out."""
    files = [p for p in folder.rglob("*") if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(files)


class _Counted:
    """Counts the bytes ``read`` has handed out and reports the total to ``on_read``."""

    on_read: Callable[[int], None] | None
    sent: int

    def _counted(self, data: bytes) -> bytes:
        self.sent += len(data)
        if self.on_read is not None:
            self.on_read(self.sent)
        return data


class FolderZip(_Counted):
    """A file-like object whose ``read`` returns the next bytes of a zip of ``folder``
    (its name the top folder inside the archive). ``on_read(total_read)`` reports progress;
    ``size_hint`` is the files' total size, a close estimate of the archive's."""

    def __init__(self, folder: str | Path, on_read: Callable[[int], None] | None = None) -> None:
        self.folder = Path(folder)
        self.files = folder_files(self.folder)
        if not self.files:
            raise ValueError(f"{self.folder}: no files to upload")
        self.size_hint = sum(p.stat().st_size for p in self.files)
        self.on_read = on_read
        self.sent = 0
        self._sink = _Sink()
        self._chunks = self._generate()
        self._done = False

    def _generate(self) -> Generator[None, None, None]:
        with zipfile.ZipFile(self._sink, "w", zipfile.ZIP_STORED) as archive:
            for path in self.files:
                name = (Path(self.folder.name) / path.relative_to(self.folder)).as_posix()
                with path.open("rb") as source, archive.open(name, "w") as dest:
                    while chunk := source.read(CHUNK):
                        dest.write(chunk)
                        yield
                yield
        yield

    def read(self, size: int = -1) -> bytes:
        want = CHUNK if size is None or size < 0 else size
        while len(self._sink.buffer) < want and not self._done:
            try:
                next(self._chunks)
            except StopIteration:
                self._done = True
        data = bytes(self._sink.buffer[:want])
        del self._sink.buffer[:want]
        return self._counted(data)

    def close(self) -> None:
        self._chunks.close()


class ProgressFile(_Counted):
    """A file opened for reading that reports how much has been read."""

    def __init__(self, path: Path, on_read: Callable[[int], None] | None = None) -> None:
        self.file = path.open("rb")
        self.size_hint = path.stat().st_size
        self.on_read, self.sent = on_read, 0

    def read(self, size: int = -1) -> bytes:
        return self._counted(self.file.read(size))

    def close(self) -> None:
        self.file.close()
