"""Metrics as pure functions of scores and labels (numpy).

* `retrieval`: R@K / RSUM (Karpathy protocol), COCO 1K (5-fold) and 5K, and the
  two-stage protocol (dual-encoder top-k, cross-encoder re-ranking).
* `vqa`: the official VQA v2 accuracy (answer normalisation, leave-one-out
  scores, per answer / question type) and the official results file.
* `grounding`: referring-expression accuracy (IoU >= 0.5) per split and region setting.
"""
