"""Training objectives: keyword-only pure loss functions over model outputs.

Each loss takes arrays by keyword (shapes in its docstring), computes log-probabilities in float32 whatever the model's
dtype, and returns `(loss, metrics)`: the loss is a weighted mean over the real targets, and the metrics always carry
`weight_sum` (how many targets the means were taken over) so that a logger can average them correctly across steps and
devices. ELECTRA's `electra_loss` runs its own two forward passes, sampling the corruptions from the generator between
them. Which batch keys and model outputs feed which loss, and their weighted combination, is train/tasks/'s job (compose.py):
one record per objective and task.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model.heads import Electra

Metrics = dict[str, jax.Array]

# ------------------------------------------------------------------------------------------------- the core


def _weighted_mean(values, weights):
  """sum(w * v) / sum(w), and 0 (not NaN) when every weight is 0 (an all-padding eval batch)."""
  total = jnp.sum(weights)
  # `where`, not a product, so that inf/NaN at weight-0 positions (garbage logits under padding) cannot leak in.
  num = jnp.sum(jnp.where(weights > 0, values * weights, 0.0))
  return jnp.where(total > 0, num / jnp.where(total > 0, total, 1.0), 0.0), total


@jax.custom_vjp
def _normalizer_and_target(logits, targets):
  """logits [..., V] float32, targets [...] int -> (logsumexp over V, the target's logit), each [...].

  Its own VJP, d/dlogits = g_lse * softmax + g_target * onehot(target), is one elementwise pass over [..., V]: autodiff
  of the plain formula would keep log-probabilities [..., V] alive and scatter the target's gradient into a zero
  array of that size, both a full extra pass over the largest activation of a language model."""
  return _normalizer_and_target_fwd(logits, targets)[0]


def _normalizer_and_target_fwd(logits, targets):
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return (log_z, picked), (logits, log_z, targets)


def _normalizer_and_target_bwd(res, g):
  logits, log_z, targets = res
  g_z, g_picked = g
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
  grad = g_z[..., None] * jnp.exp(logits - log_z[..., None]) + jnp.where(onehot, g_picked[..., None], 0.0)
  return grad, None


_normalizer_and_target.defvjp(_normalizer_and_target_fwd, _normalizer_and_target_bwd)


def cross_entropy(*, logits, targets, weights=None, label_smoothing: float = 0.0, z_loss: float = 0.0):
  """Softmax cross-entropy, weighted mean over the targets.

  logits [..., V] (any float dtype; computed in float32), targets [...] int, weights [...] float (default all 1).
  label_smoothing eps: the target distribution is (1 - eps) one-hot + eps uniform over V. z_loss c adds
  c * logsumexp(logits)^2 per target (PaLM), which keeps the softmax normalizer near 1 in low precision.
  Metrics: loss (what is optimized), accuracy (argmax == target; a tie at the top counts), perplexity (exp of the plain token-mean NLL,
  without smoothing or z-loss, so it stays comparable across settings), weight_sum.
  """
  logits = logits.astype(jnp.float32)
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  # Padding targets may hold any id (even out of range); point them at 0 so the gather is always in bounds.
  targets = jnp.where(weights > 0, targets, 0).astype(jnp.int32)
  log_z, picked = _normalizer_and_target(logits, targets)  # [...], [...]
  nll = log_z - picked  # [...]
  per_target = nll
  if label_smoothing:
    # -mean_v log p_v = log_z - mean_v logits_v
    per_target = (1.0 - label_smoothing) * nll + label_smoothing * (log_z - jnp.mean(logits, axis=-1))
  if z_loss:
    per_target = per_target + z_loss * jnp.square(log_z)
  loss, weight_sum = _weighted_mean(per_target, weights)
  mean_nll, _ = _weighted_mean(jax.lax.stop_gradient(nll), weights)
  # The target's logit is the largest (a tie counts as a hit): the same answer as argmax == target for real-valued
  # logits, without argmax's separate pass over [..., V].
  hit = jax.lax.stop_gradient(picked) >= jnp.max(jax.lax.stop_gradient(logits), axis=-1)
  accuracy, _ = _weighted_mean(hit.astype(jnp.float32), weights)
  metrics = {'loss': loss, 'accuracy': accuracy, 'perplexity': jnp.exp(mean_nll), 'weight_sum': weight_sum}
  if z_loss:
    metrics['z_loss'] = _weighted_mean(jnp.square(jax.lax.stop_gradient(log_z)), weights)[0]
  return loss, metrics


def sigmoid_cross_entropy(*, logits, labels, weights=None):
  """Binary cross-entropy on logits, weighted mean. logits [...] float, labels [...] in {0, 1}, weights [...] float.

  Metrics: loss, accuracy (logit > 0 == label), positive_fraction (weighted share of label 1), weight_sum.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  weights = jnp.ones(logits.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  # log(1 + e^x) - y x: the stable form of -[y log s(x) + (1 - y) log(1 - s(x))].
  per_target = jax.nn.softplus(logits) - labels * logits
  loss, weight_sum = _weighted_mean(per_target, weights)
  accuracy, _ = _weighted_mean(((logits > 0) == (labels > 0.5)).astype(jnp.float32), weights)
  positive, _ = _weighted_mean(labels, weights)
  return loss, {'loss': loss, 'accuracy': accuracy, 'positive_fraction': positive, 'weight_sum': weight_sum}


# ------------------------------------------------------------------------------------------ pre-training losses


def mlm_loss(*, logits, labels, weights):
  """Masked LM. logits [B,P,V] at the masked positions, labels [B,P] original ids, weights [B,P] (0 = padding)."""
  return cross_entropy(logits=logits, targets=labels, weights=weights)


def nsp_loss(*, logits, labels):
  """Next-sentence prediction. logits [B,2], labels [B] (0 = B follows A, 1 = B is random)."""
  return cross_entropy(logits=logits, targets=labels)


def clm_loss(*, logits, targets, weights, label_smoothing: float = 0.0, z_loss: float = 0.0):
  """Causal LM. logits [B,T,V], targets [B,T] (the next token), weights [B,T] (0 on padding / segment ends)."""
  return cross_entropy(logits=logits, targets=targets, weights=weights, label_smoothing=label_smoothing, z_loss=z_loss)


def seq2seq_loss(*, logits, targets, weights, label_smoothing: float = 0.0, z_loss: float = 0.0):
  """Encoder-decoder CE (T5 span corruption, translation, ...). logits [B,T_dec,V], targets/weights [B,T_dec]."""
  return cross_entropy(logits=logits, targets=targets, weights=weights, label_smoothing=label_smoothing, z_loss=z_loss)


def span_loss(*, logits, targets, weights, roles=None, label_smoothing: float = 0.0, z_loss: float = 0.0):
  """T5 span corruption: seq2seq_loss, and with roles [B,T_dec] (train/data/examples.py span_target_roles: 1 span
  token, 2 sentinel, 3 EOS, 0 padding) the accuracy of each kind of target, as T5's diagnostics separate them:
  token_accuracy (the dropped text: the part a most-frequent-token guess is the baseline for), sentinel_accuracy,
  eos_accuracy. A model at init predicts none of them; one that learned only the format gets sentinels and EOS."""
  loss, metrics = seq2seq_loss(logits=logits, targets=targets, weights=weights, label_smoothing=label_smoothing,
                               z_loss=z_loss)
  if roles is None:
    return loss, metrics
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  safe = jnp.where(weights > 0, targets, 0).astype(jnp.int32)
  hit = (jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0] >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  for role, name in ((1, 'token_accuracy'), (2, 'sentinel_accuracy'), (3, 'eos_accuracy')):
    metrics[name] = _weighted_mean(hit, ((roles == role) & (weights > 0)).astype(jnp.float32))[0]
  return loss, metrics


def rtd_loss(*, logits, labels, weights):
  """ELECTRA's discriminator: sigmoid CE. logits [B,T], labels [B,T] (1 = replaced), weights [B,T] (real tokens)."""
  return sigmoid_cross_entropy(logits=logits, labels=labels, weights=weights)


# ------------------------------------------------------------------------------------------- downstream losses


def classification_loss(*, logits, labels, weights=None):
  """Sequence classification. logits [B,C], labels [B] int, weights [B] (default 1)."""
  return cross_entropy(logits=logits, targets=labels, weights=weights)


def tagging_loss(*, logits, labels, weights):
  """Token classification (NER, POS). logits [B,T,C], labels [B,T], weights [B,T] (first sub-word of a word = 1)."""
  return cross_entropy(logits=logits, targets=labels, weights=weights)


def span_qa_loss(*, start_logits, end_logits, start_positions, end_positions, weights=None):
  """Extractive QA: the mean of the start and end CEs. *_logits [B,T], *_positions [B] int, weights [B].

  Metrics: loss, start_accuracy, end_accuracy, exact_match (both right), weight_sum.
  """
  start, start_m = cross_entropy(logits=start_logits, targets=start_positions, weights=weights)
  end, end_m = cross_entropy(logits=end_logits, targets=end_positions, weights=weights)
  w = jnp.ones(start_positions.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  both = ((jnp.argmax(start_logits, -1) == start_positions) & (jnp.argmax(end_logits, -1) == end_positions))
  exact, _ = _weighted_mean(both.astype(jnp.float32), w)
  loss = 0.5 * (start + end)
  return loss, {
      'loss': loss,
      'start_accuracy': start_m['accuracy'],
      'end_accuracy': end_m['accuracy'],
      'exact_match': exact,
      'weight_sum': start_m['weight_sum']
  }


def regression_loss(*, predictions, targets, weights=None):
  """Mean squared error (STS-B). predictions [B] (or [B,1]), targets [B] float, weights [B]."""
  predictions = predictions.astype(jnp.float32).reshape(targets.shape)
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  loss, weight_sum = _weighted_mean(jnp.square(predictions - targets.astype(jnp.float32)), weights)
  return loss, {'loss': loss, 'weight_sum': weight_sum}


# ------------------------------------------------------------------------------------------------------ ELECTRA


def scatter_at_positions(*, tokens, positions, values, weights):
  """tokens [B,T] with values [B,P] written at positions [B,P] where weights [B,P] > 0 (padding slots write nothing).

  A one-hot sum rather than a scatter: padding slots usually point at position 0 too, and XLA leaves the winner of
  colliding scatter writes unspecified, which would make the corruption depend on the backend.
  """
  hit = (jax.nn.one_hot(positions, tokens.shape[1], dtype=jnp.int32) *
         (weights > 0).astype(jnp.int32)[..., None])  # [B,P,T]
  written = hit.sum(1) > 0  # [B,T]
  new = jnp.einsum('bpt,bp->bt', hit, values.astype(jnp.int32))  # [B,T]
  return jnp.where(written, new, tokens)


def rtd_labels(*, corrupted, original, segment_ids):
  """ELECTRA's targets: (labels, weights) [B,T], label 1 exactly where the corrupted token differs from the original
  (a generator sample that happens to equal the original is labeled 0, as in the paper), weight 1 on real tokens."""
  weights = (segment_ids != 0).astype(jnp.float32)
  labels = ((corrupted != original) & (segment_ids != 0)).astype(jnp.int32)
  return labels, weights


def binary_auc(*, scores, labels, weights):
  """Area under the ROC curve of scores [...] for labels [...] in {0, 1}, over the entries with weights [...] > 0:
  P(score of a random positive > score of a random negative), ties counting one half (Mann-Whitney U / (n+ n-)).

  Sorted, not pairwise: O(N log N) for N entries. -> (auc, pairs): auc is 0.5 when either class is empty, pairs =
  n+ * n- (a logger weighs batches by it)."""
  scores = scores.astype(jnp.float32).reshape(-1)
  real = weights.reshape(-1) > 0
  pos = real & (labels.reshape(-1) > 0)
  neg = real & ~(labels.reshape(-1) > 0)
  negatives = jnp.sort(jnp.where(neg, scores, jnp.inf))  # the negatives' scores first, +inf after them
  below = jnp.searchsorted(negatives, scores, side='left').astype(jnp.float32)
  at_most = jnp.searchsorted(negatives, scores, side='right').astype(jnp.float32)
  wins = jnp.sum(jnp.where(pos, below + 0.5 * (at_most - below), 0.0))
  pairs = jnp.sum(pos).astype(jnp.float32) * jnp.sum(neg).astype(jnp.float32)
  return jnp.where(pairs > 0, wins / jnp.maximum(pairs, 1.0), 0.5), pairs


def token_variance_share(*, hidden, weights):
  """The share of hidden [B,T,D]'s second moment over the real tokens (weights [B,T] > 0) that differs between
  tokens: sum_d Var_tokens(h_d) / sum_d E_tokens(h_d^2), in [0, 1]. Near 0 when every token has the same vector (the
  collapse of a post-LN discriminator that predicts the base rate everywhere)."""
  h = hidden.astype(jnp.float32)
  w = (weights > 0).astype(jnp.float32)[..., None]  # [B,T,1]
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(h * w, axis=(0, 1)) / n  # [D]
  second = jnp.sum(jnp.square(h) * w, axis=(0, 1)) / n  # [D]
  total = jnp.sum(second)
  return jnp.where(total > 0, jnp.sum(second - jnp.square(mean)) / jnp.maximum(total, 1e-30), 0.0)


def rtd_diagnostics(*, logits, labels, weights, hidden, generator_accuracy):
  """What ELECTRA's reference logs to tell learning from collapse (its run_pretraining.py metric_fn: disc_auc,
  disc_precision and disc_recall on replaced tokens), plus the replaced share, the loss of predicting that share
  everywhere (its entropy: what the discriminator loss must go below), the generator's accuracy and the
  discriminator's token_variance_share. logits/labels/weights [B,T], hidden [B,T,D]. Accuracy cannot show a collapse:
  predicting "original" everywhere scores 1 - replaced_fraction."""
  real = weights > 0
  predicted = real & (logits > 0)
  replaced = real & (labels > 0)
  hits = jnp.sum(predicted & replaced).astype(jnp.float32)
  auc, pairs = binary_auc(scores=logits, labels=labels, weights=weights)
  n_real = jnp.sum(real).astype(jnp.float32)
  share = jnp.sum(replaced).astype(jnp.float32) / jnp.maximum(n_real, 1.0)
  eps = 1e-7
  base_rate_loss = -(share * jnp.log(share + eps) + (1 - share) * jnp.log(1 - share + eps))
  return {
      'disc_auc': auc,
      'disc_precision': hits / jnp.maximum(jnp.sum(predicted), 1).astype(jnp.float32),
      'disc_recall': hits / jnp.maximum(jnp.sum(replaced), 1).astype(jnp.float32),
      'replaced_fraction': share,
      # The loss of a discriminator that knows only the replaced share (predicts it everywhere): its entropy.
      'disc_loss_baseline': base_rate_loss,
      'generator_accuracy': generator_accuracy,
      'token_variance_share': token_variance_share(hidden=hidden, weights=weights),
      'weight_sum': n_real,
  }


def electra_loss(params, batch, rng, *, model: Electra, rtd_lambda: float = 50.0, deterministic: bool = False,
                 temperature: float = 1.0):
  """Generator MLM loss + rtd_lambda * discriminator loss for one ELECTRA step -> (loss, metrics).

  The generator predicts the masked tokens of batch['tokens'] (already masked by the data pipeline); one replacement
  per masked position is sampled from its softmax, with the logits stop-gradient'ed (the discriminator's loss must not
  train the generator through the sample, as in ELECTRA); the discriminator sees the corrupted sequence and predicts,
  at every real token, whether it differs from the original. Metrics: 'generator/*', 'discriminator/*', 'loss', and
  rtd_diagnostics' (disc_auc, disc_precision, disc_recall, replaced_fraction, disc_loss_baseline,
  generator_accuracy, token_variance_share), weighted by the real tokens.
  """
  sample_rng, gen_rng, disc_rng = jax.random.split(rng, 3)
  variables = {'params': params}
  gen_logits = model.apply(variables, batch, deterministic=deterministic, rngs={'dropout': gen_rng},
                           method=Electra.generate)  # [B,P,V]
  gen_loss, gen_m = mlm_loss(logits=gen_logits, labels=batch['masked_ids'], weights=batch['masked_weights'])
  sampled = jax.random.categorical(sample_rng,
                                   jax.lax.stop_gradient(gen_logits.astype(jnp.float32)) / temperature,
                                   axis=-1)  # [B,P]
  original = scatter_at_positions(tokens=batch['tokens'], positions=batch['masked_positions'],
                                  values=batch['masked_ids'], weights=batch['masked_weights'])
  corrupted = scatter_at_positions(tokens=batch['tokens'], positions=batch['masked_positions'], values=sampled,
                                   weights=batch['masked_weights'])
  segment_ids = batch.get('segment_ids')
  if segment_ids is None:
    segment_ids = jnp.ones_like(batch['tokens'])
  labels, weights = rtd_labels(corrupted=corrupted, original=original, segment_ids=segment_ids)
  disc_logits, disc_hidden = model.apply(variables, batch, corrupted, deterministic=deterministic,
                                         rngs={'dropout': disc_rng}, method=Electra.discriminate_with_hidden)
  disc_loss, disc_m = rtd_loss(logits=disc_logits, labels=labels, weights=weights)
  loss = gen_loss + rtd_lambda * disc_loss
  metrics = {'loss': loss}
  metrics.update({f'generator/{k}': v for k, v in gen_m.items()})
  metrics.update({f'discriminator/{k}': v for k, v in disc_m.items()})
  metrics.update(rtd_diagnostics(logits=jax.lax.stop_gradient(disc_logits), labels=labels, weights=weights,
                                 hidden=jax.lax.stop_gradient(disc_hidden), generator_accuracy=gen_m['accuracy']))
  return loss, metrics
