r"""Prints the demo's results as one table (pretraining and each fine-tuning).

  python -m vlp.tools.demo_table workdir/demo

Reads WORKDIR/eval.json (pretraining) and the fine-tuning evaluations that
`make demo` writes under WORKDIR/ft_retrieval, ft_vqa and ft_grounding.
"""

from __future__ import annotations

import json
import os
import sys

_ROWS = (
    ("pretrain (zero-shot ITM)", "eval.json",
     ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mlm_acc", "itm_acc")),
    ("retrieval fine-tuned", "ft_retrieval/eval_test.json",
     ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")),
    ("VQA fine-tuned", "ft_vqa/eval_val.json", ("vqa_acc", "vqa_acc_majority")),
    ("grounding fine-tuned", "ft_grounding/eval_val.json",
     ("grounding_acc", "grounding_chance")),
)
# What each bar is measured against (R@1 chance: 1 of N images, N = 100 in the demo).
_NOTE = ("baselines: retrieval R@1 chance = 100/N images; vqa_acc_majority = one answer, "
         "the most common, for every question; grounding_chance = a random region")


def table(workdir: str) -> str:
  lines = [f"{'stage':28s} metric values (percent unless *_acc of pretraining)"]
  for name, rel, keys in _ROWS:
    path = os.path.join(workdir, rel)
    if not os.path.exists(path):
      lines.append(f"{name:28s} missing ({path})")
      continue
    with open(path) as f:
      ev = json.load(f)
    lines.append(f"{name:28s} " + "  ".join(
        f"{k}={ev[k]:.3g}" for k in keys if isinstance(ev.get(k), (int, float))))
  lines.append(_NOTE)
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m vlp.tools.demo_table WORKDIR")
  print(table(sys.argv[1]))
