"""Every pre-training objective learns, by its reference's own diagnostics: T5 starts from Mesh TensorFlow's
initialization and learns span corruption's format within its runlocal steps; ELECTRA's discriminator, trained by
configs/electra.py's recipe, separates replaced from original tokens (disc_auc) instead of predicting the base rate;
the diagnostics themselves (AUC, the collapse signal, span roles, most-frequent-token baselines) against float64 numpy.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import electra as electra_config
from configs import t5 as t5_config
from model import heads
from model import transformer
from train.tasks import losses as obj
from train import tasks
from train.core import trainer
from train.data import examples as ex


def _rows(workdir, split):
  with open(f'{workdir}/metrics.jsonl') as f:
    return [r for r in map(json.loads, f) if r['split'] == split]


# ------------------------------------------------------------------------------------------------------ T5's init


def _t5_params(**overrides):
  cfg = transformer.preset('t5-tiny', vocab_size=2000, **overrides)
  lm = heads.LanguageModel(cfg, heads=('lm',))
  rows = {'encoder_tokens': jnp.ones((1, 8), jnp.int32), 'decoder_tokens': jnp.ones((1, 8), jnp.int32)}
  return cfg, heads.init_params(lm, jax.random.key(0), rows)


def test_t5_draws_mesh_tensorflows_init_and_other_families_keep_0_02():
  cfg, p = _t5_params()
  d, kv, n, ff = cfg.d_model, cfg.head_width, cfg.num_heads, cfg.d_ff
  enc = p['transformer']['encoder']['stack']
  expected = {
      'embedding': (p['embed']['token']['embedding'], 1.0),
      'query': (enc['layers']['self_attn']['query']['kernel'], (d * kv) ** -0.5),
      'key': (enc['layers']['self_attn']['key']['kernel'], d ** -0.5),
      'value': (enc['layers']['self_attn']['value']['kernel'], d ** -0.5),
      'out': (enc['layers']['self_attn']['out']['kernel'], (n * kv) ** -0.5),
      'wi': (enc['layers']['mlp']['wi']['kernel'], d ** -0.5),
      'wo': (enc['layers']['mlp']['wo']['kernel'], ff ** -0.5),
      'relative_bias': (enc['relative_bias']['rel_embedding'], d ** -0.5),
  }
  for name, (array, std) in expected.items():
    assert np.std(np.asarray(array)) == pytest.approx(std, rel=0.15), name
  bert = transformer.preset('bert-tiny', vocab_size=500)
  bp = heads.init_params(heads.LanguageModel(bert, heads=('mlm',)), jax.random.key(0),
                         {'tokens': jnp.ones((1, 8), jnp.int32)})
  assert np.std(np.asarray(bp['transformer']['stack']['layers']['self_attn']['query']['kernel'])) == pytest.approx(
      0.02, rel=0.1)
  assert np.std(np.asarray(bp['embed']['token']['embedding'])) == pytest.approx(0.02, rel=0.1)


def test_t5_layer0_attention_logits_have_unit_scale_at_init():
  """With T5's init, q.k over d_kv is O(1) (attention_scale 1.0 has the 1/sqrt(d_kv) folded into the query); with
  every kernel at d_model^-0.5 it was 7.9: near one-hot attention before the first step."""
  cfg, p = _t5_params()
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 2, cfg.vocab_size)
  x = np.asarray(p['embed']['token']['embedding'], np.float64)[np.asarray(tokens)]  # [B,T,D]
  layer = p['transformer']['encoder']['stack']['layers']
  scale = np.asarray(layer['self_attn_norm']['scale'][0], np.float64)
  xn = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale
  q = np.einsum('btd,dnh->btnh', xn, np.asarray(layer['self_attn']['query']['kernel'][0], np.float64))
  k = np.einsum('btd,dnh->btnh', xn, np.asarray(layer['self_attn']['key']['kernel'][0], np.float64))
  logits = np.einsum('btnh,bsnh->bnts', q, k) * cfg.attention_scale
  assert 0.5 <= logits.std() <= 2.0, logits.std()


def test_t5_runlocal_learns_the_span_format_in_50_steps(tmp_path):
  c = t5_config.get_config('runlocal')
  c.train.steps = c.train.eval_every = c.train.checkpoint_every = 50
  trainer.train_and_evaluate(c, str(tmp_path), log=lambda m: None)
  final = _rows(tmp_path, 'eval')[-1]
  vocab = int(c.data.vocab_size)
  print(f'\nt5 runlocal, 50 steps: eval loss {final["loss"]:.3f} (ln V {math.log(vocab):.2f}), eos accuracy '
        f'{final["span/eos_accuracy"]:.3f}, sentinel {final["span/sentinel_accuracy"]:.3f}, tokens '
        f'{final["span/token_accuracy"]:.3f} (baseline {final["span/token_accuracy_baseline"]:.3f})')
  assert final['loss'] < 0.8 * math.log(vocab)
  assert final['span/eos_accuracy'] >= 0.9


# --------------------------------------------------------------------------------------------------- ELECTRA


def test_electra_runlocal_discriminator_learns_and_does_not_collapse(tmp_path):
  """configs/electra.py:runlocal as it is: the discriminator's AUC on held-out text, its loss below the base rate's
  (the entropy of the replaced share: what predicting "original" everywhere scores) and hidden states that still
  differ between tokens. The old recipe (2e-3, warmup 5) ended at AUC 0.49, loss = entropy, token share 0.0000."""
  c = electra_config.get_config('runlocal')
  lines = []
  trainer.train_and_evaluate(c, str(tmp_path), log=lines.append)
  final = _rows(tmp_path, 'eval')[-1]
  print(f'\nelectra runlocal ({int(c.train.steps)} steps): disc_auc {final["rtd/disc_auc"]:.3f}, disc loss '
        f'{final["rtd/discriminator/loss"]:.4f} (base rate {final["rtd/disc_loss_baseline"]:.4f}), token share '
        f'{final["rtd/token_variance_share"]:.4f}, recall {final["rtd/disc_recall"]:.3f}')
  assert final['rtd/disc_auc'] >= 0.65
  assert final['rtd/discriminator/loss'] < final['rtd/disc_loss_baseline'] - 0.02
  assert final['rtd/token_variance_share'] > 0.05
  assert not [line for line in lines if line.startswith('warning: rtd')]
  train = _rows(tmp_path, 'train')[-1]
  for key in ('disc_auc', 'disc_precision', 'disc_recall', 'replaced_fraction', 'generator_accuracy',
              'token_variance_share'):
    assert f'rtd/{key}' in train and math.isfinite(train[f'rtd/{key}'])


def _auc64(scores, labels, weights):
  """P(positive > negative) + 1/2 P(tie), over every pair, in float64."""
  s, y, w = (np.asarray(a, np.float64).ravel() for a in (scores, labels, weights))
  pos, neg = s[(w > 0) & (y > 0)], s[(w > 0) & (y == 0)]
  diff = pos[:, None] - neg[None, :]
  return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def test_binary_auc_equals_the_pairwise_count_with_ties_and_padding():
  rng = np.random.default_rng(0)
  scores = np.round(rng.normal(size=(4, 50)), 1).astype(np.float32)  # rounded: many ties
  labels = (rng.random((4, 50)) < 0.2).astype(np.int32)
  weights = (rng.random((4, 50)) < 0.9).astype(np.float32)
  scores[weights == 0] = 100.0  # padding must not count, whatever its score
  auc, pairs = obj.binary_auc(scores=jnp.asarray(scores), labels=jnp.asarray(labels), weights=jnp.asarray(weights))
  assert float(auc) == pytest.approx(_auc64(scores, labels, weights), abs=1e-6)
  assert float(pairs) == ((weights > 0) & (labels > 0)).sum() * ((weights > 0) & (labels == 0)).sum()
  perfect, _ = obj.binary_auc(scores=jnp.asarray(labels, jnp.float32), labels=jnp.asarray(labels),
                              weights=jnp.ones((4, 50)))
  assert float(perfect) == 1.0
  empty, _ = obj.binary_auc(scores=jnp.zeros(3), labels=jnp.zeros(3, jnp.int32), weights=jnp.ones(3))
  assert float(empty) == 0.5


def test_token_variance_share_is_zero_for_one_vector_and_near_one_for_centred_noise():
  rng = np.random.default_rng(0)
  same = np.broadcast_to(rng.normal(size=16), (2, 10, 16))
  weights = np.ones((2, 10))
  assert float(obj.token_variance_share(hidden=jnp.asarray(same), weights=jnp.asarray(weights))) == pytest.approx(
      0.0, abs=1e-6)
  noise = rng.normal(size=(2, 10, 16))
  noise -= noise.mean(axis=(0, 1))
  got = float(obj.token_variance_share(hidden=jnp.asarray(noise), weights=jnp.asarray(weights)))
  assert got == pytest.approx(1.0, abs=1e-5)
  # Padding rows are left out: a constant real part is a collapse however the padding looks.
  mixed = np.concatenate([same[:, :5], noise[:, 5:]], axis=1)
  w = np.concatenate([np.ones((2, 5)), np.zeros((2, 5))], axis=1)
  assert float(obj.token_variance_share(hidden=jnp.asarray(mixed), weights=jnp.asarray(w))) == pytest.approx(
      0.0, abs=1e-6)


def test_rtd_diagnostics_against_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 20)).astype(np.float32)
  labels = (rng.random((3, 20)) < 0.3).astype(np.int32)
  weights = np.ones((3, 20), np.float32)
  weights[:, 15:] = 0
  hidden = rng.normal(size=(3, 20, 8)).astype(np.float32)
  m = obj.rtd_diagnostics(logits=jnp.asarray(logits), labels=jnp.asarray(labels), weights=jnp.asarray(weights),
                          hidden=jnp.asarray(hidden), generator_accuracy=jnp.asarray(0.25))
  real = weights > 0
  pred, rep = real & (logits > 0), real & (labels > 0)
  share = rep.sum() / real.sum()
  assert float(m['disc_precision']) == pytest.approx((pred & rep).sum() / pred.sum(), rel=1e-6)
  assert float(m['disc_recall']) == pytest.approx((pred & rep).sum() / rep.sum(), rel=1e-6)
  assert float(m['replaced_fraction']) == pytest.approx(share, rel=1e-6)
  assert float(m['disc_loss_baseline']) == pytest.approx(-(share * np.log(share) + (1 - share) * np.log(1 - share)),
                                                         rel=1e-5)
  assert float(m['disc_auc']) == pytest.approx(_auc64(logits, labels, weights), abs=1e-6)
  assert float(m['weight_sum']) == real.sum()


def test_health_warnings_name_a_collapse_and_stay_quiet_when_learning():
  collapsed = {'rtd/disc_auc': 0.50, 'rtd/discriminator/loss': 0.405, 'rtd/disc_loss_baseline': 0.405,
               'rtd/token_variance_share': 0.0001}
  lines = tasks.health_warnings(collapsed, split='eval')
  assert len(lines) == 2 and 'did not learn' in lines[0] and 'collapsed' in lines[1]
  # In training, dropout alone keeps the share near 0.08: only the AUC/loss signal is read there.
  assert len(tasks.health_warnings(collapsed, split='train')) == 1
  healthy = {'rtd/disc_auc': 0.75, 'rtd/discriminator/loss': 0.36, 'rtd/disc_loss_baseline': 0.405,
             'rtd/token_variance_share': 0.2}
  assert tasks.health_warnings(healthy, split='eval') == []
  assert tasks.health_warnings({'loss': 1.0}, split='eval') == []


# ---------------------------------------------------------------------------------- span roles and baselines


def test_span_target_roles_mark_tokens_sentinels_and_the_final_eos():
  sentinels = np.array([90, 91, 92], np.int32)
  targets = np.array([90, 5, 6, 91, 7, 1], np.int32)  # <x0> 5 6 <x1> 7 EOS
  np.testing.assert_array_equal(ex.span_target_roles(targets, sentinels, 8), [2, 1, 1, 2, 1, 3, 0, 0])
  # Truncated before its EOS: no EOS role.
  np.testing.assert_array_equal(ex.span_target_roles(targets, sentinels, 4), [2, 1, 1, 2])


def test_span_loss_accuracy_per_role_against_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 6, 10)).astype(np.float32)
  targets = rng.integers(0, 10, size=(2, 6)).astype(np.int32)
  roles = np.array([[2, 1, 1, 2, 3, 0], [2, 1, 2, 1, 1, 3]], np.int32)
  weights = (roles > 0).astype(np.float32)
  logits[0, 1, targets[0, 1]] = 50.0  # one token hit, one EOS hit
  logits[1, 5, targets[1, 5]] = 50.0
  _, m = obj.span_loss(logits=jnp.asarray(logits), targets=jnp.asarray(targets), weights=jnp.asarray(weights),
                       roles=jnp.asarray(roles))
  hit = logits.argmax(-1) == targets
  for role, name in ((1, 'token_accuracy'), (2, 'sentinel_accuracy'), (3, 'eos_accuracy')):
    assert float(m[name]) == pytest.approx(hit[roles == role].mean(), rel=1e-6), name


def test_token_baselines_are_the_most_frequent_targets_share():
  batches = [{'masked_ids': np.array([[3, 3, 4, 0]]), 'masked_weights': np.array([[1, 1, 1, 0]], np.float32)},
             {'masked_ids': np.array([[3, 5, 0, 0]]), 'masked_weights': np.array([[1, 1, 0, 0]], np.float32)}]
  assert tasks.token_baselines({'mlm': 1.0}, batches) == {'mlm/accuracy_baseline': pytest.approx(3 / 5)}
  span = [{'decoder_targets': np.array([[90, 7, 7, 91, 8, 1]]), 'decoder_weights': np.ones((1, 6), np.float32),
           'decoder_target_roles': np.array([[2, 1, 1, 2, 1, 3]])}]
  assert tasks.token_baselines({'span': 1.0}, span) == {'span/token_accuracy_baseline': pytest.approx(2 / 3)}
  assert tasks.token_baselines({'rtd': 1.0}, batches) == {}


# ------------------------------------------------------------------ encoder-decoder classification by label text


def test_label_text_scores_are_the_seq2seq_log_probabilities_of_each_label():
  """An encoder-decoder classifies by ranking label names: each candidate's score is exactly sum_t log p(target_t)
  from the ordinary seq2seq forward on (text, that label), in float64 from its logits."""
  from train.data import task_examples as tex
  from train.data import tokenizers
  texts = ['the cat sat on the mat', 'a dog barks at night', 'asyncio email logging tkinter'] * 40
  tok = tokenizers.train_tokenizer('unigram', texts, vocab_size=400, num_sentinels=4)
  names = ['asyncio', 'email', 'tkinter']
  builder = tex.LabelText(tok, inputs_length=16, targets_length=6, label_names=names)
  record = {'text_a': 'the dog sat', 'text_b': 'at night', 'label': 'email'}
  cfg = transformer.preset('t5-tiny', vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id, dropout_rate=0.0,
                           attention_dropout_rate=0.0, mlp_dropout_rate=0.0)
  lm = heads.LanguageModel(cfg, heads=('lm',))
  train_ex = builder(record)
  assert int(train_ex['label']) == 1 and train_ex['decoder_targets'][int(train_ex['decoder_weights'].sum()) - 1] == \
      tok.eos_id
  params = heads.init_params(lm, jax.random.key(0), {k: v[None] for k, v in train_ex.items() if k != 'label'})
  cand = builder.candidates(record)
  scores = np.asarray(lm.apply({'params': params}, {k: v[None] for k, v in cand.items()})['cls_logits'][0])
  for i, name in enumerate(names):
    pair = builder(dict(record, label=name))
    logits = np.asarray(lm.apply({'params': params}, {k: v[None] for k, v in pair.items() if k != 'label'})['lm_logits'][0],
                        np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    want = (np.take_along_axis(log_probs, pair['decoder_targets'][:, None], -1)[:, 0] * pair['decoder_weights']).sum()
    assert scores[i] == pytest.approx(want, abs=1e-4), name
