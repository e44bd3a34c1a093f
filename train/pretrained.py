"""Starting points: load a model config, its params and its tokenizer from any checkpoint lmlab understands.

`load(path)` accepts an lmlab run's workdir (config.json + checkpoints/ + tokenizer/), a converted checkpoint
(`python -m model.convert import`), a Hugging Face model directory or a GGUF file; `convert.checkpoint_kind` says which
it is. model/convert reads the last three; the run's orbax checkpoint is restored here, since model/ knows nothing of
train/checkpoint.py. `config.model.init_from` in the trainer and `python -m train.generate --from=PATH` both read
through it.
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
from model.config import ModelConfig
from model.transformer import stack_layers, unstack_layers
from train import checkpoint as ckpt_lib
from train import tasks


@dataclasses.dataclass
class Pretrained:
  cfg: ModelConfig
  params: dict
  heads: tuple[str, ...]
  tokenizer_dir: Optional[str]  # a folder Tokenizer.load reads; None when the checkpoint has none
  source: str  # 'lmlab-run' | 'converted' | 'huggingface' | 'gguf'


def _from_run(workdir: str, step: Optional[int]) -> Pretrained:
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  cfg = ModelConfig(**saved['model'])
  objectives = saved['config'].get('objectives', {})
  own = [n for n in objectives if tasks.get(n).model is not None]
  if own:  # ELECTRA: a generator and a discriminator, not one LanguageModel
    raise ValueError(f'{workdir}: a {own[0]!r} run holds its own model (for rtd a generator and a discriminator); '
                     'export the part to start from with model.convert.')
  heads = tasks.heads_for(objectives)
  shapes = heads_lib.abstract_params(cfg, heads)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), async_save=False)
  try:
    params = ckpts.restore_params(abstract, step)
  finally:
    ckpts.close()
  tok = os.path.join(workdir, 'tokenizer')
  return Pretrained(cfg, params, heads, tok if os.path.exists(tok) else None, 'lmlab-run')


def load(path: str, *, step: Optional[int] = None, scan_layers: bool = True,
         save_dir: Optional[str] = None) -> Pretrained:
  """Any supported checkpoint -> Pretrained. A GGUF's tokenizer lives in its metadata: give save_dir to write it out."""
  kind = convert.checkpoint_kind(path)  # FileNotFoundError / ValueError naming the path and what it accepts
  if kind == 'lmlab-run':
    return _from_run(path, step)
  conv = convert.import_any(path, scan_layers=scan_layers)
  tokenizer_dir = conv.tokenizer_dir
  if conv.tokenizer is not None or (tokenizer_dir is None and save_dir):
    if save_dir is None:
      raise ValueError(f'{path}: its tokenizer is in the file\'s metadata; pass save_dir to write it out.')
    tokenizer_dir = str(convert.save(conv, save_dir))
  if conv.cfg.scan_layers != scan_layers:
    conv.params = stack_layers(conv.params) if scan_layers else unstack_layers(conv.params)
    conv.cfg = conv.cfg.replace(scan_layers=scan_layers)
  return Pretrained(conv.cfg, conv.params, tuple(conv.heads), tokenizer_dir, kind)


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
