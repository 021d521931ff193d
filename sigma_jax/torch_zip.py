"""The zip layer of a torch checkpoint, read at a cost bounded by the file.

`torch.save` writes an uncompressed zip: every entry stored (ZIP_STORED), never encrypted, with
no flags but "sizes in a data descriptor" and "UTF-8 names". `Archive(path)` opens such a file
and checks, before any entry's data is read:

- no single read of the file is over `MAX_READ` bytes (so the central directory is at most that,
  and every structure zipfile reads is small);
- entry names are unique; every entry is stored, unencrypted, with only the flags above, in its
  central directory record and in its local header alike, and its two sizes are equal;
- every entry (local header to end of data) lies inside the file and overlaps no other entry.

So the entries hold at most as many bytes as the file. `Archive.read(name, size)` returns an
entry's bytes (exactly `size` of them), read in `MAX_READ` chunks with its CRC-32 checked;
`Archive.chunks(name, size, chunk)` yields them piece by piece, so a reader can put them where
they belong without ever holding the whole entry.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from collections.abc import Iterator

from sigma_jax.torch_errors import CheckpointError, short_repr

MAX_READ = 1 << 20
_ALLOWED_FLAGS = 0x0008 | 0x0800  # sizes in a data descriptor; UTF-8 names
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature ... name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"


class _CappedReads(io.RawIOBase):
    """A read-only file whose every read is at most MAX_READ bytes (CheckpointError otherwise):
    what zipfile sees, so that no zip field can make it read much at once."""

    def __init__(self, raw, size: int, path):
        super().__init__()
        self._raw, self._size, self._path = raw, size, path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = max(self._size - self._raw.tell(), 0)
        if n > MAX_READ:
            raise CheckpointError(f"{self._path}: a zip structure of {n} bytes (a torch "
                                  f"checkpoint's central directory is under {MAX_READ})")
        return self._raw.read(n)

    def close(self) -> None:
        self._raw.close()
        super().close()


class Archive:
    """A torch checkpoint's zip, checked as the module docstring says. A context manager."""

    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        self._file = _CappedReads(open(path, "rb"), size, path)  # noqa: SIM115 (closed by close)
        try:
            self._zip = zipfile.ZipFile(self._file)
            self._infos = {info.filename: info for info in self._zip.infolist()}
            if len(self._infos) != len(self._zip.infolist()):
                raise CheckpointError(f"{path}: two zip entries have the same name")
            self._check_entries(size)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def names(self) -> list[str]:
        return list(self._infos)

    def size(self, name: str) -> int:
        """The byte size of entry `name`; CheckpointError if there is none."""
        if name not in self._infos:
            raise CheckpointError(f"{self.path}: the archive has no entry {short_repr(name)}")
        return self._infos[name].file_size

    def _check_entries(self, file_size: int) -> None:
        end = 0
        for info in sorted(self._infos.values(), key=lambda i: i.header_offset):
            name = short_repr(info.filename)
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & ~_ALLOWED_FLAGS:
                raise CheckpointError(
                    f"{self.path}: entry {name} is compressed or encrypted (method "
                    f"{info.compress_type}, flags {info.flag_bits:#x}); torch writes only "
                    "stored entries")
            if info.file_size != info.compress_size:
                raise CheckpointError(f"{self.path}: entry {name} has two different sizes")
            start = info.header_offset
            if start < end:
                raise CheckpointError(f"{self.path}: entry {name} overlaps another entry")
            end = self._data_start(info) + info.compress_size
            if end > file_size:
                raise CheckpointError(f"{self.path}: entry {name} runs past the end of the file")

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Where the data of `info` starts, from its local header (checked against the central
        directory: same method, allowed flags)."""
        self._file.seek(info.header_offset)
        header = self._file.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            raise CheckpointError(f"{self.path}: a local zip header past the end of the file")
        signature, _, flags, method, *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != _LOCAL_SIGNATURE or method != zipfile.ZIP_STORED or \
                flags & ~_ALLOWED_FLAGS:
            raise CheckpointError(f"{self.path}: the local header of entry "
                                  f"{short_repr(info.filename)} is damaged, compressed or "
                                  "encrypted")
        return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length

    def read(self, name: str, size: int) -> bytearray:
        """The `size` bytes of entry `name`, CRC-checked; CheckpointError if the entry is
        missing or not `size` bytes long (checked before reading)."""
        out = bytearray(size)
        done = 0
        for chunk in self.chunks(name, size, MAX_READ):
            out[done:done + len(chunk)] = chunk
            done += len(chunk)
        return out

    def chunks(self, name: str, size: int, chunk: int) -> Iterator[bytearray]:
        """The `size` bytes of entry `name` in consecutive pieces of `chunk` bytes (the last one
        shorter when `chunk` does not divide `size`), each a new bytearray, each read from the
        file in `MAX_READ` pieces. The CRC-32 is checked as the last byte is read, before the
        last piece is yielded, so a damaged entry raises before its iteration ends (earlier
        pieces may already have been used). CheckpointError if the entry is missing or not
        `size` bytes long (its recorded size is checked before reading)."""
        if self.size(name) != size:
            raise CheckpointError(f"{self.path}: entry {short_repr(name)} holds "
                                  f"{self.size(name)} bytes, expected {size}")
        if chunk < 1:
            raise ValueError(f"chunks of {chunk} bytes")
        with self._zip.open(self._infos[name]) as entry:
            for start in range(0, size, chunk):
                yield self._piece(entry, name, min(chunk, size - start))
            if entry.read(1):  # also the read that checks the CRC of an empty entry
                raise CheckpointError(f"{self.path}: entry {short_repr(name)} is too long")

    def _piece(self, entry, name: str, size: int) -> bytearray:
        """The next `size` bytes of the open entry `entry`."""
        out = bytearray(size)
        view = memoryview(out)
        done = 0
        while done < size:
            data = entry.read(min(MAX_READ, size - done))
            if not data:
                raise CheckpointError(f"{self.path}: entry {short_repr(name)} is truncated")
            view[done:done + len(data)] = data
            done += len(data)
        return out
