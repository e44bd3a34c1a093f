"""model/lora.py and the LoRA adapters of layers.Dense: rank 0 changes nothing; adapters sit only at the targeted
projections with peft's shapes, init and logical axes; a LoRA model computes what its merged params compute on a plain
model (encoder, decoder, encoder-decoder; scanned and unrolled, with remat) and merge / unmerge are inverses; a merged
export loads in transformers with the same logits."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import lora, pytree
from model.config import PRESETS, ModelConfig, preset
from model.heads import LanguageModel, init_params, logical_axes
from tests.model_params import random_params

V, B, T = 61, 2, 8
ALL = ('query', 'value', 'out', 'mlp/*')  # the multi-axis input of 'out' ([N,H]) and every MLP projection too


def _cfg(name, **kw):
  extra = dict(num_layers=1) if name.startswith('t5') else dict(max_len=16, num_layers=2)
  return preset(name, vocab_size=V, **{**extra, **kw})


def _heads(cfg):
  return ('mlm',) if cfg.arch == 'encoder' else ('lm',)


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  ids = lambda: jnp.asarray(rng.integers(3, V, size=(B, T)), jnp.int32)
  segments = jnp.asarray([[1] * T, [1] * 5 + [0] * (T - 5)], jnp.int32)
  if cfg.arch == 'encoder_decoder':
    return dict(encoder_tokens=ids(), encoder_segment_ids=segments, decoder_tokens=ids(), decoder_segment_ids=segments)
  return dict(tokens=ids(), segment_ids=segments)


def _logits(cfg, params, batch, **kw):
  out = jax.jit(lambda p, b: LanguageModel(cfg, heads=_heads(cfg)).apply({'params': p}, b, **kw))(params, batch)
  return np.asarray(out['mlm_logits' if cfg.arch == 'encoder' else 'lm_logits'])


# ------------------------------------------------------------------------------------------------ rank 0 / config


def test_rank_zero_is_the_model_without_lora():
  """lora_rank=0 with every other LoRA field set (all targets, dropout on) gives the params tree, the values and, in
  train mode (dropout drawn from the same rng), the logits of a config built without the fields."""
  plain = ModelConfig(**{**PRESETS['bert-tiny'], 'vocab_size': V, 'max_len': 16})
  off = plain.replace(lora_rank=0, lora_alpha=4.0, lora_dropout=0.5, lora_targets=('*',))
  batch = _batch(plain)
  trees = [
      jax.jit(lambda b, c=c: init_params(LanguageModel(c, heads=('mlm',)), jax.random.key(0), b))(batch)
      for c in (plain, off)
  ]
  assert pytree.leaf_paths(trees[0]) == pytree.leaf_paths(trees[1])
  assert not any('lora' in p for p in pytree.leaf_paths(trees[1]))
  for a, b in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1])):
    np.testing.assert_array_equal(a, b)
  rngs = {'dropout': jax.random.key(3)}
  for deterministic in (True, False):
    got = [_logits(c, trees[0], batch, deterministic=deterministic, rngs=rngs) for c in (plain, off)]
    np.testing.assert_array_equal(got[0], got[1])


def test_config_fields_round_trip_through_json():
  """config.json gives tuples back as lists: the config built from it equals (and hashes like) the original, and its
  to_dict compares equal to the saved dict (train/core/workdir.py's check_same_model compares exactly that)."""
  cfg = _cfg('llama-tiny', lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets=('query', 'mlp/*'))
  saved = json.loads(json.dumps(cfg.to_dict()))
  back = ModelConfig(**saved)
  assert back == cfg and hash(back) == hash(cfg) and back.lora_targets == ('query', 'mlp/*')
  assert back.to_dict() == saved
  assert ModelConfig(lora_targets='query').lora_targets == ('query',)


@pytest.mark.parametrize('field,value,match', [('lora_rank', -1, 'lora_rank'), ('lora_dropout', 1.0, 'lora_dropout'),
                                               ('lora_targets', (), 'empty'),
                                               ('lora_targets', ('layers_0/self_attn/query',), 'every layer')])
def test_bad_lora_fields_name_themselves(field, value, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**{'lora_rank': 2, field: value})


# ----------------------------------------------------------------------------------------- where adapters go


def test_adapters_only_at_targets_with_peft_shapes_and_axes():
  """Default targets: one A [L,D,R] and one B [L,R,N|K,H] at each self_attn query and value, nothing else; B starts
  at zero (so a fresh LoRA model is its base model), A at U(-1/sqrt(D), 1/sqrt(D)); logical axes extend the kernel's."""
  r = 4
  cfg = _cfg('bert-tiny', lora_rank=r)
  batch = _batch(cfg)
  module = LanguageModel(cfg, heads=('mlm',))
  params = jax.jit(lambda b: init_params(module, jax.random.key(0), b))(batch)
  stack = 'transformer/stack/layers'
  assert lora.lora_paths(params) == [f'{stack}/self_attn/query', f'{stack}/self_attn/value']
  flat = pytree.flatten(params)
  L, D, N, H = cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_width
  for name in ('query', 'value'):
    a, b = flat[f'{stack}/self_attn/{name}/lora_a'], flat[f'{stack}/self_attn/{name}/lora_b']
    assert a.shape == (L, D, r) and b.shape == (L, r, N, H)
    assert not np.any(b) and 0 < np.abs(a).max() <= 1 / np.sqrt(D) and np.abs(a).max() > 0.8 / np.sqrt(D)
  assert lora.count_adapter_params(params) == 2 * L * (D * r + r * N * H)
  specs = {p: tuple(s) for p, s in pytree.flatten(logical_axes(module, batch)).items()}
  assert specs[f'{stack}/self_attn/query/kernel'] == ('layers', 'embed', 'heads', 'kv')
  assert specs[f'{stack}/self_attn/query/lora_a'] == ('layers', 'embed', None)
  assert specs[f'{stack}/self_attn/query/lora_b'] == ('layers', None, 'heads', 'kv')
  # B = 0: the same logits as the base model (the adapters removed).
  base, adapters = lora.split(params)
  assert set(pytree.flatten(adapters)) == {p for p in flat if p.endswith(('lora_a', 'lora_b'))}
  np.testing.assert_array_equal(_logits(cfg, params, batch), _logits(cfg.replace(lora_rank=0), base, batch))
  joined = pytree.flatten(lora.join(base, adapters))
  assert set(joined) == set(flat) and all(np.array_equal(joined[p], flat[p]) for p in flat)


def test_targets_select_by_name_path_glob_and_regex():
  """Patterns match the end of the module's path (or all of it), as globs or regexes; layer indices read as 'layers'."""
  paths = {
      'q': 'transformer/stack/layers_1/self_attn/query',
      'xq': 'transformer/decoder/stack/layers/cross_attn/query',
      'wi': 'transformer/stack/layers/mlp/wi_0',
      'wo': 'transformer/stack/layers_0/mlp/wo',
      'out': 'transformer/stack/layers/self_attn/out',
      'cls': 'classifier',
  }
  cases = {
      ('query', 'value'): {'q', 'xq'},
      ('self_attn/query',): {'q'},
      ('mlp/*',): {'wi', 'wo'},
      ('*/mlp/*',): {'wi', 'wo'},
      (r'wi_\d',): {'wi'},
      ('stack/layers/*/out',): {'out'},
      ('quer',): set(),
  }
  for targets, want in cases.items():
    assert {k for k, p in paths.items() if lora.is_target(p, targets)} == want, targets
  assert lora.is_target(('transformer', 'stack', 'layers_3', 'self_attn', 'query'), ('layers/self_attn/query',))
  # And in a model: 'mlp/*' puts adapters on the (gated) MLP of every layer, unrolled, and nowhere else.
  cfg = _cfg('llama-tiny', lora_rank=2, lora_targets=('mlp/*',), scan_layers=False)
  shapes = jax.eval_shape(lambda: init_params(LanguageModel(cfg, heads=('lm',)), jax.random.key(0), _batch(cfg)))
  assert lora.lora_paths(shapes) == [
      f'transformer/stack/layers_{i}/mlp/{w}' for i in range(2) for w in ('wi_0', 'wi_1', 'wo')
  ]


# -------------------------------------------------------------------------------------- merge / unmerge / apply


@pytest.mark.parametrize('name,scan,remat', [('bert-tiny', True, 'none'), ('bert-tiny', False, 'full'),
                                             ('llama-tiny', True, 'full'), ('llama-tiny', False, 'none'),
                                             ('t5-tiny', True, 'none')])
def test_lora_logits_equal_merged_logits(name, scan, remat):
  """With A and B random, the LoRA model's logits are those of merge(params) on a lora_rank=0 model (1e-5), and
  unmerge(merge(p), p) == p (1e-6)."""
  cfg = _cfg(name, lora_rank=3, lora_alpha=6.0, lora_targets=ALL, scan_layers=scan, remat_policy=remat)
  batch = _batch(cfg)
  params = random_params(LanguageModel(cfg, heads=_heads(cfg)), batch, std=0.08, seed=1)
  assert len(lora.lora_paths(params)) >= 5 and all(np.any(m) for m in jax.tree.leaves(lora.split(params)[1]))
  merged = lora.merge(params, cfg)
  assert not lora.lora_paths(merged)
  assert pytree.leaf_paths(merged) == pytree.leaf_paths(lora.split(params)[0])
  ours, plain = _logits(cfg, params, batch), _logits(lora.merged_config(cfg), merged, batch)
  np.testing.assert_allclose(ours, plain, rtol=0, atol=1e-5)
  # The adapters matter: without them the logits move well beyond the tolerance.
  assert np.abs(_logits(lora.merged_config(cfg), lora.split(params)[0], batch) - ours).max() > 1e-2
  back = pytree.flatten(lora.unmerge(merged, params, cfg))
  assert set(back) == set(pytree.flatten(params))
  for path, a in pytree.flatten(params).items():
    np.testing.assert_allclose(back[path], a, rtol=0, atol=1e-6, err_msg=path)


def test_merge_refuses_a_config_of_another_rank():
  cfg = _cfg('bert-tiny', lora_rank=2)
  params = random_params(LanguageModel(cfg, heads=('mlm',)), _batch(cfg), std=0.05)
  with pytest.raises(ValueError, match='lora_rank=4'):
    lora.merge(params, cfg.replace(lora_rank=4))


def test_lora_dropout_acts_in_train_mode_only():
  """lora_dropout drops the adapter's input when deterministic=False (threaded from attention into Dense), scanned."""
  cfg = _cfg('bert-tiny', lora_rank=2, lora_dropout=0.5, dropout_rate=0.0, attention_dropout_rate=0.0)
  batch = _batch(cfg)
  params = random_params(LanguageModel(cfg, heads=('mlm',)), batch, std=0.08)
  rngs = {'dropout': jax.random.key(5)}
  eval_mode = _logits(cfg, params, batch)
  assert np.abs(_logits(cfg, params, batch, deterministic=False, rngs=rngs) - eval_mode).max() > 1e-3
  no_drop = cfg.replace(lora_dropout=0.0)
  np.testing.assert_array_equal(_logits(no_drop, params, batch, deterministic=False, rngs=rngs), eval_mode)


# ----------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize('family,name,cls', [('llama', 'llama-tiny', 'LlamaForCausalLM'),
                                             ('bert', 'bert-tiny', 'BertForMaskedLM')])
def test_merged_export_loads_in_transformers(tmp_path, family, name, cls):
  """A LoRA model exported to Hugging Face is the merged model: transformers loads it (nothing missing or unexpected)
  and its logits equal lmlab's LoRA model's (1e-4); through our own layout and the CLI as well."""
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  transformers.logging.set_verbosity_error()
  from model import convert
  cfg = _cfg(name, lora_rank=4, lora_targets=ALL, pad_id=0)
  batch = _batch(cfg)
  params = random_params(LanguageModel(cfg, heads=_heads(cfg)), batch, std=0.1, seed=2)
  ours = _logits(cfg, params, batch)
  conv = convert.Converted(cfg=cfg, params=params, heads=_heads(cfg), family=family)
  convert.save(conv, tmp_path / 'ours')
  assert convert.load(tmp_path / 'ours').cfg == cfg  # lora_targets come back from JSON as the same tuple
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(
      [sys.executable, '-m', 'model.convert', 'export', f'--from={tmp_path / "ours"}', f'--to={tmp_path / "cli"}'],
      cwd=root, env={
          **os.environ, 'JAX_PLATFORMS': 'cpu'
      }, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  for out in (convert.export_hf(conv, tmp_path / 'hf'), tmp_path / 'cli'):
    model, info = getattr(transformers, cls).from_pretrained(out, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'], info
    model.eval()
    with torch.no_grad():
      ref = model(input_ids=torch.tensor(np.asarray(batch['tokens']), dtype=torch.long),
                  attention_mask=torch.tensor(np.asarray(batch['segment_ids']), dtype=torch.long)).logits.numpy()
    real = np.asarray(batch['segment_ids'], bool)
    assert np.abs(ours - ref)[real].max() < 1e-4
  # Imported back, it is the merged model: plain params, lora_rank 0.
  back = convert.import_hf(tmp_path / 'hf', scan_layers=cfg.scan_layers)
  assert back.cfg.lora_rank == 0 and not lora.lora_paths(back.params)
  merged = pytree.flatten(jax.tree.map(np.asarray, lora.merge(params, cfg)))
  for path, a in pytree.flatten(back.params).items():
    np.testing.assert_allclose(a, merged[path], rtol=0, atol=1e-6, err_msg=path)


def test_a_lora_run_exports_merged_weights_that_transformers_loads(tmp_path):
  """prompt+lora trained from a Hugging Face LLaMA; train.export merges the adapters; transformers' logits on the
  export equal lmlab's LoRA model on the run's checkpoint, and differ from the starting weights'."""
  from pathlib import Path

  import torch
  import transformers

  from train.core import pretrained
  from train.data import tokenizers
  repo = Path(__file__).resolve().parents[1]
  rows = [(f'the film was {w} and {f}', int(w in ('good', 'great')))
          for w in ('good', 'bad', 'great', 'awful')
          for f in ('long', 'short', 'new', 'old', 'odd')]
  data = tmp_path / 'train.tsv'
  data.write_text('sentence\tlabel\n' + ''.join(f'{s}\t{label}\n' for s, label in rows))
  tok = tokenizers.train_bpe([s for s, _ in rows] * 10 + ['Review: Sentiment: negative positive'] * 10, vocab_size=300)
  torch.manual_seed(0)
  start = tmp_path / 'llama'
  transformers.LlamaForCausalLM(
      transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               tie_word_embeddings=False)).save_pretrained(start)
  tok.save(start)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  run, out = tmp_path / 'run', tmp_path / 'hf'
  train = subprocess.run([
      sys.executable, '-m', 'train.main', '--config=configs/finetune.py:task=sst2,strategy=prompt+lora,'
      'runlocal', f'--workdir={run}', f'--config.model.init_from={start}', f'--config.data.train={data}',
      '--config.train.steps=10', '--config.finetune.lora_dropout=0'
  ], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  job = subprocess.run([sys.executable, '-m', 'train.export', f'--from={run}', f'--to={out}', '--step=latest'],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert job.returncode == 0, job.stderr[-3000:]
  assert 'LoRA merged' in job.stdout
  loaded = pretrained.load_run(str(run), step='latest')
  assert loaded.model.cfg.lora_rank > 0
  ids = np.asarray([tok.encode('Review: the film was good and new\nSentiment: positive')])
  # The 'prompt' head the run scored with reads the LM head; the same backbone and LM head over every position:
  lm = LanguageModel(loaded.model.cfg, heads=('lm',))
  ours = lm.apply({'params': loaded.pretrained.params}, {'tokens': ids})['lm_logits']
  merged = transformers.LlamaForCausalLM.from_pretrained(out).eval()
  base = transformers.LlamaForCausalLM.from_pretrained(start).eval()
  with torch.no_grad():
    theirs = merged(torch.tensor(ids)).logits.numpy()
    before = base(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4)
  assert np.abs(theirs - before).max() > 1e-4  # the adapters trained and were merged
