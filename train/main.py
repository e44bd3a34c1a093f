"""Command line: `python -m train.main --config=configs/<family>.py:<args> --workdir=DIR [--config.key=value ...]`.

`--print_config` prints the resolved config (every field, after overrides; documented in configs/common.py) and exits.
A relative --config path is looked up in the current directory, then in the repository. Multi-host: on a Cloud TPU pod
slice pass --multihost (JAX finds its peers itself); elsewhere pass --coordinator=HOST:PORT --num_processes=N
--process_id=I on every host. A run started on a workdir that already has checkpoints resumes from the latest one.
Mistakes in the flags (a misspelt field, a value of the wrong type, a missing config file, a bad config argument) stop
with one line `error: ...` and exit code 2, before anything is compiled or written.

Exit codes: 0 done (or the workdir was already finished); 2 one-line `error: ...` the user can fix (flags, config,
data, divergence, a busy workdir, a full disk: rerun once fixed, a checkpointed run resumes from its newest complete
step); 143 stopped by SIGTERM, 130 by Ctrl-C (SIGINT): in the loop after saving the step in flight (within two steps),
during start-up with nothing trained and the workdir as it was, after the final save with the run complete; each says
which in one line, and the same command resumes. A second Ctrl-C exits at once without saving; 75 (multi-host) another process of the run was killed, crashed or stopped
answering for --peer_timeout seconds (default 30), or stopped on an error of its own: this one names it in one line
and exits rather than hang in a collective; restart every process to resume from the newest complete checkpoint.
"""
import difflib
import importlib.util
import os
import re
import signal
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from train.core import failures
from train.core import host
from train.core import signals as signals_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A configs/*.py file, optionally with :args (e.g. configs/gpt.py:size=small,runlocal); a relative '
    'path is looked up in the current directory, then in the repository. Any field can be overridden with '
    '--config.<field>=value (e.g. --config.train.steps=100, --config.model.overrides.num_layers=4); --print_config '
    'lists them all, and configs/common.py documents each.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics.jsonl, TensorBoard and the tokenizer go.')
_PRINT_CONFIG = flags.DEFINE_bool(
    'print_config', False, 'Print the resolved config (after the --config.* overrides) '
    'and exit, without training; --workdir may be omitted.')
_COORDINATOR = flags.DEFINE_string('coordinator', None, 'Multi-host: address HOST:PORT of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: how many processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process, 0..num_processes-1.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Join a multi-host run whose peers JAX discovers (Cloud TPU).')
_INIT_TIMEOUT = flags.DEFINE_integer('distributed_timeout', 300, 'Seconds to wait for every host to join.')
_PEER_TIMEOUT = flags.DEFINE_integer(
    'peer_timeout', 30, 'Multi-host: seconds a process may stay silent (killed, hung, unreachable) before the others '
    'stop with one line naming it and exit code 75, instead of hanging in a collective (a killed process is noticed '
    'at once). Keep it below the collective backend\'s own timeout (gloo: 60 s); 0 turns the watchdog off.')

_WATCHDOG = []  # the multi-host peer watchdog (train/core/distributed.py), once started
# SIGTERM and Ctrl-C from the start (installed by __main__): start-up stops at once, the loop saves first.
_SIGNALS = signals_lib.Signals(immediate=True)


def _stopped(line: str, code: int, *, at_once: bool = False):
  """The run stopped on a signal: one line on stdout and the signal's exit code (multi-host: the peers are told, as
  by _fail). at_once: without waiting for the threads of a save in flight (Python's exit would join them)."""
  if _WATCHDOG:
    from train.core import distributed  # pylint: disable=g-import-not-at-top
    _WATCHDOG[0].stop(failed=line)
    distributed.exit_with(line, code)
  print(line, flush=True)
  if at_once:
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def _newest_checkpoint(workdir) -> str:
  """'from step N, its newest checkpoint' or 'from the start: it holds no checkpoint yet', for a stop line."""
  folder = os.path.join(workdir or '', 'checkpoints')
  steps = [int(n) for n in (os.listdir(folder) if os.path.isdir(folder) else ()) if n.isdigit()]
  return f'from step {max(steps)}, its newest checkpoint' if steps else 'from the start: it holds no checkpoint yet'


def _stop_signal(error: BaseException):
  """A run a signal ended before or outside the loop's own save: its one line and exit code."""
  if isinstance(error, signals_lib.Stopped):
    _stopped(f'{error.name} during start-up: stopped before training; nothing was lost (no step was trained or saved; '
             'the same command starts or resumes the run).', error.exit_code)
  # A save cut off in flight leaves only orbax's temporary folder, never a partial step.
  _stopped(f'Ctrl-C again: stopped at once, without saving or finishing a save; the same command resumes '
           f'{_newest_checkpoint(_WORKDIR.value)}.', signals_lib.EXIT_CODES[signal.SIGINT], at_once=True)


def _fail(message: str, code: int = 2):
  """A mistake the user can fix from the command line: one line, exit code 2, nothing written. In a multi-host run
  the peers are told (they stop too, naming this process) and the process ends at once: jax's exit-time shutdown
  would wait minutes for peers that may be blocked in a collective."""
  line = f'error: {" ".join(str(message).split())}'
  if _WATCHDOG:
    from train.core import distributed  # pylint: disable=g-import-not-at-top
    _WATCHDOG[0].stop(failed=line.removeprefix('error: '))
    distributed.exit_with(line, code)
  print(line, file=sys.stderr)
  sys.exit(code)


# ------------------------------------------------------------------------------------------------- flag parsing


def _config_arg(argv) -> tuple[int, str, str] | None:
  """Where argv gives the config file: (index of the token, text before the value, the value)."""
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--':
      break
    m = re.match(r'^--?config(=|$)', arg)
    if m and m.group(1):
      return i, arg[:m.end()], arg[m.end():]
    if m and i + 1 < len(argv):
      return i + 1, '', argv[i + 1]
  return None


def _known_configs() -> str:
  names = sorted(f for f in os.listdir(os.path.join(REPO, 'configs')) if f.endswith('.py') and not f.startswith('_'))
  return ', '.join(f'configs/{f}' for f in names if f != 'common.py')


def _resolve_config_path(argv) -> list[str]:
  """A relative --config path not found in the current directory is taken from the repository, so the README's
  commands work from anywhere; a path found in neither is an error listing the known configs."""
  where = _config_arg(argv)
  if where is None:
    return list(argv)
  i, before, value = where
  path, colon, arg = value.partition(':')
  if os.path.isfile(path):
    return list(argv)
  if path and not os.path.isabs(path) and os.path.isfile(os.path.join(REPO, path)):
    argv = list(argv)
    argv[i] = before + os.path.join(REPO, path) + colon + arg
    return argv
  _fail(f'--config={value}: no file {path!r} in the current directory ({os.getcwd()}) nor in the repository '
        f'({REPO}); known: {_known_configs()}, e.g. --config=configs/gpt.py:runlocal.')


def _load_config(value: str):
  """Runs the config file's get_config as config_flags does -> (config, None) or (None, what went wrong)."""
  path, colon, arg = value.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('_lmlab_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*([arg] if colon else [])), None
  except ValueError as e:  # the config's own check of its arguments: already names them and the choices
    return None, str(e)
  except Exception as e:  # a broken config file (a typo, a bad import): say where
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return None, f'{type(e).__name__}: {e} (at {frame.filename}:{frame.lineno})'


def _override_names(argv) -> list[str]:
  """The field paths of the --config.<path>[=value] flags, as ml_collections reads them."""
  names = []
  for arg in argv[1:]:
    if arg == '--':
      break
    if re.match(r'^-{1,2}(no)?config\.', arg):
      names.append(arg.split('=', 1)[0].split('.', 1)[1])
  return names


def _field_problem(config, path: str) -> str | None:
  """Why --config.<path> names no field (with the nearest field name), or None when it does."""
  node, walked = config, 'config'
  for key in path.split('.'):
    if '[' in key:  # an index into a sequence field: leave it to ml_collections
      return None
    keys = list(node.keys()) if hasattr(node, 'keys') else None
    if keys is None:
      return f'--config.{path}: {walked} is a {type(node).__name__}, not a group of fields.'
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=1)
      hint = f'did you mean {walked}.{close[0]}?' if close else f'its fields are {", ".join(sorted(keys))}.'
      return f'--config.{path}: {walked} has no field {key!r}; {hint} (--print_config lists every field)'
    node, walked = node[key], f'{walked}.{key}'
  return None


def _type_of(config, path: str) -> str:
  """The name of the type config.<path> holds (a None placeholder's declared type)."""
  parent, _, key = f'.{path}'.rpartition('.')
  node = config
  for k in filter(None, parent.split('.')):
    node = node[k]
  field_type = node.get_type(key) if hasattr(node, 'get_type') else type(node[key])
  return getattr(field_type, '__name__', str(field_type))


def _explain(error: Exception, argv) -> str:
  """The one line for a flag-parsing failure: which flag, what is wrong, the fix."""
  where = _config_arg(argv)
  value = where[2] if where else ''
  config = None
  if value:
    config, problem = _load_config(value)
    if problem:
      return f'--config={value}: {problem}'
  if config is not None:
    for path in _override_names(argv):
      problem = _field_problem(config, path)
      if problem:
        return problem
  message = ' '.join(str(error).split())
  m = re.match(r'^flag --config\.([\w.]+)=(.*?): (.*)$', message)
  if m and config is not None:
    path, given, why = m.groups()
    try:
      kind = _type_of(config, path)
    except (KeyError, AttributeError, TypeError):
      return f'--config.{path}={given}: {why}; give a value of the type --print_config shows for it.'
    article = 'an' if kind[:1] in 'aeiou' else 'a'
    return f'--config.{path}={given}: {why}; config.{path} takes {article} {kind} value.'
  return message.removeprefix('flag ')


def _parse_flags(argv):
  """absl flag parsing, with every mistake turned into one line and exit code 2 (config_flags raises while parsing)."""
  argv = _resolve_config_path(argv)
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    _fail(_explain(e, argv))
  if _CONFIG.value is None:
    _fail('--config is required, e.g. --config=configs/gpt.py:runlocal (known: ' + _known_configs() + ').')
  try:
    _CONFIG.value.keys()  # a config file that failed to load raises only when the config is first used
  except OSError as e:
    _fail(f'--config={_config_arg(argv)[2]}: {e}')
  if len(rest) > 1:
    _fail(f'unexpected argument(s) {rest[1:]}: every option is a flag, e.g. --config.train.steps=100.')
  if not _WORKDIR.value and not _PRINT_CONFIG.value:
    _fail('--workdir is required (where checkpoints and metrics go), e.g. --workdir=/tmp/run; or pass --print_config.')
  return rest


# --------------------------------------------------------------------------------------------------------- main


def _config_lines(node, prefix: str = 'config') -> list[str]:
  """'config.train.steps = 60' per field, in the syntax --config.<field>=<value> accepts; None: not set."""
  lines = []
  for key, value in node.items():
    if hasattr(value, 'items') and len(value):
      lines += _config_lines(value, f'{prefix}.{key}')
    else:
      lines.append(f'{prefix}.{key} = {value.to_dict() if hasattr(value, "to_dict") else value!r}')
  return lines


def _unexpected(error: BaseException):
  """Multi-host, an error that is not the user's: a collective that failed because a peer died is first given the
  peer watchdog's time to name that peer (which ends the process); otherwise the traceback, and the peers are told
  (exit code 1, without waiting in jax's exit-time shutdown for peers that may be stuck in a collective)."""
  _WATCHDOG[0].wait_for_verdict(_WATCHDOG[0].timeout_s + 2 * _WATCHDOG[0].interval_s)
  traceback.print_exception(error)
  _fail(f'{type(error).__name__}: {" ".join(str(error).split())[:300]} (traceback above)', code=1)


def main(argv):
  del argv
  if _PRINT_CONFIG.value:
    print(f'# --config={_config_arg(sys.argv)[2]} with its overrides. Every field is documented in configs/common.py '
          '(model.overrides: model/config.py); set one with --config.<field>=<value>.')
    print('\n'.join(_config_lines(_CONFIG.value)))
    return
  # A write past the file-size limit (ulimit -f) fails with EFBIG, reported below, instead of killing the process.
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  failures.quiet_disk_full_noise()
  import jax  # after flag parsing, so XLA_FLAGS set by the caller take effect
  from train.core import distributed
  from train.core import trainer
  if _PEER_TIMEOUT.value < 0:
    _fail(f'--peer_timeout={_PEER_TIMEOUT.value}: give seconds >= 0 (0 turns the peer watchdog off).')
  if _MULTIHOST.value or _COORDINATOR.value or _NUM_PROCESSES.value:
    try:
      distributed.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                         _INIT_TIMEOUT.value, heartbeat_timeout_s=max(100, 2 * _PEER_TIMEOUT.value))
      watchdog = distributed.start_watchdog(_PEER_TIMEOUT.value, connect_timeout_s=_INIT_TIMEOUT.value)
    except (ValueError, RuntimeError) as e:  # bad flags, or peers that never joined: named, one line
      _fail(e)
    if watchdog is not None:
      _WATCHDOG.append(watchdog)
  log = print if jax.process_index() == 0 else (lambda *_, **__: None)  # one console: process 0
  from train.core.workdir import WorkdirBusy
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, log=lambda m: log(m, flush=True),
                                         signals=_SIGNALS)
  except Exception as e:  # pylint: disable=broad-except
    # A full disk (from any layer: Python, orbax/tensorstore, the Rust tokenizer) and config, data and divergence
    # errors are the user's to fix: one line, no traceback, exit code 2. Anything else keeps its traceback.
    full = failures.disk_full(e, _WORKDIR.value)
    if full is not None or isinstance(e, (ValueError, FileNotFoundError, FloatingPointError, WorkdirBusy)):
      _fail(full or e)
    if not _WATCHDOG:
      raise
    _unexpected(e)
  if _WATCHDOG:
    _WATCHDOG[0].stop()  # done: the peers stop watching this process
  summary.pop('state', None)
  if summary['status'] == 'preempted':  # the loop saved and said so
    sys.exit(_SIGNALS.exit_code)
  if _SIGNALS.received is not None:  # after the loop: the final save was let finish
    _stopped(
        f'{_SIGNALS.name} after the final checkpoint (step {summary["steps"]}) was written: nothing was lost; '
        f'the run is complete (outputs in {summary["workdir"]}).', _SIGNALS.exit_code)
  if summary['status'] == 'finished':
    return  # an already finished workdir: said so, wrote nothing
  loss = ' -> '.join(f'{summary[k]:.4f}' for k in ('first_loss', 'final_loss') if summary[k] is not None)
  log(f'done: {summary["steps"]} steps{", loss " + loss if loss else ""}, outputs in {summary["workdir"]}')


if __name__ == '__main__':
  host.start_job()  # the device pool, programs run inline, malloc tuned, before JAX starts (train/core/host.py)
  _SIGNALS.install()
  logging.set_verbosity(logging.WARNING)
  try:
    app.run(main, flags_parser=_parse_flags)
  except (signals_lib.Stopped, KeyboardInterrupt) as stop:  # start-up, or a second Ctrl-C: no traceback
    _stop_signal(stop)
