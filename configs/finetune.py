"""Fine-tuning a checkpoint on a downstream task; the task and the strategy are config arguments.

Run from the repository root (data paths are relative to the current directory):

  python -m train.main --config=configs/finetune.py:task=sst2,strategy=full --workdir=/tmp/sst2 \
      --config.model.init_from=CKPT \
      --config.data.train=../shared/data/sst2/train.tsv --config.data.dev=../shared/data/sst2/dev.tsv
  python -m train.evaluate --from=/tmp/sst2 --data=../shared/data/sst2/dev.tsv --out=/tmp/sst2/dev

Zero-shot (no training run, no parameter updated) and in-context k-shot for decoders, from any checkpoint:

  python -m train.evaluate --from=CKPT --config=configs/finetune.py:task=sst2,strategy=prompt \
      --data=../shared/data/sst2/dev.tsv --out=/tmp/zs [--config.finetune.template='Review: {sentence}\nSentiment:' \
      --config.finetune.verbalizer='0:negative;1:positive' --config.finetune.demonstrations=4 \
      --config.data.train=../shared/data/sst2/train.tsv]

Few-shot: --config.data.few_shot_k=16 trains on 16 records per class of data.train (dev: 16 more per class);
`python -m train.sweep --config=... --workdir=W --seeds=13,21,42,87,100 --eval_data=DEV` runs every seed and writes
W/results.md with mean +- std.

CKPT is an lmlab run's workdir, a converted or Hugging Face model directory, or a .gguf file; its tokenizer and
architecture come with it. Arguments (`task=...,strategy=...,runlocal`):

  task       the record in train/tasks/ the run trains, its reader and its dev metric:
               sst2, trec (coarse labels), trec_fine, rte, snli      classification (accuracy)
               classification                                       any TSV/CSV/JSONL: set data.text_columns and
                                                                    data.label_column (one or two text columns)
               wnut17, tagging                                      CoNLL token tags, BIO (entity F1, seqeval)
               squad, xquad, qa                                     SQuAD JSON, doc stride (exact match, F1)
               translation (en -> de columns), seq2seq              text-to-text TSV/CSV/JSONL, KV-cache decoding
                                                                    (BLEU, chrF by sacrebleu). An encoder-decoder reads
                                                                    the source; a decoder continues the prompt
                                                                    data.source_template and learns only the target
                                                                    (data.targets_len tokens, default seq_len / 2).
                                                                    From init_from or from scratch (model.preset and a
                                                                    tokenizer trained on the task's text)
  strategy   full        every parameter trains (optim.layerwise_lr_decay < 1 decays the lower layers' rates)
             head        the backbone is frozen and not differentiated; only the task head trains (mean pooling
                         for classification unless model.classifier_pooling says otherwise)
             soft_prompt finetune.soft_prompt_length learned input vectors after [CLS]/BOS, backbone frozen; with
                         a classifier head (trained too) or with prompt
             lora        low-rank adapters (finetune.lora_rank, lora_alpha, lora_dropout, lora_targets) on the
                         frozen backbone, plus a fresh task head; `model.convert export` writes merged weights
             prompt      classification as a cloze (encoders: MLM head at {mask}) or a continuation (decoders: LM
                         head), finetune.template + finetune.verbalizer (defaults per task and architecture in
                         train/tasks/classification.py), trained PET-style with full; prompt+head, prompt+soft_prompt and
                         prompt+lora train only the MLM head's transform, the soft prompt or the adapters
  runlocal   seconds on a CPU: short sequences, small batches, a few steps (tests use it)

Every task works with full, head and lora; prompt and soft_prompt serve the classification tasks; sentence pairs, tags and spans need an encoder (or a decoder, pooled at its
last token). Labels come from the training file (data.label_names fixes their order and refuses others). The run
evaluates the dev file every train.eval_every steps with the task's metrics, keeps the best checkpoint by
train.best_metric and stops early after train.early_stopping evaluations without improvement.
"""
import ml_collections

from configs import common
from train import tasks
from train.finetune.strategies import STRATEGIES



def tasks_offered() -> tuple[str, ...]:
  """The downstream tasks registered (train/tasks: the built-in ones, and any a config file or test registered)."""
  return tuple(sorted(n for n, r in tasks.REGISTRY.items() if r.kind == 'task'))


def finetune_fields(c: ml_collections.ConfigDict) -> None:
  """The fields a fine-tuning run reads beyond base()'s, with their defaults and meanings."""
  # yapf: disable (a table: one field per line, its meaning aligned beside it)
  c.finetune = ml_collections.ConfigDict(dict(
      strategy='full',          # 'full' | 'head' | 'soft_prompt' | 'lora' (train/finetune/strategies.py)
      train_pooler=False,       # head: also train the [CLS] pooler (with model.classifier_pooling='cls')
      backbone_dropout=False,   # head: keep dropout inside the frozen backbone (default: eval mode, a linear probe)
      # prompt-based classification (train/finetune/prompts.py), with any strategy above (PET) or none (zero-shot)
      prompt=False,             # classify through template + verbalizer and the MLM (encoder) / LM (decoder) head
      template='',              # e.g. '{sentence} It was {mask}.'; ' || ' separates templates to ensemble;
      #                           '': the task's default for the architecture (train/tasks/classification.py PROMPTS)
      verbalizer='',            # label:word[|word...];... e.g. '0:terrible;1:great'; '': the task's default
      length_norm=False,        # a multi-token word scores its mean token log-probability, not the sum
      word_prefix=' ',          # decoders: written before each verbalizer word (' positive')
      bos=False,                # decoders: start the context with the BOS token
      demonstrations=0,         # decoders: in-context examples from data.train before each query (no training)
      balanced=True,            # demonstrations: the same number of each label
      demonstration_seed=0,     # demonstrations: drawn per query with np.random.default_rng([seed, query index])
      separator='\n\n',         # demonstrations: between them and before the query
      soft_prompt_length=20,    # soft_prompt: learned input vectors after [CLS] / BOS (Lester et al.)
      soft_prompt_init='vocab',  # soft_prompt: 'vocab' (rows of random words' embeddings) | 'random'
      lora_rank=8,              # lora: adapter rank r
      lora_alpha=16.0,          # lora: the update is scaled by alpha / r (peft's convention)
      lora_dropout=0.1,         # lora: dropout on the adapter's input
      lora_targets=('query', 'value'),  # lora: projections by name or '/'-joined path glob ('mlp/*', 'self_attn/out')
  ))
  c.model.classifier_pooling = ''  # '' (cls for encoders, last for decoders) | 'cls' | 'mean' | 'last'
  c.data.source = 'files'
  c.data.train = ''             # training file(s), comma-separated; TSV/CSV/JSONL, CoNLL or SQuAD JSON by task,
  #                               or a TFDS split tfds:NAME:SPLIT (prepared under data.tfds_data_dir), e.g.
  #                               tfds:glue/sst2:train with text_columns=('sentence',), label_column='label'
  c.data.dev = ''               # dev file(s) or TFDS split scored during training; '' : no dev evaluation
  c.data.text_columns = ()      # classification: the one or two text columns; (): the task's own
  #                               (TFDS tagging: the token feature, default 'tokens')
  c.data.label_column = ''      # classification: the label column; '': the task's own
  #                               (TFDS tagging: the tag feature, default 'ner_tags')
  c.data.label_names = ()       # class names in id order; (): the sorted set found in data.train
  c.data.tag_names = ()         # tagging: tag names in id order; (): found in data.train ('O' first)
  c.data.few_shot_k = 0         # classification: train on k records per class drawn from data.train; 0: all
  c.data.few_shot_seed = 13     # few_shot_k: the draw's seed (train/data/few_shot.py; train/sweep.py sets it)
  c.data.few_shot_dev_k = -1    # few_shot_k: dev records per class drawn from the rest of data.train, as LM-BFF;
  #                               -1: as many as few_shot_k; 0: none, the run evaluates on data.dev
  c.data.doc_stride = 64        # QA: context tokens shared by consecutive windows of a long context
  c.data.max_query_length = 64  # QA: question tokens kept
  c.data.max_answer_length = 30  # QA: longest answer span, in tokens, at prediction time
  c.data.source_column = ''     # seq2seq: the input column; '': the task's own ('en' for translation, 'source')
  c.data.target_column = ''     # seq2seq: the output column; '': the task's own ('de' for translation, 'target')
  c.data.num_beams = 1          # seq2seq: 1 = greedy decoding at evaluation; more = beam search
  c.data.source_template = '{source}\n'  # seq2seq on a decoder: the prompt holding the source; the target follows
  c.train.epochs = 3.0          # passes over data.train; > 0 sets train.steps and optim.total_steps from it
  c.train.warmup_fraction = 0.06  # share of the steps with linear warmup (with epochs > 0)
  c.train.early_stopping = 0    # stop after this many dev evaluations without a better best_metric; 0: off
  # yapf: enable


def get_config(arg=None):
  args = common.parse_arg(arg, task='sst2', strategy='full')
  if args.task not in tasks_offered():
    raise ValueError(f'config argument task={args.task!r} is unknown; known tasks: {", ".join(tasks_offered())} '
                     '(a task registered with train.tasks.register is offered too).')
  parts = set(str(args.strategy).split('+'))
  strategy = (parts - {'prompt'} or {'full'}).pop()
  if len(parts - {'prompt'}) > 1 or strategy not in STRATEGIES:
    raise ValueError(f'config argument strategy={args.strategy!r}: use one of {", ".join(STRATEGIES)}, or prompt '
                     'alone or with one of them (prompt+lora).')
  c = common.base()
  finetune_fields(c)
  c.objectives = {args.task: 1.0}
  c.model.preset = 't5-small' if args.task in ('translation', 'seq2seq') else ''  # without init_from: from scratch
  c.finetune.strategy = strategy
  c.finetune.prompt = 'prompt' in parts
  c.data.seq_len = 128
  c.data.batch_size = 32
  c.data.prefetch = 0
  c.optim.learning_rate = 5e-5 if strategy == 'full' else 1e-3
  c.optim.weight_decay = 0.01
  c.optim.decay = 'linear'
  c.optim.clip_norm = 1.0
  if strategy == 'head':
    c.train.epochs = 10.0
    c.model.classifier_pooling = 'mean'
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 1
  c.train.best_metric = f'eval/{tasks.get(args.task).best}'
  c.train.best_mode = 'max'
  if args.runlocal:
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.train.epochs = 0.0
    c.train.steps = 30
    c.optim.warmup_steps = 3
    c.optim.learning_rate = 1e-3 if strategy == 'full' else 1e-2
    c.train.log_every = 10
    c.train.eval_every = c.train.checkpoint_every = 30
    c.finetune.soft_prompt_length, c.finetune.lora_rank = 4, 4
    if args.task in ('translation', 'seq2seq'):
      c.model.preset, c.data.vocab_size, c.data.targets_len = 't5-tiny', 1000, 32
  return c
