"""Generate text from any checkpoint: `python -m train.generate --from=PATH --prompt="Once upon a time"`.

PATH is an lmlab workdir, a converted checkpoint, a Hugging Face model directory or a .gguf file (train/core/pretrained.py).
Decoder-only models continue the prompt; encoder-decoder models read it as the encoder input. A run's tokenizer is
<workdir>/tokenizer (where the trainer adopts an init_from checkpoint's), else the config.data.tokenizer_path it used.
"""
import os
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging

from train.core import host

_FROM = flags.DEFINE_string('from', None, 'Checkpoint: lmlab workdir, converted dir, Hugging Face dir or .gguf file.')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'Prompt text; repeat the flag for a batch.')
_METHOD = flags.DEFINE_enum('method', 'greedy', ['greedy', 'sample', 'beam'], 'How tokens are chosen.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 32, 'Tokens to generate per prompt.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens (0: off).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample from the smallest set with this much probability (1: off).')
_BEAMS = flags.DEFINE_integer('num_beams', 4, 'Beam search width.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
flags.mark_flags_as_required(['from', 'prompt'])


def main(argv):
  del argv
  import jax
  import numpy as np
  from model import decode
  from model import heads
  from train.core import host
  from train.core import pretrained
  from train.data import tokenizers

  with tempfile.TemporaryDirectory() as tmp:
    try:
      ckpt = pretrained.load(_FROM.value, save_dir=tmp, inference=True)
    except (ValueError, FileNotFoundError) as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    # A run reads <workdir>/tokenizer (pretrained.adopt_tokenizer puts an init_from checkpoint's there), else the
    # config.data.tokenizer_path it trained with, which may since have moved.
    if ckpt.tokenizer_dir is None or not os.path.exists(ckpt.tokenizer_dir):
      where = 'no tokenizer files' if ckpt.tokenizer_dir is None else f'tokenizer {ckpt.tokenizer_dir}, which is gone'
      fix = (f'copy the tokenizer it was trained with into it: train.core.pretrained.adopt_tokenizer(TOKENIZER, '
             f'{_FROM.value!r})' if ckpt.source == 'lmlab-run' else 'put its tokenizer.json or vocab.txt next to it')
      print(f'error: {_FROM.value} has {where}; {fix}.', file=sys.stderr)
      return 2
    try:
      tok = tokenizers.Tokenizer.load(ckpt.tokenizer_dir)
    except (ValueError, FileNotFoundError) as e:
      print(f'error: {_FROM.value}: cannot read its tokenizer: {e}', file=sys.stderr)
      return 2
  # The decode loop compiles in seconds per prompt shape and method: a run keeps it in its workdir beside what
  # training compiled, any other checkpoint in the user's cache (unless JAX_COMPILATION_CACHE_DIR names another).
  host.use_job_cache(_FROM.value if ckpt.source == 'lmlab-run' else None, host.cache_home())
  if ckpt.cfg.arch == 'encoder':
    print('error: an encoder-only model does not generate text; use a decoder or encoder-decoder.', file=sys.stderr)
    return 2
  model = heads.LanguageModel(ckpt.cfg, heads=('lm',))
  ids = [tok.encode(p) for p in _PROMPT.value]
  if ckpt.cfg.arch == 'decoder' and ckpt.cfg.bos_id is not None:
    ids = [[ckpt.cfg.bos_id] + x if not x or x[0] != ckpt.cfg.bos_id else x for x in ids]
  width = max(len(x) for x in ids)
  tokens = np.full((len(ids), width), ckpt.cfg.pad_id, np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for i, x in enumerate(ids):
    tokens[i, :len(x)], mask[i, :len(x)] = x, 1
  config = decode.DecodeConfig(method=_METHOD.value, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                               top_k=_TOP_K.value, top_p=_TOP_P.value, num_beams=_BEAMS.value)
  if ckpt.cfg.arch == 'encoder_decoder':
    out, _ = decode.generate(model, ckpt.params, encoder_tokens=tokens, encoder_segment_ids=mask, config=config,
                             rng=jax.random.key(_SEED.value))
  else:
    out, _ = decode.generate(model, ckpt.params, tokens, prompt_mask=mask, config=config,
                             rng=jax.random.key(_SEED.value))
  eos = ckpt.cfg.eos_id
  for prompt, row in zip(_PROMPT.value, np.asarray(out)):
    row = [int(t) for t in row]
    row = row[:row.index(eos)] if eos is not None and eos in row else row
    print(f'{prompt!r} -> {tok.decode(row)!r}')
  return 0


if __name__ == '__main__':
  host.start_job()  # the device pool, programs run inline, malloc tuned, before JAX starts (train/core/host.py)
  logging.set_verbosity(logging.WARNING)
  app.run(lambda argv: sys.exit(main(argv)))
