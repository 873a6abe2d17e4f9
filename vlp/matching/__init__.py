"""Image-text matching mechanisms under one protocol (docs/matching.md).

* `pooling`: masked mean / max and L2 normalisation shared by the scorers;
* `registry`: the similarity and loss look-ups the model and job use (see its
  docstring: two built-ins until the full registries land);
* `encoders`: the dual-stream region and text encoders (transformer or bi-GRU);
* `blocks`: COMMA's alternating cross/self-attention scorer and SLAN's
  text-conditioned region filter (approximate);
* `graph`: HGAN-style graph reasoning and three-level similarity (approximate);
* `shapley`: Monte-Carlo Shapley values and LOUPE's interaction regulariser (approximate, toy scale);
* `proposals`: Ref-NMS query-aware proposal scoring and a fixed-size NMS;
* `model`: `MatchingModel`, the dual-stream model (or the UNITER backbone run on
  each modality alone) that scores with a pluggable similarity;
* `objective`: the matching loss on the in-batch score matrix.
"""
