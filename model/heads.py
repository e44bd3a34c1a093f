"""Prediction heads and the top-level LanguageModel that puts a backbone and any set of heads in one params pytree.

Pre-training heads: MLM (tied to the input embedding, applied only at the gathered masked positions), NSP on the pooled
[CLS], LM (tied or not), the ELECTRA discriminator. Task heads: sequence classification, token classification and
extractive-QA start/end. `LanguageModel(cfg, heads=('mlm', 'nsp'))` returns a dict of what each head produced, so
objectives can be combined over one forward pass; `Electra` pairs a generator and a discriminator that share
embeddings. Batches follow the contract in train/data/__init__.py (tokens, segment_ids, positions, ...).
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import Embeddings, Norm, activation, dense, zeros_init
from model.transformer import Decoder, Encoder, EncoderDecoder

HEADS = ('mlm', 'nsp', 'lm', 'rtd', 'classifier', 'tagger', 'qa', 'prompt')
# Batch keys of prompt (cloze / continuation) examples that carry a group axis G after the batch axis: [B,G,T].
PROMPT_INPUTS = ('tokens', 'segment_ids', 'positions', 'token_type_ids', 'extra_embeddings', 'soft_prompt_slots')


def gather_positions(hidden, positions):
  """hidden [B,T,D], positions [B,P] int -> [B,P,D]."""
  return jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)


class MLMHead(nn.Module):
  """BERT's transform (dense, activation, norm) then logits against the tied embedding table plus a bias -> [..., V]."""
  cfg: ModelConfig
  embed: Embeddings

  @nn.compact
  def __call__(self, hidden):
    cfg = self.cfg
    h = dense(cfg, cfg.embed_width, ('embed', 'embed_in'), use_bias=True, name='transform')(hidden)
    h = Norm(cfg, features_axis='embed_in', name='norm')(activation(cfg.activation)(h))
    bias = self.param('bias', zeros_init(('vocab',)), (cfg.vocab_size,), cfg.jnp_param_dtype)
    return self.embed.attend(h) + bias.astype(h.dtype)


class Pooler(nn.Module):
  """tanh(W h_[CLS] + b): [B,T,D] -> [B,D] (BERT's pooled output, read by NSP and the classifier)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden):
    return jnp.tanh(dense(self.cfg, self.cfg.d_model, ('embed', 'mlp'), use_bias=True, name='dense')(hidden[:, 0]))


class LMHead(nn.Module):
  """Next-token logits [B,T,D] -> [B,T,V]: the transposed embedding table when tied, else its own kernel."""
  cfg: ModelConfig
  embed: Embeddings

  @nn.compact
  def __call__(self, hidden):
    cfg = self.cfg
    if cfg.tie_embeddings:
      if cfg.scale_tied_logits:
        hidden = hidden * cfg.d_model ** -0.5
      return self.embed.attend(hidden)
    return dense(cfg, cfg.vocab_size, ('embed', 'vocab'), use_bias=False, name='out')(hidden)


class RTDHead(nn.Module):
  """ELECTRA's discriminator: per-token logit that the token was replaced, [B,T,D] -> [B,T]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, hidden):
    cfg = self.cfg
    h = activation(cfg.activation)(dense(cfg, cfg.d_model, ('embed', 'mlp'), use_bias=True, name='dense')(hidden))
    import os
    return dense(cfg, 1, ('mlp', None), use_bias=True, name='out')(h)[..., 0] + float(os.environ.get('RTD_PRIOR', '0'))


def pool(hidden, segment_ids, how: str):
  """[B,T,D] -> [B,D]: 'cls' first token, 'mean' over real tokens, 'last' the last real token (decoders)."""
  if how == 'cls':
    return hidden[:, 0]
  real = (segment_ids != 0).astype(hidden.dtype)
  if how == 'mean':
    return (hidden * real[..., None]).sum(1) / jnp.maximum(real.sum(1, keepdims=True), 1.0)
  if how == 'last':
    last = jnp.maximum(real.sum(1).astype(jnp.int32) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  raise ValueError(f"classifier pooling {how!r} is unknown; use 'cls', 'mean' or 'last'.")


def verbalizer_scores(log_probs, batch, num_labels: int):
  """Label scores from the log-probabilities of every verbalizer word's tokens.

  log_probs [B,C,P]: log p(score_ids) at score_positions for the C candidate words (each word of each label of each
  template); batch['score_weights'] [B,C,P] (1, or 1/n for a length-normalized word of n tokens, 0 on padding),
  batch['score_label'] [B,C] and batch['score_template'] [B,C] say whose word it is. A word scores sum_p w_p log p; a
  label the log of its words' mean probability; each template's label scores are log-softmaxed over the labels and
  the templates averaged (PET's and LM-BFF's ensemble). -> (label log-probs [B,L], raw label scores [B,K,L]) with K = C
  template slots, those of absent templates -inf in raw and left out of the mean."""
  c = log_probs.shape[1]
  word = (log_probs * batch['score_weights']).sum(-1)  # [B,C]
  labels = jax.nn.one_hot(batch['score_label'], num_labels, dtype=jnp.float32)  # [B,C,L]
  templates = jax.nn.one_hot(batch['score_template'], c, dtype=jnp.float32)  # [B,C,K]
  member = templates[:, :, :, None] * labels[:, :, None, :]  # [B,C,K,L]
  count = member.sum(1)  # [B,K,L] words per (template, label)
  # A large finite stand-in for -inf keeps the gradients of empty (template, label) slots finite.
  raw = jax.nn.logsumexp(jnp.where(member > 0, word[:, :, None, None], -1e30), axis=1)
  raw = jnp.where(count > 0, raw - jnp.log(jnp.maximum(count, 1.0)), -jnp.inf)  # [B,K,L]
  present = count.sum(-1) > 0  # [B,K]
  per_template = jnp.where(present[..., None], jax.nn.log_softmax(jnp.where(count > 0, raw, 0.0), axis=-1), 0.0)
  return per_template.sum(1) / jnp.maximum(present.sum(1, keepdims=True), 1), raw


class LanguageModel(nn.Module):
  """A backbone chosen by cfg.arch plus the named heads, as one module with one params pytree.

  params: {'embed', 'transformer', and one entry per head ('mlm', 'pooler', 'nsp', 'lm', 'rtd', 'classifier',
  'tagger', 'qa')}. __call__(batch) returns {'hidden': [B,T,D], and per head: 'mlm_logits' [B,P,V] (at
  batch['masked_positions'], or every position without it), 'nsp_logits' [B,2], 'lm_logits' [B,T,V], 'rtd_logits'
  [B,T], 'cls_logits' [B,C], 'tag_logits' [B,T,C], 'start_logits'/'end_logits' [B,T]}; encoder-decoder models read
  encoder_* / decoder_* keys and also return 'encoded'.
  """
  cfg: ModelConfig
  heads: Sequence[str] = ()
  num_labels: int = 2
  num_tags: int = 2
  classifier_pooling: Optional[str] = None  # None: 'cls' for encoders, 'last' for decoders
  # A frozen backbone used as a feature extractor runs in eval mode (no dropout inside it), as a linear probe does;
  # the heads keep their dropout.
  backbone_deterministic: bool = False
  # Soft prompt (Lester et al.): this many learned vectors [n,E], added at the input positions that
  # batch['soft_prompt_slots'] [B,T] marks 1..n over a placeholder token (train/finetune/prompts.py SoftPromptSlots).
  soft_prompt_length: int = 0

  def setup(self):
    cfg = self.cfg
    if self.soft_prompt_length:
      self.soft_prompt = self.param('soft_prompt',
                                    nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), (None, 'embed')),
                                    (self.soft_prompt_length, cfg.embed_width), cfg.jnp_param_dtype)
    unknown = set(self.heads) - set(HEADS)
    if unknown:
      raise ValueError(f'unknown head(s) {sorted(unknown)}; known: {HEADS}.')
    self.embed = Embeddings(cfg)
    if cfg.arch == 'encoder':
      self.transformer = Encoder(cfg, shared_embeddings=self.embed)
    elif cfg.arch == 'decoder':
      self.transformer = Decoder(cfg, shared_embeddings=self.embed)
    else:
      self.transformer = EncoderDecoder(cfg, shared_embeddings=self.embed)
    heads = set(self.heads)
    if 'prompt' in heads and cfg.arch == 'encoder_decoder':
      raise ValueError("the 'prompt' head scores verbalizers with an encoder's MLM head or a decoder's LM head; "
                       'encoder-decoders classify by the text of each label (a classification task without '
                       'finetune.prompt): the labels are ranked by the log-probability of their text.')
    if 'mlm' in heads or ('prompt' in heads and cfg.arch == 'encoder'):
      self.mlm = MLMHead(cfg, self.embed)
    if 'nsp' in heads or ('classifier' in heads and self.pooling == 'cls' and cfg.arch == 'encoder'):
      self.pooler = Pooler(cfg)
    if 'nsp' in heads:
      self.nsp = dense(cfg, 2, ('embed', None), use_bias=True)
    if 'lm' in heads or ('prompt' in heads and cfg.arch == 'decoder'):
      self.lm = LMHead(cfg, self.embed)
    if 'rtd' in heads:
      self.rtd = RTDHead(cfg)
    if 'classifier' in heads:
      self.classifier = dense(cfg, self.num_labels, ('embed', None), use_bias=True)
    if 'tagger' in heads:
      self.tagger = dense(cfg, self.num_tags, ('embed', None), use_bias=True)
    if 'qa' in heads:
      self.qa = dense(cfg, 2, ('embed', None), use_bias=True)
    self.head_dropout = nn.Dropout(cfg.dropout_rate)

  @property
  def pooling(self) -> str:
    return self.classifier_pooling or ('cls' if self.cfg.arch == 'encoder' else 'last')

  def encode(self, batch, *, deterministic: bool = True):
    """Encoder-decoder only: batch['encoder_tokens'] [B,S] -> [B,S,D]."""
    return self.transformer.encode(batch['encoder_tokens'], segment_ids=batch.get('encoder_segment_ids'),
                                   positions=batch.get('encoder_positions'), deterministic=deterministic)

  def backbone(self, batch, *, deterministic: bool = True, decode: bool = False):
    """The final hidden states [B,T,D] (decoder side for encoder-decoder) and, for T5, the encoder output."""
    cfg = self.cfg
    extra = batch.get('extra_embeddings')
    if self.soft_prompt_length and 'soft_prompt_slots' in batch:
      slots = batch['soft_prompt_slots'][..., None]  # [B,T,1]
      prompt = jnp.take(self.soft_prompt, jnp.maximum(batch['soft_prompt_slots'] - 1, 0), axis=0)  # [B,T,E]
      prompt = jnp.where(slots > 0, prompt, 0.0)
      extra = prompt if extra is None else extra + prompt
    if cfg.arch == 'encoder':
      return self.transformer(batch['tokens'], segment_ids=batch.get('segment_ids'), positions=batch.get('positions'),
                              token_type_ids=batch.get('token_type_ids'), deterministic=deterministic,
                              extra_embeddings=extra), None
    if cfg.arch == 'decoder':
      return self.transformer(batch['tokens'], segment_ids=batch.get('segment_ids'), positions=batch.get('positions'),
                              deterministic=deterministic, decode=decode, extra_embeddings=extra), None
    encoded = batch.get('encoded')
    if encoded is None:
      encoded = self.encode(batch, deterministic=deterministic)
    hidden = self.transformer.decode(batch['decoder_tokens'], encoded=encoded,
                                     encoder_segment_ids=batch.get('encoder_segment_ids'),
                                     segment_ids=batch.get('decoder_segment_ids'),
                                     positions=batch.get('decoder_positions'), deterministic=deterministic,
                                     decode=decode)
    return hidden, encoded

  def prompt_logits(self, batch, *, deterministic: bool = True):
    """The 'prompt' head: label log-probabilities read off the MLM head at the masks (encoders) or the LM head at
    the continuation (decoders), for examples of G inputs each (tokens [B,G,T]; train/finetune/prompts.py builds them).

    batch['score_group'] [B,C] names the input row of each candidate word, batch['score_positions'] [B,C,P] the
    positions whose output predicts its tokens batch['score_ids'] [B,C,P]. -> {'cls_logits' [B,L], 'label_scores'
    [B,K,L], 'hidden' [B,G,T,D]}."""
    b, g, t = batch['tokens'].shape
    flat = {k: v.reshape((b * g,) + v.shape[2:]) for k, v in batch.items() if k in PROMPT_INPUTS}
    hidden, _ = self.backbone(flat, deterministic=deterministic or self.backbone_deterministic)
    hidden = hidden.reshape((b, g, t, hidden.shape[-1]))  # [B,G,T,D]
    rows = jnp.take_along_axis(hidden, batch['score_group'][:, :, None, None].astype(jnp.int32), axis=1)  # [B,C,T,D]
    at = jnp.take_along_axis(rows, batch['score_positions'][..., None].astype(jnp.int32), axis=2)  # [B,C,P,D]
    logits = (self.mlm(at) if self.cfg.arch == 'encoder' else self.lm(at)).astype(jnp.float32)  # [B,C,P,V]
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                                    batch['score_ids'][..., None].astype(jnp.int32), axis=-1)[..., 0]  # [B,C,P]
    label_logits, raw = verbalizer_scores(log_probs, batch, self.num_labels)
    return {'hidden': hidden, 'cls_logits': label_logits, 'label_scores': raw}

  def label_text_scores(self, batch, *, deterministic: bool = True):
    """Encoder-decoder classification by the label's text: log p(label_decoder_targets | encoder input) summed over
    each candidate's target tokens. batch: the encoder keys [B,S] and label_decoder_* [B,L,T] (one row per label,
    train/data/task_examples.py LabelText.candidates). The input is encoded once and read by every candidate.
    -> {'cls_logits' [B,L] (the candidates' log-probabilities), 'hidden' [B,L,T,D]}."""
    b, n_labels, t = batch['label_decoder_tokens'].shape
    encoded = self.encode(batch, deterministic=deterministic)  # [B,S,D]
    repeat = lambda x: jnp.repeat(x, n_labels, axis=0)  # [B,...] -> [B*L,...], candidates of a row adjacent
    rows = {k[len('label_'):]: v.reshape((b * n_labels, t)) for k, v in batch.items() if k.startswith('label_decoder')}
    hidden = self.transformer.decode(rows['decoder_tokens'], encoded=repeat(encoded),
                                     encoder_segment_ids=repeat(batch['encoder_segment_ids']),
                                     segment_ids=rows['decoder_segment_ids'], positions=rows['decoder_positions'],
                                     deterministic=deterministic)  # [B*L,T,D]
    log_probs = jax.nn.log_softmax(self.lm(hidden).astype(jnp.float32), axis=-1)  # [B*L,T,V]
    picked = jnp.take_along_axis(log_probs, rows['decoder_targets'][..., None].astype(jnp.int32), axis=-1)[..., 0]
    scores = (picked * rows['decoder_weights']).sum(-1).reshape((b, n_labels))
    return {'cls_logits': scores, 'hidden': hidden.reshape((b, n_labels, t, hidden.shape[-1]))}

  def __call__(self, batch, *, deterministic: bool = True, decode: bool = False):
    if 'label_decoder_tokens' in batch and self.cfg.arch == 'encoder_decoder':
      return self.label_text_scores(batch, deterministic=deterministic)
    if 'prompt' in self.heads:
      if 'score_group' not in batch:
        raise ValueError("LanguageModel(heads=('prompt',)) reads prompt examples (score_group, score_positions, "
                         'score_ids, ...; train/finetune/prompts.py); this batch has ' + ', '.join(sorted(batch)) + '.')
      return self.prompt_logits(batch, deterministic=deterministic)
    hidden, encoded = self.backbone(batch, deterministic=deterministic or self.backbone_deterministic, decode=decode)
    out = {'hidden': hidden}
    if encoded is not None:
      out['encoded'] = encoded
    heads = set(self.heads)
    seg_key = 'decoder_segment_ids' if self.cfg.arch == 'encoder_decoder' else 'segment_ids'
    segment_ids = batch.get(seg_key)
    if segment_ids is None:
      segment_ids = jnp.ones(hidden.shape[:2], jnp.int32)
    if 'mlm' in heads:
      positions = batch.get('masked_positions')
      out['mlm_logits'] = self.mlm(hidden if positions is None else gather_positions(hidden, positions))
    pooled = None
    if hasattr(self, 'pooler') and ('nsp' in heads or 'classifier' in heads):
      pooled = self.pooler(hidden)
    if 'nsp' in heads:
      out['nsp_logits'] = self.nsp(pooled)
    if 'lm' in heads:
      out['lm_logits'] = self.lm(hidden)
    if 'rtd' in heads:
      out['rtd_logits'] = self.rtd(hidden)
    if 'classifier' in heads:
      if pooled is None or self.pooling != 'cls':
        pooled = pool(hidden, segment_ids, self.pooling)
      out['cls_logits'] = self.classifier(self.head_dropout(pooled, deterministic=deterministic))
    if 'tagger' in heads:
      out['tag_logits'] = self.tagger(self.head_dropout(hidden, deterministic=deterministic))
    if 'qa' in heads:
      span = self.qa(hidden)
      out['start_logits'], out['end_logits'] = span[..., 0], span[..., 1]
    return out


class Electra(nn.Module):
  """ELECTRA's generator (small MLM encoder) and discriminator (RTD encoder) over one shared embedding table.

  params: {'embed', 'generator', 'mlm', 'discriminator', 'rtd'}. The train step samples replacements from
  `generate` and scores them with `discriminate`; __call__ runs both on the same tokens (for init).
  """
  generator_cfg: ModelConfig
  discriminator_cfg: ModelConfig

  def setup(self):
    g, d = self.generator_cfg, self.discriminator_cfg
    if (g.vocab_size, g.embed_width, g.max_len) != (d.vocab_size, d.embed_width, d.max_len):
      raise ValueError('ELECTRA generator and discriminator must agree on vocab_size, embed_dim and max_len to share '
                       f'embeddings; got generator {g.vocab_size, g.embed_width, g.max_len}, discriminator '
                       f'{d.vocab_size, d.embed_width, d.max_len}.')
    self.embed = Embeddings(d)
    self.generator = Encoder(g, shared_embeddings=self.embed)
    self.mlm = MLMHead(g, self.embed)
    self.discriminator = Encoder(d, shared_embeddings=self.embed)
    self.rtd = RTDHead(d)

  def _encode(self, encoder, batch, tokens, deterministic):
    return encoder(tokens, segment_ids=batch.get('segment_ids'), positions=batch.get('positions'),
                   token_type_ids=batch.get('token_type_ids'), deterministic=deterministic)

  def generate(self, batch, *, deterministic: bool = True):
    """MLM logits of the generator at batch['masked_positions']: [B,P,V]."""
    hidden = self._encode(self.generator, batch, batch['tokens'], deterministic)
    return self.mlm(gather_positions(hidden, batch['masked_positions']))

  def discriminate(self, batch, tokens, *, deterministic: bool = True):
    """Replaced-token logits [B,T] for the corrupted tokens [B,T]."""
    return self.discriminate_with_hidden(batch, tokens, deterministic=deterministic)[0]

  def discriminate_with_hidden(self, batch, tokens, *, deterministic: bool = True):
    """(replaced-token logits [B,T], the discriminator's final hidden states [B,T,D]) for corrupted tokens [B,T]."""
    hidden = self._encode(self.discriminator, batch, tokens, deterministic)
    return self.rtd(hidden), hidden

  def __call__(self, batch, *, deterministic: bool = True):
    return {
        'mlm_logits': self.generate(batch, deterministic=deterministic),
        'rtd_logits': self.discriminate(batch, batch['tokens'], deterministic=deterministic)
    }


def init_params(module: nn.Module, rng, batch, **kwargs):
  """Unboxed params of `module` for an example batch (logical axis metadata dropped; see logical_axes)."""
  return nn.meta.unbox(module.init({'params': rng, 'dropout': rng}, batch, **kwargs)['params'])


def abstract_params(cfg, heads: Sequence[str], **module_kw):
  """Shapes and dtypes of LanguageModel(cfg, heads, **module_kw)'s params (ShapeDtypeStruct leaves), allocating
  nothing; module_kw: num_labels, num_tags, classifier_pooling."""
  rows = {
      'encoder_tokens': jnp.zeros((1, 2), jnp.int32),
      'decoder_tokens': jnp.zeros((1, 2), jnp.int32)
  } if (cfg.arch == 'encoder_decoder') else {
      'tokens': jnp.zeros((1, 2), jnp.int32)
  }
  if 'prompt' in heads:
    rows = dict(
        tokens=jnp.zeros((1, 1, 2), jnp.int32), **{
            k: jnp.zeros((1, 1) + (1,) * (k in ('score_positions', 'score_ids', 'score_weights')), jnp.int32)
            for k in ('score_group', 'score_positions', 'score_ids', 'score_label', 'score_template')
        }, score_weights=jnp.ones((1, 1, 1), jnp.float32))
  module = LanguageModel(cfg, heads=tuple(heads), **module_kw)
  return jax.eval_shape(lambda: init_params(module, jax.random.key(0), rows))


def logical_axes(module: nn.Module, batch, **kwargs):
  """The logical axis names of every parameter, as a pytree of PartitionSpecs, computed without allocating."""
  shapes = jax.eval_shape(lambda: module.init({
      'params': jax.random.key(0),
      'dropout': jax.random.key(0)
  }, batch, **kwargs)['params'])
  return nn.get_partition_spec(shapes)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
