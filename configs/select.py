"""Model selection: pre-train candidates (or start from local checkpoints), fine-tune each on a task, and choose one
within a compute budget by successive halving on the dev metric (train/selection/).

  python -m train.select --config=configs/select.py --workdir=/tmp/select \
      --config.pretrain.source=files --config.pretrain.path=../shared/data/gutenberg_books \
      --config.data.train=../shared/data/sst2/train.tsv --config.data.dev=../shared/data/sst2/dev.tsv \
      --config.search.budget=2e14
  python -m train.select --config=configs/select.py:demo --workdir=/tmp/select   # embedded data, no files (make demo)
  python -m train.select --config=configs/select.py:mode=equal_compute ...        # every candidate the same FLOPs

  python -m train.select --config=configs/select.py:mode=scaling ...              # loss against N and D, fitted
  python -m train.select --config=configs/select.py:mode=finetune --workdir=/tmp/choose \
      --config.data.train=../shared/data/sst2/train.tsv --config.data.dev=../shared/data/sst2/dev.tsv \
      --config.search.budget=3600                           # pretrained models x strategies within 3600 s

Arguments: `mode=halving` (default) | `equal_compute` | `scaling` (config.scaling: one pre-training per size and
token budget, L = E + A/N^alpha + B/D^beta fitted with bootstrap intervals) | `finetune` (no pre-training: starting
points x fine-tuning strategies, `_ft` candidates, train/selection/finetune_search.py); `demo` (embedded corpus and
the embedded docstring-package task, tiny candidates, minutes on a CPU); `runlocal` (tests: seconds).

Each candidate names a config family (configs/<family>.py and its argument) whose pre-training objective it brings
(bert: mlm+nsp, electra: rtd, gpt/llama: clm, t5: span; `objectives` replaces them), model overrides, or a local
checkpoint in `init_from` (no pre-training), and the fine-tuning strategy and learning rate. Candidates are a dict, so
one is changed from the command line (--config.candidates.gpt.overrides.num_layers=4) or removed by its config file.

The budget (search.budget in search.budget_kind units: 'flops' as the cost model counts them, 'seconds' converted to
FLOPs by a short calibration on this machine, or 'steps' of pre-training summed over candidates) covers the whole
search: every rung's pre-training and fine-tuning and the final seeds. The plan is the largest pre-training length
whose worst case fits, printed before anything trains. A killed selection restarted with the same command resumes:
finished evaluations are read back from the study (optuna, SQLite in the workdir) and a half-done run resumes from
its checkpoint, so the leaderboard comes out the same.
"""
import ml_collections

from configs import common

MODES = ('halving', 'equal_compute', 'scaling', 'finetune')


def _candidate(family, arg='', *, strategy='full', learning_rate=0.0, pretrain_learning_rate=0.0, init_from='',
               objectives=None, generator=None, **overrides):
  return dict(family=family, arg=arg, init_from=init_from, strategy=strategy, learning_rate=learning_rate,
              pretrain_learning_rate=pretrain_learning_rate, objectives=objectives or {}, overrides=overrides,
              generator=generator or {})


def _shape(layers: int, width: int) -> dict:
  return dict(num_layers=layers, d_model=width, num_heads=max(1, width // 64), d_ff=4 * width)


# Pre-training learning rate per candidate, each the best of a sweep at the demo's shape (2 layers x 128, 400 steps of
# 16 x 64 on the embedded corpus, one seed; end-of-run eval rows, docs/objectives.md): MLM 5e-4 / 1e-3 / 2e-3 / 4e-3 ->
# accuracy 0.069 / 0.077 / 0.053 / 0.053 (its most-frequent-token baseline 0.053); CLM -> 0.082 / 0.091 / 0.062 /
# 0.071 (baseline 0.041); span corruption (Adafactor) 3e-3 / 1e-2 / 3e-2 -> eval loss 5.04 / 4.78 / 4.62; RTD
# (generator temperature 1.5) 5e-4 / 1e-3 -> disc_auc 0.70 / 0.68. One rate per objective for every shape: a
# comparison at another shape should sweep again (the halving search itself can: one candidate per rate).
PRETRAIN_LR = {'mlm': 1e-3, 'clm': 1e-3, 'span': 3e-2, 'rtd': 5e-4}


def _candidates(layers: int, width: int, arg: str = '', lr: float = 1e-4, nsp: bool = True) -> ml_collections.ConfigDict:
  """One candidate per pre-training objective, all of one shape (ELECTRA's generator a quarter as wide), each at its
  measured pre-training rate; every one fine-tunes the same way (strategy full, learning rate lr)."""
  shape, pre = _shape(layers, width), PRETRAIN_LR
  out = {
      'bert_mlm': _candidate('bert', arg, objectives={'mlm': 1.0}, learning_rate=lr, pretrain_learning_rate=pre['mlm'],
                             **shape),
      'electra_rtd': _candidate('electra', arg, learning_rate=lr, pretrain_learning_rate=pre['rtd'], embed_dim=width,
                                generator=dict(_shape(layers, max(32, width // 4)), embed_dim=width), **shape),
      'gpt_clm': _candidate('gpt', arg, learning_rate=lr, pretrain_learning_rate=pre['clm'], **shape),
      't5_span': _candidate('t5', arg, learning_rate=lr, pretrain_learning_rate=pre['span'], **shape),
  }
  if nsp:  # BERT's own pair: MLM + next-sentence prediction (configs/bert.py's objectives)
    out['bert_mlm_nsp'] = _candidate('bert', arg, learning_rate=lr, pretrain_learning_rate=pre['mlm'], **shape)
  return ml_collections.ConfigDict(out)


def get_config(arg=None):
  args = common.parse_arg(arg, mode='halving', demo=False, layers='4', width='256')
  if args.mode not in MODES:
    raise ValueError(f'config argument mode={args.mode!r} is unknown; known: {", ".join(MODES)}.')
  c = ml_collections.ConfigDict()
  # yapf: disable (a table: one field per line, its meaning aligned beside it)
  c.seed = 0                    # pre-training seed of every candidate; fine-tuning seeds are 0..search.seeds-1
  c.task = 'sst2'               # the fine-tuning task (configs/finetune.py task=...); encoder-decoders train it
  #                               with each label's name as target text and rank the labels by its log-probability
  c.metric = 'eval/accuracy'    # dev metric the search ranks by (higher is better)
  c.data = ml_collections.ConfigDict(dict(
      train='',                 # fine-tuning training file (configs/finetune.py data.train); 'embedded:package'
      dev='',                   # fine-tuning dev file; 'embedded:package' (the task the demo writes)
      text_columns=(),          # classification: the text column(s); (): the task's own
      label_column='',          # classification: the label column; '': the task's own
  ))
  c.pretrain = ml_collections.ConfigDict(dict(
      source='embedded',        # pre-training text: 'embedded' | 'files' | 'tfds' (configs/common.py data.source)
      path='',                  # files: a text file or folder (../shared/data/gutenberg_books)
      embedded_kind='docs',     # embedded: 'docs' | 'code'
      seq_len=128,              # tokens per pre-training example
      batch_size=32,            # pre-training global batch
      vocab_size=8000,          # tokenizer trained per candidate on the pre-training text
      tokenizer_train_records=20_000,
      warmup_steps=100,
      max_steps=0,              # the longest pre-training of the plan; 0: the most the budget allows
      checkpoint_every=200,     # a killed pre-training resumes from here
  ))
  c.finetune = ml_collections.ConfigDict(dict(
      steps=300,                # fine-tuning steps of every evaluation
      batch_size=32,
      seq_len=128,
      warmup_steps=30,
      eval_every=100,           # dev evaluations per fine-tuning (the best one counts, as train.best_metric keeps)
      targets_len=8,            # encoder-decoders: label text tokens
  ))
  c.search = ml_collections.ConfigDict(dict(
      mode=args.mode,           # 'halving': successive halving over pre-training length; 'equal_compute': every
      #                           candidate pre-trains on the same FLOPs, then fine-tunes with every seed
      budget_kind='flops',      # 'flops' | 'seconds' | 'steps'
      budget=1e15,              # the whole search's budget in budget_kind units
      eta=2,                    # halving: the top 1/eta of the candidates go on to eta times the pre-training
      rungs=3,                  # halving: rungs; the last rung's survivors fine-tune with every seed
      seeds=3,                  # fine-tuning seeds at the last rung (mean +- std in the leaderboard)
  ))
  c.candidates = _candidates(int(args.layers), int(args.width))  # config arguments layers=, width= set the shape
  c.scaling = ml_collections.ConfigDict(dict(
      family='gpt',             # mode=scaling: the config family every size pre-trains with (its objective)
      arg='',                   # its config argument
      sizes=('2x64', '2x96', '3x128', '4x192'),  # LAYERSxD_MODEL (heads of width 32, d_ff = 4 d_model)
      tokens=(250_000, 500_000, 1_000_000),  # pre-training tokens per run; every size trains on each
      overrides=dict(dropout_rate=0.0, attention_dropout_rate=0.0, max_len=128),  # more ModelConfig fields, every size
      learning_rate=2e-3,
      eval_steps=20,            # eval batches of the loss each point is
      bootstrap=200,            # bootstrap refits for the intervals
      target_flops=1e18,        # the compute budget whose optimal N and D the report gives
  ))
  # yapf: enable
  if args.mode == 'scaling':
    c.pretrain.seq_len, c.pretrain.batch_size = 64, 16
  if args.mode == 'finetune':
    _finetune(c)
  elif args.demo or args.runlocal:
    _small(c, demo=args.demo)
  return c


def _ft(init_from, strategy='full', *, learning_rate=0.0, demonstrations=0, few_shot_k=0, seq_len=0, batch_size=0,
        finetune=None, **overrides):
  """A mode=finetune candidate: a starting point (a packaged name: all-MiniLM-L6-v2, SmolLM2-135M-Instruct; an lmlab
  run; a Hugging Face or converted directory; a .gguf file) and a strategy of configs/finetune.py ('full', 'head',
  'lora', 'soft_prompt', 'prompt+lora', ...; 'prompt' alone is zero-shot, with demonstrations=k in-context k-shot,
  neither trains); few_shot_k trains on k records per class; seq_len / batch_size replace config.finetune's;
  finetune: more config.finetune fields (lora_rank, template, verbalizer, ...); overrides: ModelConfig fields."""
  return dict(init_from=init_from, strategy=strategy, learning_rate=learning_rate, demonstrations=demonstrations,
              few_shot_k=few_shot_k, seq_len=seq_len, batch_size=batch_size, finetune=finetune or {},
              overrides=overrides)


def finetune_candidates() -> ml_collections.ConfigDict:
  """The two packaged checkpoints across the strategies that suit them for classification: the sentence encoder
  trained (every parameter, the head on mean-pooled states, LoRA adapters, a soft prompt), the 135M decoder read
  through its LM head (zero-shot, in-context 4-shot, LoRA under the prompt). Rates: the fine-tuning table of
  docs/results.md (MiniLM head 1e-3 to 1e-2, SmolLM2 prompt+lora 2e-4), raised for runs of a few hundred steps."""
  minilm, smol = 'all-MiniLM-L6-v2', 'SmolLM2-135M-Instruct'
  return ml_collections.ConfigDict({
      'minilm_full': _ft(minilm, 'full', learning_rate=1e-4),
      'minilm_head': _ft(minilm, 'head', learning_rate=3e-3),
      'minilm_lora': _ft(minilm, 'lora', learning_rate=1e-3),
      'minilm_soft_prompt': _ft(minilm, 'soft_prompt', learning_rate=3e-3),
      'smollm2_zero_shot': _ft(smol, 'prompt'),
      'smollm2_4shot': _ft(smol, 'prompt', demonstrations=4, seq_len=256),
      'smollm2_prompt_lora': _ft(smol, 'prompt+lora', learning_rate=2e-4, batch_size=16),
  })


def _finetune(c):
  """mode=finetune: starting points x strategies on config.task, within a budget in seconds (or FLOPs), by
  successive halving over fine-tuning steps (train/selection/finetune_search.py)."""
  f, s = c.finetune, c.search
  f.steps = 600                 # the longest fine-tuning (the last rung); the plan takes the longest that fits up to
  #                               it; 0: as long as the budget allows
  f.seq_len, f.batch_size, f.warmup_steps = 64, 32, 30
  s.budget_kind = 'seconds'     # 'seconds' (the cost model at this machine's calibrated FLOP/s, and the measured
  #                               seconds as a hard limit) | 'flops'
  s.budget = 3600.0              # the default candidates: in-context 4-shot scoring alone is ~850 s by the cost model
  s.rungs, s.eta, s.seeds = 3, 2, 1  # seeds: of the last rung's survivors and of in-context candidates (>= 3: t
  #                               intervals over seeds)
  s.choose = 'best'             # 'best' (highest mean dev metric) | 'cheapest_within' (the cheapest candidate within
  #                               search.within_points points of the best)
  s.within_points = 1.0         # cheapest_within: how far below the best (points of 100) still counts
  s.overhead_seconds = 30.0     # seconds budget: per evaluation, its process's start, loading and compiling
  s.mfu = 0.4                   # seconds budget: the share of the calibrated matmul FLOP/s (calibration.json) that
  #                               training and scoring steps reach (MiniLM full on SST-2, 2-core CPU: 0.4 measured)
  s.only = ()                   # candidate names to keep (e.g. "('minilm_head','smollm2_zero_shot')"); (): all
  c.candidates = finetune_candidates()


def _small(c, *, demo):
  """Tiny candidates on the embedded corpus and the embedded docstring-package task: minutes (demo), seconds."""
  c.task = 'classification'
  c.data.train = c.data.dev = 'embedded:package'
  c.data.text_columns, c.data.label_column = ('text_a',), 'label'
  p, f, s = c.pretrain, c.finetune, c.search
  p.seq_len, p.batch_size, p.vocab_size, p.tokenizer_train_records = 64, 16, 2000, 3000
  p.warmup_steps, p.checkpoint_every = 10, 50
  f.steps, f.batch_size, f.seq_len, f.warmup_steps, f.eval_every = 200, 16, 64, 10, 50
  s.budget_kind, s.budget, s.eta, s.rungs, s.seeds = 'steps', 1200, 2, 2, 2
  c.candidates = _candidates(2, 128, 'runlocal', 1e-3, nsp=False)
  if not demo:  # runlocal: seconds
    p.seq_len, p.batch_size, p.checkpoint_every = 32, 8, 10
    f.steps, f.batch_size, f.seq_len, f.eval_every, f.warmup_steps = 20, 8, 32, 20, 2
    s.budget, s.rungs, s.seeds = 120, 2, 2
    c.candidates = _candidates(1, 64, 'runlocal', 1e-3, nsp=False)
