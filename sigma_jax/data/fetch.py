"""Locating, downloading and verifying data files.

Lookup order for a file with relative name `rel` (e.g. "tinyshakespeare/input.txt"):
  1. an explicit path given by the user (`data_path=`); it must exist;
  2. `$SIGMA_JAX_DATA/rel` (a read-only shared data folder; nothing is ever written there);
  3. `cache_dir()/rel`, where earlier downloads land;
  4. a download from the canonical URL into `cache_dir()/rel`, verified against its sha256
     (a mismatch is an error and the file is not kept).
Offline, step 4 fails with a one-line DataError that says where to put the file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

from sigma_jax.checks import short_repr
from sigma_jax.data.task import DataError

DOWNLOAD_TIMEOUT_S = 30


def data_dir() -> Path | None:
    """The shared data folder from `$SIGMA_JAX_DATA`; None when the variable is unset or empty."""
    value = os.environ.get("SIGMA_JAX_DATA", "")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """Where downloads and derived files go: `$SIGMA_JAX_CACHE`, else `~/.cache/sigma_jax`.

    The folder is not created here; writers create it.
    """
    value = os.environ.get("SIGMA_JAX_CACHE", "")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "sigma_jax"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, sha256: str | None) -> Path:
    """Download `url` to `dest` atomically; verify `sha256` (if given) before the file appears."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with (os.fdopen(fd, "wb") as out,
              urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r):
            for block in iter(lambda: r.read(1 << 20), b""):
                out.write(block)
        got = sha256_file(tmp)
        if sha256 is not None and got != sha256:
            raise DataError(
                f"downloaded {url} has sha256 {got}, expected {sha256}; the file was not kept"
            )
        os.replace(tmp, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def locate(rel: str, *, explicit: str | os.PathLike | None = None, url: str | None = None,
           sha256: str | None = None, option: str = "data_path") -> Path:
    """Find (or download) the file `rel`; see the module docstring for the lookup order.

    Args:
      rel: the file's path relative to the data folder, e.g. "gpt2/gpt2.tiktoken".
      explicit: a user-given path (a str or a str os.PathLike); when set, it is the only place
        looked at, and must be an existing file.
      url: canonical download URL; None means the file cannot be downloaded.
      sha256: expected hash of a downloaded file (files found locally are not re-hashed here).
      option: the load_task option name to mention in error messages.
    Raises:
      DataError (one line) when the file cannot be found or fetched.
    """
    if explicit is not None:
        if not isinstance(explicit, str | os.PathLike) or not isinstance(os.fspath(explicit), str):
            raise DataError(f"{option} must be a file path (a string); got "
                            f"{short_repr(explicit)}")
        path = Path(explicit).expanduser()
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "not a file"
            raise DataError(f"{option}={str(explicit)!r} is {what}; pass an existing file")
        return path
    shared = data_dir()
    if shared is not None and (shared / rel).is_file():
        return shared / rel
    cached = cache_dir() / rel
    if cached.is_file():
        return cached
    where = f"put the file at $SIGMA_JAX_DATA/{rel} or {cached}, or pass {option}=PATH"
    if url is None:
        raise DataError(f"{rel} not found; {where}")
    try:
        return download(url, cached, sha256)
    except DataError:
        raise
    except OSError as e:  # URLError, timeouts, refused connections are OSErrors
        reason = getattr(e, "reason", None) or e
        raise DataError(
            f"{rel} not found and download from {url} failed ({reason}); {where}") from e
