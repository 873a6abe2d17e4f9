"""Fine-tuning keeps its best evaluated step: orbax keeps it beside the latest ones,
`best_step` finds it (also after a restart), and `vlp.evaluate` restores a chosen step."""

import jax.numpy as jnp
import pytest

from vlp import checkpoint as ckpt_lib
from vlp.train import loop


def test_best_step_picks_the_highest_metric_latest_on_ties():
  metrics = {1: {"acc": 0.2}, 2: {"acc": 0.7}, 3: None, 4: {"acc": 0.7}, 5: {"other": 9.0},
             6: {"acc": None}}
  assert ckpt_lib.best_step(metrics, "acc") == 4
  assert ckpt_lib.best_step({1: {"acc": 0.2}, 2: {"acc": 0.1}}, "acc") == 1
  assert ckpt_lib.best_step({1: None, 2: {"loss": 1.0}}, "acc") is None


def test_best_score_takes_only_finite_numbers():
  assert loop.best_score({"vqa_acc": 61.5, "step": 3}, "vqa_acc") == {"vqa_acc": 61.5}
  assert loop.best_score({"vqa_acc": None}, "vqa_acc") is None  # e.g. test_dev: no answers
  assert loop.best_score({"vqa_acc": float("nan")}, "vqa_acc") is None
  assert loop.best_score({"vqa_acc": 61.5}, "") is None


def test_the_best_step_survives_beside_the_latest_and_after_a_restart(tmp_path):
  # A validation metric that rises, then falls: step 2 is the best, the last two
  # steps (4, 5) are the latest; steps 1 and 3 go.
  directory = str(tmp_path / "checkpoints")
  ckpt = ckpt_lib.Checkpointer(directory, save_every=1, keep=2, async_save=False,
                               best_metric="acc")
  for step, acc in zip(range(1, 6), [0.1, 0.5, 0.3, 0.2, 0.1]):
    state = {"w": jnp.full((2,), float(step))}
    ckpt.save(step, state, {"step": step}, force=True, metrics={"acc": acc})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4, 5] and ckpt.best_step() == 2
  ckpt.close()
  again = ckpt_lib.Checkpointer(directory, save_every=1, keep=2, best_metric="acc")
  assert again.best_step() == 2
  restored, meta = again.restore(2, {"w": jnp.zeros((2,))})
  assert meta["step"] == 2 and restored["w"].tolist() == [2.0, 2.0]
  # The step `vlp.evaluate --step=...` restores.
  assert loop.checkpoint_step(again, None, "acc") == 5
  assert loop.checkpoint_step(again, "best", "acc") == 2
  assert loop.checkpoint_step(again, 4, "acc") == 4
  with pytest.raises(ValueError, match=r"--step=3: .* holds steps \[2, 4, 5\]"):
    loop.checkpoint_step(again, 3, "acc")
  again.close()
  plain = ckpt_lib.Checkpointer(directory, save_every=1, keep=2)
  with pytest.raises(ValueError,
                     match="--step=best: no checkpoint .* saved with config.best_metric=''"):
    loop.checkpoint_step(plain, "best", "")
  plain.close()
