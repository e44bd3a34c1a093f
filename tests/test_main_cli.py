"""The command line refuses a bad config or a missing data file before compiling: one line on stderr naming the field,
a non-zero exit, and nothing in an existing workdir touched."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CASES = {
    # gpt2-tiny has d_model 128. A dict-valued field is overridden whole from the command line; a single new key
    # (--config.model.overrides.num_heads=3) is refused by ml_collections' flag parser, as for any unknown key.
    'heads_do_not_divide_d_model': (["--config.model.overrides={'num_heads': 3}"], 'num_heads'),
    'unknown_objective': (["--config.objectives={'clm': 1.0, 'clm_typo': 1.0}"], 'clm_typo'),
    'no_pretraining_objective': (["--config.objectives={'mlm_typo': 1.0}"], 'config.objectives'),
    'missing_data_file': (['--config.data.source=files', '--config.data.path=/nonexistent/corpus.txt'],
                          'config.data.path'),
}


def _snapshot(workdir: Path):
  return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in sorted(workdir.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('case', sorted(CASES))
def test_bad_config_or_data_is_one_line_and_touches_nothing(case, tmp_path):
  args, field = CASES[case]
  workdir = tmp_path / 'run'
  # A workdir from an earlier run: its outputs must survive a bad command.
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'config.json').write_text('{"config": {"marker": 1}}\n')
  (workdir / 'metrics.jsonl').write_text('{"step": 5, "split": "train", "loss": 1.5}\n')
  (workdir / 'checkpoints' / 'note.txt').write_text('earlier run\n')
  before = _snapshot(workdir)

  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-m', 'train.main', '--config=configs/gpt.py:runlocal', f'--workdir={workdir}',
                         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  print(f'\n{case}: rc {proc.returncode}, stderr: {proc.stderr.strip()}')
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and field in lines[0], proc.stderr
  assert 'Traceback' not in proc.stdout + proc.stderr
  assert _snapshot(workdir) == before
