"""VQA fine-tuning job: answer head, soft-score BCE, official accuracy.

Evaluation writes the predictions of `config.eval_split` in the official results
format (`WORKDIR/vqa_results_<split>.json`, a list of {"question_id", "answer"})
and scores them with `vlp.evaluators.vqa.vqa_accuracy`:
* `vqa_v2`: against annotations rebuilt from the question records (the raw 10
  human answers, answer_type and question_type the builder copied from the
  official annotation file), so the score is the official one over the built
  questions; `test` / `test_dev` have no answers: the results file is written
  (for the evaluation server) and `vqa_acc` is None, with a note saying so;
* `vlp_scenes`: against the official-format question and annotation files
  stored with the data.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from vlp import storage
from vlp.data import downstream, scenes
from vlp.evaluators import vqa as vqa_eval
from vlp.jobs import base, data_setup, eval_batches
from vlp.jobs.base import EvalContext, Feed, Job
from vlp.jobs.task_data import TaskData
from vlp.models.downstream import UniterForVqa
from vlp.tasks import make_loss_fn
from vlp.train import flops


def make_vqa_job(config: ml_collections.ConfigDict, feed: Feed) -> Job:
  data = TaskData(config, feed, "vqa")
  model_cfg = data_setup.model_config_for(config, data.tokenizer)
  make_model = functools.partial(UniterForVqa, model_cfg, num_answers=len(data.answers))
  return Job(
      data=data, make_model=make_model,
      loss_fns={"vqa": make_loss_fn("vqa")}, batch_kinds={"vqa": "vqa"},
      evaluate=functools.partial(evaluate_vqa, data=data),
      init_params=base.init_params_fn(config, model_cfg),
      eval_file=f"eval_{config.eval_split}.json",
      model_info=base.model_info(UniterForVqa, model_cfg, data.tokenizer,
                                   num_answers=len(data.answers)),
      lr_multipliers={"vqa_output": config.head_lr_mult} if config.head_lr_mult != 1 else {},
      flops_per_example={"vqa": flops.encoder_train_flops_per_example(model_cfg, config)})


def predict(model, batch):
  return jnp.argmax(model.encode(batch)["vqa_logits"], axis=-1)


def evaluate_vqa(params, ctx: EvalContext, *, data: TaskData) -> dict:
  t0 = time.perf_counter()
  split = ctx.config.eval_split
  rows = eval_batches.eval_rows(ctx)
  ds = data.eval_dataset(split, rows)
  fn = eval_batches.forward_fn(ctx, predict)
  qids, labels = [], []
  for batch in ds:
    pred = eval_batches.run_forward(fn, params, batch, ctx)
    keep = rows.gather(batch["example_mask"])
    qids.append(rows.gather(batch["question_id"])[keep])
    labels.append(np.asarray(pred)[keep])
  qids, labels = np.concatenate(qids), np.concatenate(labels)
  answers = [data.answers[i] for i in labels]
  path = storage.join(ctx.workdir, f"vqa_results_{split}.json")
  if jax.process_index() == 0:
    vqa_eval.write_results(path, qids, answers)
  out = {"step": ctx.step, "split": split, "results_file": path}
  results = [{"question_id": int(q), "answer": a} for q, a in zip(qids, answers)]
  if data.layout == "images":
    q_path, a_path = scenes.vqa_json_paths(data.builder, split)
    annotations = _load(a_path)
    report = vqa_eval.vqa_accuracy(results, annotations, _load(q_path))
    out["annotations"] = a_path
  else:
    annotations = downstream.vqa_annotations(ds.split_index)
    if annotations is None:
      out.update(vqa_acc=None, num_questions=len(results),
                 note=f"split {split!r} has no answers: only the results file was written "
                      "(score it with the VQA evaluation server)",
                 eval_seconds=time.perf_counter() - t0)
      return out
    report = vqa_eval.vqa_accuracy(results, annotations)
    out["annotations"] = (f"answers stored in the {split!r} records of "
                          f"{data.builder.info.full_name}")
  # The bar to beat: one answer, the split's most common, for every question.
  out["vqa_majority_answer"], out["vqa_acc_majority"] = vqa_eval.majority_baseline(annotations)
  out.update(vqa_acc=report["overall"], vqa_acc_per_answer_type=report["per_answer_type"],
             vqa_acc_per_question_type=report["per_question_type"],
             num_questions=report["num_questions"], eval_seconds=time.perf_counter() - t0)
  return out


def _load(path):
  return json.loads(epath.Path(path).read_text())
