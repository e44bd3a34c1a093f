"""The command line of model.convert: a checkpoint of any kind in, our converted layout or a Hugging Face one out.

  python -m model.convert import --from=HF_DIR_OR_GGUF --to=OUT_DIR   (writes params.safetensors + lmlab_model.json)
  python -m model.convert export --from=OUT_DIR --to=HF_DIR           (writes config.json + model.safetensors)

The flags (--from, --to, --scan_layers, --param_dtype) are defined in __main__.py, not on import, so that a program
with its own --from flag (train/generate.py) imports this package without a clash.
"""
from __future__ import annotations

from typing import Sequence

from absl import flags, logging

from model.convert.hf import export_hf
from model.convert.kinds import import_any
from model.convert.store import ConversionError, save

USAGE = 'usage: python -m model.convert import|export --from=SRC --to=DST'


def main(argv: Sequence[str]):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) != 2 or argv[1] not in ('import', 'export'):
    raise SystemExit(USAGE)
  src, dst = getattr(FLAGS, 'from'), FLAGS.to
  if not src or not dst:
    raise SystemExit('both --from and --to are required.')
  try:
    if argv[1] == 'import':
      conv = import_any(src, scan_layers=FLAGS.scan_layers, param_dtype=FLAGS.param_dtype)
      save(conv, dst)
    else:
      conv = import_any(src)
      export_hf(conv, dst)
  except (ConversionError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  if conv.unused:
    logging.warning('tensors not converted: %s', ', '.join(conv.unused))
  print(f'{argv[1]}ed {conv.family} ({", ".join(conv.heads) or "no heads"}) {src} -> {dst}')
