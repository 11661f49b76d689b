"""Orbax steps published without all their items (seen when an async save is SIGKILLed) are never resumed from."""

import shutil

import numpy as np

from jaxcl.config import CheckpointConfig
from jaxcl.train.checkpoint import Checkpointer


def test_a_step_missing_an_item_is_dropped_and_the_previous_one_restores(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3, async_save=False))
    for step in (1, 2, 3):
        ckpt.save(step, {"w": np.full(4, step, np.float32)}, {"step": step})
    ckpt.close()
    shutil.rmtree(tmp_path / "3" / "meta")            # what the killed async writer left
    reopened = Checkpointer(tmp_path, CheckpointConfig(keep=3, async_save=False))
    assert reopened.all_steps() == [1, 2] and reopened.latest_step() == 2
    assert "incomplete" in caplog.text and not (tmp_path / "3").exists()
    assert reopened.restore_meta(2) == {"step": 2}
    reopened.save(3, {"w": np.full(4, 3, np.float32)}, {"step": 3})      # and saving goes on
    reopened.wait()
    assert reopened.latest_step() == 3 and reopened.restore_meta(3) == {"step": 3}
    reopened.close()
