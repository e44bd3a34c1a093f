"""The front door for every kind of checkpoint path: `checkpoint_kind(path)` says which kind it is.

An lmlab run's workdir (config.json + checkpoints/ + tokenizer/), a converted directory (lmlab_model.json, written by
`python -m model.convert import`), a Hugging Face model directory (config.json + weights) or a .gguf file. The convert
CLI and train/core/pretrained.py both dispatch on this one answer; `import_any` reads the three kinds that model/ can read
on its own (an lmlab run is an orbax checkpoint, which train/core/pretrained.py restores).
"""
from __future__ import annotations

from pathlib import Path

from model.convert.gguf import import_gguf
from model.convert.hf import import_hf
from model.convert.store import CONFIG_FILE, ConversionError, Converted, load

KINDS = ('lmlab-run', 'converted', 'huggingface', 'gguf')
RUN_CHECKPOINTS = 'checkpoints'  # the orbax folder inside an lmlab run's workdir
_ACCEPTED = 'give an lmlab workdir, a converted or Hugging Face model directory, or a .gguf file'


def checkpoint_kind(path) -> str:
  """'lmlab-run' | 'converted' | 'huggingface' | 'gguf', from the layout on disk (nothing is read).

  Raises FileNotFoundError when path does not exist and ConversionError (a ValueError) when it is none of the kinds.
  """
  p = Path(path)
  if not p.exists():
    raise FileNotFoundError(f'{path} does not exist; {_ACCEPTED}.')
  if p.is_dir():
    if (p / RUN_CHECKPOINTS).exists():
      return 'lmlab-run'
    if (p / CONFIG_FILE).exists():
      return 'converted'
    if (p / 'config.json').exists():
      return 'huggingface'
  elif p.suffix == '.gguf':
    return 'gguf'
  raise ConversionError(f'{path} is not a checkpoint lmlab reads: {_ACCEPTED} (an lmlab workdir holds config.json '
                        f'and {RUN_CHECKPOINTS}/, a converted one {CONFIG_FILE}, a Hugging Face one config.json and '
                        'the weights).')


def import_any(path, **kw) -> Converted:
  """A converted directory, a Hugging Face model directory or a .gguf file -> Converted.

  kw (scan_layers, param_dtype) go to import_hf / import_gguf; a converted directory loads as it was saved.
  """
  kind = checkpoint_kind(path)
  if kind == 'lmlab-run':
    raise ConversionError(f"{path} is an lmlab run's workdir (an orbax checkpoint), which model.convert does not read; "
                          'start from it with train.core.pretrained.load(path), config.model.init_from or '
                          '`python -m train.generate --from=PATH`.')
  if kind == 'converted':
    return load(path)
  if kind == 'gguf':
    return import_gguf(path, **kw)
  return import_hf(path, **kw)
