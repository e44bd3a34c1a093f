"""Export a training run's checkpoint as a Hugging Face model directory (config.json + model.safetensors + tokenizer).

  python -m train.export --from=RUN --to=HF_DIR [--step=best|latest|N] [--family=llama]

LoRA adapters are merged into the weights (model/lora.py), so transformers loads the result as a plain model. A run
whose task head has no Hugging Face counterpart (a classifier, tagger or QA layer) is refused; a prompt-based run
exports its backbone with the MLM or LM head it scored with. The family is the init_from checkpoint's, else
inferred from the architecture (encoder: bert, rotary decoder: llama, other decoders: gpt2, encoder-decoder: t5).
model.convert does the same for converted directories; this job adds what only train/ can read (orbax checkpoints).
"""
from __future__ import annotations

import sys

from model.config import ModelConfig

EXPORTABLE = {'mlm', 'nsp', 'lm'}


def infer_family(cfg: ModelConfig, init_from: str = '') -> str:
  """The Hugging Face family to write: the starting checkpoint's when it was one, else by architecture."""
  from model import convert  # pylint: disable=g-import-not-at-top
  if init_from and convert.checkpoint_kind(init_from) != 'lmlab-run':
    return convert.import_any(init_from).family
  if cfg.arch == 'encoder':
    return 'bert'
  if cfg.arch == 'decoder':
    return 'llama' if cfg.position == 'rope' else 'gpt2'
  return 't5'


def export_run(run_dir: str, out_dir: str, *, step='best', family: str = '', log=print):
  """Writes run_dir's checkpoint at `step` to out_dir in the Hugging Face layout (adapters merged)."""
  from model import convert  # pylint: disable=g-import-not-at-top
  from train.core import pretrained  # pylint: disable=g-import-not-at-top
  loaded = pretrained.load_run(run_dir, step=step)
  p = loaded.pretrained
  heads = tuple(('mlm' if p.cfg.arch == 'encoder' else 'lm') if h == 'prompt' else h for h in p.heads)
  extra = sorted(set(heads) - EXPORTABLE)
  if extra:
    raise ValueError(f'{run_dir}: its head(s) {extra} have no Hugging Face model class to load them into; export a '
                     'run that trains an MLM or LM head (pre-training, or finetune.prompt).')
  params = {k: v for k, v in p.params.items() if k != 'soft_prompt'}
  if 'soft_prompt' in p.params:
    log('note: the soft prompt has no place in a Hugging Face model; it stays in the run.')
  family = family or infer_family(p.cfg, loaded.config.model.get('init_from') or '')
  conv = convert.Converted(cfg=p.cfg, params=params, heads=heads, family=family, tokenizer_dir=p.tokenizer_dir)
  convert.export_hf(conv, out_dir)
  log(f'exported {run_dir} step {loaded.step} as {family} ({", ".join(heads) or "no heads"}'
      f'{", LoRA merged" if p.cfg.lora_rank else ""}) -> {out_dir}')


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('from', None, 'A training run (its workdir).')
  flags.DEFINE_string('to', None, 'The Hugging Face model directory to write.')
  flags.DEFINE_string('step', 'best', "'best', 'latest' or a step number.")
  flags.DEFINE_string('family', '', 'bert, roberta, electra, gpt2, t5, llama, mistral; default: inferred.')
  fl = flags.FLAGS
  try:
    fl(argv or sys.argv)
    if not fl['from'].value or not fl.to:
      raise ValueError('--from and --to are required: python -m train.export --from=RUN --to=HF_DIR.')
    export_run(fl['from'].value, fl.to, step=fl.step, family=fl.family)
  except (ValueError, FileNotFoundError, flags.Error) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
