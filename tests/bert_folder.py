"""A tiny HuggingFace BERT folder, as bert-base-cased is published, for the tests
that start from BERT (tests/test_bert_init.py, tests/test_e2e_bert_pretrain.py).

`write_bert_folder` writes config.json, tokenizer_config.json, vocab.txt and
model.safetensors (written with torch) of a 1-layer, 32-wide BertForPreTraining
whose vocabulary is `VOCAB`; `ID` maps its tokens to ids for hand tokenisations.
Needs torch and safetensors (requirements-torch.txt).
"""

import json

# bert-base-cased's layout: [PAD], [unused*], [UNK], [CLS], [SEP], [MASK], then pieces.
VOCAB = (['[PAD]', '[unused0]', '[unused1]', '[unused2]', '[UNK]', '[CLS]', '[SEP]', '[MASK]',
          '.', ',', '!', "'", '-'] + list('0123456789') + [f'##{d}' for d in '0123456789']
         + ['Caption', 'of', 'image', 'with', 'a', 'dog', 'the', 'cat', 'play', '##ing', 'café',
            'cafe', 'naïve', 'naive', '日', '本', 'un', '##believ', '##able', 'New', 'York',
            'new', 'york', 's', 't', 'don'])
ID = {t: i for i, t in enumerate(VOCAB)}
H, LAYERS, HEADS_N, INTER, MAXPOS = 32, 1, 2, 64, 512
HF_CONFIG = {'architectures': ['BertForPreTraining'], 'model_type': 'bert',
             'attention_probs_dropout_prob': 0.1, 'hidden_act': 'gelu',
             'hidden_dropout_prob': 0.1, 'hidden_size': H, 'initializer_range': 0.02,
             'intermediate_size': INTER, 'layer_norm_eps': 1e-12,
             'max_position_embeddings': MAXPOS, 'num_attention_heads': HEADS_N,
             'num_hidden_layers': LAYERS, 'pad_token_id': 0, 'type_vocab_size': 2,
             'vocab_size': len(VOCAB)}
# The model keys the jobs' configs set to match it (dropout off: runs compare exactly).
MODEL = {'model.hidden_size': H, 'model.num_layers': LAYERS, 'model.num_heads': HEADS_N,
         'model.intermediate_size': INTER, 'model.hidden_dropout': 0.0,
         'model.attention_dropout': 0.0}


def write_vocab(path):
  path.write_text('\n'.join(VOCAB) + '\n', encoding='utf-8')
  return str(path)


def bert_tensors(seed=0):
  """A BertForPreTraining state dict as HuggingFace publishes bert-base-cased: old
  LayerNorm names (gamma / beta), the MLM and next-sentence heads."""
  import torch
  g = torch.Generator().manual_seed(seed)
  r = lambda *shape: torch.randn(*shape, generator=g) * 0.05
  sd = {'bert.embeddings.word_embeddings.weight': r(len(VOCAB), H),
        'bert.embeddings.position_embeddings.weight': r(MAXPOS, H),
        'bert.embeddings.token_type_embeddings.weight': r(2, H)}

  def linear(name, n_out, n_in):
    sd[f'{name}.weight'], sd[f'{name}.bias'] = r(n_out, n_in), r(n_out)

  def norm(name):
    sd[f'{name}.gamma'], sd[f'{name}.beta'] = 1 + r(H), r(H)

  norm('bert.embeddings.LayerNorm')
  for i in range(LAYERS):
    p = f'bert.encoder.layer.{i}'
    for n in ('query', 'key', 'value'):
      linear(f'{p}.attention.self.{n}', H, H)
    linear(f'{p}.attention.output.dense', H, H)
    norm(f'{p}.attention.output.LayerNorm')
    linear(f'{p}.intermediate.dense', INTER, H)
    linear(f'{p}.output.dense', H, INTER)
    norm(f'{p}.output.LayerNorm')
  linear('bert.pooler.dense', H, H)
  linear('cls.predictions.transform.dense', H, H)
  norm('cls.predictions.transform.LayerNorm')
  sd['cls.predictions.bias'] = r(len(VOCAB))
  linear('cls.seq_relationship', 2, H)
  return sd


def write_bert_folder(folder, seed=0):
  """A HuggingFace BERT folder (model.safetensors) at `folder` (a pathlib.Path,
  created); returns its state dict (torch tensors)."""
  from safetensors.torch import save_file
  folder.mkdir(parents=True)
  sd = bert_tensors(seed)
  save_file(sd, str(folder / 'model.safetensors'))
  (folder / 'config.json').write_text(json.dumps(HF_CONFIG))
  (folder / 'tokenizer_config.json').write_text(json.dumps({'do_lower_case': False}))
  write_vocab(folder / 'vocab.txt')
  return sd
