"""Command line: `python -m train.main --config=configs/<family>.py:<args> --workdir=DIR [--config.key=value ...]`.

Multi-host: on a Cloud TPU pod slice pass --multihost (JAX finds its peers itself); elsewhere pass
--coordinator=HOST:PORT --num_processes=N --process_id=I on every host.
A run started on a workdir that already has checkpoints resumes from the latest one.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py file, optionally with :args.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics.jsonl, TensorBoard and the tokenizer go.')
_COORDINATOR = flags.DEFINE_string('coordinator', None, 'Multi-host: address HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: how many processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process, 0..num_processes-1.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Join a multi-host run whose peers JAX discovers (Cloud TPU).')
_INIT_TIMEOUT = flags.DEFINE_integer('distributed_timeout', 300, 'Seconds to wait for every host to join.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  import jax  # after flag parsing, so XLA_FLAGS set by the caller take effect
  from train import partitioning, trainer
  if _MULTIHOST.value or _COORDINATOR.value or _NUM_PROCESSES.value:
    partitioning.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                        _INIT_TIMEOUT.value)
  log = print if jax.process_index() == 0 else (lambda *_: None)
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, log=lambda m: log(m, flush=True))
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # Config, data and divergence errors are the user's to fix: one line, no traceback, non-zero exit.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  summary.pop('state', None)
  if summary['status'] == 'preempted':
    sys.exit(143)
  log(f'done: {summary["steps"]} steps, loss {summary["first_loss"]:.4f} -> {summary["final_loss"]:.4f}, '
      f'outputs in {summary["workdir"]}')


if __name__ == '__main__':
  logging.set_verbosity(logging.WARNING)
  app.run(main)
