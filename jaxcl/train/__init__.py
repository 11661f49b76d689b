"""Training: TrainState, AdamW schedule, CLM/MLM losses, jitted sharded steps."""

from jaxcl.train.losses import causal_lm_nll, mask_tokens, masked_lm_nll
from jaxcl.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from jaxcl.train.state import TrainState, create_train_state, state_shardings
from jaxcl.train.step import make_eval_step, make_loss_fn, make_train_step

__all__ = ["TrainState", "create_train_state", "state_shardings", "make_optimizer", "learning_rate_schedule",
           "weight_decay_mask", "causal_lm_nll", "masked_lm_nll", "mask_tokens", "make_loss_fn", "make_train_step",
           "make_eval_step"]
