r"""Every matching mechanism under one protocol: same data, budget and seed, one table.

  python -m vlp.tools.matching_protocol --config=configs/matching.py \
      --config.data_dir=workdir/data --workdir=workdir/matching_protocol
  # One dataset prepared with `python -m vlp.data.prepare` (base widths, 2048-d features):
  python -m vlp.tools.matching_protocol --config=configs/matching.py:size=base,data=coco_karpathy \
      --config.data_dir=/data/tfds --workdir=workdir/matching_coco

For each mechanism of `MECHANISMS` (or `--mechanisms=a,b`) the config's
`matching.*` keys are overridden, the model is trained from scratch for
`config.total_steps` steps with `config.seed` (`vlp.train.loop`, in
WORKDIR/<mechanism>; one finished by an earlier run there is read back), then
evaluated on the test gallery by the matching job:
full ranking, and for mechanisms that encode each side apart the dual-encoder search and
two-stage re-ranking (vlp/jobs/matching.py). Training seconds are the wall time
of the training run (compilation included), evaluation seconds that of each
mode (encoding the gallery included).

Writes WORKDIR/matching_protocol.json (the rows, the budget, chance levels),
WORKDIR/matching_protocol.md (the rows as a Markdown table) and
WORKDIR/matching_protocol.png (RSUM per mechanism and mode; RSUM against pairs
scored), and prints the table.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import time

from absl import flags
from etils import epath

from vlp import entry, storage

_CONFIG = entry.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", "workdir/matching_protocol",
                               "One sub-directory per mechanism, the table and the chart.")
_MECHANISMS = flags.DEFINE_list("mechanisms", [], "Mechanisms to run (default: all).")

# name -> (what it is, `matching.*` overrides; a callable value is computed from the
# config). Losses: InfoNCE unless the mechanism's paper fixes another (VSE++, DVSA).
NCE = dict(loss="info_nce", loss_args="temperature=0.05")


def third_of_training(config) -> int:
  """VSE++'s warm-up length: from random init the hardest negative alone collapses
  (R@1 at chance on vlp_scenes); a third of the steps on the summed hinge first
  (VSE-infinity's recipe, with its length scaled to the budget) avoids that."""
  return int(config.total_steps) // 3


MECHANISMS = {
    "vsepp": ("VSE++: global cosine, hardest-negative hinge (summed hinge for 1/3 first)",
              dict(similarity="cosine_global", loss="hinge_hardest", loss_args="margin=0.2",
                   mean_warmup_steps=third_of_training)),
    "global_nce": ("global cosine, InfoNCE", dict(similarity="cosine_global", **NCE)),
    "dvsa": ("DVSA: sum over words of the best region, summed hinge (margin 1)",
             dict(similarity="max_sum", loss="hinge_sum", loss_args="margin=1.0")),
    "scan_t2i": ("SCAN t-i: word-to-region attention, average pooling",
                 dict(similarity="scan_t2i", **NCE)),
    "scan_i2t": ("SCAN i-t: region-to-word attention, LSE pooling",
                 dict(similarity="scan_i2t", similarity_args="agg=lse", **NCE)),
    "token_flow": ("TokenFlow: flow-weighted token similarity",
                   dict(similarity="token_flow", **NCE)),
    "locov": ("LocOv: localized word-region similarity",
              dict(similarity="aligned_local", **NCE)),
    "bigru": ("SCAN's bi-GRU text encoder, global cosine",
              dict(text_encoder="bigru", similarity="cosine_global", **NCE)),
    "cookie": ("COOKIE: one transformer layer shared by both streams",
               dict(shared_layers=1, similarity="cosine_global", **NCE)),
    "hgan": ("HGAN-style (approximate): graph reasoning, three-level similarity",
             dict(graph_layers=1, similarity="hgan_3level", **NCE)),
    "slan": ("SLAN-style (approximate): text-conditioned top-4 region filter",
             dict(scorer="slan", filter_k=4, **NCE)),
    "loupe": ("LOUPE-style (approximate): Monte-Carlo Shapley alignment regulariser",
              dict(similarity="cosine_global", shapley_weight=0.1, **NCE)),
    "uniter_separate": ("UNITER backbone run on each modality alone, global cosine",
                        dict(encoder="uniter", similarity="cosine_global", **NCE)),
    "comma": ("COMMA: alternating cross/self-attention over every pair",
              dict(scorer="comma", scorer_layers=1, **NCE)),
}
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
TABLE = "matching_protocol"


def chance(num_images: int, num_captions: int, k: int) -> dict:
  """Expected R@K of a random ranking: t2i k / N_img; i2t P(one of an image's
  captions in the top k) with N_txt / N_img captions per image."""
  per = num_captions // max(num_images, 1)
  miss = math.comb(num_captions - per, k) / math.comb(num_captions, k) if k <= num_captions else 0
  return {"i2t": 100.0 * (1 - miss), "t2i": 100.0 * min(1.0, k / num_images)}


def rows_of(name: str, out: dict, train_seconds: float) -> list[dict]:
  modes = ["full"] + [m for m in out if m == "dual" or m.startswith("two_stage_k")]
  return [dict({"mechanism": name, "mode": mode, "train_seconds": train_seconds,
                "eval_seconds": out[mode]["seconds"],
                "pairs_scored": out[mode]["pairs_scored"]},
               **{k: out[mode][k] for k in METRICS}) for mode in modes]


DONE = "protocol_result.json"  # Per mechanism: its evaluation and training seconds.


def run_mechanism(config, name: str, overrides: dict, workdir: str) -> tuple[dict, float]:
  """Trains one mechanism, then evaluates its last checkpoint: (eval dict, train seconds).

  A mechanism finished by an earlier run of the protocol in this workdir is read
  back from its `DONE` file instead of being trained again.
  """
  from vlp import config_lib
  from vlp.train import loop
  from vlp.train import metrics as metrics_lib
  done = epath.Path(storage.join(workdir, DONE))
  if done.exists():
    saved = json.loads(done.read_text())
    return saved["eval"], saved["train_seconds"]
  if epath.Path(storage.join(workdir, "checkpoints")).exists():
    raise FileExistsError(f"{workdir} holds an unfinished run of {name!r}; the protocol "
                          "times training from scratch: remove it or pass another --workdir")
  cfg = copy.deepcopy(config)
  config_lib.set_values(cfg, {f"matching.{k}": v(config) if callable(v) else v
                              for k, v in overrides.items()})
  cfg.eval_every = 0  # Evaluated once below, timed apart from training.
  t0 = time.perf_counter()
  loop.train_and_evaluate(cfg, workdir)
  train_seconds = time.perf_counter() - t0
  out = loop.evaluate_checkpoint(cfg, workdir)
  metrics_lib.write_json(os.fspath(done), {"eval": out, "train_seconds": train_seconds})
  return out, train_seconds


def table_lines(rows: list[dict]) -> list[str]:
  head = (f"{'mechanism':<16} {'mode':<13} " + " ".join(f"{m:>7}" for m in METRICS)
          + f" {'train_s':>8} {'eval_s':>7} {'pairs':>9}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['mechanism']:<16} {r['mode']:<13} "
                 + " ".join(f"{r[m]:7.1f}" for m in METRICS)
                 + f" {r['train_seconds']:8.1f} {r['eval_seconds']:7.1f} {r['pairs_scored']:9d}")
  return lines


def markdown_table(rows: list[dict]) -> str:
  """The table as Markdown (what docs/matching.md shows)."""
  head = ["mechanism", "mode", *METRICS, "train s", "eval s", "pairs scored"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append("| " + " | ".join([r["mechanism"], r["mode"]]
                                   + [f"{r[m]:.1f}" for m in METRICS]
                                   + [f"{r['train_seconds']:.0f}", f"{r['eval_seconds']:.1f}",
                                      f"{r['pairs_scored']:,}"]) + " |")
  return "\n".join(lines) + "\n"


def write_chart(rows: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  done = rows
  names = list(dict.fromkeys(r["mechanism"] for r in done))
  modes = list(dict.fromkeys(r["mode"] for r in done))
  fig, (bars, cost) = plt.subplots(1, 2, figsize=(13, 4.8))
  width = 0.8 / max(len(modes), 1)
  for j, mode in enumerate(modes):
    xs, ys = [], []
    for i, n in enumerate(names):
      hit = [r for r in done if r["mechanism"] == n and r["mode"] == mode]
      if hit:
        xs.append(i + (j - (len(modes) - 1) / 2) * width)
        ys.append(hit[0]["rsum"])
    bars.bar(xs, ys, width, label=mode)
  bars.set_xticks(range(len(names)), names, rotation=35, ha="right")
  bars.set_ylabel("RSUM (max 600)")
  bars.set_title(title)
  bars.legend(fontsize=8)
  colours = plt.get_cmap("tab20")
  for i, n in enumerate(names):
    pts = sorted((max(r["pairs_scored"], 1), r["rsum"]) for r in done if r["mechanism"] == n)
    cost.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colours(i % 20),
              label=n)
  cost.set_xscale("log")
  cost.set_xlabel("pairs scored by the mechanism (dual search: 1)")
  cost.set_ylabel("RSUM")
  cost.set_title("accuracy against scoring cost")
  cost.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  png = io.BytesIO()  # matplotlib writes local files only; the workdir may be a URI.
  fig.savefig(png, format="png", dpi=110)
  plt.close(fig)
  epath.Path(path).write_bytes(png.getvalue())


def run_protocol(config, workdir: str, names: list[str]) -> dict:
  from vlp.train import metrics as metrics_lib
  unknown = [n for n in names if n not in MECHANISMS]
  if unknown:
    raise ValueError(f"--mechanisms: unknown {unknown}; expected some of {list(MECHANISMS)}")
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  rows, sizes = [], None
  for name in names:
    label, overrides = MECHANISMS[name]
    metrics_lib.log(f"matching protocol: {name} ({label})")
    out, train_seconds = run_mechanism(config, name, overrides, storage.join(workdir, name))
    sizes = (out["num_images"], out["num_captions"])
    rows.extend(rows_of(name, out, train_seconds))
  result = {
      "data": config.data, "eval_split": config.eval_split,
      "budget": {"steps": config.total_steps, "batch_size": config.batch_size,
                 "seed": config.seed, "learning_rate": config.optimizer.learning_rate},
      "mechanisms": {n: MECHANISMS[n][0] for n in names},
      "rows": rows}
  if sizes:
    result["num_images"], result["num_captions"] = sizes
    result["chance"] = {f"r{k}": chance(*sizes, k) for k in (1, 5, 10)}
  metrics_lib.write_json(storage.join(workdir, f"{TABLE}.json"), result)
  epath.Path(storage.join(workdir, f"{TABLE}.md")).write_text(markdown_table(rows))
  write_chart(rows, storage.join(workdir, f"{TABLE}.png"),
              f"{config.data} {config.eval_split}: {config.total_steps} steps, seed {config.seed}")
  print("\n".join(table_lines(rows)), flush=True)
  return result


def main(config):
  run_protocol(config, _WORKDIR.value, _MECHANISMS.value or list(MECHANISMS))


if __name__ == "__main__":
  entry.run(main, config=_CONFIG)
