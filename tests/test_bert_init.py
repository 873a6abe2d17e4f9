"""Starting from BERT, and the tokenizer following the checkpoint (WordPiece end to end).

* WordPiece (HuggingFace `tokenizers`) against tokenisations written out by hand:
  accents (cased and uncased), punctuation, CJK, long and unknown words;
* a HuggingFace BERT folder (tiny config.json, model.safetensors or
  pytorch_model.bin written with torch, vocab.txt) imports into the backbone and
  the MLM head with exactly BERT's tensors under the name map (mapped here by
  hand); what BERT lacks is initialised as the reference's ``init_weights``
  (N(0, 0.02) weights, zero biases, unit LayerNorm); UNITER's converted init
  (``bert`` -> ``uniter``) imports to the same parameters;
* pretraining with ``init_from`` the imported BERT starts from exactly its
  parameters, tokenises with its vocab.txt, and refuses another config.tokenizer
  with an error naming both;
* a PyTorch UNITER checkpoint with a WordPiece vocabulary -> import -> retrieval
  fine-tuning on a Karpathy-format build -> evaluation, whose recalls equal a
  numpy recomputation from the exported model on hand-tokenised captions.
"""

import json
import os

import jax
import numpy as np
import pytest

import vlp
from vlp import checkpoint as ckpt_lib, config_lib, jobs, pretrained
from vlp.data import batching, pipeline, prepare
from vlp.data.tokenizer import WordPieceTokenizer
from vlp.evaluators import retrieval as retrieval_eval
from vlp.jobs.base import Feed
from vlp.models.pretraining import UniterForPretraining
from vlp.models.torch_names import torch_name_table
from vlp.models.uniter_config import model_config
from vlp.tools import import_uniter
from vlp.train import loop

from bert_folder import (HEADS_N, HF_CONFIG, ID, INTER, LAYERS, MAXPOS, MODEL, VOCAB, H,
                         write_bert_folder, write_vocab)
from test_builders_karpathy import COCO, write_images  # Karpathy-format fixture writer.

torch = pytest.importorskip('torch', reason='needs torch: make test installs '
                            'requirements-torch.txt')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = jax.devices()[:1]
D = 16  # Region feature size of the Karpathy fixture.
CLASSES = 9  # The tiny pretraining config's region classes.


# ------------------------------------------------------------------ WordPiece
CASED = [
    ("the café's naïve cat.", ['the', 'café', "'", 's', 'naïve', 'cat', '.']),
    # After punctuation a new word starts: 'ing' is no word of its own.
    ("don't play-ing!", ['don', "'", 't', 'play', '-', '[UNK]', '!']),
    ('New York, the cat', ['New', 'York', ',', 'the', 'cat']),
    ('日本dog 日', ['日', '本', 'dog', '日']),  # Ideographs stand alone, spaces or not.
    ('unbelievable playing', ['un', '##believ', '##able', 'play', '##ing']),
    ('unbelievablex Cat', ['[UNK]', '[UNK]']),  # An unmatched rest: the whole word.
    ('Caption 12 of image 305', ['Caption', '1', '##2', 'of', 'image', '3', '##0', '##5']),
    ('1' * 100, ['1'] + ['##1'] * 99),  # At most 100 characters a word ...
    ('1' * 101 + ' a', ['[UNK]', 'a']),  # ... a longer one is [UNK].
    ('a\tdog\r\nthe\x00 cat\u200b', ['a', 'dog', 'the', 'cat']),  # Control chars go.
    ('a [MASK] dog [mask]', ['a', '[MASK]', 'dog', '[UNK]', '[UNK]', '[UNK]']),
    ('', []),
]
UNCASED = [
    ("The CAFÉ's Naïve cat.", ['the', 'cafe', "'", 's', 'naive', 'cat', '.']),
    ('NEW york', ['new', 'york']),
    ('a [MASK] dog', ['a', '[MASK]', 'dog']),  # Special tokens are not lowercased.
]


def test_wordpiece_matches_hand_tokenisations(tmp_path):
  path = write_vocab(tmp_path / 'vocab.txt')
  cased = WordPieceTokenizer(path)
  assert (cased.pad_id, cased.unk_id, cased.cls_id, cased.sep_id, cased.mask_id) == (0, 4, 5, 6, 7)
  assert cased.vocab_size == len(VOCAB) and cased.random_range == (8, len(VOCAB))
  for text, pieces in CASED:
    assert cased.tokenize(text) == pieces, text
    assert cased.encode(text) == [ID[p] for p in pieces], text
  assert cased.encode_batch([t.encode() for t, _ in CASED]) == [
      [ID[p] for p in pieces] for _, pieces in CASED]
  uncased = WordPieceTokenizer(path, lowercase=True)
  for text, pieces in UNCASED:
    assert uncased.tokenize(text) == pieces, text
  ids = [ID['[CLS]'], ID['un'], ID['##believ'], ID['##able'], ID['cat'], ID['!'], ID['[SEP]'], 0]
  assert cased.decode(ids) == 'unbelievable cat!'
  (tmp_path / 'bad.txt').write_text('[PAD]\n[UNK]\n[CLS]\nhello\n')
  with pytest.raises(ValueError, match=r"bad.txt' lacks the special token\(s\) "
                                       r"\['\[SEP\]', '\[MASK\]'\]"):
    WordPieceTokenizer(tmp_path / 'bad.txt')
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    WordPieceTokenizer(tmp_path / 'missing.txt')


# ------------------------------------------------------------------ BERT import
def hand_path(key):
  """The vlp parameter path of a BERT key and whether torch stores it transposed,
  written out from the two models' layouts (not from vlp's name table)."""
  parts = key.replace('bert.', 'uniter.', 1).split('.')
  if parts[:2] == ['uniter', 'encoder']:
    parts = ['uniter', 'encoder', int(parts[3])] + parts[4:]  # torch's extra 'layer'
  if parts[0] == 'cls':
    parts = ['cls'] + parts[2:]  # torch's extra 'predictions'
  leaf = parts[-1]
  if leaf in ('gamma', 'beta'):
    return tuple(parts[:-1]) + ({'gamma': 'scale', 'beta': 'bias'}[leaf],), False
  if leaf == 'weight' and parts[-2].endswith('_embeddings'):
    return tuple(parts[:-1]) + ('embedding',), False
  if leaf == 'weight':
    return tuple(parts[:-1]) + ('kernel',), True
  return tuple(parts), False


# What BERT lacks, as torch module names (the reference's UniterForPretraining).
FRESH_MODULES = ['feat_regress', 'feat_regress.net.0', 'feat_regress.net.2', 'itm_output',
                 'region_classifier.net.0', 'region_classifier.net.2', 'region_classifier.net.3',
                 'uniter.img_embeddings.LayerNorm', 'uniter.img_embeddings.img_layer_norm',
                 'uniter.img_embeddings.img_linear', 'uniter.img_embeddings.mask_embedding',
                 'uniter.img_embeddings.pos_layer_norm', 'uniter.img_embeddings.pos_linear']


@pytest.fixture(scope='module')
def hf_bert(tmp_path_factory):
  """A HuggingFace BERT folder (model.safetensors) and its import."""
  root = tmp_path_factory.mktemp('bert')
  folder = root / 'bert-tiny-cased'
  sd = write_bert_folder(folder)
  out = root / 'imported'
  config, summary, ignored = import_uniter.import_checkpoint(
      str(folder), None, str(out), img_dim=D, num_region_classes=CLASSES, seed=3)
  return dict(folder=folder, sd={k: v.numpy() for k, v in sd.items()}, out=str(out),
              config=config, summary=summary, ignored=ignored, root=root)


def imported_params(directory):
  model, tok = vlp.load_pretrained(directory)
  from flax import nnx
  flat = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  return model, tok, flat


def test_hf_bert_folder_imports_backbone_and_mlm_head(hf_bert):
  config, summary = hf_bert['config'], hf_bert['summary']
  assert config['heads'] == ['cls', 'feat_regress', 'region_classifier', 'itm_output']
  assert config['tokenizer'] == dict(type='wordpiece', file='vocab.txt', lowercase=False,
                                     vocab_size=len(VOCAB))
  assert "renamed 'bert.' to 'uniter.'" in summary.prefix
  assert summary.ignored == {'cls.seq_relationship.weight': "BERT's next-sentence head "
                             '(UNITER has none)', 'cls.seq_relationship.bias': "BERT's "
                             'next-sentence head (UNITER has none)'}
  assert sorted({k.rsplit('.', 1)[0] for k in summary.initialised}) == FRESH_MODULES
  assert config['source']['initialised'] == summary.initialised
  assert hf_bert['ignored'] == ['architectures', 'model_type', 'pad_token_id']
  model, tok, flat = imported_params(hf_bert['out'])
  assert isinstance(model, UniterForPretraining)
  assert isinstance(tok, WordPieceTokenizer) and tok.encode('the cat') == [ID['the'], ID['cat']]
  # Every BERT tensor (bar the next-sentence head) lands where the layouts say.
  used = set()
  for key, value in hf_bert['sd'].items():
    if key.startswith('cls.seq_relationship'):
      continue
    path, transposed = hand_path(key)
    np.testing.assert_array_equal(flat[path], value.T if transposed else value, err_msg=key)
    used.add(path)
  # Spot checks that the hand map is the one meant.
  np.testing.assert_array_equal(
      flat[('uniter', 'encoder', 0, 'attention', 'self', 'query', 'kernel')],
      hf_bert['sd']['bert.encoder.layer.0.attention.self.query.weight'].T)
  np.testing.assert_array_equal(flat[('cls', 'transform', 'LayerNorm', 'scale')],
                                hf_bert['sd']['cls.predictions.transform.LayerNorm.gamma'])
  # The rest is what BERT lacks, initialised as the reference's init_weights.
  fresh = {p: v for p, v in flat.items() if p not in used}
  assert {p[0] if p[0] != 'uniter' else p[:2] for p in fresh} == {
      ('uniter', 'img_embeddings'), 'feat_regress', 'region_classifier', 'itm_output'}
  weights = []
  for p, v in fresh.items():
    if p[-1] in ('kernel', 'embedding'):
      assert 0.5 * 0.02 < v.std() < 1.5 * 0.02, p  # Each: N(0, 0.02), loosely.
      weights.append(v.ravel())
    else:
      np.testing.assert_array_equal(v, np.full_like(v, float(p[-1] == 'scale')), err_msg=str(p))
  weights = np.concatenate(weights)
  assert weights.size > 3000
  assert abs(weights.std() - 0.02) < 0.001 and abs(weights.mean()) < 0.001


def test_bin_and_uniter_converted_init_import_the_same(hf_bert, tmp_path):
  sd = {k: torch.from_numpy(v) for k, v in hf_bert['sd'].items()}
  # pytorch_model.bin carries the tied decoder (same storage) and a position-id buffer.
  binary = dict(sd, **{'cls.predictions.decoder.weight':
                       sd['bert.embeddings.word_embeddings.weight'],
                       'bert.embeddings.position_ids': torch.arange(MAXPOS)[None]})
  folder = tmp_path / 'bin-folder'
  folder.mkdir()
  torch.save(binary, folder / 'pytorch_model.bin')
  (folder / 'config.json').write_text(json.dumps(HF_CONFIG))
  write_vocab(folder / 'vocab.txt')
  _, summary, _ = import_uniter.import_checkpoint(str(folder), None, str(tmp_path / 'a'),
                                                  img_dim=D, num_region_classes=CLASSES, seed=3)
  assert summary.tied_checked == ['cls.predictions.decoder.weight']
  assert summary.ignored['uniter.embeddings.position_ids'] == 'buffer, not a parameter'
  # UNITER's scripts/convert_ckpt.py: every 'bert' in a key becomes 'uniter'.
  converted = {k.replace('bert', 'uniter'): v for k, v in sd.items()}
  torch.save(converted, tmp_path / 'uniter-tiny-init.pt')
  (tmp_path / 'uniter-tiny.json').write_text(json.dumps(HF_CONFIG))
  import_uniter.import_checkpoint(
      str(tmp_path / 'uniter-tiny-init.pt'), str(tmp_path / 'uniter-tiny.json'),
      str(tmp_path / 'b'), vocab=write_vocab(tmp_path / 'vocab.txt'), img_dim=D,
      num_region_classes=CLASSES, seed=3)
  _, _, want = imported_params(hf_bert['out'])
  for name in ('a', 'b'):
    _, _, got = imported_params(str(tmp_path / name))
    assert set(got) == set(want)
    for p in want:
      np.testing.assert_array_equal(got[p], want[p], err_msg=f'{name} {p}')
  # Without the MLM head: the backbone alone (image embeddings initialised).
  backbone = {k: v for k, v in converted.items() if not k.startswith('cls.')}
  torch.save(backbone, tmp_path / 'backbone.pt')
  config, summary, _ = import_uniter.import_checkpoint(
      str(tmp_path / 'backbone.pt'), str(tmp_path / 'uniter-tiny.json'), str(tmp_path / 'c'),
      img_dim=D, seed=3)
  assert config['heads'] == [] and all(k.startswith('uniter.img_embeddings.')
                                       for k in summary.initialised)
  _, _, got = imported_params(str(tmp_path / 'c'))
  for p in got:
    if p[1] != 'img_embeddings':
      np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
  # Another seed draws other fresh parameters; BERT's stay.
  other, _ = import_uniter.convert_state_dict(
      hf_bert['sd'], import_uniter.uniter_config(HF_CONFIG, img_dim=D,
                                                 num_region_classes=CLASSES)[0], seed=4)
  other = pretrained.flatten(other)
  assert not np.array_equal(other[('itm_output', 'kernel')], want[('itm_output', 'kernel')])
  np.testing.assert_array_equal(other[('uniter', 'pooler', 'dense', 'bias')],
                                want[('uniter', 'pooler', 'dense', 'bias')])


# ------------------------------------------------------------------ Karpathy runs
@pytest.fixture(scope='module')
def coco(tmp_path_factory):
  root = tmp_path_factory.mktemp('coco')
  truth = write_images(str(root / 'manual'), COCO, D, np.random.default_rng(0))
  builder, _ = prepare.prepare('coco_karpathy', manual_dir=root / 'manual',
                               data_dir=root / 'data', feature_dim=D, min_bb=5, max_bb=16,
                               test_fold_size=0, spm_vocab_size=80)
  return builder, truth, root


def run_config(spec, builder, root, **overrides):
  c = config_lib.load_config_file(os.path.join(REPO, spec))
  values = dict(data=f'coco_karpathy/{builder.builder_config.name}', data_dir=str(root / 'data'),
                feature_dim=D, max_regions=16, max_text_len=16, batch_size=8,
                mesh={'data': 1, 'fsdp': 1, 'tensor': 1}, eval_batch_size=24, log_every=1,
                **MODEL)
  values.update(overrides)
  return config_lib.set_values(c, values)


def hand_ids(caption):
  """[CLS] pieces [SEP] of a fixture caption, tokenised by hand: words as they are,
  numbers digit by digit (the vocabulary has single digits and ##digits)."""
  pieces = []
  for word in caption.replace('.', ' .').split():
    pieces += ([word[0]] + ['##' + d for d in word[1:]]) if word.isdigit() else [word]
  return [ID['[CLS]']] + [ID[p] for p in pieces] + [ID['[SEP]']]


def test_pretraining_starts_from_imported_bert(hf_bert, coco, tmp_path):
  builder, _, root = coco
  cfg = run_config('configs/uniter_base.py:size=tiny,data=coco_karpathy', builder, root,
                   init_from=hf_bert['out'], tasks={'mlm': 1.0}, total_steps=1,
                   eval_every=0, checkpoint_every=1, num_region_classes=CLASSES,
                   **{'optimizer.frozen': 'uniter,cls,feat_regress,region_classifier,itm_output'})
  job = jobs.job_factory(cfg)(cfg, Feed.whole(cfg.batch_size))
  tok = job.data.tokenizer
  assert isinstance(tok, WordPieceTokenizer)
  assert tok.path == os.path.join(hf_bert['out'], 'vocab.txt') and not tok.lowercase
  assert job.model_info['tokenizer'] == tok.path and job.model_info['tokenizer_lowercase'] is False
  gallery = job.data.gallery()  # The test captions, tokenised with BERT's vocabulary.
  test_caps = [c.strip() for i, s, n, _ in COCO if s == 'test' for c in coco[1][i][2][:5]]
  for row, caption in enumerate(test_caps):
    ids = hand_ids(caption)
    np.testing.assert_array_equal(gallery['input_ids'][row, :len(ids)], ids, err_msg=caption)
  # Every module frozen (no update) keeps the step-0 parameters: the checkpoint
  # shows what the run started from.
  loop.train_and_evaluate(cfg, str(tmp_path), devices=ONE)
  with open(tmp_path / 'metrics.jsonl') as f:
    assert np.isfinite(json.loads(f.readline())['loss/mlm'])
  params, meta, step = ckpt_lib.restore_params(str(tmp_path / 'checkpoints'))
  assert step == 1 and meta['model_info']['tokenizer'] == tok.path
  _, _, want = imported_params(hf_bert['out'])
  got = pretrained.flatten(jax.tree.map(np.asarray, params))
  assert set(got) == set(want)
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
  # Another tokenizer than the checkpoint's is refused, naming both.
  spm_path = os.path.join(builder.data_dir, 'spm.model')
  cfg.tokenizer = spm_path
  with pytest.raises(ValueError) as err:
    jobs.job_factory(cfg)(cfg, Feed.whole(cfg.batch_size))
  assert spm_path in str(err.value) and tok.path in str(err.value)


@pytest.mark.slow
def test_uniter_wordpiece_checkpoint_finetunes_and_evaluates_retrieval(coco, tmp_path,
                                                                     monkeypatch):
  builder, _, root = coco
  cfg_model = model_config('tiny', vocab_size=len(VOCAB), hidden_size=H, num_layers=LAYERS,
                           num_heads=HEADS_N, intermediate_size=INTER, img_dim=D,
                           num_region_classes=CLASSES)
  # A released-style UNITER checkpoint: random parameters under the reference names.
  rng = np.random.default_rng(5)
  abstract = pretrained.flatten(pretrained.abstract_params(
      lambda rngs: UniterForPretraining(cfg_model, rngs=rngs)))
  sd = {}
  for key, path, how in torch_name_table(LAYERS):
    shape = abstract[path].shape[::-1] if how == 'transpose' else abstract[path].shape
    sd[key] = torch.from_numpy(
        (rng.normal(size=shape) * 0.1 + (path[-1] == 'scale')).astype(np.float32))
  torch.save(sd, tmp_path / 'uniter-tiny.pt')
  (tmp_path / 'uniter-tiny.json').write_text(json.dumps(HF_CONFIG))
  imported = str(tmp_path / 'imported')
  import_uniter.import_checkpoint(str(tmp_path / 'uniter-tiny.pt'),
                                  str(tmp_path / 'uniter-tiny.json'), imported,
                                  vocab=write_vocab(tmp_path / 'vocab.txt'), img_dim=D,
                                  num_region_classes=CLASSES)
  cfg = run_config('configs/finetune_retrieval.py:size=tiny,data=coco_karpathy', builder, root,
                   init_from=imported, total_steps=3, eval_gallery_images=0,
                   **{'retrieval_ft.num_anchors': 4, 'retrieval_ft.num_hard_negatives': 3})
  work = str(tmp_path / 'work')
  out = loop.train_and_evaluate(cfg, work, devices=ONE)
  seen = []  # The score matrix the evaluation ranks (images x captions).
  recall_at_k = retrieval_eval.recall_at_k
  monkeypatch.setattr(retrieval_eval, 'recall_at_k',
                      lambda scores, *a, **kw: seen.append(scores) or recall_at_k(scores, *a, **kw))
  again = loop.evaluate_checkpoint(cfg, work, devices=ONE)
  assert out['num_images'] == 3 and out['num_captions'] == 15
  # The fine-tuned model, exported (its tokenizer comes along) and scored here.
  exported = str(tmp_path / 'exported')
  pretrained.export_workdir(work, exported)
  model, tok = vlp.load_pretrained(exported)
  assert isinstance(tok, WordPieceTokenizer) and tok.vocab_size == len(VOCAB)
  spec = batching.BatchSpec(batch_size=24, max_text_len=16, max_regions=16, feature_dim=D)
  gallery = pipeline.load_retrieval_gallery(builder, spec, tokenizer=tok, split='test')
  captions = [c.strip() for i, s, n, _ in COCO if s == 'test' for c in coco[1][i][2][:5]]
  ids = np.zeros((15, 16), np.int32)
  for row, caption in enumerate(captions):
    ids[row, :len(hand_ids(caption))] = hand_ids(caption)
  np.testing.assert_array_equal(gallery['input_ids'], ids)
  img, txt = np.repeat(np.arange(3), 15), np.tile(np.arange(15), 3)
  batch = {'input_ids': ids[txt], 'txt_mask': ids[txt] > 0,
           'img_feat': gallery['img_feat'][img], 'img_pos': gallery['img_pos'][img],
           'img_mask': gallery['img_mask'][img]}
  scores = np.asarray(model.encode(batch)['rank_scores']).reshape(3, 15)
  txt2img = np.repeat(np.arange(3), 5)
  t2i_r1 = 100 * np.mean(scores.argmax(0) == txt2img)
  i2t_r1 = 100 * np.mean(txt2img[scores.argmax(1)] == np.arange(3))
  # Evaluation scored exactly these pairs, hand-tokenised, and ranked them.
  (matrix,) = seen
  np.testing.assert_allclose(matrix, scores, rtol=1e-5, atol=1e-5)
  assert np.ptp(scores) > 1e-3  # Not all alike: the comparison above can tell.
  for result in (out, again):
    assert result['t2i_r1'] == pytest.approx(t2i_r1) and result['i2t_r1'] == pytest.approx(i2t_r1)
