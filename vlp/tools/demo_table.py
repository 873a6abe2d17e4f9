r"""Prints the demo's results as one table (pretraining and each fine-tuning).

  python -m vlp.tools.demo_table workdir/demo

Reads WORKDIR/eval.json (pretraining) and the fine-tuning evaluations that
`make demo` writes under WORKDIR/ft_retrieval, ft_vqa and ft_grounding; after
`make two-stage`, also the dual-encoder stage in WORKDIR/ft_retrieval_dual (the
full ranking, the dual encoder alone and two-stage retrieval at each k).
"""

from __future__ import annotations

import json
import sys

from etils import epath

_RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
_ROWS = (
    ("pretrain (zero-shot ITM)", "eval.json", _RECALLS + ("mlm_acc", "itm_acc")),
    ("retrieval fine-tuned", "ft_retrieval/eval_test.json", _RECALLS + ("rsum",)),
    ("VQA fine-tuned", "ft_vqa/eval_val.json", ("vqa_acc", "vqa_acc_majority")),
    ("grounding fine-tuned", "ft_grounding/eval_val.json",
     ("grounding_acc", "grounding_chance")),
)
# What each bar is measured against (R@1 chance: 1 of N images, N = 100 in the demo).
_NOTE = ("baselines: retrieval R@1 chance = 100/N images; vqa_acc_majority = one answer, "
         "the most common, for every question; grounding_chance = a random region")


_TWO_STAGE = "ft_retrieval_dual/eval_test.json"
_TWO_STAGE_KEYS = _RECALLS + ("rsum",)
_K_PREFIX = "two_stage_k"  # eval keys two_stage_k<k>, one per k (vlp/jobs/retrieval.py)


def two_stage_table(workdir: str) -> str | None:
  """Full ranking vs dual encoder vs two-stage, with pairs scored and seconds."""
  path = epath.Path(workdir) / _TWO_STAGE
  if not path.exists():
    return None
  ev = json.loads(path.read_text())
  total = ev["num_images"] * ev["num_captions"]
  lines = [f"two-stage retrieval, {ev['num_images']} images x {ev['num_captions']} captions "
           f"({total} pairs)",
           f"{'mode':16s} " + " ".join(f"{k:>7s}" for k in _TWO_STAGE_KEYS)
           + "  pairs scored      seconds"]
  ks = sorted(int(key[len(_K_PREFIX):]) for key in ev if key.startswith(_K_PREFIX))
  modes = [("full ranking", "full"), ("dual encoder", "dual")] + [
      (f"two-stage k={k}", f"{_K_PREFIX}{k}") for k in ks]
  for name, key in modes:
    r = ev[key]
    lines.append(f"{name:16s} " + " ".join(f"{r[k]:7.1f}" for k in _TWO_STAGE_KEYS)
                 + f"  {r['pairs_scored']:7d} ({100 * r['pairs_scored'] / total:4.1f} %)"
                 + f" {r['seconds']:7.1f}")
  return "\n".join(lines)


def table(workdir: str) -> str:
  lines = [f"{'stage':28s} metric values (percent unless *_acc of pretraining)"]
  for name, rel, keys in _ROWS:
    path = epath.Path(workdir) / rel
    if not path.exists():
      lines.append(f"{name:28s} missing ({path})")
      continue
    ev = json.loads(path.read_text())
    lines.append(f"{name:28s} " + "  ".join(
        f"{k}={ev[k]:.3g}" for k in keys if isinstance(ev.get(k), (int, float))))
  lines.append(_NOTE)
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m vlp.tools.demo_table WORKDIR")
  print(table(sys.argv[1]))
  extra = two_stage_table(sys.argv[1])
  if extra:
    print(extra)
