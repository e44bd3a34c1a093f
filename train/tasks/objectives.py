"""The pre-training objectives' records: masked LM (BERT), next-sentence prediction, causal LM (GPT, LLaMA), replaced
token detection (ELECTRA) and span corruption (T5), each with its example builder over text records, its loss over
the model's outputs (train/tasks/losses.py), its metrics and, for token objectives, where its targets sit in a batch
(for the most-frequent-token baseline `token_baselines` puts beside its accuracy). `health_warnings` reads the logged
values for the signs of an objective that is not learning. docs/objectives.md lists every metric and its baseline.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from model import config as model_config
from model.config import ModelConfig
from model.heads import Electra
from train.data import examples as ex
from train.tasks import losses
from train.tasks import registry
from train.tasks.registry import CAUSAL, ENCODER, MASKED, SEQ2SEQ, TOKEN_METRICS, Objective, OwnModel, TokenTargets

# ------------------------------------------------------------------------------------------- example builders


def _stream(records, tokenizer, doc_end_id):
  return ex.TokenStream.from_records(records, tokenizer, doc_end_id=doc_end_id)


def _max_predictions(data):
  return data.max_predictions or None


def _random_start(data):
  return bool(data.get('random_start', False)) if hasattr(data, 'get') else False


def causal_examples(records, tokenizer, data):
  t = ex.CausalLM(_stream(records, tokenizer, tokenizer.eos_id), seq_len=data.seq_len,
                  random_start=_random_start(data))
  return t, range(t.num_windows)


def masked_examples(records, tokenizer, data):
  t = ex.MaskedLM(_stream(records, tokenizer,
                          tokenizer.sep_id), ex.Specials.from_tokenizer(tokenizer), seq_len=data.seq_len,
                  max_predictions=_max_predictions(data), mask_rate=data.mask_rate, whole_word=data.whole_word,
                  random_start=_random_start(data))
  return t, range(t.num_windows)


def next_sentence_examples(records, tokenizer, data):
  t = ex.NextSentence(records, tokenizer, seq_len=data.seq_len, max_predictions=_max_predictions(data),
                      mask_rate=data.mask_rate, whole_word=data.whole_word)
  return t, range(len(records))


def span_examples(records, tokenizer, data):
  t = ex.SpanCorruption(_stream(records, tokenizer, tokenizer.eos_id), ex.Specials.from_tokenizer(tokenizer),
                        inputs_length=data.seq_len, targets_length=data.targets_len or None,
                        random_start=_random_start(data))
  return t, range(t.num_windows)


# ------------------------------------------------------------------------------------------------- losses


def _mlm(out, batch, opts):
  return losses.mlm_loss(logits=out['mlm_logits'], labels=batch['masked_ids'], weights=batch['masked_weights'])


def _nsp(out, batch, opts):
  return losses.nsp_loss(logits=out['nsp_logits'], labels=batch['nsp_labels'])


def _clm(out, batch, opts):
  return losses.clm_loss(logits=out['lm_logits'], targets=batch['targets'], weights=batch['weights'],
                         label_smoothing=opts.label_smoothing, z_loss=opts.z_loss)


def _span(out, batch, opts):
  return losses.span_loss(logits=out['lm_logits'], targets=batch['decoder_targets'], weights=batch['decoder_weights'],
                          roles=batch.get('decoder_target_roles'), label_smoothing=opts.label_smoothing,
                          z_loss=opts.z_loss)


# ------------------------------------------------------------------------------------------------- ELECTRA


def _electra_step_loss(params, batch, rng, *, model, deterministic, opts):
  if not isinstance(model, Electra):
    raise ValueError(f"objective 'rtd' needs the Electra(generator_cfg, discriminator_cfg) model, got "
                     f'{type(model).__name__}.')
  if rng is None:
    raise ValueError("objective 'rtd' samples the generator's replacements and needs an rng, also in evaluation.")
  return losses.electra_loss(params, batch, rng, model=model, rtd_lambda=opts.rtd_lambda, deterministic=deterministic,
                             temperature=opts.generator_temperature)


# Discriminator fields the generator shares; the rest comes from config.model.generator_preset and its overrides.
_GENERATOR_SHARES = ('vocab_size', 'pad_id', 'max_len', 'embed_dim', 'type_vocab_size', 'dtype', 'param_dtype',
                     'scan_layers', 'remat_policy')


def electra_model(config, model_cfg: ModelConfig) -> Electra:
  """ELECTRA's generator (config.model.generator_preset and generator_overrides, sharing the discriminator's
  vocabulary, positions and embedding width) and discriminator (model_cfg)."""
  gen = {k: getattr(model_cfg, k) for k in _GENERATOR_SHARES}
  gen.update(model_config.set_fields(config.model.generator_overrides))
  return Electra(model_config.preset(config.model.generator_preset, **gen), model_cfg)


# ------------------------------------------------------------------------------------------------- records

for _record in (
    Objective('mlm', ('encoder',), ('mlm',), MASKED, _mlm, "use an encoder (arch='encoder'); decoder-only models train "
              "with 'clm'", masked_examples, ENCODER + MASKED, 'wordpiece', TOKEN_METRICS,
              targets=TokenTargets('masked_ids', 'masked_weights')),
    Objective('nsp', ('encoder',), ('nsp',), ('nsp_labels',), _nsp, "use an encoder (arch='encoder') or drop 'nsp'",
              next_sentence_examples, ENCODER + MASKED + ('nsp_labels',), 'wordpiece', TOKEN_METRICS),
    Objective('clm', ('decoder',), ('lm',), ('targets', 'weights'), _clm, "use a decoder (arch='decoder'); encoders "
              "train with 'mlm', encoder-decoders with 'span' or 'seq2seq'", causal_examples, CAUSAL, 'bpe',
              TOKEN_METRICS, targets=TokenTargets('targets', 'weights')),
    Objective('rtd', ('encoder',), ('rtd',), ('tokens',) + MASKED, None, "ELECTRA's replaced-token detection needs an "
              'encoder discriminator and the Electra(generator_cfg, discriminator_cfg) model', masked_examples,
              ENCODER + MASKED, 'wordpiece', ('loss', 'generator/loss', 'discriminator/loss', 'disc_auc'),
              own=OwnModel(electra_model, _electra_step_loss)),
    Objective('span', ('encoder_decoder',), ('lm',), ('encoder_tokens',) + SEQ2SEQ[3:6], _span,
              "span corruption needs an encoder-decoder (arch='encoder_decoder'); use 'mlm' for encoders, 'clm' for "
              'decoders', span_examples, SEQ2SEQ + ('decoder_target_roles',), 'unigram',
              TOKEN_METRICS + ('token_accuracy', 'sentinel_accuracy', 'eos_accuracy'),
              targets=TokenTargets('decoder_targets', 'decoder_weights', 'token_accuracy', 'decoder_target_roles')),
):
  registry.register(_record)

# ---------------------------------------------------------------------------------- baselines and collapse signals


def token_baselines(objectives: Iterable[str], batches: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """'<objective>/<metric>_baseline' for each token objective among `objectives`: the accuracy of always predicting
  the most frequent target of these batches (the evaluation's own, so a generous trivial baseline): what
  mlm/accuracy, clm/accuracy and span/token_accuracy must beat before a model can be said to have learned."""
  out = {}
  for name in objectives:
    record = registry.REGISTRY.get(name)
    spec = getattr(record, 'targets', None)
    if spec is None:
      continue
    ids = []
    for batch in batches:
      if spec.targets not in batch:
        break
      keep = np.asarray(batch[spec.weights]) > 0
      if spec.roles is not None and spec.roles in batch:
        keep &= np.asarray(batch[spec.roles]) == 1
      ids.append(np.asarray(batch[spec.targets])[keep])
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if len(ids):
      out[f'{name}/{spec.metric}_baseline'] = float(np.bincount(ids.astype(np.int64)).max() / len(ids))
  return out


def health_warnings(values: Mapping[str, float], *, split: str) -> list[str]:
  """One line per objective whose logged values say it is not learning (ELECTRA's discriminator predicting the base
  rate everywhere; its final hidden states the same vector for every token). split: 'train' (a window, dropout on)
  or 'eval' (no dropout: token_variance_share is only read there, as dropout alone keeps it near 0.08 in training)."""
  out = []
  auc, loss, base = (values.get(f'rtd/{k}') for k in ('disc_auc', 'discriminator/loss', 'disc_loss_baseline'))
  if auc is not None and base is not None and auc < 0.55 and loss > base - 0.005:
    out.append(f'warning: rtd did not learn: disc_auc {auc:.3f} and discriminator loss {loss:.4f} at the base rate\'s '
               f'{base:.4f} ({split}): it predicts "original" everywhere. Lower config.optim.learning_rate, lengthen '
               'warmup_steps or raise config.loss.generator_temperature (configs/electra.py says what was measured).')
  share = values.get('rtd/token_variance_share')
  if split == 'eval' and share is not None and share < 0.01:
    out.append(f'warning: rtd collapsed: the discriminator\'s final hidden states are one vector for every token '
               f'(token_variance_share {share:.4f}, healthy runs > 0.05).')
  return out
