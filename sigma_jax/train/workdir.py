"""A training workdir before a run starts in it: the path, the kinds of its files, and the run
it already holds (the model, and the optimizer state of its checkpoints) against new configs.
Everything here reads only; `make_workdir` creates the directory."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax

from sigma_jax import metrics_log
from sigma_jax.checkpoint import CHECKPOINT_DIR, stored_configs
from sigma_jax.config import ModelConfig, TrainConfig
from sigma_jax.model import init_params
from sigma_jax.train.step import make_optimizer

CONFIG_FILE = "config.json"


def configs_dict(model_cfg: ModelConfig, train_cfg: TrainConfig) -> dict:
    """Both configs as JSON-ready dicts: {"model": {...}, "train": {...}}."""
    return {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(train_cfg)}


def check_workdir_path(workdir) -> None:
    """ValueError (one line) unless `workdir` is a directory this process may write, or a path
    that can be created: not an existing non-directory, no file among its parents, no parent
    that is not writable. Reads only."""
    path = Path(workdir)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise ValueError(f"workdir {path} exists and is not a directory; use a new --workdir")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"workdir {path} is not writable; use a new --workdir")
        return
    parent = path.absolute().parent
    while not (parent.exists() or parent.is_symlink()):
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"workdir {path} cannot be created: {parent} is not a directory; use a "
                         "new --workdir")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"workdir {path} cannot be created: {parent} is not writable; use a new "
                         "--workdir")


def make_workdir(workdir) -> None:
    """Create `workdir` (and its parents) if absent; ValueError (one line) naming it if that
    fails (e.g. a path on a file system that takes no new directories)."""
    try:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"workdir {workdir} cannot be created ({error.strerror or error}); use "
                         "a new --workdir") from None


def _read_config_file(path: Path) -> dict:
    """config.json of a workdir: a JSON object whose "model" and "train" are objects. ValueError
    (one line, naming the file) for anything else."""
    fix = "move it away (the next run writes it again) or use a new --workdir"
    if not path.is_file():
        raise ValueError(f"{path} is not a file; {fix}")
    try:
        old = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({error.strerror or error}); {fix}") from None
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = "not UTF-8" if isinstance(error, UnicodeDecodeError) else "not JSON"
        raise ValueError(f"{path} is {reason}; {fix}") from None
    if not (isinstance(old, dict) and isinstance(old.get("model"), dict)
            and isinstance(old.get("train"), dict)):
        raise ValueError(f"{path} does not hold a run's configs (an object with \"model\" and "
                         f"\"train\" objects); {fix}")
    return old


def _optimizer_layout(model_cfg: ModelConfig, train_cfg: TrainConfig):
    """The tree structure, shapes and dtypes of the optimizer state (what a checkpoint holds)."""
    params = jax.eval_shape(init_params, model_cfg, jax.random.key(0))
    state = jax.eval_shape(make_optimizer(train_cfg).init, params)
    return jax.tree.structure(state), [(x.shape, x.dtype) for x in jax.tree.leaves(state)]


def _check_optimizer(workdir, step: int, saved: dict, model_cfg: ModelConfig,
                     train_cfg: TrainConfig) -> None:
    """ValueError unless `train_cfg` gives the optimizer state of the checkpoint saved with the
    train settings `saved` (a dict; a dict that no longer builds a TrainConfig is not checked)."""
    try:
        old_cfg = TrainConfig(**saved)
    except (TypeError, ValueError):
        return
    old = _optimizer_layout(model_cfg, old_cfg)
    if _optimizer_layout(model_cfg, train_cfg) == old:
        return
    changed = [k for k in dataclasses.asdict(train_cfg) if saved.get(k) != getattr(train_cfg, k)]
    causes = []
    for name in changed:
        try:
            alone = old_cfg.replace(**{name: getattr(train_cfg, name)})
        except ValueError:
            continue
        if _optimizer_layout(model_cfg, alone) != old:
            causes.append(name)
    causes = causes or changed
    was = " ".join(f"{k}={saved.get(k)}" for k in causes)
    now = ", ".join(f"{k}={getattr(train_cfg, k)}" for k in causes)
    raise ValueError(f"workdir {workdir} holds checkpoints (step {step}) whose optimizer state "
                     f"was made with {was}, and {now} gives a different one; resume with the "
                     f"run's settings (--set {was.replace(' ', ' --set ')}) or use a new "
                     "--workdir")


def check_workdir(workdir, model_cfg: ModelConfig, train_cfg: TrainConfig) -> list[str]:
    """A workdir holds one model. Reads only; raises ValueError (one line) unless the run can go
    on in `workdir` with these configs:

    - the path (`check_workdir_path`), and the types of its files: config.json and metrics.jsonl
      must be files, checkpoints/ a directory;
    - config.json, if present, must be a JSON object with "model" and "train" objects;
    - the model must be the run's: the config stored in the newest checkpoint whose config reads
      (`checkpoint.stored_configs`), or config.json when there is no such checkpoint;
    - with a checkpoint, the train settings must give the optimizer state it holds (e.g.
      grad_clip 0 drops the clipping state that grad_clip > 0 saved).

    Returns the names of the train fields that changed since the last run (config.json, else the
    checkpoint's config; possibly none).
    """
    check_workdir_path(workdir)
    workdir = Path(workdir)
    if not workdir.exists():
        return []
    for name, want_dir in ((CONFIG_FILE, False), (metrics_log.METRICS_FILE, False),
                           (CHECKPOINT_DIR, True)):
        path = workdir / name
        if (path.exists() or path.is_symlink()) and path.is_dir() != want_dir:
            kind = "a directory" if want_dir else "a file"
            raise ValueError(f"{path} is not {kind}; move it away or use a new --workdir")
    path = workdir / CONFIG_FILE
    recorded = _read_config_file(path) if path.exists() else None
    stored = stored_configs(workdir)
    new = configs_dict(model_cfg, train_cfg)
    if stored is not None and isinstance(stored[1].get("model"), dict):
        step, saved = stored
        source = f"checkpoint {step}"
    elif recorded is not None:
        step, saved, source = None, recorded, str(path)
    else:
        return []
    if saved["model"] != new["model"]:
        changed = sorted(k for k in new["model"] if saved["model"].get(k) != new["model"][k])
        raise ValueError(f"workdir {workdir} holds a run of a different model ({', '.join(changed)}"
                         f" differ; the run's model is in {source}); use a new --workdir or the "
                         "same model settings")
    if step is not None and isinstance(saved.get("train"), dict):
        _check_optimizer(workdir, step, saved["train"], model_cfg, train_cfg)
    old_train = (recorded or saved).get("train")
    old_train = old_train if isinstance(old_train, dict) else {}
    return sorted(k for k in new["train"] if old_train.get(k) != new["train"][k])
