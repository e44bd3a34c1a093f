"""Fine-tuning through `python -m train.main --config=configs/finetune.py:task=...,strategy=...`, on small synthetic
data the tests write, from a small randomly initialized Hugging Face BERT (the BERT uncased vocab of ../shared/data):
each task's dev metric beats its trivial baseline, the evaluate job reproduces the metric training logged, `head`
leaves every backbone parameter bitwise unchanged and compiles to fewer FLOPs than `full`, and bad configs or labels
fail in one line before anything compiles.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
VOCAB = REPO.parent / 'shared' / 'data' / 'bert_uncased_vocab' / 'vocab.txt'

pytestmark = pytest.mark.skipif(not VOCAB.exists(), reason=f'{VOCAB} is not here')

POS, NEG = ('good', 'great', 'wonderful', 'fine'), ('bad', 'awful', 'terrible', 'poor')
FILLER = ('the', 'movie', 'was', 'a', 'story', 'of', 'and', 'it', 'plot', 'actors', 'film', 'very', 'quite', 'this')
CITIES = ('paris', 'london', 'berlin', 'rome', 'madrid', 'tokyo')


@pytest.fixture(scope='module')
def tiny_bert(tmp_path_factory):
  """A 2-layer, 64-wide BERT with random weights and the real uncased vocabulary, saved as a HF model directory."""
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=64)
  d = tmp_path_factory.mktemp('tiny_bert')
  transformers.BertModel(cfg).save_pretrained(d)
  (d / 'vocab.txt').write_bytes(VOCAB.read_bytes())
  return d


def _sentences(rng, n):
  rows = []
  for _ in range(n):
    label = int(rng.integers(2))
    words = list(rng.choice(FILLER, size=int(rng.integers(4, 9))))
    words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(POS if label else NEG)))
    rows.append((' '.join(words), label))
  return rows


def _write_tsv(path, header, rows):
  path.write_text('\t'.join(header) + '\n' + ''.join('\t'.join(map(str, r)) + '\n' for r in rows))
  return path


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return env


def _main(task, strategy, workdir, init, train, dev, *extra):
  return subprocess.run([
      sys.executable, '-m', 'train.main', f'--config=configs/finetune.py:task={task},strategy={strategy},runlocal',
      f'--workdir={workdir}', f'--config.model.init_from={init}', f'--config.data.train={train}',
      f'--config.data.dev={dev}', *extra
  ], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)


def _evals(workdir):
  return [
      r for r in map(json.loads, (Path(workdir) / 'metrics.jsonl').read_text().splitlines()) if r['split'] == 'eval'
  ]


def test_classification_beats_majority_and_evaluate_reproduces_it(tiny_bert, tmp_path):
  rng = np.random.default_rng(0)
  train = _write_tsv(tmp_path / 'train.tsv', ('sentence', 'label'), _sentences(rng, 400))
  dev_rows = _sentences(rng, 100)
  dev = _write_tsv(tmp_path / 'dev.tsv', ('sentence', 'label'), dev_rows)
  workdir = tmp_path / 'run'
  # Mean pooling: at random init a post-LN BERT's [CLS] state barely depends on the input.
  proc = _main('sst2', 'full', workdir, tiny_bert, train, dev, '--config.train.steps=80',
               '--config.optim.total_steps=80', '--config.train.eval_every=40', '--config.train.checkpoint_every=40',
               '--config.model.classifier_pooling=mean')
  assert proc.returncode == 0, proc.stderr[-3000:]
  majority = max(np.mean([label for _, label in dev_rows]), 1 - np.mean([label for _, label in dev_rows]))
  evals = _evals(workdir)
  assert [e['step'] for e in evals] == [40, 80]
  best = max(e['accuracy'] for e in evals)
  assert best > majority + 0.15, (evals, majority)
  # The log says what came from the checkpoint and what started fresh; the tokenizer travels with the run.
  assert 'fresh' in proc.stdout and (workdir / 'tokenizer').exists()
  out = tmp_path / 'scored'
  job = subprocess.run([sys.executable, '-m', 'train.evaluate', f'--from={workdir}', f'--data={dev}', f'--out={out}'],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert job.returncode == 0, job.stderr[-3000:]
  scored = json.loads((out / 'metrics.json').read_text())
  logged = next(e for e in evals if e['step'] == scored['step'])
  assert scored['accuracy'] == pytest.approx(logged['accuracy'], abs=1e-9) and logged['accuracy'] == best
  rows = [json.loads(line) for line in (out / 'predictions.jsonl').read_text().splitlines()]
  assert len(rows) == 100 and {'label', 'prediction', 'probabilities'} <= set(rows[0])


def _tagged(rng, n):
  """CoNLL sentences: filler words tagged O, city names B-LOC; 'new york' B-LOC I-LOC."""
  lines = []
  for _ in range(n):
    words = [(str(w), 'O') for w in rng.choice(FILLER, size=int(rng.integers(3, 7)))]
    at = int(rng.integers(len(words) + 1))
    city = [('new', 'B-LOC'), ('york', 'I-LOC')] if rng.random() < 0.3 else [(str(rng.choice(CITIES)), 'B-LOC')]
    words[at:at] = city
    lines += [f'{w}\t{t}' for w, t in words] + ['']
  return '\n'.join(lines) + '\n'


@pytest.mark.parametrize('source', ['files', 'tfds'])
def test_tagging_finds_entities(tiny_bert, tmp_path, source):
  rng = np.random.default_rng(1)
  (tmp_path / 'train.conll').write_text(_tagged(rng, 300))
  (tmp_path / 'dev.conll').write_text(_tagged(rng, 60))
  train, dev, extra = tmp_path / 'train.conll', tmp_path / 'dev.conll', ()
  if source == 'tfds':  # the same sentences as a prepared TFDS dataset, named tfds:NAME:SPLIT with its features
    from train.data import builders
    builders.build('tagging', name='cities', data_dir=tmp_path / 'tfds', splits={
        'train': train,
        'dev': dev
    }, num_columns=None)
    train, dev = 'tfds:lmlab_tagging/cities:train', 'tfds:lmlab_tagging/cities:dev'
    extra = (f'--config.data.tfds_data_dir={tmp_path / "tfds"}', '--config.data.label_column=tags')
  workdir = tmp_path / 'run'
  proc = _main('wnut17', 'full', workdir, tiny_bert, train, dev, '--config.train.steps=60',
               '--config.optim.total_steps=60', '--config.train.eval_every=60', '--config.train.checkpoint_every=60',
               *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = _evals(workdir)[-1]
  # Tagging everything O (the majority tag) has entity F1 0.
  assert final['f1'] > 0.5, final
  saved = json.loads((workdir / 'config.json').read_text())['config']['data']
  assert saved['tag_names'] == ['O', 'B-LOC', 'I-LOC']


def test_bad_labels_and_strategies_fail_in_one_line(tiny_bert, tmp_path):
  rng = np.random.default_rng(2)
  train = _write_tsv(tmp_path / 'train.tsv', ('sentence', 'label'), _sentences(rng, 40))
  dev = _write_tsv(tmp_path / 'dev.tsv', ('sentence', 'label'), _sentences(rng, 10))
  bad_dev = _write_tsv(tmp_path / 'bad_dev.tsv', ('sentence', 'label'), _sentences(rng, 10) + [('an odd one', 'maybe')])
  cases = {
      'label_not_in_the_set': ((f'--config.data.dev={bad_dev}',), f'{bad_dev}:12'),
      'strategy': (('--config.finetune.strategy=adapter',), 'config.finetune.strategy'),
      'template': (('--config.finetune.prompt', '--config.finetune.template={sentense} {mask}'), 'config.finetune.template'),
      'missing_train': (('--config.data.train=/nonexistent.tsv',), 'config.data.train'),
  }
  for name, (extra, needle) in cases.items():
    workdir = tmp_path / name
    proc = _main('sst2', 'full', workdir, tiny_bert, train, dev, *extra)
    assert proc.returncode == 2, (name, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith('error: ') and needle in lines[-1], (name, lines[-3:])
    assert not workdir.exists(), name


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _prepared(tiny_bert, tmp_path, strategy):
  from configs import finetune
  from train.core import trainer
  rng = np.random.default_rng(3)
  train = _write_tsv(tmp_path / f'{strategy}.tsv', ('sentence', 'label'), _sentences(rng, 64))
  c = finetune.get_config(f'task=sst2,strategy={strategy},runlocal')
  c.model.init_from, c.data.train, c.data.dev = str(tiny_bert), str(train), ''
  return trainer.prepare(c, str(tmp_path / strategy), log=lambda *_: None)


def test_head_strategy_freezes_the_backbone_bitwise_and_skips_its_backward(tiny_bert, tmp_path):
  from train.core import trainer
  from train.data.loader import global_batch
  runs = {s: _prepared(tiny_bert, tmp_path, s) for s in ('full', 'head')}
  flops = {}
  for strategy, run in runs.items():
    ckpts = trainer._checkpoints(run)
    state, _ = trainer.restore_or_init(run, ckpts)
    ckpts.close()
    batch = global_batch(next(run.data.train), run.setup.batch_sharding)
    flops[strategy] = run.train_fn.lower(state, batch).compile().cost_analysis()['flops']
    if strategy == 'head':  # the loss alone (forward with dropout): what a step with no backbone backward costs
      loss = jax.jit(lambda p, b, run=run: run.setup.loss_fn(p, b, jax.random.key(0), model=run.setup.model)[0])
      flops['forward'] = loss.lower(state['params'], batch).compile().cost_analysis()['flops']
    before = jax.tree.map(np.asarray, state['params'])
    for _ in range(3):
      state, _ = run.train_fn(state, batch)
    after = jax.tree.map(np.asarray, state['params'])
    assert not _same(before['classifier'], after['classifier']), strategy
    frozen = _same(before['transformer'], after['transformer']) and _same(before['embed'], after['embed'])
    assert frozen == (strategy == 'head'), strategy
    assert run.setup.model.backbone_deterministic == (strategy == 'head')  # a frozen backbone runs without dropout
  # The backward through the backbone costs about twice its forward: head's step must be well under full's.
  assert flops['head'] < 0.6 * flops['full'], flops
  # A frozen optimizer alone (no mask in the step) gives about 3x the forward here: the backward must be absent.
  assert flops['head'] < 1.2 * flops['forward'], flops


def _opt_bytes(state):
  return sum(x.nbytes for x in jax.tree.leaves(state['opt_state']) if hasattr(x, 'nbytes') and x.ndim > 0)


@pytest.mark.parametrize('strategy,trains', [('soft_prompt', ('soft_prompt', 'classifier')),
                                             ('prompt+soft_prompt', ('soft_prompt',)), ('prompt+head', ('mlm',)),
                                             ('lora', ('lora_', 'classifier')), ('prompt+lora', ('lora_',))])
def test_parameter_efficient_strategies_train_only_their_parameters(tiny_bert, tmp_path, strategy, trains):
  """Every leaf outside what the strategy trains is bitwise unchanged after steps; the step compiles to fewer FLOPs
  and the optimizer keeps less state than under full."""
  from train.core import trainer
  from train.data.loader import global_batch
  from model import pytree
  pytest.importorskip('model.lora') if 'lora' in strategy else None
  measured = {}
  for name in ('prompt' if strategy.startswith('prompt') else 'full', strategy):
    run = _prepared(tiny_bert, tmp_path, name)
    ckpts = trainer._checkpoints(run)
    state, _ = trainer.restore_or_init(run, ckpts)
    ckpts.close()
    batch = global_batch(next(run.data.train), run.setup.batch_sharding)
    measured[name] = (run.train_fn.lower(state, batch).compile().cost_analysis()['flops'], _opt_bytes(state))
    if name != strategy:
      continue
    before = pytree.leaf_paths(state['params']), jax.tree.leaves(jax.tree.map(np.asarray, state['params']))
    for _ in range(3):
      state, _ = run.train_fn(state, batch)
    after = jax.tree.leaves(jax.tree.map(np.asarray, state['params']))
    for path, old, new in zip(before[0], before[1], after):
      moved = not np.array_equal(old, new)
      assert moved == any(t in path for t in trains), (path, moved)
  (full_flops, full_bytes), (flops, nbytes) = measured.values()
  assert flops < full_flops and nbytes < 0.2 * full_bytes, measured


def test_pet_prompt_finetuning_learns_the_task(tiny_bert, tmp_path):
  """strategy=prompt trains the cloze '{sentence} It was {mask}.' with words bad/good through the MLM head."""
  rng = np.random.default_rng(1)
  train = _write_tsv(tmp_path / 'train.tsv', ('sentence', 'label'), _sentences(rng, 300))
  dev_rows = _sentences(rng, 100)
  dev = _write_tsv(tmp_path / 'dev.tsv', ('sentence', 'label'), dev_rows)
  proc = _main('sst2', 'prompt', tmp_path / 'pet', tiny_bert, train, dev, '--config.train.steps=150',
               '--config.train.eval_every=150', '--config.train.checkpoint_every=150',
               '--config.finetune.verbalizer=0:bad;1:good')
  assert proc.returncode == 0, proc.stderr[-3000:]
  majority = max(np.mean([label for _, label in dev_rows]), 1 - np.mean([label for _, label in dev_rows]))
  assert _evals(tmp_path / 'pet')[-1]['accuracy'] > majority + 0.15, _evals(tmp_path / 'pet')


def _squad(rng, n):
  """SQuAD JSON: long contexts of filler words holding one city; 'which city ?' is answered by it (often beyond the
  first 32-token window)."""
  paragraphs = []
  for i in range(n):
    words = [str(w) for w in rng.choice(FILLER, size=int(rng.integers(20, 40)))]
    at = int(rng.integers(len(words)))
    city = str(rng.choice(CITIES))
    words.insert(at, city)
    context = ' '.join(words)
    start = len(' '.join(words[:at])) + (1 if at else 0)
    paragraphs.append({
        'context': context,
        'qas': [{
            'id': f'q{i}',
            'question': 'which city is named ?',
            'answers': [{
                'text': city,
                'answer_start': start
            }]
        }]
    })
  return json.dumps({'version': '1.1', 'data': [{'title': 'cities', 'paragraphs': paragraphs}]})


def test_qa_with_doc_stride_finds_answers_beyond_the_first_window(tiny_bert, tmp_path):
  rng = np.random.default_rng(4)
  (tmp_path / 'train.json').write_text(_squad(rng, 200))
  (tmp_path / 'dev.json').write_text(_squad(rng, 40))
  workdir = tmp_path / 'run'
  proc = _main('xquad', 'full', workdir, tiny_bert, tmp_path / 'train.json', tmp_path / 'dev.json',
               '--config.train.steps=80', '--config.optim.total_steps=80', '--config.train.eval_every=80',
               '--config.train.checkpoint_every=80', '--config.data.max_query_length=8', '--config.data.doc_stride=8')
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = _evals(workdir)[-1]
  # Copying the first context word would almost never be the city: exact match near 0.
  assert final['exact_match'] > 50 and final['f1'] >= final['exact_match'], final


def test_a_killed_finetuning_run_resumes_bitwise(tiny_bert, tmp_path):
  import signal
  import time
  import orbax.checkpoint as ocp
  rng = np.random.default_rng(5)
  train = _write_tsv(tmp_path / 'train.tsv', ('sentence', 'label'), _sentences(rng, 200))
  dev = _write_tsv(tmp_path / 'dev.tsv', ('sentence', 'label'), _sentences(rng, 30))
  n = 8

  def command(workdir):
    return [
        sys.executable, '-m', 'train.main', '--config=configs/finetune.py:task=sst2,strategy=full,runlocal',
        f'--workdir={workdir}', f'--config.model.init_from={tiny_bert}', f'--config.data.train={train}',
        f'--config.data.dev={dev}', f'--config.train.steps={2 * n}', f'--config.optim.total_steps={2 * n}',
        f'--config.train.checkpoint_every={n}', '--config.train.eval_every=0', '--config.train.best_metric=',
        '--config.train.keep_checkpoints=3', '--config.train.log_every=1'
    ]

  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  done = subprocess.run(command(straight), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  proc = subprocess.Popen(command(resumed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    while proc.poll() is None and not (resumed / 'checkpoints' / str(n)).is_dir():
      time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, f'the run ended (rc {proc.returncode}) before it could be killed'
  again = subprocess.run(command(resumed), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'resumed from step {n}' in again.stdout
  timing = ('steps_per_sec', 'tokens_per_sec')
  rows = [[{
      k: v for k, v in json.loads(line).items() if k not in timing
  } for line in (w / 'metrics.jsonl').read_text().splitlines()] for w in (straight, resumed)]
  assert rows[0] == rows[1] and rows[0][-1]['split'] == 'eval'
  a, b = (ocp.StandardCheckpointer().restore(w / 'checkpoints' / str(2 * n) / 'state') for w in (straight, resumed))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(np.asarray(x), np.asarray(y))


# An encoder-decoder reads the source and writes the target; a decoder continues a prompt that holds the source.
@pytest.mark.parametrize('preset,lengths', [('t5-tiny', (16, 16)), ('llama-tiny', (24, 12))])
def test_translation_from_scratch_beats_copying_the_source(tmp_path, preset, lengths):
  """A word-for-word 'translation' ('the' -> 'der', ...): a tiny model trained from scratch on it for 600 steps decodes
  (KV cache, greedy) text closer to the targets than the source is, and the evaluate job scores the same."""
  rng = np.random.default_rng(6)
  lexicon = dict(
      zip(FILLER + CITIES, ('der', 'kino', 'war', 'ein', 'bericht', 'von', 'und', 'es', 'handlung', 'leute', 'streifen',
                            'sehr', 'ziemlich', 'dies', 'lutetia', 'londinium', 'kiez', 'roma', 'mantua', 'edo')))

  def pairs(n):
    rows = []
    for _ in range(n):
      words = [str(w) for w in rng.choice(list(lexicon), size=int(rng.integers(2, 5)))]
      rows.append((' '.join(words), ' '.join(lexicon[w] for w in words)))
    return rows

  train = _write_tsv(tmp_path / 'train.tsv', ('en', 'de'), pairs(600))
  dev_rows = pairs(40)
  dev = _write_tsv(tmp_path / 'dev.tsv', ('en', 'de'), dev_rows)
  workdir = tmp_path / 'run'
  proc = subprocess.run([
      sys.executable, '-m', 'train.main', '--config=configs/finetune.py:task=translation,runlocal',
      f'--workdir={workdir}', f'--config.data.train={train}', f'--config.data.dev={dev}', '--config.train.steps=600',
      '--config.optim.total_steps=600', '--config.train.eval_every=600', '--config.train.checkpoint_every=600',
      '--config.optim.learning_rate=3e-3', f'--config.data.seq_len={lengths[0]}',
      f'--config.data.targets_len={lengths[1]}', '--config.data.batch_size=16', f'--config.model.preset={preset}'
  ], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  from train.tasks import metrics
  copied = metrics.generation_metrics(predictions=[s for s, _ in dev_rows], references=[t for _, t in dev_rows])
  final = _evals(workdir)[-1]
  assert final['chrf'] > copied['chrf'] + 10 and final['bleu'] >= copied['bleu'], (final, copied)
  out = tmp_path / 'scored'
  job = subprocess.run([sys.executable, '-m', 'train.evaluate', f'--from={workdir}', f'--data={dev}', f'--out={out}'],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert job.returncode == 0, job.stderr[-3000:]
  assert json.loads((out / 'metrics.json').read_text())['bleu'] == pytest.approx(final['bleu'], abs=1e-9)
