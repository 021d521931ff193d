"""Models shipped with the package: `load(name) -> (model_cfg, params, encode, decode)`.

A shipped model is one msgpack file under `sigma_jax/weights/` holding its ModelConfig fields, its
character vocabulary and its parameters (the plain nested dict of `init_params`), checked against
the sha256 recorded in `MODELS` before anything is decoded. `save` writes such a file from a
training run's parameters; `experiments/reference_model.py` ships the reference model with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import serialization

from sigma_jax.checks import short_repr
from sigma_jax.config import ModelConfig
from sigma_jax.data.text_char import CharVocab

FORMAT = "sigma_jax.pretrained/1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclasses.dataclass(frozen=True)
class ShippedModel:
    """file: name under WEIGHTS_DIR; sha256: hex digest of that file; description: one line."""

    file: str
    sha256: str
    description: str


MODELS: dict[str, ShippedModel] = {
    "shakespeare_char": ShippedModel(
        file="shakespeare_char.msgpack",
        sha256="66149e8011f72527c991f98293cfb4b3a26331198c20be775551df462af6ceac",
        description="random-order character model of tiny-shakespeare (4x128, block 256)",
    ),
}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(path, model_cfg: ModelConfig, params: dict, chars: str) -> str:
    """Write a shipped-model file (atomically: a crash leaves any old file intact); returns its
    sha256. chars: the vocabulary, token id i = chars[i]."""
    if len(chars) != model_cfg.vocab_size:
        raise ValueError(f"the vocabulary has {len(chars)} characters but the model has "
                         f"vocab_size {model_cfg.vocab_size}")
    if list(chars) != sorted(set(chars)):
        raise ValueError("chars must be the sorted, distinct characters of the vocabulary")
    record = {
        "format": FORMAT,
        "model_config": json.dumps(dataclasses.asdict(model_cfg), sort_keys=True),
        "chars": chars,
        "params": jax.tree.map(np.asarray, params),
    }
    data = serialization.msgpack_serialize(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def read(path, sha256: str | None = None) -> tuple[ModelConfig, dict, str]:
    """(model_cfg, params as numpy arrays, chars) of a shipped-model file. With `sha256`, a file
    whose digest differs raises ValueError before it is decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} is corrupt or altered: its sha256 is not the recorded "
                         f"{sha256[:12]}...; reinstall the package")
    try:
        record = serialization.msgpack_restore(data)
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        model_cfg = ModelConfig(**json.loads(record["model_config"]))
        return model_cfg, record["params"], record["chars"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a sigma_jax weights file ({e})") from e


def load(name: str) -> tuple[ModelConfig, dict, Callable[[str], np.ndarray],
                             Callable[..., str]]:
    """The shipped model `name`: (model_cfg, params, encode, decode).

    params is the plain nested dict of jax arrays that every sampler and `log_prob` take;
    encode maps a string to int32 [len] ids (a character outside the vocabulary raises), decode
    maps ids back to a string. A name that is not a shipped one (or not a string): ValueError
    listing the shipped ones; a file whose sha256 differs from the recorded one: ValueError,
    nothing loaded.
    """
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"no shipped model {short_repr(name)}; shipped: "
                         f"{', '.join(sorted(MODELS))}")
    entry = MODELS[name]
    model_cfg, params, chars = read(WEIGHTS_DIR / entry.file, entry.sha256)
    vocab = CharVocab(chars)
    return model_cfg, jax.tree.map(jax.numpy.asarray, params), vocab.encode, vocab.decode
