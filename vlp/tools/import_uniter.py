r"""Import a released PyTorch UNITER or BERT checkpoint as a vlp pretrained directory.

  python -m vlp.tools.import_uniter --checkpoint=uniter-base.pt \
      --model_config=uniter-base.json --vocab=bert-base-cased-vocab.txt --out=DIR
  python -m vlp.tools.import_uniter --checkpoint=model.safetensors ... --out=DIR
  # BERT as HuggingFace publishes it (config.json, model.safetensors or
  # pytorch_model.bin, vocab.txt): the start of UNITER pretraining.
  python -m vlp.tools.import_uniter --checkpoint=bert-base-cased/ --out=DIR

Reads the state dict of the reference `UniterForPretraining`, `UniterModel` (keys
with or without the ``uniter.`` prefix, or a ``module.`` wrapper prefix) or one of
its fine-tuning models, in float16 or float32, from ``.pt`` (``torch.load`` with
``weights_only=True``, so a pickle that needs code or custom classes is refused
without running it; needs the ``torch`` extra) or ``.safetensors``. The names map
through `vlp.models.torch_names.torch_name_table`; tied duplicates
(``cls.predictions.decoder.weight``, ``feat_regress.weight``,
``cls.predictions.decoder.bias``) are checked to equal what they tie to. Old BERT
LayerNorm names (``gamma``/``beta``) are accepted. Heads of reference models vlp
does not implement (NLVR2, VCR) and position-id buffers are ignored and listed;
with ``--backbone_only`` every head is. Any other unknown key, a missing key or a
shape that does not fit the config is an error that lists all of them.

BERT (``bert.*`` keys, or UNITER's converted ``uniter-base-init.pt`` /
``uniter-large-init.pt``: BERT under ``uniter.*``; recognised by having no image
embeddings): embeddings, encoder and pooler go into the backbone, the MLM head
``cls.predictions.*`` (if present) into ``cls``; the next-sentence head is ignored.
What BERT lacks (the image embeddings and, with an MLM head, the MRFR, MRC and
ITM heads) is initialised as the reference's ``init_weights`` does (Linear and
Embedding weights N(0, initializer_range), biases 0, LayerNorm 1 and 0; ``--seed``)
and listed in config.json's ``source.initialised``. Text is token type 0, regions
type 1 (BERT's two token types), as in the reference.

The output is exactly what `python -m vlp.export` writes (see `vlp.pretrained`);
load it with `vlp.load_pretrained(DIR)`, or start pretraining or fine-tuning from it
with ``--config.init_from=DIR`` (the tokenizer follows it).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
import sys
from typing import Any, Mapping

import numpy as np
from etils import epath

from vlp import storage

# Reference fine-tuning heads with no vlp counterpart (nlvr2.py, vcr.py).
UNSUPPORTED_HEADS = ('nlvr2_output', 'attn1', 'attn2', 'attn_pool', 'fc', 'vcr_output')
# Buffers (not parameters) some exports carry.
BUFFERS = re.compile(r'^uniter\.embeddings\.(position_ids|token_type_ids)$')
# BERT's next-sentence head: UNITER has none.
BERT_NSP = 'cls.seq_relationship.'
# What a BERT checkpoint lacks: UNITER's image embeddings and its other
# pre-training heads (initialised as the reference does; `reference_init`); the
# pooler too, when a BERT export has none (masked-LM-only models).
BERT_LACKS = ('uniter.img_embeddings.', 'uniter.pooler.', 'feat_regress.', 'region_classifier.',
              'itm_output.')
# HuggingFace folder files, in order of preference.
HF_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
_BACKBONE_MODULES = ('embeddings', 'img_embeddings', 'encoder', 'pooler')
_DECODER_BIAS = 'cls.predictions.decoder.bias'

# UNITER / BERT json field -> UniterConfig field.
_CONFIG_FIELDS = {
    'vocab_size': 'vocab_size', 'hidden_size': 'hidden_size',
    'num_hidden_layers': 'num_layers', 'num_attention_heads': 'num_heads',
    'intermediate_size': 'intermediate_size',
    'max_position_embeddings': 'max_position_embeddings',
    'type_vocab_size': 'type_vocab_size', 'hidden_dropout_prob': 'hidden_dropout',
    'attention_probs_dropout_prob': 'attention_dropout',
    'initializer_range': 'initializer_range', 'layer_norm_eps': 'layer_norm_eps',
}
_REQUIRED = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
             'intermediate_size')


class CheckpointMismatchError(ValueError):
  """The state dict does not fit the model config; the message lists every key."""


class CheckpointReadError(ValueError):
  """The file is not a plain state dict of tensors; nothing in it was run."""


@dataclasses.dataclass
class ImportSummary:
  heads: tuple[str, ...]
  ignored: dict[str, str]           # key -> reason
  tied_checked: list[str]
  source_dtypes: dict[str, int]     # dtype name -> number of tensors
  prefix: str
  initialised: list[str] = dataclasses.field(default_factory=list)  # BERT lacks them

  def lines(self) -> list[str]:
    out = [f"heads: {', '.join(self.heads) or '(none: backbone only)'}",
           f"tensor dtypes in the checkpoint: {self.source_dtypes}",
           f"key prefix handling: {self.prefix}"]
    if self.tied_checked:
      out.append(f"tied duplicates checked and dropped: {', '.join(self.tied_checked)}")
    if self.initialised:
      modules = sorted({k.rsplit('.', 1)[0] for k in self.initialised})
      out.append(f'initialised as the reference does (not in the checkpoint): '
                 f"{', '.join(modules)}")
    if self.ignored:
      out.append(f'ignored ({len(self.ignored)}):')
      out += [f'  {k}  [{why}]' for k, why in sorted(self.ignored.items())]
    return out


def uniter_config(json_config: Mapping[str, Any], *, img_dim: int = 2048,
                  num_region_classes: int = 1601, **overrides):
  """`UniterConfig` from a UNITER / BERT json model config.

  Returns:
    (config, ignored json fields). ``hidden_act`` must be gelu (vlp's exact erf
    GELU); fields without a vlp meaning are returned as ignored.
  """
  from vlp.models.uniter_config import UniterConfig
  missing = [k for k in _REQUIRED if k not in json_config]
  if missing:
    raise ValueError(f'model config lacks {missing}')
  act = json_config.get('hidden_act', 'gelu')
  if act != 'gelu':
    raise ValueError(f'hidden_act={act!r}: vlp implements the exact (erf) gelu only')
  pos = json_config.get('position_embedding_type', 'absolute')
  if pos != 'absolute':
    raise ValueError(f'position_embedding_type={pos!r}: vlp uses absolute positions only')
  fields = {ours: json_config[theirs] for theirs, ours in _CONFIG_FIELDS.items()
            if theirs in json_config}
  ignored = sorted(set(json_config) - set(_CONFIG_FIELDS)
                   - {'hidden_act', 'position_embedding_type'})
  fields.update(img_dim=img_dim, num_region_classes=num_region_classes, **overrides)
  return UniterConfig(**fields), ignored


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Numpy arrays of a ``.pt`` / ``.bin`` (torch) or ``.safetensors`` state dict."""
  data = epath.Path(path).read_bytes()  # Local or on an object store.
  if path.endswith('.safetensors'):
    from safetensors.numpy import load
    return dict(load(data))
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'reading {path} needs PyTorch: pip install "vlp[torch]" (or convert '
                      'the checkpoint to .safetensors elsewhere)') from e
  try:
    obj = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's message suggests weights_only=False and allowlisting; keep only its reason.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or ['']
    reason = next((l for l in lines if 'WeightsUnpickler error' in l), lines[-1])
    reason = reason.split(' Please use')[0]
    raise CheckpointReadError(
        f'refused {path}: loading it needs more than tensors (code or custom classes); '
        f'nothing in it was run. {reason} Re-save the state dict (tensors only, or as '
        '.safetensors) where its source is trusted.') from None
  for wrapper in ('state_dict', 'model'):
    if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise CheckpointReadError(f'{path} holds a {type(obj).__name__}, not a state dict')
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise CheckpointReadError(f'{path}: entry {k!r} is a {type(v).__name__}, not a tensor')
    v = v.detach().cpu()
    out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
  return out


def _normalise_keys(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  """Strips ``module.``, renames BERT's ``bert.`` to ``uniter.``, adds ``uniter.`` to
  bare backbone keys, gamma/beta -> weight/bias."""
  notes = []
  keys = list(sd)
  if keys and all(k.startswith('module.') for k in keys):
    sd = {k[len('module.'):]: v for k, v in sd.items()}
    notes.append("stripped 'module.'")
  if any(k.startswith('bert.') for k in sd):
    sd = {('uniter.' + k[len('bert.'):] if k.startswith('bert.') else k): v
          for k, v in sd.items()}
    notes.append("renamed 'bert.' to 'uniter.' (BERT checkpoint)")
  if not any(k.startswith('uniter.') for k in sd):
    sd = {(f'uniter.{k}' if k.split('.')[0] in _BACKBONE_MODULES else k): v
          for k, v in sd.items()}
    notes.append("added 'uniter.' to backbone keys (UniterModel state dict)")
  out = {}
  for k, v in sd.items():
    if k.endswith('.gamma'):
      k = k[:-len('gamma')] + 'weight'
    elif k.endswith('.beta'):
      k = k[:-len('beta')] + 'bias'
    if k in out:
      raise CheckpointMismatchError(f'key {k!r} appears twice (after renaming gamma/beta)')
    out[k] = v
  return out, '; '.join(notes) or 'keys used as they are'


def _head_keys(num_layers: int) -> dict[str, list]:
  from vlp.models.torch_names import FINETUNING_HEADS, PRETRAINING_HEADS, torch_name_table
  backbone = {k for k, _, _ in torch_name_table(num_layers, ())}
  return {h: [r for r in torch_name_table(num_layers, (h,)) if r[0] not in backbone]
          for h in PRETRAINING_HEADS + FINETUNING_HEADS}


def reference_init(rows, abstract: Mapping, keys, initializer_range: float,
                   seed: int) -> dict[str, np.ndarray]:
  """Torch-layout tensors for `keys` as the reference's ``init_weights`` makes them:
  Linear / Embedding weights N(0, initializer_range), biases 0, LayerNorm weight 1
  and bias 0 (`rows`: `torch_name_table` rows; `abstract`: the flat parameter shapes)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, path, how in rows:
    if key not in keys:
      continue
    shape = abstract[path].shape
    shape = tuple(reversed(shape)) if how == 'transpose' else tuple(shape)
    if path[-1] in ('kernel', 'embedding'):
      out[key] = (rng.standard_normal(shape) * initializer_range).astype(np.float32)
    else:  # bias (Linear, LayerNorm, or a head's own bias) 0, LayerNorm scale 1.
      out[key] = np.full(shape, float(path[-1] == 'scale'), np.float32)
  return out


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg, *, backbone_only: bool = False,
                       seed: int = 0) -> tuple[dict, ImportSummary]:
  """Reference state dict -> (vlp pure parameter dict, summary).

  The heads present decide the model class (see `vlp.pretrained`); a head is all
  or nothing, and one pre-training-only head (cls, feat_regress,
  region_classifier) means all four pre-training heads are expected.

  A BERT state dict (no image embeddings) gets what it lacks from
  `reference_init` (`seed`); the summary lists those keys as ``initialised``.

  Raises:
    CheckpointMismatchError: listing unknown, missing and mis-shaped keys (with
      the expected torch shapes) and tied duplicates that differ.
  """
  from vlp import pretrained
  from vlp.models.torch_names import PRETRAINING_HEADS, TIED_TORCH_KEYS, torch_name_table
  dtypes: dict[str, int] = {}
  for v in sd.values():
    dtypes[str(v.dtype)] = dtypes.get(str(v.dtype), 0) + 1
  sd, prefix = _normalise_keys(sd)
  bert = ('uniter.embeddings.word_embeddings.weight' in sd
          and not any(k.startswith('uniter.img_embeddings.') for k in sd))
  head_rows = _head_keys(cfg.num_layers)
  heads = [h for h, rows in head_rows.items() if any(r[0] in sd for r in rows)]
  ignored: dict[str, str] = {}
  for k in sd:
    top = k.split('.')[0]
    if BUFFERS.match(k):
      ignored[k] = 'buffer, not a parameter'
    elif top in UNSUPPORTED_HEADS:
      ignored[k] = 'reference head vlp does not implement'
    elif bert and k.startswith(BERT_NSP):
      ignored[k] = "BERT's next-sentence head (UNITER has none)"
    elif backbone_only and top != 'uniter':
      ignored[k] = 'head (--backbone_only)'
  if backbone_only:
    heads = []
  elif any(h in heads for h in PRETRAINING_HEADS[:3]):
    heads = sorted(set(heads) | set(PRETRAINING_HEADS), key=pretrained.HEAD_ORDER.index)
  rows = torch_name_table(cfg.num_layers, heads)
  # The expected shapes, from the model class the heads select.
  options = {}
  if 'vqa_output' in heads and 'vqa_output.3.weight' in sd:
    options['num_answers'] = int(sd['vqa_output.3.weight'].shape[0])
  if 'dual_output' in heads and 'dual_output.proj.weight' in sd:
    options['dual_dim'] = int(sd['dual_output.proj.weight'].shape[0])
  abstract = pretrained.flatten(pretrained.abstract_params(
      pretrained.model_factory(cfg, heads, options)))
  initialised = []
  if bert:
    initialised = sorted(r[0] for r in rows if r[0] not in sd and r[0].startswith(BERT_LACKS))
    sd = {**sd, **reference_init(rows, abstract, set(initialised), cfg.initializer_range,
                                 seed)}
  tied = {k: v for k, v in TIED_TORCH_KEYS.items() if k.split('.')[0] in heads}
  if 'cls' in heads:
    tied[_DECODER_BIAS] = (('cls', 'bias'), 'identity')
  used = {r[0] for r in rows} | set(tied)
  unknown = sorted(k for k in sd if k not in used and k not in ignored)
  missing = sorted(r[0] for r in rows if r[0] not in sd)
  fix = lambda a, how: a.T if how == 'transpose' else a
  shapes, params = [], {}
  for key, path, how in rows:
    if key not in sd:
      continue
    want = abstract[path]
    torch_shape = tuple(reversed(want.shape)) if how == 'transpose' else tuple(want.shape)
    if tuple(sd[key].shape) != torch_shape:
      shapes.append(f'{key}: expected {torch_shape}, got {tuple(sd[key].shape)}')
      continue
    params[path] = np.asarray(fix(sd[key], how), dtype=want.dtype)
  differ = []
  for key, (path, how) in sorted(tied.items()):
    if key in sd and path in params:
      if not np.array_equal(np.asarray(fix(sd[key], how), params[path].dtype), params[path]):
        differ.append(f'{key} (should equal {"/".join(map(str, path))})')
  if unknown or missing or shapes or differ:
    lines = [f'the checkpoint does not fit the model config ({cfg.num_layers} layers, '
             f'hidden {cfg.hidden_size}, heads {heads or "none"}):']
    for title, items in (('unknown keys', unknown), ('missing keys', missing),
                         ('mis-shaped keys', shapes), ('tied duplicates that differ', differ)):
      if items:
        lines.append(f'  {title} ({len(items)}): ' + ', '.join(items))
    if any(s.startswith(('uniter.img_embeddings.img_linear.', 'region_classifier.net.3.'))
           for s in shapes):
      lines.append(f'  (img_dim={cfg.img_dim} and num_region_classes={cfg.num_region_classes} '
                   'are not in the json config: see --img_dim, --num_region_classes)')
    raise CheckpointMismatchError('\n'.join(lines))
  summary = ImportSummary(heads=tuple(heads), ignored=ignored,
                          tied_checked=sorted(k for k in tied if k in sd),
                          source_dtypes=dtypes, prefix=prefix, initialised=initialised)
  return pretrained.unflatten(params), summary


def hf_folder(path: str) -> dict[str, Any]:
  """The files of a HuggingFace model folder (e.g. ``bert-base-cased``): ``weights``
  (`HF_WEIGHTS`, the first present), ``model_config`` (config.json), ``vocab``
  (vocab.txt, or None) and ``lowercase`` (tokenizer_config.json's do_lower_case,
  or None when the folder does not say)."""
  folder = epath.Path(path)
  weights = [storage.join(path, n) for n in HF_WEIGHTS if (folder / n).exists()]
  model_config = storage.join(path, 'config.json')
  if not weights or not (folder / 'config.json').exists():
    raise FileNotFoundError(f'{path} is not a HuggingFace model folder: expected config.json '
                            f"and one of {', '.join(HF_WEIGHTS)}")
  lowercase = None
  if (folder / 'tokenizer_config.json').exists():
    lowercase = json.loads((folder / 'tokenizer_config.json').read_text()).get('do_lower_case')
  vocab = storage.join(path, 'vocab.txt') if (folder / 'vocab.txt').exists() else None
  return dict(weights=weights[0], model_config=model_config, vocab=vocab, lowercase=lowercase)


def import_checkpoint(checkpoint: str, model_config_path: str | None, out_dir: str, *,
                      vocab: str | None = None, tokenizer: str | None = None,
                      lowercase: bool | None = None, img_dim: int = 2048,
                      num_region_classes: int = 1601, backbone_only: bool = False,
                      seed: int = 0) -> tuple[dict, ImportSummary, list[str]]:
  """Converts `checkpoint` with its json model config and writes `out_dir`.

  `checkpoint` may be a HuggingFace folder (`hf_folder`): its config.json,
  vocab.txt and case are the defaults of `model_config_path`, `vocab` and
  `lowercase` (otherwise False). `seed` draws what a BERT checkpoint lacks.

  Returns:
    (config.json contents, the conversion summary, ignored json config fields).
  """
  from vlp import pretrained
  if vocab and tokenizer:
    raise ValueError('pass --vocab (WordPiece) or --tokenizer (sentencepiece), not both')
  weights = checkpoint
  if epath.Path(checkpoint).is_dir():
    folder = hf_folder(checkpoint)
    weights = folder['weights']
    model_config_path = model_config_path or folder['model_config']
    if not tokenizer:
      vocab = vocab or folder['vocab']
    lowercase = folder['lowercase'] if lowercase is None else lowercase
  if not model_config_path:
    raise ValueError(f'{checkpoint} is a file: pass its json model config (--model_config)')
  cfg, ignored_fields = uniter_config(json.loads(epath.Path(model_config_path).read_text()),
                                      img_dim=img_dim, num_region_classes=num_region_classes)
  params, summary = convert_state_dict(read_state_dict(weights), cfg,
                                       backbone_only=backbone_only, seed=seed)
  source = dict(kind='import', checkpoint=storage.absolute(weights),
                model_config=storage.absolute(model_config_path),
                ignored=sorted(summary.ignored))
  if summary.initialised:
    source.update(initialised=summary.initialised, seed=seed)
  config = pretrained.save_pretrained(out_dir, params, cfg, tokenizer=vocab or tokenizer,
                                      lowercase=bool(lowercase), source=source)
  return config, summary, ignored_fields


def main(config):
  del config  # The reference's json model config (--model_config) describes the model.
  from absl import flags, logging
  f = flags.FLAGS
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO.
  try:
    config, summary, ignored_fields = import_checkpoint(
        f.checkpoint, f.model_config, f.out, vocab=f.vocab, tokenizer=f.tokenizer,
        lowercase=f.lowercase, img_dim=f.img_dim, num_region_classes=f.num_region_classes,
        backbone_only=f.backbone_only, seed=f.seed)
  except (CheckpointMismatchError, CheckpointReadError, ImportError, FileNotFoundError,
          ValueError) as e:
    sys.exit(f'error: {e}')
  print(f'imported {f.checkpoint} -> {storage.absolute(f.out)}')
  for line in summary.lines():
    print(line)
  if ignored_fields:
    print(f"model config fields without a vlp meaning (ignored): {', '.join(ignored_fields)}")
  tok = config['tokenizer']
  print(f"tokenizer: {tok['type']} {tok['file']} ({tok['vocab_size']} ids)" if tok else
        'tokenizer: none (pass --vocab=vocab.txt or --tokenizer=spm.model to include one)')


def _define_flags():
  from absl import flags
  flags.DEFINE_string('checkpoint', None, 'Reference state dict (.pt, .bin or .safetensors), '
                      'or a HuggingFace BERT folder.')
  flags.DEFINE_string('model_config', None, 'UNITER / BERT json model config (default for a '
                      "folder: its config.json).")
  flags.DEFINE_string('out', None, 'Pretrained directory to write.')
  flags.DEFINE_string('vocab', None, 'BERT WordPiece vocab.txt (bert-base-cased for UNITER; '
                      "default for a folder: its vocab.txt).")
  flags.DEFINE_bool('lowercase', None, 'The WordPiece vocabulary is uncased (default: a '
                    "folder's tokenizer_config.json, else False).")
  flags.DEFINE_integer('seed', 0, 'Seed of the parts a BERT checkpoint lacks.')
  flags.DEFINE_string('tokenizer', None, 'A sentencepiece model instead of --vocab.')
  flags.DEFINE_integer('img_dim', 2048, 'Region feature size.')
  flags.DEFINE_integer('num_region_classes', 1601, 'Detector classes of the MRC head.')
  flags.DEFINE_bool('backbone_only', False, 'Ignore (and list) every head.')


if __name__ == '__main__':
  from vlp import entry  # Here, not at the top: importing the module stays light.
  _define_flags()
  entry.run(main, required=['checkpoint', 'out'])
