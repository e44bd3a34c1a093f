"""Our own checkpoint format: a `Converted` model (ModelConfig + params + heads) and its directory on disk.

`save(conv, dir)` writes params.safetensors (keys are '/'-joined param paths: 'embed/token/embedding'), lmlab_model.json
(the ModelConfig, the heads, the family and the source config.json) and the tokenizer files that came with the
weights; `load(dir)` reads it back. Fine-tuning and generation read this directory as a starting point; every other
part of model/convert produces or consumes a `Converted`, so this module imports none of them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from model import pytree
from model.config import ModelConfig
from model.heads import LanguageModel

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt', 'vocab.json',
                   'merges.txt', 'spiece.model', 'tokenizer.model', 'added_tokens.json')
CONFIG_FILE = 'lmlab_model.json'
PARAMS_FILE = 'params.safetensors'


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file, tensor or config field and the fix."""


@dataclasses.dataclass
class Converted:
  """A converted checkpoint: LanguageModel(cfg, heads=heads) applies `params`.

  params may hold a 'pooler' that `heads` do not build (a BertModel's): applying ignores it, and a model that builds
  one (NSP, classifier_pooling='cls') takes it when train/core/pretrained.py merges the params in.
  family: one of hf_layouts.FAMILIES; hf_config: the checkpoint's config.json (export starts from it); extras: numpy
  arrays that have no place in our params but that export puts back (RoBERTa's unused position rows); unused: HF
  tensors that were not mapped (e.g. BertForSequenceClassification's classifier); tokenizer: a `tokenizers.Tokenizer`
  built from GGUF metadata, tokenizer_dir: the directory whose tokenizer files (tokenizer.json / vocab.txt / ...) came
  with the weights.
  """
  cfg: ModelConfig
  params: dict
  heads: tuple[str, ...]
  family: str
  hf_config: dict = dataclasses.field(default_factory=dict)
  extras: dict = dataclasses.field(default_factory=dict)
  unused: list = dataclasses.field(default_factory=list)
  tokenizer: Any = None
  tokenizer_dir: Optional[str] = None

  def module(self):
    return LanguageModel(self.cfg, heads=self.heads)


def read_safetensors(path) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays; a damaged file raises ConversionError naming it."""
  from safetensors.numpy import load_file
  try:
    return dict(load_file(str(path)))
  except Exception as e:  # safetensors raises its own SafetensorError (truncated header or data), OSError, ...
    size = os.path.getsize(path) if os.path.exists(path) else 0
    raise ConversionError(f'{path}: cannot read this safetensors file ({type(e).__name__}: {e}); it is truncated or '
                          f'not a safetensors file ({size} bytes). Re-download or re-export it.') from None


def copy_tokenizer(conv: Converted, out: Path):
  """Writes conv's tokenizer into out: the one built from GGUF metadata, and the files that came with the weights."""
  if conv.tokenizer is not None:
    conv.tokenizer.save(str(out / 'tokenizer.json'))
  if conv.tokenizer_dir and Path(conv.tokenizer_dir).resolve() != out.resolve():
    for name in TOKENIZER_FILES:
      src = Path(conv.tokenizer_dir) / name
      if src.exists() and not (out / name).exists():
        shutil.copyfile(src, out / name)


def save(conv: Converted, out_dir) -> Path:
  """params.safetensors (keys 'embed/token/embedding', ...) + lmlab_model.json + tokenizer files."""
  from safetensors.numpy import save_file
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  flat = {k: np.asarray(v) for k, v in pytree.flatten(jax.tree.map(np.asarray, conv.params)).items()}
  flat.update({f'extras/{k}': np.asarray(v) for k, v in conv.extras.items()})
  save_file(flat, str(out / PARAMS_FILE))
  meta = {
      'model_config': conv.cfg.to_dict(),
      'heads': list(conv.heads),
      'family': conv.family,
      'hf_config': conv.hf_config
  }
  (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
  copy_tokenizer(conv, out)
  return out


def load(path) -> Converted:
  """The inverse of `save`: a directory with lmlab_model.json + params.safetensors -> Converted."""
  d = Path(path)
  if not (d / CONFIG_FILE).exists():
    raise ConversionError(f'{d}: no {CONFIG_FILE}; write one with `python -m model.convert import`.')
  meta = json.loads((d / CONFIG_FILE).read_text())
  try:
    cfg = ModelConfig(**meta['model_config'])
  except (TypeError, ValueError) as e:
    raise ConversionError(f'{d / CONFIG_FILE}: model_config is not a valid ModelConfig: {e}') from None
  flat = read_safetensors(d / PARAMS_FILE)
  extras = {k[len('extras/'):]: v for k, v in flat.items() if k.startswith('extras/')}
  params = pytree.unflatten({k: v for k, v in flat.items() if not k.startswith('extras/')})
  return Converted(cfg=cfg, params=params, heads=tuple(meta['heads']), family=meta['family'],
                   hf_config=meta.get('hf_config', {}), extras=extras, tokenizer_dir=str(d))
