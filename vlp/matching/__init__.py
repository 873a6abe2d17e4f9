"""Image-text matching mechanisms under one protocol: similarities (`similarities`),
losses on score matrices (`losses`) and chunked, sharded scoring (`score_matrix`)."""
