"""Image-text matching mechanisms under one protocol (docs/matching.md).

Scoring functions: similarities (`similarities`; the approximate HGAN levels in
`similarity_hierarchical`), losses on score matrices (`losses`) and chunked,
sharded scoring (`score_matrix`). The matching model built on them:
* `encoders`: the dual-stream region and text encoders (transformer or bi-GRU);
* `blocks`: COMMA's alternating cross/self-attention scorer and SLAN's
  text-conditioned region filter (approximate);
* `graph`: HGAN-style graph reasoning (approximate);
* `shapley`: Monte-Carlo and exact Shapley values, LOUPE's regulariser (approximate, toy scale);
* `model`: `MatchingModel`, the dual-stream model (or the UNITER backbone run on
  each modality alone) that scores with a pluggable similarity or pair scorer;
* `objective`: the matching loss on the in-batch score matrix;
* `proposals`: Ref-NMS query-aware proposal scoring and a fixed-size NMS.
"""
