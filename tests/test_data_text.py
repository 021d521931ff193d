"""Text tasks: tiny-shakespeare checksum and vocabulary, windows, GPT-2 BPE count, file lookup."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from sigma_jax.data import DataError, fetch, load_task, text_char

DATA = Path(os.environ.setdefault("SIGMA_JAX_DATA", "/work/shared/data"))
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
RANKS = DATA / "gpt2" / "gpt2.tiktoken"
needs_text = pytest.mark.skipif(
    not SHAKESPEARE.is_file(), reason=f"tiny-shakespeare not at {SHAKESPEARE} (set SIGMA_JAX_DATA)")
needs_ranks = pytest.mark.skipif(not (SHAKESPEARE.is_file() and RANKS.is_file()),
                                 reason=f"tiny-shakespeare or GPT-2 ranks missing under {DATA}")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SIGMA_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "sigma_jax_cache"))


@needs_text
def test_tiny_shakespeare_checksum_vocab_and_split():
    assert hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest() == text_char.TINY_SHAKESPEARE_SHA256
    task = load_task("shakespeare_char")
    assert (task.vocab_size, task.seq_len, task.prompt_len) == (65, 256, 0)
    n = 1_115_394
    cut = int(n * 0.9)
    assert len(task.train) == cut - 256 + 1  # every start offset
    assert len(task.val) == (n - cut - 256) // 256 + 1  # non-overlapping windows
    text = SHAKESPEARE.read_text()
    assert task.decode(task.train[0]) == text[:256]
    assert task.decode(task.train[5]) == text[5:261]
    assert task.decode(task.val[1]) == text[cut + 256:cut + 512]
    assert task.decode(task.train[len(task.train) - 1]) == text[cut - 256:cut]
    x = task.train[123]
    assert x.dtype == np.int32 and x.min() >= 0 and x.max() < 65
    assert np.array_equal(task.encode(task.decode(x)), x)


@needs_text
def test_char_encode_rejects_unknown_characters():
    task = load_task("shakespeare_char", seq_len=32)
    assert task.seq_len == 32 and task.train[0].shape == (32,)
    with pytest.raises(DataError, match="vocabulary") as e:
        task.encode("hello ~ world")
    assert "\n" not in str(e.value) and "'~'" in str(e.value)


def test_char_task_from_any_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcabcabcabcabcabcabcabcabcabcxyz", encoding="utf-8")
    task = load_task("shakespeare_char", data_path=str(path), seq_len=3)
    assert task.vocab_size == 6 and task.decode(task.train[1]) == "bca"
    with pytest.raises(DataError, match="seq_len"):
        load_task("shakespeare_char", data_path=str(path), seq_len=10)


@needs_ranks
def test_bpe_token_count_and_cache():
    task = load_task("text_bpe")
    assert (task.vocab_size, task.seq_len, task.prompt_len) == (50257, 1024, 0)
    train_tokens = len(task.train) + 1024 - 1
    val_tokens = task.val.tokens.size
    assert (train_tokens, val_tokens) == (301_966, 36_059)
    assert train_tokens + val_tokens == 338_025
    bins = sorted((fetch.cache_dir() / "bpe").glob("*.bin"))
    assert len(bins) == 2 and sum(p.stat().st_size for p in bins) == 2 * 338_025
    x = task.train[0]
    assert x.dtype == np.int32 and x.max() < 50257
    assert task.decode(x).startswith("First Citizen:\nBefore we proceed any further")
    assert np.array_equal(task.encode("Hello world"), [15496, 995])  # GPT-2 ids
    again = load_task("text_bpe", seq_len=64)  # served from the cache
    assert np.array_equal(again.train[0], x[:64])


def test_missing_file_offline_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMA_JAX_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("SIGMA_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text_char, "TINY_SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(DataError) as e:
        load_task("shakespeare_char")
    msg = str(e.value)
    assert "\n" not in msg and "SIGMA_JAX_DATA" in msg and "data_path" in msg
    assert not (tmp_path / "cache" / "tinyshakespeare" / "input.txt").exists()
    with pytest.raises(DataError, match="not a file"):
        load_task("shakespeare_char", data_path=str(tmp_path / "nope.txt"))
    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    with pytest.raises(DataError, match="bpe_path"):
        load_task("text_bpe", data_path=str(text), bpe_path=str(tmp_path / "nope"))


@pytest.mark.parametrize("bpe_path, message", [
    (5, "bpe_path must be a file path (a string); got 5"),
    (b"ranks", "bpe_path must be a file path (a string); got b'ranks'"),
    ("{tmp}/nope", "bpe_path='{tmp}/nope' is not a file; pass an existing file"),
    ("{tmp}", "bpe_path='{tmp}' is a folder, not a file; pass an existing file"),
    ("{tmp}/t.txt", "{tmp}/t.txt is not a tiktoken ranks file (lines of '<base64 token> <rank>'); "
                    "pass the GPT-2 gpt2.tiktoken file as bpe_path"),
])
def test_bad_bpe_path_is_one_line_error(tmp_path, bpe_path, message):
    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    if isinstance(bpe_path, str):
        bpe_path = bpe_path.format(tmp=tmp_path)
    with pytest.raises(DataError) as e:
        load_task("text_bpe", data_path=str(text), bpe_path=bpe_path)
    assert str(e.value) == message.format(tmp=tmp_path)


@needs_ranks
def test_bpe_path_as_a_path_object_still_works(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    task = load_task("text_bpe", seq_len=8, data_path=text, bpe_path=RANKS)
    assert task.vocab_size == 50257 and task.decode(task.encode("some text")) == "some text"


@needs_text
def test_download_is_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMA_JAX_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("SIGMA_JAX_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not shakespeare")
    monkeypatch.setattr(text_char, "TINY_SHAKESPEARE_URL", wrong.as_uri())
    with pytest.raises(DataError, match="sha256") as e:
        load_task("shakespeare_char")
    assert "\n" not in str(e.value)
    assert not cached.exists() and list(cached.parent.iterdir()) == []  # nothing kept
    good = tmp_path / "good.txt"
    shutil.copy(SHAKESPEARE, good)
    monkeypatch.setattr(text_char, "TINY_SHAKESPEARE_URL", good.as_uri())
    assert load_task("shakespeare_char").vocab_size == 65
    assert fetch.sha256_file(cached) == text_char.TINY_SHAKESPEARE_SHA256


@pytest.mark.parametrize("options, message", [
    ({"val_fraction": "0.1"}, "val_fraction must be a finite number in (0, 1); got '0.1'"),
    ({"val_fraction": 1.0}, "val_fraction must be a finite number in (0, 1); got 1.0"),
    ({"seq_len": True}, "seq_len must be an integer >= 1; got True"),
    ({"seq_len": 2.0}, "seq_len must be an integer >= 1; got 2.0"),
])
def test_char_task_bad_options_raise_one_line(tmp_path, options, message):
    path = tmp_path / "t.txt"
    path.write_text("abcabcabcabcabcabcabcabcabcabcxyz", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_task("shakespeare_char", data_path=str(path), **options)
    assert message in str(e.value) and "\n" not in str(e.value)
    if "val_fraction" in options:  # checked before any file is read
        with pytest.raises(DataError, match="val_fraction"):
            load_task("text_bpe", data_path=str(tmp_path / "missing.txt"), **options)


def test_char_encode_and_decode_check_their_argument(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcabcabcabcabcabcabcabcabcabcxyz", encoding="utf-8")
    task = load_task("shakespeare_char", data_path=str(path), seq_len=np.int64(3))
    assert task.seq_len == 3 and task.decode([]) == "" and task.decode([0, 5]) == "az"
    with pytest.raises(DataError, match=r"^text must be a string; got 5$"):
        task.encode(5)
    with pytest.raises(DataError, match=r"^tokens must hold integer token ids; got dtype float64$"):
        task.decode(np.array([1.0, 2.0]))
    with pytest.raises(DataError, match=r"^tokens must be one sequence \[N\]; got shape \(2, 3\)$"):
        task.decode(np.zeros((2, 3), np.int32))
