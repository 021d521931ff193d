"""`flights`: altitude profiles of real ADS-B flights (stand-in for the private vertical-rate set).

Data: `traffic`'s sample `quickstart.json.gz` (236 flights around Paris, 1 Hz rows with `timestamp`
in ms, `icao24`, `callsign`, `altitude` in ft, `onground`, ...), from `data_path`, else
`$SIGMA_JAX_DATA/flights/quickstart.json.gz`, else the cache. It is not downloaded: users get it
from the `traffic` package (`pip install --no-deps traffic==2.13`, file
`traffic/data/samples/collections/quickstart.json.gz`).

Cleaning (`clean_track`), per (icao24, callsign) sorted by time:
  1. keep airborne rows with an altitude in [0, 100,000] ft (drops missing values, negative and
     > 100,000 ft spikes, and on-ground rows, whose altitude is missing or garbage);
  2. drop isolated jumps: a point further than `SPIKE_FT` (1,000 ft) from the median of the kept
     points within 10 s of it (at least 2 of them); repeated (at most 5 passes) until none is left;
  3. split into flights where consecutive kept points are more than `GAP_S` (300 s) apart;
  4. within a flight, cut wherever the altitude changes by more than max(500 ft, 100 ft/s * dt)
     between consecutive points (beyond any airliner: such jumps start or end stuck or offset runs
     of readings, e.g. a constant 34,000 ft reported after landing) and keep the longest piece;
  5. keep flights of at least `MIN_POINTS` (60) points whose altitude is not one constant value
     (two such flights in quickstart repeat a stale reading for minutes before take-off; a
     genuinely level overflight would be dropped too, and none is in quickstart).
Each segment is linearly interpolated onto `seq_len` (default 256) evenly spaced times from its
first to its last point. Token = clip(round(ft / 100), 0, 449): flight levels, V = 450 (as the
published task). Split by flight: the (icao24, callsign) keys sorted by sha256, the first
round(val_fraction * keys) (10%) are val, so no flight has segments in both splits.
prompt_len defaults to seq_len // 4 (the known start of the profile).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np

from sigma_jax.checks import check_int
from sigma_jax.data import fetch
from sigma_jax.data.sources import ArraySource
from sigma_jax.data.task import (
    DataError,
    Task,
    check_fraction,
    check_options,
    data_check,
    token_row,
)

QUICKSTART = "flights/quickstart.json.gz"
QUICKSTART_SHA256 = (  # of the traffic==2.13 copy, for users checking theirs
    "0ef1a97f6b96c31a58e2d9cf58af01a90016eb97472f37718dcba3913c682403")
VOCAB_SIZE = 450
FT_PER_TOKEN = 100.0
MAX_FT = 100_000.0
SPIKE_FT = 1_000.0
SPIKE_WINDOW = 10  # neighbours on each side considered by the spike test ...
SPIKE_WINDOW_S = 10.0  # ... if within this many seconds
SPIKE_PASSES = 5
MAX_RATE_FT_S = 100.0  # 6,000 ft/min ...
MAX_STEP_FT = 500.0  # ... or 500 ft: larger changes between consecutive kept points are glitches
GAP_S = 300.0
MIN_POINTS = 60
CONTINUITY_JUMP = 10  # tokens (1,000 ft) between consecutive steps
MSE_ERROR_TOKENS2 = 50.0  # the published per-sample error threshold, in token^2
DEFAULT_SEQ_LEN = 256
OPTIONS = {"prompt_len": None, "val_fraction": 0.1}


def _isolated_jumps(t: np.ndarray, alt: np.ndarray) -> np.ndarray:
    """bool[n]: points further than SPIKE_FT from the median of the other points within
    SPIKE_WINDOW_S seconds (needs at least 2 such neighbours)."""
    w = SPIKE_WINDOW
    win_a = np.lib.stride_tricks.sliding_window_view(
        np.pad(alt, w, constant_values=np.nan), 2 * w + 1).copy()  # [n, 2w+1]
    win_t = np.lib.stride_tricks.sliding_window_view(
        np.pad(t, w, constant_values=np.inf), 2 * w + 1)  # [n, 2w+1]
    win_a[np.abs(win_t - t[:, None]) > SPIKE_WINDOW_S] = np.nan
    win_a[:, w] = np.nan  # the point itself
    win_a.sort(axis=1)  # NaNs last
    k = np.count_nonzero(np.isfinite(win_a), axis=1)  # [n]
    enough = k >= 2
    lo = np.take_along_axis(win_a, np.maximum(k - 1, 0)[:, None] // 2, axis=1)[:, 0]
    hi = np.take_along_axis(win_a, np.maximum(k, 1)[:, None] // 2, axis=1)[:, 0]
    med = 0.5 * (lo + hi)  # median of the finite neighbours
    return enough & (np.abs(alt - med) > SPIKE_FT)


def clean_track(t_s: np.ndarray, alt_ft: np.ndarray, onground: np.ndarray) -> list[tuple]:
    """Cleaned segments of one aircraft/callsign track.

    t_s: float[n] seconds, sorted, distinct; alt_ft: float[n] (NaN = missing); onground: bool[n].
    Returns a list of (t[m], alt[m]) float64 arrays, one per segment (see the module docstring).
    """
    keep = ~onground & np.isfinite(alt_ft) & (alt_ft >= 0) & (alt_ft <= MAX_FT)
    t, a = t_s[keep], alt_ft[keep]
    for _ in range(SPIKE_PASSES):
        bad = _isolated_jumps(t, a) if a.size else np.zeros(0, bool)
        if not bad.any():
            break
        t, a = t[~bad], a[~bad]
    segments = []
    for ft, fa in zip(*_split_where(t, a, np.diff(t) > GAP_S), strict=True):
        jumps = np.abs(np.diff(fa)) > np.maximum(MAX_STEP_FT, MAX_RATE_FT_S * np.diff(ft))
        pieces = list(zip(*_split_where(ft, fa, jumps), strict=True))
        best = max(pieces, key=lambda p: p[0].size)  # the first longest piece
        if best[0].size >= MIN_POINTS and best[1].max() > best[1].min():
            segments.append(best)
    return segments


def _split_where(t: np.ndarray, a: np.ndarray, cut_after: np.ndarray) -> tuple[list, list]:
    """Split t, a [n] between i and i+1 wherever cut_after[i] ([n-1])."""
    cuts = np.flatnonzero(cut_after) + 1
    return np.split(t, cuts), np.split(a, cuts)


def resample(t: np.ndarray, alt: np.ndarray, n: int) -> np.ndarray:
    """alt linearly interpolated at n evenly spaced times from t[0] to t[-1]: float[n]."""
    return np.interp(np.linspace(t[0], t[-1], n), t, alt)


def tokenize(alt_ft: np.ndarray) -> np.ndarray:
    """clip(round(ft / 100), 0, 449) as int32."""
    return np.clip(np.round(np.asarray(alt_ft) / FT_PER_TOKEN), 0, VOCAB_SIZE - 1).astype(np.int32)


@functools.lru_cache(maxsize=2)
def load_segments(path: str) -> dict[tuple[str, str], list[tuple]]:
    """{(icao24, callsign): cleaned segments} for a quickstart-style `.json.gz` file."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a gzip JSON list of ADS-B rows ({e})") from e
    if not isinstance(rows, list) or (rows and not isinstance(rows[0], dict)):
        raise DataError(f"{path} must hold a JSON list of row objects")
    try:
        keys = [(r["icao24"], r["callsign"] or "") for r in rows]
        t_s = np.array([r["timestamp"] for r in rows], dtype=np.float64) / 1000.0  # [R]
        alt = np.array([np.nan if r["altitude"] is None else r["altitude"] for r in rows],
                       dtype=np.float64)  # [R]
        ground = np.array([bool(r["onground"]) for r in rows])  # [R]
    except (KeyError, TypeError) as e:
        raise DataError(
            f"{path}: rows need timestamp, icao24, callsign, altitude, onground ({e})") from e
    names = sorted(set(keys))
    index = {k: i for i, k in enumerate(names)}
    key_id = np.array([index[k] for k in keys])  # [R]
    order = np.lexsort((t_s, key_id))  # by key, then time
    key_id, t_s, alt, ground = key_id[order], t_s[order], alt[order], ground[order]
    first = np.ones(len(order), bool)
    first[1:] = (key_id[1:] != key_id[:-1]) | (t_s[1:] != t_s[:-1])  # one row per timestamp
    key_id, t_s, alt, ground = key_id[first], t_s[first], alt[first], ground[first]
    bounds = np.flatnonzero(np.diff(key_id)) + 1
    out = {}
    for idx in np.split(np.arange(len(key_id)), bounds):
        if idx.size:
            out[names[key_id[idx[0]]]] = clean_track(t_s[idx], alt[idx], ground[idx])
    return out


def split_keys(keys, val_fraction: float) -> tuple[set, set]:
    """(train keys, val keys): keys sorted by sha256 of 'icao24/callsign'; first ones to val.
    val_fraction is a number in (0, 1), else DataError."""
    val_fraction = check_fraction("val_fraction", val_fraction)
    ordered = sorted(keys, key=lambda k: hashlib.sha256(f"{k[0]}/{k[1]}".encode()).hexdigest())
    n_val = max(1, round(val_fraction * len(ordered)))
    return set(ordered[n_val:]), set(ordered[:n_val])


def altitude_metrics(samples: np.ndarray, references: np.ndarray, prompt_len: int = 0
                     ) -> dict[str, float]:
    """Altitude metrics for token sequences samples, references: [B, N].

    altitude_mse_ft: mean over samples of the mean squared error in ft^2 over generated positions
      (index >= prompt_len); altitude_rmse_ft: its square root;
    mse_error_rate: fraction of samples whose mean squared error over generated positions is
      >= 50 token^2 (the published threshold, 500,000 ft^2);
    continuity_error_rate: fraction of samples with any |token[t+1] - token[t]| >= 10 over the
      whole sequence (a jump of 1,000 ft or more between consecutive steps).
    """
    s = np.asarray(samples, dtype=np.float64)  # [B, N]
    r = np.asarray(references, dtype=np.float64)  # [B, N]
    if s.shape != r.shape or s.ndim != 2 or s.shape[1] <= prompt_len:
        raise ValueError(f"need samples and references [B, N] with N > {prompt_len}; "
                         f"got {s.shape} and {r.shape}")
    mse_tok = ((s[:, prompt_len:] - r[:, prompt_len:]) ** 2).mean(axis=1)  # [B]
    mse_ft = float(mse_tok.mean() * FT_PER_TOKEN ** 2)
    jumps = (np.abs(np.diff(s, axis=1)) >= CONTINUITY_JUMP).any(axis=1)  # [B]
    return {
        "altitude_mse_ft": mse_ft,
        "altitude_rmse_ft": float(np.sqrt(mse_ft)),
        "mse_error_rate": float((mse_tok >= MSE_ERROR_TOKENS2).mean()),
        "continuity_error_rate": float(jumps.mean()),
    }


def decode(tokens) -> str:
    """Integer ids [N] -> altitudes in feet, space separated (token * 100)."""
    return " ".join(str(int(t) * 100) for t in token_row(tokens).tolist())


def examples(segments: dict, keys: set, seq_len: int) -> np.ndarray:
    """int32[n, seq_len]: the resampled, tokenised segments of `keys`, in sorted key order."""
    rows = [tokenize(resample(t, a, seq_len)) for k in sorted(keys) for t, a in segments[k]]
    return np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)


def build(seq_len=None, data_path=None, **options) -> Task:
    opts = check_options("flights", options, OPTIONS)
    n = data_check(check_int, "seq_len", DEFAULT_SEQ_LEN if seq_len is None else seq_len, 2)
    prompt_len = n // 4 if opts["prompt_len"] is None else opts["prompt_len"]
    prompt_len = data_check(check_int, "prompt_len", prompt_len, 0, n - 1)
    check_fraction("val_fraction", opts["val_fraction"])
    path = fetch.locate(QUICKSTART, explicit=data_path)
    segments = load_segments(str(Path(path).resolve()))
    train_keys, val_keys = split_keys(segments, opts["val_fraction"])
    return Task(
        name="flights",
        vocab_size=VOCAB_SIZE,
        seq_len=n,
        prompt_len=prompt_len,
        train=ArraySource(examples(segments, train_keys, n)),
        val=ArraySource(examples(segments, val_keys, n)),
        decode=decode,
        metrics=functools.partial(altitude_metrics, prompt_len=prompt_len),
    )
