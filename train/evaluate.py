"""Score a checkpoint on a downstream task's data: every example once, the task's predictions and its metrics by name.

  python -m train.evaluate --from=RUN --data=FILE --out=DIR [--step=best|latest|N]
  python -m train.evaluate --from=CHECKPOINT --config=configs/finetune.py:task=sst2,strategy=prompt --data=FILE --out=DIR

writes DIR/metrics.json ({'accuracy': ..., 'f1': ..., 'exact_match': ...}, the task's metrics by name, with the
checkpoint step and the file) and DIR/predictions.jsonl (one JSON object per record: its id or text, the reference and
the prediction). The scoring is the library's (train/core/evaluation.py over train/tasks/scoring.py), the same the dev
evaluation during fine-tuning runs, so the job reproduces what training logged for the same checkpoint.
"""
import os
import sys

from train.core import host


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  # after host.start_job, which sets what JAX reads when it is imported (train/core/host.py)
  from train.core.evaluation import evaluate_prompt, evaluate_run  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string(
      'from', None, 'A fine-tuning run (its workdir); with --config, any checkpoint (an lmlab run, a '
      'converted or Hugging Face directory, a .gguf file) scored zero-shot by prompt.')
  config_flags.DEFINE_config_file(
      'config', None, 'Zero-shot prompting: configs/finetune.py:task=T,strategy=prompt '
      '(template, verbalizer, demonstrations as --config.finetune.* overrides).')
  flags.DEFINE_string('data', None, "A file in the task's format (TSV/CSV/JSONL, CoNLL, SQuAD JSON).")
  flags.DEFINE_string('out', None, 'Where metrics.json and predictions.jsonl go.')
  flags.DEFINE_string('step', 'best', "'best' (by the run's config.train.best_metric), 'latest', or a step number.")
  flags.DEFINE_integer('batch_size', 0, "Examples per forward pass; 0: the run's config.data.batch_size.")
  fl = flags.FLAGS
  try:
    fl(argv or sys.argv)
    missing = [f'--{n}' for n in ('from', 'data', 'out') if not fl[n].value]
    if missing:
      raise ValueError(f'{" ".join(missing)} required: python -m train.evaluate --from=RUN --data=FILE --out=DIR.')
    where = fl['from'].value
    if not os.path.exists(where) or (fl.config is None and not os.path.isfile(os.path.join(where, 'config.json'))):
      why = 'does not exist' if not os.path.exists(where) else "holds no config.json: it is no run's workdir"
      raise FileNotFoundError(f'--from={where} {why}; give a fine-tuning run\'s --workdir, or with --config any '
                              'checkpoint (an lmlab run, a converted or Hugging Face directory, a .gguf file).')
    if fl.config is not None:
      evaluate_prompt(fl['from'].value, fl.config, fl.data, fl.out, batch_size=fl.batch_size)
    else:
      evaluate_run(fl['from'].value, fl.data, fl.out, step=fl.step, batch_size=fl.batch_size)
  except (ValueError, FileNotFoundError, flags.Error) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  host.start_job()  # the device pool, programs run inline, malloc tuned, before JAX starts (train/core/host.py)
  sys.exit(main())
