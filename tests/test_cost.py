"""train/core/cost.py against the things it predicts: parameter counts against the eval_shape'd params of every
preset (pre-training heads, task heads, LoRA, ELECTRA), FLOPs against XLA's cost analysis of the trainer's compiled
train step (encoder MLM + NSP, decoder CLM, encoder-decoder span corruption, full and head fine-tuning), bytes against
the compiled step's memory analysis, optimizer state against optax's own init, and check_fits' refusal.

Compiled steps come from trainer.prepare on the embedded corpus (a 512-entry tokenizer trained in about a second), 256
wide, 2 layers (T5: one encoder and one decoder layer), 8 x 128 tokens: big enough that matmuls dominate, small enough
to compile in seconds. XLA's cost analysis counts a while loop's body once, so the FLOPs runs unroll their layers
(scan_layers=False); the memory runs compile the same step again with the default scanned layers as well.
"""
import importlib
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from model import heads as heads_lib
from model import pytree
from model.config import PRESETS, preset
from configs import finetune as finetune_configs
from train.core import resolve
from train.finetune import strategies as finetune
from train.core import optim
from train.core import trainer
from train.data.loader import global_batch
from train.core import cost

SIZE = dict(d_model=256, num_heads=4, d_ff=1024, max_len=128, num_layers=2, scan_layers=False)


def _shapes(tree) -> dict:
  return {pytree.path_str(kp): tuple(x.shape) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _electra_shapes(gen, disc):
  batch = {'tokens': jnp.zeros((1, 4), jnp.int32), 'masked_positions': jnp.zeros((1, 2), jnp.int32)}
  module = heads_lib.Electra(gen, disc)
  return _shapes(jax.eval_shape(lambda: heads_lib.init_params(module, jax.random.key(0), batch)))


# ------------------------------------------------------------------------------------------------- parameters


def _pretraining_heads(name: str) -> tuple[str, ...]:
  cfg = preset(name)
  if cfg.arch != 'encoder':
    return ('lm',)
  return ('mlm', 'nsp') if cfg.type_vocab_size == 2 else ('mlm',)


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_param_count_is_exact_for_every_preset(name):
  cfg = preset(name)
  if name.startswith('electra-') and name.endswith('-discriminator'):  # pre-trained inside heads.Electra
    gen = preset(name.replace('-discriminator', '-generator'))
    want = _electra_shapes(gen, cfg)
    got = cost.param_shapes(cfg, ('rtd',), generator_cfg=gen)
    estimated = cost.estimate(cfg, heads=('rtd',), batch_size=2, seq_len=16, max_predictions=3, generator_cfg=gen)
  else:
    heads = _pretraining_heads(name)
    want = _shapes(heads_lib.abstract_params(cfg, heads))
    got = cost.param_shapes(cfg, heads)
    estimated = cost.estimate(cfg, heads=heads, batch_size=2, seq_len=16)
  assert got == want, sorted(set(got.items()) ^ set(want.items()))[:8]
  assert estimated.params == sum(math.prod(s) for s in want.values()) == estimated.trainable_params


@pytest.mark.parametrize(
    'name,heads,fields,kw',
    [
        ('bert-tiny', ('classifier',), {}, dict(num_labels=3)),  # [CLS] pooler + classifier
        ('bert-mini', ('tagger',), dict(lora_rank=4, lora_targets=('query', 'value', 'mlp/*')), dict(num_tags=7)),
        ('gpt2-tiny', ('classifier',), dict(lora_rank=2, scan_layers=False), dict(num_labels=5)),  # last-token pooling
        ('llama-tiny', ('qa',), dict(lora_rank=8, lora_targets=('self_attn/out', 'wi_0')), {}),
        ('t5-tiny', ('lm',), dict(lora_rank=4, scan_layers=False), {}),
        ('roberta-base', ('classifier',), {}, dict(classifier_pooling='mean', soft_prompt_length=20)),
    ])
def test_param_count_with_task_heads_and_lora(name, heads, fields, kw):
  cfg = preset(name, **fields)
  tree = heads_lib.abstract_params(cfg, heads, **kw)
  want = _shapes(tree)
  assert cost.param_shapes(cfg, heads, **kw) == want
  strategy = 'lora' if cfg.lora_rank else 'full'
  patterns = finetune.trainable_patterns(strategy, heads)
  est = cost.estimate(cfg, heads=heads, batch_size=2, seq_len=16, trainable=patterns, model_kw=kw)
  mask = optim.trainable_mask(tree, patterns) if patterns else jax.tree.map(lambda _: True, tree)
  trained = sum(math.prod(x.shape) for x, t in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if t)
  assert est.params == sum(math.prod(s) for s in want.values())
  assert est.trainable_params == trained and (trained < est.params) == bool(cfg.lora_rank)
  # The same mask given as a bool pytree or as a callable counts the same.
  assert cost.estimate(cfg, heads=heads, batch_size=2, seq_len=16, trainable=mask,
                       model_kw=kw).trainable_params == trained
  flags = pytree.flatten(mask)
  assert cost.estimate(cfg, heads=heads, batch_size=2, seq_len=16, trainable=flags.__getitem__,
                       model_kw=kw).trainable_params == trained


# --------------------------------------------------------------------------------------------- compiled steps


def _pretraining_config(family: str):
  c = importlib.import_module(f'configs.{family}').get_config('runlocal')
  c.data.source, c.data.vocab_size, c.data.tokenizer_train_records = 'embedded', 512, 300
  c.data.seq_len, c.data.batch_size = 128, 8
  c.train.eval_steps = 0
  for k, v in SIZE.items():
    c.model.overrides[k] = v
  return c


def _sentences(n, seed=0):
  rng = np.random.default_rng(seed)
  words = 'the a movie film was very quite good bad great awful plot actors story of and it this fine poor'.split()
  return [(' '.join(rng.choice(words, size=int(rng.integers(5, 12)))), int(rng.integers(2))) for _ in range(n)]


def _finetune_config(strategy: str, train_file, tokenizer_path=''):
  c = finetune_configs.get_config(f'task=sst2,strategy={strategy},runlocal')
  c.model.preset, c.data.train, c.data.dev = 'bert-mini', str(train_file), ''
  c.data.seq_len, c.data.batch_size, c.data.vocab_size, c.data.tokenizer_path = 128, 8, 512, tokenizer_path
  for k, v in SIZE.items():
    c.model.overrides[k] = v
  return c


def _compile(run, batch, setup=None):
  """The compiled train step, lowered from the state's abstract layout (what restore_or_init would hand it)."""
  setup = setup or run.setup
  train_fn = run.train_fn if setup is run.setup else trainer.jit_steps(setup)[0]
  return train_fn.lower(setup.abstract_state, batch).compile()


def _scanned(run, example):
  """The same run's setup with its layers scanned in a loop (scan_unroll=1), for the memory comparison."""
  cfg = run.setup.model_cfg.replace(scan_layers=True, scan_unroll=1)
  parts = trainer.Parts(resolve.build_model(run.config, cfg), cfg, run.setup.loss_fn, run.setup.optimizer,
                        run.setup.lr_fn, run.setup.mesh, run.setup.rules, run.setup.train_patterns)
  return trainer.make_setup(parts, example)


def _estimate(run, batch, **kw):
  """estimate() for the model the run built, the shapes of its batch and what its strategy trains."""
  model, cfg = run.setup.model, kw.pop('model_cfg', run.setup.model_cfg)
  encdec = cfg.arch == 'encoder_decoder'
  rows, seq = batch['encoder_tokens' if encdec else 'tokens'].shape
  kw = dict(
      heads=model.heads, batch_size=rows, seq_len=seq, targets_len=batch['decoder_tokens'].shape[1] if encdec else 0,
      max_predictions=batch['masked_positions'].shape[1] if 'masked_positions' in batch else 0,
      trainable=tuple(run.config.optim.get('trainable') or ()), optimizer=run.config.optim, model_kw={
          f: getattr(model, f)
          for f in ('num_labels', 'num_tags', 'classifier_pooling', 'backbone_deterministic', 'soft_prompt_length')
      }, **kw)
  return cost.estimate(cfg, **kw)


@pytest.fixture(scope='module')
def measured(tmp_path_factory):
  """name -> the run, its estimate and of_config's, XLA's FLOPs and memory of the unrolled step, and (for the memory
  cases) the scanned step's memory with the estimate for scanned layers."""
  out = {}

  def add(name, config, workdir, scanned=False):
    run = trainer.prepare(config, str(workdir), log=lambda *_: None)
    batch = global_batch(next(run.data.train), run.setup.batch_sharding)
    compiled = _compile(run, batch)
    # of_config reads the same config; with the run's own tokenizer it resolves the same vocabulary.
    same = ml_collections.ConfigDict(run.config.to_dict())
    same.data.tokenizer_path = config.data.tokenizer_path or str(workdir / 'tokenizer')
    r = dict(run=run, est=_estimate(run, batch), of_config=cost.of_config(same),
             flops=compiled.cost_analysis()['flops'], memory=compiled.memory_analysis())
    if scanned:
      r['scanned_memory'] = _compile(run, batch, _scanned(run, run.data.train[0])).memory_analysis()
      r['scanned_est'] = _estimate(run, batch, model_cfg=run.setup.model_cfg.replace(scan_layers=True, scan_unroll=1))
    out[name] = r

  base = tmp_path_factory.mktemp('cost')
  add('encoder mlm+nsp', _pretraining_config('bert'), base / 'bert', scanned=True)
  add('decoder clm', _pretraining_config('gpt'), base / 'gpt', scanned=True)
  no_dropout = _pretraining_config('gpt')  # attention trains through its own VJP (no attention dropout)
  no_dropout.model.overrides.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  add('decoder clm, no dropout', no_dropout, base / 'gpt_nodrop', scanned=True)
  t5 = _pretraining_config('t5')
  t5.model.overrides.num_layers = 1  # one encoder and one decoder layer: every part of both, half the compile
  add('encoder-decoder span', t5, base / 't5')
  train = base / 'train.tsv'
  train.write_text('sentence\tlabel\n' + ''.join(f'{s}\t{y}\n' for s, y in _sentences(64)))
  add('finetune full', _finetune_config('full', train), base / 'full')
  add('finetune head', _finetune_config('head', train, str(base / 'full' / 'tokenizer')), base / 'head')
  return out


CASES = ('encoder mlm+nsp', 'decoder clm', 'decoder clm, no dropout', 'encoder-decoder span', 'finetune full',
         'finetune head')


@pytest.mark.parametrize('name', CASES)
def test_flops_match_the_compiled_train_step(measured, name):
  r = measured[name]
  est, ratio = r['est'], r['est'].flops_per_step / r['flops']
  print(f'\n{name}: estimated {est.flops_per_step / 1e9:.3f} GFLOP, XLA {r["flops"] / 1e9:.3f} GFLOP, ratio '
        f'{ratio:.3f}; {est.summary()}')
  assert 0.9 < ratio < 1.1, (name, ratio, est.flops)
  # of_config resolves the model, heads, lengths and strategy of the same config to the same cost.
  assert r['of_config'].params == est.params == heads_lib.count_params(r['run'].setup.abstract_state['params'])
  assert r['of_config'].trainable_params == est.trainable_params
  assert r['of_config'].flops_per_step == pytest.approx(est.flops_per_step, rel=1e-9)


def test_head_strategy_is_forward_only_through_the_backbone(measured):
  full, head = measured['finetune full']['est'], measured['finetune head']['est']
  # No backward through the frozen backbone: head's backward is the classifier's alone (a 256 x 2 kernel and bias).
  assert head.flops['backward'] < 1e-3 * full.flops['backward'] and head.trainable_params == 256 * 2 + 2
  assert head.flops['forward'] < full.flops['forward']  # the frozen backbone also runs without dropout
  assert head.bytes['grads'] == head.trainable_params * 4 and head.bytes['opt_state'] == 2 * head.bytes['grads']


def _memory_ratio(est, mem) -> float:
  """Cost.bytes['total'] (params + grads + opt_state + activations) over the compiled step's argument bytes (params,
  optimizer state and the batch; donated, so the outputs alias them) plus its temporaries (gradients, the activations
  saved for the backward pass, XLA's scratch)."""
  return est.bytes['total'] / (mem.argument_size_in_bytes + mem.temp_size_in_bytes)


@pytest.mark.parametrize('name', ('encoder mlm+nsp', 'decoder clm', 'decoder clm, no dropout'))
def test_memory_matches_the_compiled_train_step(measured, name):
  r = measured[name]
  ratios = {
      'scanned': _memory_ratio(r['scanned_est'], r['scanned_memory']),
      'unrolled': _memory_ratio(r['est'], r['memory'])
  }
  mib = {k: round(v / 2 ** 20, 1) for k, v in r['scanned_est'].bytes.items()}
  print(f'\n{name}: memory estimate / compiled {ratios}; scanned estimate {mib} MiB')
  for layout, ratio in ratios.items():
    assert 0.75 < ratio < 1.25, (name, layout, ratio)
  # Params and optimizer state are the state's own bytes (Adam: two moments of every trained leaf).
  state = r['run'].setup.abstract_state
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if x.ndim)
  assert r['scanned_est'].bytes['params'] == nbytes(state['params'])
  assert r['scanned_est'].bytes['opt_state'] == nbytes(state['opt_state'])


# ------------------------------------------------------------------------------------ state, mesh, refusal


@pytest.mark.parametrize(
    'fields',
    [
        dict(optimizer='adamw'),
        dict(optimizer='adafactor', adafactor_momentum=0.9),  # factored second moments of the 2-D leaves
        dict(optimizer='sgd', momentum=0.9, grad_accum_steps=4),  # a trace, and MultiSteps' accumulator
    ])
def test_optimizer_state_bytes_equal_optax_init(fields):
  cfg = preset('t5-tiny', vocab_size=300, d_model=128)
  heads, patterns = ('lm',), ('transformer/decoder',)  # the decoder trains; embeddings and encoder are frozen
  opt = dict(optim.default_config().to_dict(), total_steps=10, trainable=patterns, **fields)
  tree = heads_lib.abstract_params(cfg, heads)
  state = jax.eval_shape(optim.make_optimizer(opt).init, tree)
  want = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim)
  est = cost.estimate(cfg, heads=heads, batch_size=2, seq_len=16, trainable=patterns, optimizer=opt)
  assert est.bytes['opt_state'] == want and est.trainable_params < est.params
  assert est.bytes['grads'] == 4 * est.trainable_params


def test_mesh_remat_and_batch_move_the_bytes_they_should():
  cfg = preset('bert-small', vocab_size=8192)
  base = dict(heads=('mlm',), batch_size=32, seq_len=128, max_predictions=20)
  one = cost.estimate(cfg, **base)
  fsdp = cost.estimate(cfg, **base, mesh_shape=(1, 4, 1))
  # FSDP splits every leaf with an 'embed' axis 4 ways (norm scales and biases over it too) and the batch 4 ways.
  assert fsdp.params == one.params and fsdp.devices == 4
  assert 0.25 <= fsdp.bytes['params'] / one.bytes['params'] < 0.3
  assert fsdp.bytes['activations'] == pytest.approx(one.bytes['activations'] / 4)
  assert fsdp.flops_per_step == pytest.approx(one.flops_per_step)
  full = cost.estimate(cfg, **base, remat_policy='full')  # saves each layer's input, recomputes the rest
  assert full.bytes['activations'] < 0.5 * one.bytes['activations']
  assert one.flops_per_step < full.flops_per_step < one.flops_per_step + full.flops['forward']
  half = cost.estimate(cfg, **dict(base, batch_size=16))
  assert half.bytes['activations'] == pytest.approx(one.bytes['activations'] / 2, rel=0.05)
  assert half.flops_per_step == pytest.approx(one.flops_per_step / 2, rel=0.01)
  with pytest.raises(ValueError, match='multiple of the data-parallel degree 3'):
    cost.estimate(cfg, **base, mesh_shape=(3, 1, 1))
  with pytest.raises(ValueError, match='does not divide'):
    cost.estimate(cfg, **base, mesh_shape=(1, 1, 3))  # 8 heads over 3 tensor shards


def test_check_fits_refuses_with_the_numbers_and_the_fix():
  est = cost.estimate(preset('gpt2-small'), heads=('lm',), batch_size=8, seq_len=1024)
  total = est.bytes['total']
  cost.check_fits(est, device_bytes=int(total * 1.01))
  with pytest.raises(ValueError) as err:
    cost.check_fits(est, device_bytes=int(total / 3))
  message = str(err.value)
  for key in ('params', 'grads', 'opt_state', 'activations'):
    assert f'{key} {cost._mib(est.bytes[key])} MiB' in message, key
  assert cost._mib(total) in message and cost._mib(int(total / 3)) in message
  for fix in ('config.data.batch_size', "remat_policy='full'", 'fsdp', 'config.mesh.shape'):
    assert fix in message, fix
  # Without device_bytes: the device's own capacity (the host's memory on CPU) holds a tiny model.
  cost.check_fits(cost.estimate(preset('bert-tiny', vocab_size=500), heads=('mlm',), batch_size=2, seq_len=16))
  assert cost.device_memory()[0] > 2 ** 28


def test_calibrate_and_predict_seconds():
  flops_per_sec = cost.calibrate(size=256, repeats=2)
  assert 1e6 < flops_per_sec < 1e16
  est = cost.estimate(preset('bert-tiny', vocab_size=500), heads=('mlm',), batch_size=8, seq_len=64,
                      mesh_shape=(1, 1, 1))
  assert cost.predict_seconds(est, flops_per_sec) == pytest.approx(est.flops_per_step / flops_per_sec)
  state = {'x': jnp.ones((64, 64))}
  step = lambda: state['x'] @ state['x']
  assert cost.calibrate(step, flops=2 * 64 ** 3, repeats=2) > 0
  with pytest.raises(ValueError, match='flops='):
    cost.calibrate(step)


def test_of_config_reads_a_checkpoints_config_only(tmp_path):
  cfg = preset('bert-mini', vocab_size=1000, num_layers=3)
  run = tmp_path / 'run'
  (run / 'checkpoints').mkdir(parents=True)  # an lmlab workdir; of_config reads config.json and nothing else
  (run / 'config.json').write_text(json.dumps({'model': cfg.to_dict(), 'config': {}}))
  c = finetune_configs.get_config('task=sst2,strategy=lora')
  c.model.init_from, c.data.label_names = str(run), ('neg', 'neutral', 'pos')
  est = cost.of_config(c)
  lora_cfg = cfg.replace(**finetune.model_fields(c))
  assert est.params == sum(math.prod(s) for s in cost.param_shapes(lora_cfg, ('classifier',), num_labels=3).values())
  assert est.trainable_params == sum(
      math.prod(s)
      for p, s in cost.param_shapes(lora_cfg, ('classifier',), num_labels=3).items()
      if 'lora_' in p or p.startswith('classifier'))
  assert est.tokens_per_step == 32 * 128
  (tmp_path / 'model.gguf').write_bytes(b'GGUF')
  c.model.init_from = str(tmp_path / 'model.gguf')
  with pytest.raises(ValueError, match='convert it once'):
    cost.of_config(c)
  c.finetune.prompt = True
  with pytest.raises(ValueError, match='config.finetune.prompt'):
    cost.of_config(c)


def test_a_run_that_will_not_fit_is_refused_by_train_main_before_anything_is_built(tmp_path):
  from configs import gpt
  from train.core import trainer
  config = gpt.get_config('runlocal')
  config.data.batch_size = 2 ** 20  # about 2 TiB of activations at seq_len 64
  workdir = tmp_path / 'huge'
  with pytest.raises(ValueError, match=r'needs an estimated .* MiB per device .*activations.*batch_size.*memory_check'):
    trainer.prepare(config, str(workdir), log=lambda *_: None)
  assert not workdir.exists() or not os.listdir(workdir)  # no tokenizer trained, nothing written
