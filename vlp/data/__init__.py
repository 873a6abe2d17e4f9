"""Data side of vlp: tfds builders, grain pipelines and host-side masking.

Knows no model and no training loop. Entry points:

* :func:`vlp.data.scenes.prepare_scenes` / :func:`vlp.data.scenes.tokenizer_path`
* :class:`vlp.data.tokenizer.Tokenizer` (sentencepiece), :class:`vlp.data.tokenizer.WordPieceTokenizer`
  (BERT vocab.txt), :func:`vlp.data.tokenizer.open_tokenizer`
* :func:`vlp.data.pipeline.make_train_iterator`, :func:`vlp.data.pipeline.make_mixture_iterator`
  (several datasets and splits by weight, :mod:`vlp.data.mixture`),
  :func:`vlp.data.pipeline.make_eval_dataset`, :func:`vlp.data.pipeline.load_retrieval_gallery`
  (image-caption pairs)
* :func:`vlp.data.prepared.open_prepared` (the prepared build of a dataset name)
* :func:`vlp.data.downstream.make_task_train_iterator`,
  :func:`vlp.data.downstream.make_task_eval_dataset` (VQA, referring expressions)
* :mod:`vlp.data.masking` (``make_mlm_batch``, ``make_mrm_batch``, ``make_itm_batch``)
"""
