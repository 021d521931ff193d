"""Fuzzing the checkpoint reader with mutations of a checkpoint the published code wrote.

A child process (run as `python tests/test_torch_file_fuzz.py SEED`) loads vocab7.pt, then
several hundred seeded mutations of it: bit flips, byte deletions, truncations, edits of zip
header fields (local headers, central directory, end record), and edits of the pickle with the
zip rebuilt around it (so its CRC is right and the pickle machine sees every change). Each must
either load to exactly the original parameters or raise CheckpointError with one short
printable line, and all of them together may raise the child's peak memory by at most 64 MiB.
"""

import collections
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch_craft as tc
from cli_helpers import ROOT, subprocess_env

FIXTURE = ROOT / "tests" / "fixtures" / "official" / "vocab7.pt"
SEED = 20240923
# (record kind, field offset, struct format) of the zip fields worth lying about
ZIP_FIELDS = [
    ("local", 6, "H"), ("local", 8, "H"), ("local", 14, "I"), ("local", 18, "I"),
    ("local", 22, "I"), ("local", 26, "H"), ("local", 28, "H"),
    ("central", 8, "H"), ("central", 10, "H"), ("central", 16, "I"), ("central", 20, "I"),
    ("central", 24, "I"), ("central", 28, "H"), ("central", 30, "H"), ("central", 32, "H"),
    ("central", 34, "H"), ("central", 42, "I"),
    ("end", 4, "H"), ("end", 6, "H"), ("end", 8, "H"), ("end", 10, "H"), ("end", 12, "I"),
    ("end", 16, "I"), ("end", 20, "H"),
]


def _field_value(rng: random.Random, old: int, fmt: str) -> int:
    top = 0xFFFF if fmt == "H" else 0xFFFFFFFF
    choice = rng.choice([0, 1, top, old + 1, old - 1, old ^ (1 << rng.randrange(16)),
                         rng.randrange(top + 1), old * 2, 1 << 20])
    return choice & top


def _zip_edit(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind, offset, fmt = rng.choice(ZIP_FIELDS)
    at = rng.choice(tc.records(data)[kind]) + offset
    old = int.from_bytes(data[at:at + (2 if fmt == "H" else 4)], "little")
    new = _field_value(rng, old, fmt)
    return f"zip {kind}+{offset}: {old} -> {new}", tc.patch(data, at, fmt, new)


def _rezip(data: bytes, pickle_bytes: bytes) -> bytes:
    """`data` (a torch zip) with its data.pkl replaced, every entry stored, CRCs right."""
    with zipfile.ZipFile(io.BytesIO(data)) as source:
        entries = [(info.filename, source.read(info)) for info in source.infolist()]
    out = io.BytesIO(b"")
    with zipfile.ZipFile(out, "w") as z:
        for name, content in entries:
            z.writestr(name, pickle_bytes if name.endswith("/data.pkl") else content)
    return out.getvalue()


def _pickle_edit(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        body = bytearray(z.read(name))
    at = rng.randrange(len(body))
    how = rng.choice(["flip", "delete", "insert", "set"])
    if how == "flip":
        body[at] ^= 1 << rng.randrange(8)
    elif how == "delete":
        del body[at]
    elif how == "insert":
        body.insert(at, rng.randrange(256))
    else:
        body[at] = rng.choice(b"()tlduesabRQ0h(]}NK\x85\x86\x87\x88\x89")
    return f"pickle {how} at {at}", _rezip(data, bytes(body))


def mutations(data: bytes, seed: int):
    """(description, mutated bytes) pairs: 150 bit flips, 50 deletions, 50 truncations, 120
    zip field edits and 120 pickle edits with the zip rebuilt."""
    rng = random.Random(seed)
    for _ in range(150):
        at, bit = rng.randrange(len(data)), rng.randrange(8)
        yield f"flip bit {bit} of byte {at}", data[:at] + bytes([data[at] ^ 1 << bit]) + \
            data[at + 1:]
    for _ in range(50):
        at = rng.randrange(len(data))
        yield f"delete byte {at}", data[:at] + data[at + 1:]
    for _ in range(50):
        at = rng.randrange(len(data))
        yield f"truncate to {at}", data[:at]
    for _ in range(120):
        yield _zip_edit(data, rng)
    for _ in range(120):
        yield _pickle_edit(data, rng)


def _outcome(path: Path, original: dict) -> str:
    import jax

    from sigma_jax.convert import CheckpointError, from_official
    from sigma_jax.torch_errors import MAX_MESSAGE

    try:
        _, params = from_official(path)
    except CheckpointError as error:
        message = str(error)
        ok = message.isprintable() and 0 < len(message) <= MAX_MESSAGE
        return "refused" if ok else f"bad message {message[:200]!r}"
    except Exception as error:  # what the reader must never let out
        return f"escaped {type(error).__name__}: {str(error)[:200]}"
    if jax.tree.structure(params) != jax.tree.structure(original):
        return "loaded another tree"
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(original), strict=True))
    return "loaded the original" if same else "loaded other values"


def main(seed: int) -> None:
    from sigma_jax.convert import from_official

    _, original = from_official(FIXTURE)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts, bad = collections.Counter(), []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mutant.pt"
        for description, data in mutations(FIXTURE.read_bytes(), seed):
            path.write_bytes(data)
            outcome = _outcome(path, original)
            counts[outcome.split(" ")[0]] += 1
            if outcome not in ("refused", "loaded the original"):
                bad.append(f"{description}: {outcome}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"counts": counts, "bad": bad, "base_kib": base, "peak_kib": peak}))


def test_mutated_checkpoints_load_unchanged_or_fail_in_one_line():
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = subprocess_env(PYTHONPATH=os.pathsep.join(paths))
    out = subprocess.run([sys.executable, __file__, str(SEED)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["bad"] == [], report["bad"][:20]
    assert sum(report["counts"].values()) == 490
    assert report["counts"]["refused"] > 200 and report["counts"]["loaded"] > 20, report
    assert report["peak_kib"] - report["base_kib"] < 64 * 1024, report


if __name__ == "__main__":
    main(int(sys.argv[1]))
