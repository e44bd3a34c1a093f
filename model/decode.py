"""Incremental decoding with a KV cache: greedy, sampling (temperature / top-k / top-p) and beam search.

Works for any LanguageModel with an 'lm' head whose architecture is 'decoder' or 'encoder_decoder'. The prompt is run
once to fill the cache (prefill); then one token per step inside `lax.while_loop` (its carry a named dataclass,
SampleState or BeamState), stopping when every sequence has emitted EOS or `max_new_tokens` is reached. Prompts arrive
right-padded with a mask and are left-aligned here, so every row's last prompt token sits in the same cache slot and
positions restart at 0 for each row's first real token.

Letters: B batch, W beams, P prompt length, L new tokens, S cache length, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from flax import struct
import jax
import jax.numpy as jnp

from model import pytree
from model.heads import LanguageModel
from model.transformer import forward_compiler_options

_NEG_INF = -1.0e9


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How to pick tokens. method: 'greedy' | 'sample' | 'beam'."""
  method: str = 'greedy'
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1.0: off
  num_beams: int = 4
  length_penalty: float = 0.0  # beam score = logp / ((5 + len) / 6) ** length_penalty (GNMT)
  eos_id: Optional[int] = None  # None: the model config's eos_id

  def validate(self):
    if self.method not in ('greedy', 'sample', 'beam'):
      raise ValueError(f"DecodeConfig.method={self.method!r}: use 'greedy', 'sample' or 'beam'.")
    if self.max_new_tokens < 1:
      raise ValueError(f'DecodeConfig.max_new_tokens={self.max_new_tokens}: must be >= 1.')
    if self.method == 'beam' and self.num_beams < 1:
      raise ValueError(f'DecodeConfig.num_beams={self.num_beams}: must be >= 1.')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'DecodeConfig.top_p={self.top_p}: must be in (0, 1].')


# ---------------------------------------------------------------------------------------------- cache primitives


def _decoder_batch(cfg, tokens, positions, segment_ids, encoded=None, encoder_segment_ids=None):
  if cfg.arch == 'encoder_decoder':
    return dict(decoder_tokens=tokens, decoder_positions=positions, decoder_segment_ids=segment_ids, encoded=encoded,
                encoder_segment_ids=encoder_segment_ids)
  return dict(tokens=tokens, positions=positions, segment_ids=segment_ids)


def init_cache(model: LanguageModel, params, batch_size: int, max_len: int, *, encoded=None, encoder_segment_ids=None):
  """An empty cache for `batch_size` rows of up to `max_len` tokens (shapes only are traced; nothing runs)."""
  cfg = model.cfg
  if cfg.arch == 'encoder':
    raise ValueError('decoding needs a decoder: ModelConfig.arch is "encoder"; use arch "decoder" or '
                     '"encoder_decoder".')
  tokens = jnp.zeros((batch_size, max_len), jnp.int32)
  batch = _decoder_batch(cfg, tokens, tokens, jnp.ones_like(tokens), encoded, encoder_segment_ids)
  shapes = jax.eval_shape(lambda: model.apply({'params': params}, batch, decode=True, mutable=['cache'])[1])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


def decode_step(model: LanguageModel, params, cache, tokens, *, positions, segment_ids=None, encoded=None,
                encoder_segment_ids=None):
  """Feeds tokens [B,T] (a prompt or one new token) at the cache's index: -> (lm logits [B,T,V] float32, cache)."""
  segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
  batch = _decoder_batch(model.cfg, tokens, positions, segment_ids, encoded, encoder_segment_ids)
  out, new = model.apply({'params': params, 'cache': cache}, batch, decode=True, mutable=['cache'])
  return out['lm_logits'].astype(jnp.float32), new['cache']


def left_align(tokens, mask):
  """Right-padded [B,P] tokens and mask -> left-padded tokens, mask and positions (0 at each first real token)."""
  p = tokens.shape[1]
  lengths = mask.sum(axis=1).astype(jnp.int32)
  src = (jnp.arange(p)[None, :] - (p - lengths)[:, None]) % p
  tokens = jnp.take_along_axis(tokens, src, axis=1)
  mask = jnp.take_along_axis(mask, src, axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  return tokens, mask.astype(jnp.int32), positions


def gather_beams(cache, index):
  """Reorders every cache row by index [B'] (beam search). Scanned layer caches carry the layer axis first."""

  def take(path, leaf):
    if leaf.ndim == 0:
      return leaf
    scanned = any(pytree.key_name(k) == 'layers' for k in path)
    return jnp.take(leaf, index, axis=1 if scanned else 0)

  return jax.tree_util.tree_map_with_path(take, cache)


# ------------------------------------------------------------------------------------------------- token choice


def filter_logits(logits, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """[..., V] -> [..., V] with everything outside the top-k / the top-p nucleus set to -inf-ish, then / temperature."""
  logits = logits / max(temperature, 1e-6)
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, _NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cum = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(cum < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, _NEG_INF, logits)
  return logits


def _eos_id(model, dcfg: DecodeConfig):
  eos = dcfg.eos_id if dcfg.eos_id is not None else model.cfg.eos_id
  return -1 if eos is None else int(eos)


def _prefill(model, params, prompt, prompt_mask, encoder_tokens, encoder_segment_ids, max_new, rows_per_prompt=1):
  """Encodes (T5), fills the cache with the prompt -> (last logits [B',V], cache, next positions [B'], enc, enc_seg)."""
  cfg = model.cfg
  encoded = None
  if cfg.arch == 'encoder_decoder':
    if encoder_tokens is None:
      raise ValueError('an encoder-decoder model needs encoder_tokens to generate from.')
    if encoder_segment_ids is None:
      encoder_segment_ids = jnp.ones_like(encoder_tokens)
    encoded = model.apply({'params': params},
                          dict(encoder_tokens=encoder_tokens, encoder_segment_ids=encoder_segment_ids),
                          method=LanguageModel.encode)
    b = encoder_tokens.shape[0]
    if prompt is None:
      prompt = jnp.full((b, 1), cfg.decoder_start_id, jnp.int32)
  if prompt is None:
    raise ValueError('a decoder-only model needs a prompt of at least one token (e.g. BOS).')
  if prompt_mask is None:
    prompt_mask = jnp.ones_like(prompt)
  tokens, mask, positions = left_align(prompt, prompt_mask)
  if rows_per_prompt > 1:
    rep = lambda x: None if x is None else jnp.repeat(x, rows_per_prompt, axis=0)
    tokens, mask, positions, encoded, encoder_segment_ids = map(rep,
                                                                (tokens, mask, positions, encoded, encoder_segment_ids))
  rows, p = tokens.shape
  cache = init_cache(model, params, rows, p + max_new, encoded=encoded, encoder_segment_ids=encoder_segment_ids)
  logits, cache = decode_step(model, params, cache, tokens, positions=positions, segment_ids=mask, encoded=encoded,
                              encoder_segment_ids=encoder_segment_ids)
  return logits[:, -1], cache, positions[:, -1] + 1, encoded, encoder_segment_ids


# ------------------------------------------------------------------------------------------ greedy and sampling


@struct.dataclass
class SampleState:
  """The carry of the greedy / sampling loop: one token per row per step."""
  step: jax.Array  # [] int32: tokens emitted so far
  logits: jax.Array  # [B,V] float32: logits of the next token
  cache: dict  # the decoder's 'cache' collection
  position: jax.Array  # [B] int32: position of the next token
  tokens: jax.Array  # [B,L] int32: emitted so far, pad_id after EOS
  finished: jax.Array  # [B] bool: has emitted EOS
  scores: jax.Array  # [B] float32: summed log-probabilities
  rng: jax.Array


def _sample_loop(model, params, prompt, prompt_mask, encoder_tokens, encoder_segment_ids, rng, dcfg: DecodeConfig):
  eos = _eos_id(model, dcfg)
  pad = model.cfg.pad_id
  max_new = dcfg.max_new_tokens
  logits, cache, position, encoded, enc_seg = _prefill(model, params, prompt, prompt_mask, encoder_tokens,
                                                       encoder_segment_ids, max_new)
  b = logits.shape[0]

  def choose(logits, rng):
    if dcfg.method == 'greedy':
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature=dcfg.temperature, top_k=dcfg.top_k, top_p=dcfg.top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

  def cond(state: SampleState):
    return (state.step < max_new) & ~jnp.all(state.finished)

  def body(state: SampleState):
    rng, sub = jax.random.split(state.rng)
    token = choose(state.logits, sub)
    logp = jnp.take_along_axis(jax.nn.log_softmax(state.logits, axis=-1), token[:, None], axis=1)[:, 0]
    token = jnp.where(state.finished, pad, token)
    step_logits, cache = decode_step(model, params, state.cache, token[:, None], positions=state.position[:, None],
                                     encoded=encoded, encoder_segment_ids=enc_seg)
    return SampleState(step=state.step + 1, logits=step_logits[:, 0], cache=cache, position=state.position + 1,
                       tokens=state.tokens.at[:, state.step].set(token), finished=state.finished | (token == eos),
                       scores=state.scores + jnp.where(state.finished, 0.0, logp), rng=rng)

  init = SampleState(step=jnp.int32(0), logits=logits, cache=cache, position=position, tokens=jnp.full(
      (b, max_new), pad, jnp.int32), finished=jnp.zeros((b,), bool), scores=jnp.zeros((b,), jnp.float32), rng=rng)
  final = jax.lax.while_loop(cond, body, init)
  return final.tokens, final.scores


# -------------------------------------------------------------------------------------------------- beam search


@struct.dataclass
class BeamState:
  """The carry of the beam search loop: W alive beams per row and the W best finished ones."""
  step: jax.Array  # [] int32: tokens emitted so far
  logits: jax.Array  # [B*W,V] float32: logits of each alive beam's next token
  cache: dict  # the decoder's 'cache' collection, one row per alive beam
  alive: jax.Array  # [B,W,L] int32: alive beams' tokens
  alive_logp: jax.Array  # [B,W] float32: their summed log-probabilities, best first
  finished: jax.Array  # [B,W,L] int32: kept finished beams' tokens
  finished_scores: jax.Array  # [B,W] float32: their length-penalized scores, best first
  finished_flags: jax.Array  # [B,W] bool: whether the slot holds a finished beam yet


def _merge_finished(state: BeamState, seqs, scores, ends):
  """The best W of the kept finished beams and this step's EOS-ending candidates seqs [B,2W,L] (scores, ends [B,2W]).

  -> (tokens [B,W,L], scores [B,W], flags [B,W]), best first.
  """
  w = state.finished_flags.shape[1]
  all_fin = jnp.concatenate([state.finished, seqs], axis=1)
  all_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
  all_flags = jnp.concatenate([state.finished_flags, ends], axis=1)
  keep_scores, keep = jax.lax.top_k(jnp.where(all_flags, all_scores, _NEG_INF), w)
  return (jnp.take_along_axis(all_fin, keep[:, :, None],
                              axis=1), keep_scores, jnp.take_along_axis(all_flags, keep, axis=1))


def _beam_loop(model, params, prompt, prompt_mask, encoder_tokens, encoder_segment_ids, dcfg: DecodeConfig):
  eos = _eos_id(model, dcfg)
  pad = model.cfg.pad_id
  w, max_new, alpha = dcfg.num_beams, dcfg.max_new_tokens, dcfg.length_penalty
  logits, cache, position, encoded, enc_seg = _prefill(model, params, prompt, prompt_mask, encoder_tokens,
                                                       encoder_segment_ids, max_new, rows_per_prompt=w)
  b = logits.shape[0] // w
  v = logits.shape[-1]
  penalty = lambda length: ((5.0 + length) / 6.0) ** alpha

  def cond(state: BeamState):
    # Stop once no alive beam can beat the worst kept finished beam (log-probs only fall as sequences grow).
    best_alive = state.alive_logp[:, 0] / penalty(max_new)
    worst_fin = jnp.where(state.finished_flags, state.finished_scores, _NEG_INF).min(axis=1)
    done = jnp.all(state.finished_flags, axis=1) & (best_alive < worst_fin)
    return (state.step < max_new) & ~jnp.all(done)

  def body(state: BeamState):
    i = state.step
    logp = jax.nn.log_softmax(state.logits, axis=-1).reshape(b, w, v)
    cand = (state.alive_logp[:, :, None] + logp).reshape(b, w * v)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * w)  # [B,2W]
    beam, token = top_idx // v, (top_idx % v).astype(jnp.int32)
    seqs = jnp.take_along_axis(state.alive, beam[:, :, None], axis=1).at[:, :, i].set(token)  # [B,2W,L]
    is_eos = token == eos
    # Finished: EOS-ending candidates ranked within the top W (as Hugging Face does, so that beam size 1 is greedy)
    # merge into the kept finished beams; the best W stay.
    ends = is_eos & (jnp.arange(2 * w) < w)[None, :]
    new_fin_scores = jnp.where(ends, top_logp / penalty(i + 1.0), _NEG_INF)
    fin, fin_scores, fin_flags = _merge_finished(state, seqs, new_fin_scores, ends)
    # Alive: the best W candidates that did not end.
    alive_cand = jnp.where(is_eos, _NEG_INF, top_logp)
    alive_logp, pick = jax.lax.top_k(alive_cand, w)
    alive = jnp.take_along_axis(seqs, pick[:, :, None], axis=1)
    src_beam = jnp.take_along_axis(beam, pick, axis=1)  # [B,W]
    rows = (jnp.arange(b)[:, None] * w + src_beam).reshape(-1)
    cache = gather_beams(state.cache, rows)
    last = alive[:, :, i].reshape(-1)
    step_logits, cache = decode_step(model, params, cache, last[:, None], positions=jnp.full(
        (b * w, 1), 0, jnp.int32) + position[:, None] + i, encoded=encoded, encoder_segment_ids=enc_seg)
    return BeamState(step=i + 1, logits=step_logits[:, 0], cache=cache, alive=alive, alive_logp=alive_logp,
                     finished=fin, finished_scores=fin_scores, finished_flags=fin_flags)

  # All W rows start identical: only beam 0 may expand at the first step.
  alive_logp = jnp.tile(jnp.array([0.0] + [_NEG_INF] * (w - 1), jnp.float32), (b, 1))
  alive = jnp.full((b, w, max_new), pad, jnp.int32)
  init = BeamState(step=jnp.int32(0), logits=logits, cache=cache, alive=alive, alive_logp=alive_logp, finished=jnp.full(
      (b, w, max_new), pad, jnp.int32), finished_scores=jnp.full((b, w), _NEG_INF, jnp.float32),
                   finished_flags=jnp.zeros((b, w), bool))
  final = jax.lax.while_loop(cond, body, init)
  # Rows with no finished beam return their best alive beam.
  any_fin = final.finished_flags[:, 0]
  best = jnp.where(any_fin[:, None], final.finished[:, 0], final.alive[:, 0])
  score = jnp.where(any_fin, final.finished_scores[:, 0],
                    final.alive_logp[:, 0] / penalty(final.step.astype(jnp.float32)))
  return best, score


def generate(model: LanguageModel, params, prompt=None, *, prompt_mask=None, encoder_tokens=None,
             encoder_segment_ids=None, config: DecodeConfig = DecodeConfig(), rng=None):
  """Generates up to config.max_new_tokens tokens per row: -> (tokens [B,L] padded with pad_id after EOS, scores [B]).

  prompt [B,P] right-padded with prompt_mask [B,P] (1 = real); decoder-only models need it, encoder-decoder models
  start from decoder_start_id by default and read encoder_tokens [B,S] (+ encoder_segment_ids, 0 = padding).
  scores: summed log-probabilities (greedy/sample) or the length-penalized beam score.
  """
  config.validate()
  if 'lm' not in model.heads:
    raise ValueError("generate needs a LanguageModel with the 'lm' head: LanguageModel(cfg, heads=('lm',)).")
  to_i32 = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  prompt, prompt_mask = to_i32(prompt), to_i32(prompt_mask)
  encoder_tokens, encoder_segment_ids = to_i32(encoder_tokens), to_i32(encoder_segment_ids)
  if config.method == 'beam':
    return _jitted(_beam_loop, model.cfg.dtype)(model, params, prompt, prompt_mask, encoder_tokens,
                                                 encoder_segment_ids, config)
  rng = jax.random.key(0) if rng is None else rng
  return _jitted(_sample_loop, model.cfg.dtype)(model, params, prompt, prompt_mask, encoder_tokens,
                                                 encoder_segment_ids, rng, config)


@functools.lru_cache(maxsize=None)
def _jitted(loop, dtype: str):
  """jit(loop) with the decoding compiler options for a model computing in `dtype` (made once per pair, so the
  compiled loops are cached as a decorated function's would be)."""
  return jax.jit(loop, static_argnames=('model', 'dcfg'), compiler_options=forward_compiler_options(dtype) or None)
