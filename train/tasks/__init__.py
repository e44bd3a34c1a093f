"""What lmlab trains: the records of the pre-training objectives and downstream tasks, their losses, scorers and
metrics, and the open registry (docs/extending.md adds one).

  registry.py        Objective and Task, REGISTRY, register, lookups (for_arch, task_of, heads_for, ...)
  compose.py         build_loss_fn: weighted objectives -> one loss over one params pytree
  losses.py          keyword-only loss functions (float32 log-softmax, weighted means, metrics)
  objectives.py      mlm, nsp, clm, rtd (ELECTRA), span (T5): records, baselines, collapse warnings
  classification.py  single texts and pairs (sst2, trec, rte, snli); tagging.py (wnut17); qa.py (squad, xquad);
  text_to_text.py    (translation): one module per kind of task, each with its readers, examples, loss, scorer
  scoring.py         running a model over a task's records and writing metrics.json / predictions.jsonl
  metrics.py         accuracy/F1, seqeval, SQuAD, sacrebleu

Importing the package registers every built-in record.
"""
from train.tasks import classification, objectives, qa, tagging, text_to_text  # noqa: F401  (they register)
from train.tasks.compose import LossOptions, build_loss_fn  # noqa: F401
from train.tasks.objectives import health_warnings, token_baselines  # noqa: F401
from train.tasks.registry import (REGISTRY, Labels, Objective, OwnModel, Task, TokenTargets, dataset,  # noqa: F401
                                  example_task, for_arch, get, heads_for, own_model, pretraining_task, register,
                                  task_of, validate_objectives)
