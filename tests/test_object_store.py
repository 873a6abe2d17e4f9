"""gs:// paths for the workdir, data_dir, tokenizer, init_from and export, offline.

`gs://` is served by a fake bucket: an fsspec file system registered for the
`gs` protocol, the one epath's own fsspec backend asks for (gcsfs in real use),
that keeps objects in a local folder and, like GCS, refuses appends. Orbax
writes array data through tensorstore's GCS driver, which cannot be pointed at
a folder, so its kvstore spec for gs:// paths is replaced by a file spec into
the same folder (and its bucket lookup answers "no hierarchical namespace").
Everything else, vlp's code and orbax's code for gs:// paths, runs as it would
against GCS. Any file vlp opened with the
local file system instead would land under `./gs:/` in the working directory,
which each test checks stays empty.
"""

import copy
import json
import os

import numpy as np
import pytest
from etils import epath

from vlp import checkpoint as ckpt_lib
from vlp import pretrained
from vlp.data import records, scenes, staging
from vlp.data.tokenizer import Tokenizer, WordPieceTokenizer
from vlp.jobs import data_setup
from vlp.parallel import preemption
from vlp.train import loop

from test_train_loop import ONE, event_scalars, stop_after, tiny_config

BUCKET = "gs://vlp-test"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """The local folder behind `gs://`; objects of gs://B/X are at folder/B/X."""
  import fsspec
  from fsspec.implementations.dirfs import DirFileSystem
  from fsspec.implementations.local import LocalFileSystem
  from orbax.checkpoint._src.path import gcs_utils

  root = tmp_path_factory.mktemp("bucket")
  open_ = [True]

  class LocalBucket(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, **kwargs):
      del args, kwargs  # gcsfs's options
      super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

    def _join(self, path):  # Every call maps its paths here.
      if not open_[0]:
        raise OSError("the fake gs:// of tests/test_object_store.py is closed")
      return super()._join(path)

    def open(self, path, mode="rb", *args, **kwargs):
      if "a" in mode or "+" in mode:
        raise OSError(f"object stores cannot append or update in place ({path}, {mode!r})")
      return super().open(path, mode, *args, **kwargs)

  def file_kvstore(path):
    name, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(root, name, key)}

  # epath keeps the first file system it gets for a protocol for the whole process,
  # so the fake stays registered; once this module is done it refuses every call.
  for protocol in LocalBucket.protocol:
    fsspec.register_implementation(protocol, LocalBucket, clobber=True)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gcs_utils, "get_kvstore_for_gcs", file_kvstore)
    mp.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    yield root
  open_[0] = False


@pytest.fixture(autouse=True)
def _no_local_gs_files(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  yield
  assert not os.path.exists("gs:"), "something wrote a gs:// path to the local disk"


def _losses(metrics_jsonl: str) -> dict[int, tuple[str, float]]:
  lines = [json.loads(x) for x in metrics_jsonl.splitlines()]
  return {r["step"]: (r["task"], r[f"loss/{r['task']}"]) for r in lines}


@pytest.fixture(scope="module")
def runs(bucket, tmp_path_factory):
  """A 4-step run in gs://.../run, stopped after step 2 and resumed, with its data
  in gs://.../data; the same run uninterrupted on local disk."""
  local = tmp_path_factory.mktemp("local")
  overrides = dict(total_steps=4, log_every=1, checkpoint_every=2, eval_every=100,
                   tasks={"mlm": 1, "itm": 1}, profile_steps="2:3",
                   data_cache_dir=str(local / "cache"))
  remote_cfg = tiny_config(f"{BUCKET}/data", **overrides)
  run = f"{BUCKET}/run"

  real = loop.Preemption
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(local)
    mp.setattr(loop, "Preemption", stop_after(2))  # No evaluation before step 4.
    with pytest.raises(preemption.Preempted):
      loop.train_and_evaluate(remote_cfg, run, devices=ONE)
    first = (epath.Path(run) / "metrics.jsonl").read_text()
    mp.setattr(loop, "Preemption", real)
    loop.train_and_evaluate(remote_cfg, run, devices=ONE)
    # The reference reads the same (staged) records.
    ref_cfg = tiny_config(local / "cache" / "gs" / "vlp-test" / "data", **overrides)
    loop.train_and_evaluate(ref_cfg, str(local / "ref"), devices=ONE)
    assert not os.path.exists("gs:")
  return dict(cfg=remote_cfg, run=run, first=first, ref=local / "ref", local=local)


def test_pretraining_writes_its_workdir_to_the_object_store_and_resumes(runs, bucket):
  run = epath.Path(runs["run"])
  assert max(_losses(runs["first"])) == 2  # The first part stopped after step 2.
  got = _losses((run / "metrics.jsonl").read_text())
  want = _losses((runs["ref"] / "metrics.jsonl").read_text())
  assert sorted(got) == [1, 2, 3, 4]
  for step in got:  # Resumed from the gs:// checkpoint: the uninterrupted losses.
    assert got[step][0] == want[step][0]
    np.testing.assert_allclose(got[step][1], want[step][1], rtol=1e-5, err_msg=str(step))
  # Two event files (one per part), together holding every logged loss.
  event_files = list(run.glob("events.out.tfevents.*"))
  assert len([f for f in event_files if f.name.endswith(".metrics")]) == 2
  events = event_scalars(run)
  for step, (task, loss) in got.items():
    assert events[(f"loss/{task}", step)] == pytest.approx(loss, rel=1e-6)
  ev = json.loads((run / "eval.json").read_text())
  assert events[("eval/mlm_acc", 4)] == pytest.approx(ev["mlm_acc"], rel=1e-6)
  ref_ev = json.loads((runs["ref"] / "eval.json").read_text())
  for key in ("mlm_acc", "itm_acc", "i2t_r1", "t2i_r1"):
    assert ev[key] == pytest.approx(ref_ev[key], abs=1e-6), key
  # Orbax's checkpoints and the profiler trace are objects in the bucket.
  ckpts = {p.name for p in (run / "checkpoints").iterdir()}
  assert {"2", "4"} <= ckpts, ckpts
  assert list((run / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert (bucket / "vlp-test" / "run" / "checkpoints" / "4").is_dir()


def test_data_dir_on_the_object_store_is_staged(runs, tmp_path):
  cfg = runs["cfg"]
  remote = scenes.scenes_builder(cfg.data_dir, feature_dim=cfg.feature_dim,
                                 size=cfg.data_size)
  assert remote.is_prepared()  # Built once, in the cache, and uploaded.
  names = sorted(p.name for p in epath.Path(remote.data_dir).iterdir())
  assert any(".array_record" in n for n in names) and "spm.model" in names
  with pytest.raises(ValueError, match="array_record reads local files only"):
    records.open_source(remote, "train", raw=True)
  # A fresh cache: every file is copied down, then read locally.
  cfg.data_cache_dir = str(tmp_path / "fresh")
  builder = data_setup.open_builder(cfg)
  local = os.fspath(builder.data_dir)
  assert local.startswith(str(tmp_path / "fresh")) and sorted(os.listdir(local)) == names
  assert len(records.open_source(builder, "train", raw=True)) == 200  # data_size=small
  # Staging again copies nothing; the tokenizer is named by its shared copy.
  assert staging.copy_tree(os.fspath(remote.data_dir), local) == 0
  assert data_setup.tokenizer_path(cfg, builder, init_from="") == f"{remote.data_dir}/spm.model"


def test_export_to_and_init_from_the_object_store(runs):
  out = f"{BUCKET}/exported"
  config = pretrained.export_workdir(runs["run"], out)
  assert config["source"]["workdir"] == runs["run"]
  names = {p.name for p in epath.Path(out).iterdir()}
  assert names == {"checkpoint", "config.json", "model.safetensors", "spm.model"}
  ref, _, _ = ckpt_lib.restore_params(str(runs["ref"] / "checkpoints"))
  want = pretrained.flatten(ref)
  model_cfg = pretrained.config_from_dict(pretrained.read_config(out)["model_config"])
  for source in (out, runs["run"]):  # A pretrained directory and a workdir on gs://.
    got = pretrained.flatten(pretrained.load_params_for_init(source, model_cfg))
    assert set(got) == set(want)
    for p in want:
      np.testing.assert_allclose(np.asarray(got[p]), want[p], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{source} {p}")
  # The safetensors file holds the same numbers under the torch names.
  from safetensors.numpy import load
  tensors = load((epath.Path(out) / "model.safetensors").read_bytes())
  np.testing.assert_allclose(
      tensors["uniter.embeddings.word_embeddings.weight"],
      want[("uniter", "embeddings", "word_embeddings", "embedding")], rtol=1e-5, atol=1e-7)
  assert pretrained.tokenizer_of(out) == (f"{out}/spm.model", False)
  model, tok = pretrained.load_pretrained(out)
  assert tok.path == f"{out}/spm.model" and tok.vocab_size == model_cfg.vocab_size
  # A run initialised from it takes its tokenizer; a gs:// copy of the same bytes
  # named by config.tokenizer is accepted, another file is refused.
  cfg = copy.deepcopy(runs["cfg"])
  builder = data_setup.open_builder(cfg)
  assert data_setup.resolve_tokenizer(cfg, builder, init_from=out) == (f"{out}/spm.model", False)
  (epath.Path(BUCKET) / "copy.model").write_bytes((epath.Path(out) / "spm.model").read_bytes())
  cfg.tokenizer = f"{BUCKET}/copy.model"
  assert data_setup.resolve_tokenizer(cfg, builder, init_from=out) == (f"{out}/spm.model", False)
  (epath.Path(BUCKET) / "other.model").write_bytes(b"not the same")
  cfg.tokenizer = f"{BUCKET}/other.model"
  with pytest.raises(ValueError, match="is not the tokenizer"):
    data_setup.resolve_tokenizer(cfg, builder, init_from=out)
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    pretrained.export_workdir(runs["run"], out)
  # The importer reads a reference checkpoint and its json from gs:// and writes there:
  # the exported safetensors file (reference torch names) comes back as the same tree.
  fields = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                num_hidden_layers="num_layers", num_attention_heads="num_heads",
                intermediate_size="intermediate_size",
                max_position_embeddings="max_position_embeddings")
  (epath.Path(BUCKET) / "uniter.json").write_text(json.dumps(
      {theirs: getattr(model_cfg, ours) for theirs, ours in fields.items()}))
  from vlp.tools import import_uniter
  import_uniter.import_checkpoint(
      f"{out}/model.safetensors", f"{BUCKET}/uniter.json", f"{BUCKET}/imported",
      tokenizer=f"{out}/spm.model", img_dim=model_cfg.img_dim,
      num_region_classes=model_cfg.num_region_classes)
  got = pretrained.flatten(pretrained.load_params_for_init(f"{BUCKET}/imported", model_cfg))
  assert set(got) == set(want)
  for p in want:
    np.testing.assert_allclose(np.asarray(got[p]), want[p], rtol=1e-5, atol=1e-7, err_msg=str(p))


def test_prepare_refuses_object_store_paths_clearly(bucket):
  from vlp.data import prepare
  with pytest.raises(ValueError, match=r"--data_dir=gs://vlp-test/tfds: preparing reads and "
                     r"writes local files only .* config.data_dir on the object store"):
    prepare.prepare("coco_karpathy", manual_dir="manual", data_dir=f"{BUCKET}/tfds")


def test_tokenizers_load_from_the_object_store(runs, bucket):
  cfg = runs["cfg"]
  path = data_setup.tokenizer_path(cfg, data_setup.open_builder(cfg), init_from="")
  assert path.startswith(f"{BUCKET}/data/")
  remote = Tokenizer(path)
  local = Tokenizer(path.replace(BUCKET, str(bucket / "vlp-test")))  # The same object.
  text = "a red cube left of a small blue sphere"
  assert remote.encode(text) == local.encode(text) and remote.vocab_size == local.vocab_size
  vocab = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\ncat\n##s\n"
  (epath.Path(BUCKET) / "vocab.txt").write_text(vocab)
  wp = WordPieceTokenizer(f"{BUCKET}/vocab.txt")
  assert wp.vocab_size == 8 and wp.encode("the cats") == [5, 6, 7]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Tokenizer(f"{BUCKET}/missing.model")
