"""The colabs (colabs/*.ipynb): each runs top to bottom in a real IPython kernel of this Python, tiny
(LMLAB_COLAB_TINY=1), from the repository root, and is committed without outputs; its first cell installs only on
Colab and finds the repository from the root or from colabs/. Every figure a notebook displays is written out as a PNG
(to $LMLAB_COLAB_FIGURES/<notebook>/ when set, to look at, with the executed notebook; else a scratch folder) and must
be one.

A failing cell surfaces as nbclient's CellExecutionError, which quotes the cell's source and its traceback.
`pytest -s` prints each notebook's wall time."""
import base64
import glob
import os
import time

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'colabs', '*.ipynb')))
# The figures each notebook displays at the least (a notebook that silently stops showing one fails).
FIGURES = {'quickstart': 2, 'model_selection': 3, 'objectives': 6, 'sharding': 2, 'finetuning_strategies': 1}
CELL_TIMEOUT = 600  # seconds per cell: generous, the CPU is shared; a tiny notebook takes well under a minute whole
KERNEL = 'python3'  # jupyter_client starts it with this very Python (sys.executable): the .venv's


def _name(path):
  return os.path.splitext(os.path.basename(path))[0]


def _kernel_env(monkeypatch, tmp_path):
  """What the kernel inherits: tiny sizes, runs under tmp_path, one CPU device whatever this session set."""
  monkeypatch.setenv('LMLAB_COLAB_TINY', '1')
  monkeypatch.setenv('LMLAB_COLAB_WORKDIR', str(tmp_path / 'runs'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('PYTHONUNBUFFERED', '1')
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)


def _execute(nb, cwd):
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=KERNEL, resources={'metadata': {'path': cwd}})
  client.execute()  # CellExecutionError (the cell's source and traceback) on the first failing cell
  return nb


def test_the_colabs_are_there():
  assert {'quickstart', 'objectives', 'finetuning_strategies', 'model_selection',
          'sharding'} <= {_name(p) for p in NOTEBOOKS}, NOTEBOOKS


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_name)
def test_committed_clean_with_a_colab_only_install_cell(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.get('kernelspec', {}).get('name') == KERNEL, nb.metadata
  code = [c for c in nb.cells if c.cell_type == 'code']
  stale = [c.get('id') for c in code if c.outputs or c.execution_count is not None]
  assert not stale, (f'{path}: cells {stale} hold outputs or execution counts; clear them before committing '
                     '(jupyter nbconvert --clear-output --inplace).')
  first = code[0].source
  assert "'google.colab' in sys.modules" in first and 'pip' in first and 'sys.path.insert' in first, first
  assert any('LMLAB_COLAB_TINY' in c.source for c in code), f'{path}: no cell reads LMLAB_COLAB_TINY'


def _install_command(source, cwd, monkeypatch):
  """Runs a setup cell as on Colab (google.colab imported, no TPU, no GPU) from cwd -> the pip command it runs."""
  import glob as glob_lib
  import shutil
  import subprocess
  import sys
  import types
  calls = []
  monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
  monkeypatch.setattr(subprocess, 'run', lambda args, **kwargs: calls.append(list(args)))
  monkeypatch.setattr(shutil, 'which', lambda name: None)
  monkeypatch.setattr(glob_lib, 'glob', lambda pattern: [])
  monkeypatch.delenv('COLAB_TPU_ADDR', raising=False)
  monkeypatch.chdir(cwd)
  exec(compile(source, 'setup cell', 'exec'), {})  # pylint: disable=exec-used
  assert len(calls) == 1 and calls[0][1:5] == ['-m', 'pip', 'install', '-q'], calls
  return calls[0][5:]


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_name)
def test_the_install_cell_takes_the_repository_from_repo_url_and_invents_no_url(path, monkeypatch, tmp_path):
  import ast
  import json
  cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == 'code']
  first = cells[0].source
  tree = ast.parse(first)
  assigned = [n for n in tree.body if isinstance(n, ast.Assign)]
  assert assigned and ast.unparse(assigned[0]) == "REPO_URL = ''", 'REPO_URL is not the first variable it sets'
  install = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and 'pip' in ast.unparse(n))
  assert 'source' in ast.unparse(install) and "'lmlab" not in ast.unparse(install), ast.unparse(install)
  # No repository URL is written anywhere in a notebook: only REPO_URL says where one is.
  text = json.dumps(nbformat.read(path, as_version=4))
  assert 'github.com' not in text and 'git+https' not in text, path
  # '' installs the checkout it runs in; a URL is installed from git; neither is one line saying what to set.
  assert _install_command(first, REPO, monkeypatch) == [REPO]
  url = 'https://example.org/someone/lmlab.git'
  given = first.replace("\nREPO_URL = ''\n", f'\nREPO_URL = {url!r}\n', 1)
  assert _install_command(given, tmp_path, monkeypatch) == [f'lmlab @ git+{url}']
  if not os.path.exists('/content/lmlab'):
    with pytest.raises(RuntimeError, match='set REPO_URL'):
      _install_command(first, tmp_path, monkeypatch)


def test_the_colabs_readme_names_no_repository_url():
  with open(os.path.join(REPO, 'colabs', 'README.md')) as f:
    text = f.read()
  assert 'github.com' not in text and 'REPO_URL' in text


@pytest.mark.parametrize('where', ['.', 'colabs'])
def test_the_setup_cell_finds_the_repository_from_the_root_and_from_colabs(where, monkeypatch, tmp_path):
  _kernel_env(monkeypatch, tmp_path)
  setup = next(c for c in nbformat.read(NOTEBOOKS[0], as_version=4).cells if c.cell_type == 'code')
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell(setup.source),
      nbformat.v4.new_code_cell(f'assert not IN_COLAB and REPO == {REPO!r} and REPO in sys.path, (REPO, sys.path)\n'
                                'from train.core import trainer\nprint(os.path.abspath(trainer.__file__))'),
  ])
  out = _execute(nb, os.path.join(REPO, where)).cells[1].outputs
  assert out and out[0].get('text', '').strip() == os.path.join(REPO, 'train', 'core', 'trainer.py'), out


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_name)
def test_runs_top_to_bottom_and_its_figures_are_pngs(path, monkeypatch, tmp_path):
  _kernel_env(monkeypatch, tmp_path)
  name = _name(path)
  nb = nbformat.read(path, as_version=4)
  t0 = time.time()
  _execute(nb, REPO)
  print(f'\n{name}.ipynb: {time.time() - t0:.1f} s, executed from {REPO}')
  out_dir = os.path.join(os.environ.get('LMLAB_COLAB_FIGURES') or str(tmp_path / 'figures'), name)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for cell in nb.cells:
    for k, output in enumerate(cell.get('outputs', [])):
      png = output.get('data', {}).get('image/png')
      if png:
        data = base64.b64decode(png)
        assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 10_000, (cell.id, len(data))
        written.append(os.path.join(out_dir, f'{cell.id}-{k}.png'))
        with open(written[-1], 'wb') as f:
          f.write(data)
  nbformat.write(nb, os.path.join(out_dir, f'{name}.executed.ipynb'))  # what ran, outputs included, to read
  print('  figures: ' + ', '.join(written))
  assert len(written) >= FIGURES.get(name, 0), (name, written)
