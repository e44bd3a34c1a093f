"""Starting points: load a model config, its params and its tokenizer from any checkpoint lmlab understands.

`load(path)` accepts an lmlab run's workdir (config.json + checkpoints/ + tokenizer/), a converted checkpoint
(`python -m model.convert import`), a Hugging Face model directory or a GGUF file. `config.model.init_from` in the
trainer and `python -m train.generate --from=PATH` both read through it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp

from model import convert
from model import heads as heads_lib
from model.transformer import ModelConfig
from train import checkpoint as ckpt_lib


@dataclasses.dataclass
class Pretrained:
  cfg: ModelConfig
  params: dict
  heads: tuple[str, ...]
  tokenizer_dir: Optional[str]   # a folder Tokenizer.load reads; None when the checkpoint has none
  source: str                    # 'lmlab-run' | 'converted' | 'huggingface' | 'gguf'


def _from_run(workdir: str, step: Optional[int]) -> Pretrained:
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  cfg = ModelConfig(**saved['model'])
  objectives = saved['config'].get('objectives', {})
  if 'rtd' in objectives:
    raise ValueError(f'{workdir}: an ELECTRA run holds a generator and a discriminator; export the discriminator '
                     'with model.convert to start from it.')
  from train.objectives import heads_for  # pylint: disable=g-import-not-at-top
  heads = heads_for(objectives)
  module = heads_lib.LanguageModel(cfg, heads=heads)
  example = ({'encoder_tokens': jnp.ones((1, 8), jnp.int32), 'decoder_tokens': jnp.ones((1, 8), jnp.int32)}
             if cfg.arch == 'encoder_decoder' else {'tokens': jnp.ones((1, 8), jnp.int32)})
  if 'nsp' in heads or 'mlm' in heads:
    example['masked_positions'] = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda: heads_lib.init_params(module, jax.random.key(0), example))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), async_save=False)
  try:
    params = ckpts.restore_params(abstract, step)
  finally:
    ckpts.close()
  tok = os.path.join(workdir, 'tokenizer')
  return Pretrained(cfg, params, heads, tok if os.path.exists(tok) else None, 'lmlab-run')


def load(path: str, *, step: Optional[int] = None, scan_layers: bool = True, save_dir: Optional[str] = None
         ) -> Pretrained:
  """Any supported checkpoint -> Pretrained. A GGUF's tokenizer lives in its metadata: give save_dir to write it out."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; give an lmlab workdir, a converted or Hugging Face model '
                            'directory, or a .gguf file.')
  if os.path.isdir(path) and os.path.exists(os.path.join(path, 'checkpoints')):
    return _from_run(path, step)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, convert.CONFIG_FILE)):
    conv, source = convert.load(path), 'converted'
  else:
    conv = convert.import_any(path, scan_layers=scan_layers)
    source = 'gguf' if str(path).endswith('.gguf') else 'huggingface'
  tokenizer_dir = conv.tokenizer_dir
  if conv.tokenizer is not None or (tokenizer_dir is None and save_dir):
    if save_dir is None:
      raise ValueError(f'{path}: its tokenizer is in the file\'s metadata; pass save_dir to write it out.')
    tokenizer_dir = str(convert.save(conv, save_dir))
  if conv.cfg.scan_layers != scan_layers:
    from model.transformer import stack_layers, unstack_layers  # pylint: disable=g-import-not-at-top
    conv.params = stack_layers(conv.params) if scan_layers else unstack_layers(conv.params)
    conv.cfg = conv.cfg.replace(scan_layers=scan_layers)
  return Pretrained(conv.cfg, conv.params, tuple(conv.heads), tokenizer_dir, source)


def merge_params(initial, loaded, *, where: str):
  """`initial` with every leaf that `loaded` has replaced by it; shapes must agree (heads absent in `loaded` stay)."""
  def walk(init, new, path):
    if not isinstance(init, dict):
      if tuple(init.shape) != tuple(new.shape):
        raise ValueError(f'{where}: parameter {path} has shape {tuple(new.shape)} in the checkpoint but '
                         f'{tuple(init.shape)} in the model; make config.model match the checkpoint.')
      return jnp.asarray(new, init.dtype)
    out = dict(init)
    for key, value in init.items():
      if isinstance(new, dict) and key in new:
        out[key] = walk(value, new[key], f'{path}/{key}' if path else key)
    return out
  return walk(initial, loaded, '')
