"""Input-pipeline throughput: examples/s and tokens/s of the loader (build + tokenize once, then batches of MLM and
CLM examples) at sequence lengths 128 and 512 on a text corpus (default ../shared/data/gutenberg_books), beside the
tokens/s lmlab's own train step (the trainer's build_parts / make_setup / jit_steps) consumes on those batches with
the matching preset (bert-small for MLM, gpt2-tiny for CLM). The loader should be at least 5x faster than the step.
Prints numbers; never asserts.

  python benchmarks/input_pipeline.py [--data=PATH] [--batch_size=32] [--batches=30]
"""
import os
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data import builders, examples, tokenizers  # noqa: E402
from train.data.loader import Loader  # noqa: E402

_DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gutenberg_books"
_DATA = flags.DEFINE_string("data", str(_DEFAULT_DATA), "text file or folder of .txt files")
_BATCH = flags.DEFINE_integer("batch_size", 32, "global batch size")
_BATCHES = flags.DEFINE_integer("batches", 30, "batches timed per setting")
_VOCAB = flags.DEFINE_integer("vocab_size", 16000, "tokenizer vocabulary size")
_PREFETCH = flags.DEFINE_integer("prefetch", 0, "loader prefetch threads")


def step_tokens_per_second(kind: str, batch, vocab_size: int, steps: int = 5) -> float:
  """Tokens/s of the trainer's jitted train step for the preset matching `kind` ("mlm" | "clm") on `batch`."""
  import jax
  import ml_collections
  from model.config import preset
  from train.core import optim
  from train.core import trainer
  from train.data.loader import global_batch
  name = {"mlm": "bert-small", "clm": "gpt2-tiny"}[kind]
  b, t = batch["tokens"].shape
  config = ml_collections.ConfigDict(
      dict(objectives={kind: 1.0}, model=dict(preset=name, overrides={}), optim=optim.default_config(),
           mesh=dict(shape=(-1, 1, 1), rules=None), data=dict(batch_size=b)))
  cfg = preset(name, vocab_size=vocab_size, max_len=max(t, 512))
  setup = trainer.make_setup(trainer.build_parts(config, cfg), batch)
  train_fn, _ = trainer.jit_steps(setup)
  state, gb = setup.init_fn(0), global_batch(batch, setup.batch_sharding)
  state, m = train_fn(state, gb)  # compile
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = train_fn(state, gb)
  jax.block_until_ready(m)
  return steps * b * t / (time.perf_counter() - t0)


def main(argv):
  del argv
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    records = builders.build("text", name="bench", data_dir=tmp, splits={"train": _DATA.value})["train"]
    records = [records[i] for i in range(len(records))]
  t_build = time.perf_counter() - t0
  print(f"corpus: {_DATA.value}: {len(records)} passages, {sum(len(r['text']) for r in records) / 1e6:.1f} MB, "
        f"TFDS build+read {t_build:.1f}s")
  rows = []
  for kind, tok_kind in (("mlm", "wordpiece"), ("clm", "bpe")):
    t0 = time.perf_counter()
    tok = tokenizers.train_tokenizer(tok_kind, [r["text"] for r in records], vocab_size=_VOCAB.value)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream = examples.TokenStream.from_records(records, tok, doc_end_id=tok.sep_id if kind == "mlm" else tok.eos_id)
    t_stream = time.perf_counter() - t0
    print(f"{kind}: train {tok_kind} tokenizer {t_tok:.1f}s; tokenize corpus {t_stream:.1f}s "
          f"({len(stream.tokens) / t_stream / 1e6:.2f}M tokens/s)")
    for seq_len in (128, 512):
      if kind == "mlm":
        fn = examples.MaskedLM(stream, examples.Specials.from_tokenizer(tok), seq_len=seq_len)
      else:
        fn = examples.CausalLM(stream, seq_len=seq_len)
      loader = Loader(range(fn.num_windows), fn, batch_size=_BATCH.value, seed=0, process_index=0, process_count=1,
                      prefetch=_PREFETCH.value)
      first = next(loader)  # warm-up
      t0 = time.perf_counter()
      for _ in range(_BATCHES.value):
        next(loader)
      dt = time.perf_counter() - t0
      loader.close()
      n = _BATCHES.value * _BATCH.value
      rows.append((kind, seq_len, n / dt, n * seq_len / dt, step_tokens_per_second(kind, first, tok.vocab_size)))
  print(f"\n{'objective':>9} {'seq':>5} {'examples/s':>11} {'tokens/s':>11} {'step tokens/s':>14} {'ratio':>7}")
  for kind, seq_len, eps, tps, step in rows:
    print(f"{kind:>9} {seq_len:>5} {eps:>11,.0f} {tps:>11,.0f} {step:>14,.0f} {tps / step:>6.1f}x")


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  app.run(main)
