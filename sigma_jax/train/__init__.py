"""Training σ-GPT: `step` holds the pure pieces (loss, optimiser, state, the one compiled train
step, evaluation), `workdir` the checks of a run's directory before it starts, `loop` the
training loop around them (`train`)."""

from sigma_jax.config import TrainConfig
from sigma_jax.train.loop import SaveError, check_batch_fits, check_task, train, val_batches
from sigma_jax.train.step import (
    EVAL_STREAM,
    TrainState,
    checked_batch,
    decay_mask,
    eval_losses,
    evaluate,
    init_state,
    learning_rate,
    loss_and_grads,
    loss_fn,
    make_optimizer,
    make_train_step,
    place_state,
    state_shardings,
    step_orders,
    train_step,
)
from sigma_jax.train.workdir import (
    check_workdir,
    check_workdir_path,
    configs_dict,
    make_workdir,
)

__all__ = [
    "EVAL_STREAM", "SaveError", "TrainConfig", "TrainState", "check_batch_fits", "check_task",
    "checked_batch", "check_workdir", "check_workdir_path", "configs_dict", "decay_mask",
    "eval_losses", "evaluate", "init_state", "learning_rate", "loss_and_grads", "loss_fn",
    "make_optimizer", "make_train_step", "make_workdir", "place_state", "state_shardings",
    "step_orders", "train", "train_step", "val_batches",
]
