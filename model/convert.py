"""Pretrained weights in and out: Hugging Face checkpoints (safetensors / pytorch_model.bin) and GGUF files.

`import_hf(dir)` reads a Hugging Face model directory (config.json + weights) of a BERT, RoBERTa, ELECTRA, GPT-2, T5
(v1.0 / v1.1) or LLaMA-family (Llama, SmolLM2, Mistral) model into a `Converted`: our ModelConfig, the params pytree of
`LanguageModel(cfg, heads)` and the heads the checkpoint has weights for. `export_hf(converted, dir)` writes it back in
the same layout, so `transformers` loads it. `import_gguf(file)` reads a llama.cpp GGUF of a LLaMA-family model,
dequantizing every tensor to float32 and building its tokenizer from the metadata. `save` / `load` keep a converted
checkpoint in our own layout (params.safetensors + lmlab_model.json + the tokenizer files), which fine-tuning and
generation read as a starting point. Every mapping is a table of (our param, HF tensor, layout) rules, so import and
export are one table read both ways and a missing tensor or a wrong shape names itself. Weights are read with numpy;
torch is imported only to read a pytorch_model.bin.

CLI:  python -m model.convert import --from=HF_DIR_OR_GGUF --to=OUT_DIR
      python -m model.convert export --from=OUT_DIR --to=HF_DIR
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from model.transformer import ModelConfig, stack_layers, unstack_layers

FAMILIES = ('bert', 'roberta', 'electra', 'gpt2', 't5', 'llama', 'mistral')
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt', 'vocab.json',
                   'merges.txt', 'spiece.model', 'tokenizer.model', 'added_tokens.json')
CONFIG_FILE = 'lmlab_model.json'
PARAMS_FILE = 'params.safetensors'


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the file, tensor or config field and the fix."""


@dataclasses.dataclass
class Converted:
  """A converted checkpoint: LanguageModel(cfg, heads=heads) applies `params`.

  family: one of FAMILIES; hf_config: the checkpoint's config.json (export starts from it); extras: numpy arrays that
  have no place in our params but that export puts back (RoBERTa's unused position rows); unused: HF tensors that were
  not mapped (e.g. BERT's pooler when there is no NSP head); tokenizer: a `tokenizers.Tokenizer` built from GGUF
  metadata, tokenizer_dir: the directory whose tokenizer files (tokenizer.json / vocab.txt / ...) came with the weights.
  """
  cfg: ModelConfig
  params: dict
  heads: tuple[str, ...]
  family: str
  hf_config: dict = dataclasses.field(default_factory=dict)
  extras: dict = dataclasses.field(default_factory=dict)
  unused: list = dataclasses.field(default_factory=list)
  tokenizer: Any = None
  tokenizer_dir: Optional[str] = None

  def module(self):
    from model.heads import LanguageModel
    return LanguageModel(self.cfg, heads=self.heads)


# ------------------------------------------------------------------------------------------------ tensor layouts
# Each layout is a pair (HF -> ours, ours -> HF) of numpy functions; `dims` is the ModelConfig-derived shape info.
# torch nn.Linear stores [out, in]; we store [in, out] (attention kernels split the head axis: [D,N,H], [N,H,D]).


def _linear():
  return (lambda w, d: w.T, lambda w, d: w.T)


def _same():
  return (lambda w, d: w, lambda w, d: w)


def _heads_in(kind):
  """nn.Linear [N*H, D] -> [D, N, H] (kind 'q' uses num_heads, 'kv' kv heads)."""
  n = lambda d: d['n'] if kind == 'q' else d['k']
  return (lambda w, d: w.T.reshape(w.shape[1], n(d), d['h']),
          lambda w, d: w.reshape(w.shape[0], -1).T)


def _heads_in_conv(kind):
  """GPT-2 Conv1D [D, N*H] -> [D, N, H]."""
  return (lambda w, d: w.reshape(w.shape[0], d['n'], d['h']), lambda w, d: w.reshape(w.shape[0], -1))


def _heads_bias(kind):
  n = lambda d: d['n'] if kind == 'q' else d['k']
  return (lambda w, d: w.reshape(n(d), d['h']), lambda w, d: w.reshape(-1))


def _heads_out():
  """nn.Linear [D, N*H] -> [N, H, D]."""
  return (lambda w, d: w.T.reshape(d['n'], d['h'], w.shape[0]), lambda w, d: w.reshape(-1, w.shape[-1]).T)


def _heads_out_conv():
  """GPT-2 Conv1D [N*H, D] -> [N, H, D]."""
  return (lambda w, d: w.reshape(d['n'], d['h'], w.shape[-1]), lambda w, d: w.reshape(-1, w.shape[-1]))


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str        # 'transformer/stack/layers_0/self_attn/query/kernel'
  hf: str          # 'bert.encoder.layer.0.attention.self.query.weight'
  layout: tuple    # (to_ours, to_hf)


def _dense_rules(ours, hf, *, bias=True, layout=None, bias_layout=None):
  out = [Rule(f'{ours}/kernel', f'{hf}.weight', layout or _linear())]
  if bias:
    out.append(Rule(f'{ours}/bias', f'{hf}.bias', bias_layout or _same()))
  return out


def _norm_rules(ours, hf, *, bias=True, weight='weight'):
  out = [Rule(f'{ours}/scale', f'{hf}.{weight}', _same())]
  if bias:
    out.append(Rule(f'{ours}/bias', f'{hf}.bias', _same()))
  return out


def _attention_rules(ours, names: dict, *, bias: bool, conv=False):
  """names: {'query': hf prefix, 'key': .., 'value': .., 'out': ..}."""
  rules = []
  for ours_name, kind in (('query', 'q'), ('key', 'kv'), ('value', 'kv')):
    rules += _dense_rules(f'{ours}/{ours_name}', names[ours_name], bias=bias,
                          layout=_heads_in_conv(kind) if conv else _heads_in(kind), bias_layout=_heads_bias(kind))
  rules += _dense_rules(f'{ours}/out', names['out'], bias=bias, layout=_heads_out_conv() if conv else _heads_out())
  return rules


# ---------------------------------------------------------------------------------------------- config mappings

_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_fast': 'gelu_tanh',
                'relu': 'relu', 'silu': 'silu', 'swish': 'silu'}
_ACT_TO_HF = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu', 'silu': 'silu'}


def _field(hf: dict, key: str, default=dataclasses.MISSING, where='config.json'):
  if key in hf and hf[key] is not None:
    return hf[key]
  if default is dataclasses.MISSING:
    raise ConversionError(f'{where}: field {key!r} is missing; it is required for model_type '
                          f'{hf.get("model_type")!r}.')
  return default


def _activation(hf, key, where='config.json'):
  act = _field(hf, key, where=where)
  if act not in _ACTIVATIONS:
    raise ConversionError(f'{where}: {key}={act!r} is not supported; supported: {sorted(_ACTIVATIONS)}.')
  return _ACTIVATIONS[act]


def _family(hf: dict, where='config.json') -> str:
  mt = hf.get('model_type')
  if mt is None:
    raise ConversionError(f'{where}: no model_type field; cannot tell which family this checkpoint is.')
  if mt not in FAMILIES:
    raise ConversionError(f'{where}: model_type={mt!r} is not supported; supported families: {", ".join(FAMILIES)}.')
  return mt


def _require(hf, key, ok: Callable[[Any], bool], why: str, where='config.json'):
  if key in hf and hf[key] is not None and not ok(hf[key]):
    raise ConversionError(f'{where}: {key}={hf[key]!r} is not supported: {why}')


def _common(hf, **kw):
  return dict(dropout_rate=0.0, attention_dropout_rate=0.0, **kw)


def _bert_like_config(hf, family, where):
  _require(hf, 'position_embedding_type', lambda v: v == 'absolute', "only 'absolute' positions are.", where)
  pad = int(_field(hf, 'pad_token_id', 0 if family != 'roberta' else 1))
  max_len = int(_field(hf, 'max_position_embeddings', where=where))
  if family == 'roberta':
    # RoBERTa numbers positions from pad_token_id + 1 (fairseq); the rows below are never read for a real token, so we
    # drop them and our positions (0, 1, ...) index the same rows (kept in `extras` for export).
    max_len -= pad + 1
  d = int(_field(hf, 'hidden_size', where=where))
  e = int(_field(hf, 'embedding_size', d)) if family == 'electra' else d
  return dict(
      arch='encoder', vocab_size=int(_field(hf, 'vocab_size', where=where)), d_model=d,
      num_heads=int(_field(hf, 'num_attention_heads', where=where)),
      num_layers=int(_field(hf, 'num_hidden_layers', where=where)),
      d_ff=int(_field(hf, 'intermediate_size', where=where)), embed_dim=None if e == d else e, max_len=max_len,
      position='learned',
      type_vocab_size=int(_field(hf, 'type_vocab_size', 2)), activation=_activation(hf, 'hidden_act', where),
      norm='layernorm', norm_eps=float(_field(hf, 'layer_norm_eps', 1e-12)), pre_norm=False, embed_norm=True,
      use_bias=True, dropout_rate=float(_field(hf, 'hidden_dropout_prob', 0.1)),
      attention_dropout_rate=float(_field(hf, 'attention_probs_dropout_prob', 0.1)), tie_embeddings=True, pad_id=pad,
      bos_id=hf.get('bos_token_id'), eos_id=hf.get('eos_token_id'),
      init_std=float(_field(hf, 'initializer_range', 0.02)))


def _gpt2_config(hf, where):
  _require(hf, 'scale_attn_by_inverse_layer_idx', lambda v: not v, 'per-layer attention scaling is not in our model.',
           where)
  d, n = int(_field(hf, 'n_embd', where=where)), int(_field(hf, 'n_head', where=where))
  scale = None if _field(hf, 'scale_attn_weights', True) else 1.0
  eos = _field(hf, 'eos_token_id', 50256)
  return dict(
      arch='decoder', vocab_size=int(_field(hf, 'vocab_size', where=where)), d_model=d, num_heads=n,
      num_layers=int(_field(hf, 'n_layer', where=where)), d_ff=int(_field(hf, 'n_inner', 4 * d)),
      max_len=int(_field(hf, 'n_positions', where=where)), position='learned',
      activation=_activation(hf, 'activation_function', where), norm='layernorm',
      norm_eps=float(_field(hf, 'layer_norm_epsilon', 1e-5)), pre_norm=True, use_bias=True, attention_scale=scale,
      dropout_rate=float(_field(hf, 'resid_pdrop', 0.1)), attention_dropout_rate=float(_field(hf, 'attn_pdrop', 0.1)),
      tie_embeddings=bool(_field(hf, 'tie_word_embeddings', True)), bos_id=_field(hf, 'bos_token_id', 50256),
      eos_id=eos, pad_id=int(_field(hf, 'pad_token_id', eos)), init_std=float(_field(hf, 'initializer_range', 0.02)))


def _t5_config(hf, where, tied: bool):
  ff = str(_field(hf, 'feed_forward_proj', 'relu'))
  gated = ff.startswith('gated-')
  act = ff.split('-')[-1]
  act = 'gelu_new' if ff == 'gated-gelu' else act
  if act not in _ACTIVATIONS:
    raise ConversionError(f'{where}: feed_forward_proj={ff!r} is not supported; supported: relu, gated-gelu, '
                          'gated-silu, ...')
  scale = bool(hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True) is not False))
  if scale and not tied:
    raise ConversionError(f'{where}: a T5 whose decoder output is scaled by d_model**-0.5 (scale_decoder_outputs / '
                          'tie_word_embeddings) but whose lm_head.weight differs from shared.weight is not supported.')
  d = int(_field(hf, 'd_model', where=where))
  return dict(
      arch='encoder_decoder', vocab_size=int(_field(hf, 'vocab_size', where=where)), d_model=d,
      num_heads=int(_field(hf, 'num_heads', where=where)), head_dim=int(_field(hf, 'd_kv', where=where)),
      num_layers=int(_field(hf, 'num_layers', where=where)),
      num_decoder_layers=int(_field(hf, 'num_decoder_layers', _field(hf, 'num_layers'))),
      d_ff=int(_field(hf, 'd_ff', where=where)), max_len=int(_field(hf, 'n_positions', 512)), position='relative',
      relative_buckets=int(_field(hf, 'relative_attention_num_buckets', 32)),
      relative_max_distance=int(_field(hf, 'relative_attention_max_distance', 128)),
      activation=_ACTIVATIONS[act], gated_mlp=gated, norm='rmsnorm',
      norm_eps=float(_field(hf, 'layer_norm_epsilon', 1e-6)),
      pre_norm=True, final_norm=True, use_bias=False, attention_scale=1.0,
      dropout_rate=float(_field(hf, 'dropout_rate', 0.1)),
      attention_dropout_rate=float(_field(hf, 'dropout_rate', 0.1)),
      mlp_dropout_rate=float(_field(hf, 'dropout_rate', 0.1)), tie_embeddings=tied, scale_tied_logits=scale and tied,
      pad_id=int(_field(hf, 'pad_token_id', 0)), eos_id=_field(hf, 'eos_token_id', 1),
      decoder_start_id=int(_field(hf, 'decoder_start_token_id', 0)),
      init_std=float(_field(hf, 'initializer_factor', 1.0)) / d ** 0.5)


def _rope_theta(hf, where):
  rp = hf.get('rope_parameters') or {}
  rs = hf.get('rope_scaling') or {}
  rope_type = rp.get('rope_type', rs.get('rope_type', rs.get('type', 'default')))
  if rope_type != 'default':
    raise ConversionError(f'{where}: rope_type={rope_type!r} (rope_scaling / rope_parameters) is not supported; only '
                          "'default' rotary embeddings are in our model.")
  return float(rp.get('rope_theta', hf.get('rope_theta', 10_000.0)))


def _llama_config(hf, where, tied: Optional[bool] = None):
  _require(hf, 'attention_bias', lambda v: not v, 'biases on the q/k/v/o projections are not in our LLaMA model.',
           where)
  _require(hf, 'mlp_bias', lambda v: not v, 'MLP biases are not in our LLaMA model.', where)
  _require(hf, 'pretraining_tp', lambda v: v == 1, 'only pretraining_tp=1 is supported.', where)
  d, n = int(_field(hf, 'hidden_size', where=where)), int(_field(hf, 'num_attention_heads', where=where))
  hd = int(_field(hf, 'head_dim', d // n))
  max_len = int(_field(hf, 'max_position_embeddings', 2048))
  window = hf.get('sliding_window')
  if window and hf.get('use_sliding_window', True) is not False:
    # Mistral's sliding window: our attention has none, so the model is exact only up to the window.
    max_len = min(max_len, int(window))
  eos = hf.get('eos_token_id')
  eos = eos[0] if isinstance(eos, list) else eos
  pad = hf.get('pad_token_id')
  return dict(
      arch='decoder', vocab_size=int(_field(hf, 'vocab_size', where=where)), d_model=d, num_heads=n,
      num_kv_heads=int(_field(hf, 'num_key_value_heads', n)), head_dim=None if hd * n == d else hd,
      num_layers=int(_field(hf, 'num_hidden_layers', where=where)),
      d_ff=int(_field(hf, 'intermediate_size', where=where)), max_len=max_len, position='rope',
      rope_theta=_rope_theta(hf, where), activation=_activation(hf, 'hidden_act', where),
      gated_mlp=True, norm='rmsnorm', norm_eps=float(_field(hf, 'rms_norm_eps', 1e-6)), pre_norm=True, use_bias=False,
      attention_dropout_rate=float(_field(hf, 'attention_dropout', 0.0)), dropout_rate=0.0,
      tie_embeddings=bool(_field(hf, 'tie_word_embeddings', False)) if tied is None else tied,
      bos_id=hf.get('bos_token_id'), eos_id=eos, pad_id=int(pad if pad is not None else (eos or 0)),
      init_std=float(_field(hf, 'initializer_range', 0.02)))


# ------------------------------------------------------------------------------------------------ rule tables


def _bert_like_rules(family, cfg: ModelConfig, heads, prefix: str) -> list[Rule]:
  p = prefix
  r = [Rule('embed/token/embedding', f'{p}embeddings.word_embeddings.weight', _same()),
       Rule('embed/position/embedding', f'{p}embeddings.position_embeddings.weight', _same())]
  if family == 'roberta':
    off = cfg.pad_id + 1
    r[1] = Rule('embed/position/embedding', r[1].hf, (lambda w, d, off=off: w[off:],
                                                      lambda w, d, off=off: w))  # export re-adds the rows
  if cfg.type_vocab_size:
    r.append(Rule('embed/token_type/embedding', f'{p}embeddings.token_type_embeddings.weight', _same()))
  r += _norm_rules('embed/norm', f'{p}embeddings.LayerNorm')
  if cfg.embed_width != cfg.d_model:
    r += _dense_rules('transformer/embed_proj', f'{p}embeddings_project')
  for i in range(cfg.num_layers):
    ours, hf = f'transformer/stack/layers_{i}', f'{p}encoder.layer.{i}'
    r += _attention_rules(f'{ours}/self_attn', {'query': f'{hf}.attention.self.query',
                                                'key': f'{hf}.attention.self.key',
                                                'value': f'{hf}.attention.self.value',
                                                'out': f'{hf}.attention.output.dense'}, bias=True)
    r += _norm_rules(f'{ours}/self_attn_norm', f'{hf}.attention.output.LayerNorm')
    r += _dense_rules(f'{ours}/mlp/wi', f'{hf}.intermediate.dense')
    r += _dense_rules(f'{ours}/mlp/wo', f'{hf}.output.dense')
    r += _norm_rules(f'{ours}/mlp_norm', f'{hf}.output.LayerNorm')
  if 'nsp' in heads:
    r += _dense_rules('pooler/dense', f'{p}pooler.dense')
    r += _dense_rules('nsp', 'cls.seq_relationship')
  if 'mlm' in heads:
    mlm = {'bert': ('cls.predictions.transform.dense', 'cls.predictions.transform.LayerNorm', 'cls.predictions.bias'),
           'roberta': ('lm_head.dense', 'lm_head.layer_norm', 'lm_head.bias'),
           'electra': ('generator_predictions.dense', 'generator_predictions.LayerNorm', 'generator_lm_head.bias')}
    dense_, norm_, bias_ = mlm[family]
    r += _dense_rules('mlm/transform', dense_) + _norm_rules('mlm/norm', norm_)
    r.append(Rule('mlm/bias', bias_, _same()))
  if 'rtd' in heads:
    r += _dense_rules('rtd/dense', 'discriminator_predictions.dense')
    r += _dense_rules('rtd/out', 'discriminator_predictions.dense_prediction')
  return r


def _gpt2_rules(cfg, heads, prefix):
  p = prefix
  r = [Rule('embed/token/embedding', f'{p}wte.weight', _same()),
       Rule('embed/position/embedding', f'{p}wpe.weight', _same())]
  for i in range(cfg.num_layers):
    ours, hf = f'transformer/stack/layers_{i}', f'{p}h.{i}'
    r += _norm_rules(f'{ours}/self_attn_norm', f'{hf}.ln_1')
    # c_attn is split into virtual q/k/v tensors by _gpt2_split (and fused back on export).
    r += _attention_rules(f'{ours}/self_attn', {'query': f'{hf}.attn.q', 'key': f'{hf}.attn.k', 'value': f'{hf}.attn.v',
                                                'out': f'{hf}.attn.c_proj'}, bias=True, conv=True)
    r += _norm_rules(f'{ours}/mlp_norm', f'{hf}.ln_2')
    r += _dense_rules(f'{ours}/mlp/wi', f'{hf}.mlp.c_fc', layout=_same())
    r += _dense_rules(f'{ours}/mlp/wo', f'{hf}.mlp.c_proj', layout=_same())
  r += _norm_rules('transformer/stack/final_norm', f'{p}ln_f')
  if 'lm' in heads and not cfg.tie_embeddings:
    r += _dense_rules('lm/out', 'lm_head', bias=False)
  return r


def _t5_rules(cfg, heads):
  r = [Rule('embed/token/embedding', 'shared.weight', _same())]

  def ff(ours, hf):
    if cfg.gated_mlp:
      out = (_dense_rules(f'{ours}/mlp/wi_0', f'{hf}.DenseReluDense.wi_0', bias=False)
             + _dense_rules(f'{ours}/mlp/wi_1', f'{hf}.DenseReluDense.wi_1', bias=False))
    else:
      out = _dense_rules(f'{ours}/mlp/wi', f'{hf}.DenseReluDense.wi', bias=False)
    return (out + _dense_rules(f'{ours}/mlp/wo', f'{hf}.DenseReluDense.wo', bias=False)
            + _norm_rules(f'{ours}/mlp_norm', f'{hf}.layer_norm', bias=False))

  def att(ours, hf):
    return _attention_rules(ours, {'query': f'{hf}.q', 'key': f'{hf}.k', 'value': f'{hf}.v', 'out': f'{hf}.o'},
                            bias=False)

  for side, n in (('encoder', cfg.num_layers), ('decoder', cfg.decoder_layers)):
    base = f'transformer/{side}/stack'
    r.append(Rule(f'{base}/relative_bias/rel_embedding',
                  f'{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight', _same()))
    for i in range(n):
      ours, hf = f'{base}/layers_{i}', f'{side}.block.{i}.layer'
      r += att(f'{ours}/self_attn', f'{hf}.0.SelfAttention')
      r += _norm_rules(f'{ours}/self_attn_norm', f'{hf}.0.layer_norm', bias=False)
      if side == 'decoder':
        r += att(f'{ours}/cross_attn', f'{hf}.1.EncDecAttention')
        r += _norm_rules(f'{ours}/cross_attn_norm', f'{hf}.1.layer_norm', bias=False)
        r += ff(ours, f'{hf}.2')
      else:
        r += ff(ours, f'{hf}.1')
    r += _norm_rules(f'{base}/final_norm', f'{side}.final_layer_norm', bias=False)
  if 'lm' in heads and not cfg.tie_embeddings:
    r += _dense_rules('lm/out', 'lm_head', bias=False)
  return r


def _llama_rules(cfg, heads):
  r = [Rule('embed/token/embedding', 'model.embed_tokens.weight', _same())]
  for i in range(cfg.num_layers):
    ours, hf = f'transformer/stack/layers_{i}', f'model.layers.{i}'
    r += _attention_rules(f'{ours}/self_attn', {'query': f'{hf}.self_attn.q_proj', 'key': f'{hf}.self_attn.k_proj',
                                                'value': f'{hf}.self_attn.v_proj', 'out': f'{hf}.self_attn.o_proj'},
                          bias=False)
    r += _norm_rules(f'{ours}/self_attn_norm', f'{hf}.input_layernorm', bias=False)
    r += _dense_rules(f'{ours}/mlp/wi_0', f'{hf}.mlp.gate_proj', bias=False)
    r += _dense_rules(f'{ours}/mlp/wi_1', f'{hf}.mlp.up_proj', bias=False)
    r += _dense_rules(f'{ours}/mlp/wo', f'{hf}.mlp.down_proj', bias=False)
    r += _norm_rules(f'{ours}/mlp_norm', f'{hf}.post_attention_layernorm', bias=False)
  r += _norm_rules('transformer/stack/final_norm', 'model.norm', bias=False)
  if 'lm' in heads and not cfg.tie_embeddings:
    r += _dense_rules('lm/out', 'lm_head', bias=False)
  return r


def _rules(family, cfg, heads, prefix=''):
  if family in ('bert', 'roberta', 'electra'):
    return _bert_like_rules(family, cfg, heads, prefix)
  if family == 'gpt2':
    return _gpt2_rules(cfg, heads, prefix)
  if family == 't5':
    return _t5_rules(cfg, heads)
  return _llama_rules(cfg, heads)


# --------------------------------------------------------------------------------------------- reading weights


def read_safetensors(path) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays; a damaged file raises ConversionError naming it."""
  from safetensors.numpy import load_file
  try:
    return dict(load_file(str(path)))
  except Exception as e:  # safetensors raises its own SafetensorError (truncated header or data), OSError, ...
    size = os.path.getsize(path) if os.path.exists(path) else 0
    raise ConversionError(f'{path}: cannot read this safetensors file ({type(e).__name__}: {e}); it is truncated or '
                          f'not a safetensors file ({size} bytes). Re-download or re-export it.') from None


def read_hf_weights(hf_dir) -> dict[str, np.ndarray]:
  """The state dict of a HF model directory: model.safetensors, sharded safetensors, or pytorch_model.bin (torch)."""
  d = Path(hf_dir)
  if (d / 'model.safetensors').exists():
    return read_safetensors(d / 'model.safetensors')
  index = d / 'model.safetensors.index.json'
  if index.exists():
    files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    out = {}
    for f in files:
      out.update(read_safetensors(d / f))
    return out
  if (d / 'pytorch_model.bin').exists():
    try:
      import torch
    except ImportError:
      raise ConversionError(f'{d / "pytorch_model.bin"}: reading a pytorch_model.bin needs torch, which is not '
                            'installed; install torch or convert the file to model.safetensors.') from None
    try:
      sd = torch.load(str(d / 'pytorch_model.bin'), map_location='cpu', weights_only=True)
    except Exception as e:
      raise ConversionError(f'{d / "pytorch_model.bin"}: cannot read it ({type(e).__name__}: {e}).') from None
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy() for k, v in sd.items()}
  raise ConversionError(f'{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin in this '
                        'directory.')


def _to_float(a: np.ndarray, name: str) -> np.ndarray:
  if a.dtype.kind != 'f' and a.dtype.name != 'bfloat16':
    raise ConversionError(f'tensor {name!r} has dtype {a.dtype}; expected floating-point weights.')
  return np.asarray(a, dtype=np.float32)


# ------------------------------------------------------------------------------------------------ the engine


def _expected_shapes(cfg: ModelConfig, heads) -> dict[str, tuple]:
  """Flat {our path: shape} of LanguageModel(cfg, heads) with unrolled layers, computed without allocating."""
  import jax
  import jax.numpy as jnp
  from model.heads import LanguageModel, init_params
  cfg = cfg.replace(scan_layers=False)
  if cfg.arch == 'encoder_decoder':
    batch = {'encoder_tokens': jnp.zeros((1, 2), jnp.int32), 'decoder_tokens': jnp.zeros((1, 2), jnp.int32)}
  else:
    batch = {'tokens': jnp.zeros((1, 2), jnp.int32)}
  shapes = jax.eval_shape(lambda: init_params(LanguageModel(cfg, heads=tuple(heads)), jax.random.key(0), batch))
  return {'/'.join(k.key for k in path): tuple(x.shape)
          for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def _nest(flat: dict) -> dict:
  out = {}
  for path, v in flat.items():
    node = out
    keys = path.split('/')
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = v
  return out


def _flatten(tree, prefix='') -> dict:
  out = {}
  for k, v in tree.items():
    p = f'{prefix}/{k}' if prefix else k
    if isinstance(v, dict):
      out.update(_flatten(v, p))
    else:
      out[p] = v
  return out


def _apply_rules(rules, state, cfg, heads, where) -> tuple[dict, list]:
  expected = _expected_shapes(cfg, heads)
  dims = {'n': cfg.num_heads, 'k': cfg.kv_heads, 'h': cfg.head_width}
  flat, used = {}, set()
  for rule in rules:
    if rule.ours not in expected:
      raise AssertionError(f'conversion rule for {rule.ours} names no parameter of the model')  # a bug here, not input
    if rule.hf not in state:
      raise ConversionError(f'{where}: tensor {rule.hf!r} is missing (needed for {rule.ours} {expected[rule.ours]}); '
                            'the weights do not match config.json.')
    w = _to_float(state[rule.hf], rule.hf)
    try:
      ours = rule.layout[0](w, dims)
    except ValueError:
      ours = None
    if ours is None or tuple(ours.shape) != expected[rule.ours]:
      raise ConversionError(f'{where}: tensor {rule.hf!r} has shape {tuple(w.shape)}, which does not fit {rule.ours} '
                            f'{expected[rule.ours]} implied by config.json; the weights and the config disagree.')
    flat[rule.ours] = np.ascontiguousarray(ours)
    used.add(rule.hf)
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise AssertionError(f'no conversion rule for {missing}')
  return flat, sorted(set(state) - used)


def _strip_prefix(state, family):
  """The base-model prefix ('bert.', 'transformer.', ...) that head-carrying checkpoints put on backbone tensors."""
  probe = {'bert': 'embeddings.word_embeddings.weight', 'roberta': 'embeddings.word_embeddings.weight',
           'electra': 'embeddings.word_embeddings.weight', 'gpt2': 'wte.weight'}[family]
  for p in (f'{family}.', 'transformer.', ''):
    if p + probe in state:
      return p
  raise ConversionError(f'no {probe!r} tensor (with or without a {family!r}. prefix); is this a {family} checkpoint?')


def _gpt2_split(state, prefix, n_layers):
  state = dict(state)
  for i in range(n_layers):
    for suffix in ('weight', 'bias'):
      name = f'{prefix}h.{i}.attn.c_attn.{suffix}'
      if name in state:
        w = state.pop(name)
        if w.shape[-1] % 3:
          raise ConversionError(f'tensor {name!r} has shape {w.shape}; its last axis should hold q, k and v.')
        for part, x in zip('qkv', np.split(w, 3, axis=-1)):
          state[f'{prefix}h.{i}.attn.{part}.{suffix}'] = x
  return state


def _tied(state, a, b):
  """Whether tensor b is absent or equal to tensor a (a tied copy)."""
  return b not in state or (state[a].shape == state[b].shape and np.array_equal(state[a], state[b]))


def _heads_present(family, state, prefix) -> tuple[str, ...]:
  has = lambda name: name in state
  if family == 'bert':
    return tuple(h for h, k in (('mlm', 'cls.predictions.bias'), ('nsp', 'cls.seq_relationship.weight')) if has(k))
  if family == 'roberta':
    return ('mlm',) if has('lm_head.bias') else ()
  if family == 'electra':
    return tuple(h for h, k in (('mlm', 'generator_lm_head.bias'), ('rtd', 'discriminator_predictions.dense.weight'))
                 if has(k))
  return ('lm',)  # decoders and T5: the LM head is the tied table or lm_head.weight


def import_hf(hf_dir, *, scan_layers: bool = True, param_dtype: str = 'float32',
              state: Optional[dict] = None) -> Converted:
  """A Hugging Face model directory (config.json + weights) -> Converted. Raises ConversionError on bad input."""
  d = Path(hf_dir)
  cfg_path = d / 'config.json'
  if not cfg_path.exists():
    raise ConversionError(f'{d}: no config.json; a Hugging Face model directory holds config.json and the weights.')
  try:
    hf = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f'{cfg_path}: not valid JSON ({e}).') from None
  where = str(cfg_path)
  family = _family(hf, where)
  state = read_hf_weights(d) if state is None else state
  return _import_state(family, hf, state, where=where, scan_layers=scan_layers, param_dtype=param_dtype,
                       tokenizer_dir=str(d))


def _import_state(family, hf, state, *, where, scan_layers, param_dtype, tokenizer_dir=None, tokenizer=None):
  prefix, extras = '', {}
  if family in ('bert', 'roberta', 'electra', 'gpt2'):
    prefix = _strip_prefix(state, family)
  heads = _heads_present(family, state, prefix)
  if family in ('bert', 'roberta', 'electra'):
    fields = _bert_like_config(hf, family, where)
    emb = f'{prefix}embeddings.word_embeddings.weight'
    for dec in ('cls.predictions.decoder.weight', 'lm_head.decoder.weight', 'generator_lm_head.weight'):
      if 'mlm' in heads and not _tied(state, emb, dec):
        raise ConversionError(f'{where}: tensor {dec!r} differs from {emb!r}; an untied MLM output layer is not '
                              'supported (our MLM head reuses the embedding table).')
    if family in ('roberta', 'electra') and 'mlm' in heads and fields['activation'] != 'gelu':
      raise ConversionError(f'{where}: hidden_act={hf.get("hidden_act")!r}, but this family\'s MLM head always uses '
                            "gelu while ours uses the config's activation; only 'gelu' converts exactly.")
    if family == 'roberta':
      rows = state[f'{prefix}embeddings.position_embeddings.weight'][:fields['pad_id'] + 1]
      extras['position_prefix'] = _to_float(rows, 'position_embeddings')
  elif family == 'gpt2':
    tied = _tied(state, f'{prefix}wte.weight', 'lm_head.weight')
    fields = _gpt2_config(hf, where)
    fields['tie_embeddings'] = tied
    state = _gpt2_split(state, prefix, int(_field(hf, 'n_layer', where=where)))
  elif family == 't5':
    fields = _t5_config(hf, where, tied=_tied(state, 'shared.weight', 'lm_head.weight'))
  else:
    tied = 'lm_head.weight' not in state or _tied(state, 'model.embed_tokens.weight', 'lm_head.weight')
    fields = _llama_config(hf, where, tied=tied)
  try:
    cfg = ModelConfig(**fields, scan_layers=False, param_dtype=param_dtype)
  except ValueError as e:
    raise ConversionError(f'{where}: the config converts to an invalid ModelConfig: {e}') from None
  flat, unused = _apply_rules(_rules(family, cfg, heads, prefix), state, cfg, heads, where)
  # Tensors that are tied copies or buffers rather than weights are not "unused".
  ignore = re.compile(r'(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$|position_ids$|lm_head\.weight$|'
                      r'decoder\.weight$|decoder\.bias$|embed_tokens\.weight$)')
  unused = [u for u in unused if not ignore.search(u)]
  if param_dtype != 'float32':
    import ml_dtypes  # jax depends on it
    flat = {k: v.astype(getattr(ml_dtypes, param_dtype, param_dtype)) for k, v in flat.items()}
  params = _nest(flat)
  cfg = cfg.replace(scan_layers=scan_layers)
  if scan_layers:
    params = stack_layers(params)
  return Converted(cfg=cfg, params=params, heads=heads, family=family, hf_config=hf, extras=extras, unused=unused,
                   tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)


# --------------------------------------------------------------------------------------------------- export

_ARCHITECTURES = {
    'bert': {('mlm', 'nsp'): 'BertForPreTraining', ('mlm',): 'BertForMaskedLM', ('nsp',): 'BertForPreTraining',
             (): 'BertModel'},
    'roberta': {('mlm',): 'RobertaForMaskedLM', (): 'RobertaModel'},
    'electra': {('rtd',): 'ElectraForPreTraining', ('mlm',): 'ElectraForMaskedLM', (): 'ElectraModel'},
    'gpt2': {('lm',): 'GPT2LMHeadModel', (): 'GPT2Model'},
    't5': {('lm',): 'T5ForConditionalGeneration', (): 'T5Model'},
    'llama': {('lm',): 'LlamaForCausalLM', (): 'LlamaModel'},
    'mistral': {('lm',): 'MistralForCausalLM', (): 'MistralModel'},
}


def hf_config(conv: Converted) -> dict:
  """config.json for `conv`: the imported config (if any) with every architecture field rewritten from conv.cfg."""
  cfg, fam = conv.cfg, conv.family
  hf = {k: v for k, v in conv.hf_config.items() if k not in ('_name_or_path', 'transformers_version')}
  hf['model_type'] = fam
  key = tuple(sorted(conv.heads))
  arch = _ARCHITECTURES[fam].get(key)
  if arch is None:
    raise ConversionError(f'no {fam} Hugging Face class has exactly the heads {key}; export with heads from '
                          f'{list(_ARCHITECTURES[fam])}.')
  hf['architectures'] = [arch]
  act = _ACT_TO_HF[cfg.activation]
  if fam in ('bert', 'roberta', 'electra'):
    off = cfg.pad_id + 1 if fam == 'roberta' else 0
    hf.update(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads,
              num_hidden_layers=cfg.num_layers, intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_len + off,
              type_vocab_size=cfg.type_vocab_size, hidden_act=act, layer_norm_eps=cfg.norm_eps, pad_token_id=cfg.pad_id,
              hidden_dropout_prob=cfg.dropout_rate, attention_probs_dropout_prob=cfg.attention_dropout_rate)
    if fam == 'electra':
      hf['embedding_size'] = cfg.embed_width
  elif fam == 'gpt2':
    hf.update(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_head=cfg.num_heads, n_layer=cfg.num_layers,
              n_inner=cfg.d_ff, n_positions=cfg.max_len, activation_function=act, layer_norm_epsilon=cfg.norm_eps,
              scale_attn_weights=cfg.attention_scale is None, tie_word_embeddings=cfg.tie_embeddings,
              bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id)
  elif fam == 't5':
    gated = 'gated-' if cfg.gated_mlp else ''
    ff = 'gated-gelu' if cfg.gated_mlp and cfg.activation == 'gelu_tanh' else gated + act
    hf.update(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_width, num_heads=cfg.num_heads,
              num_layers=cfg.num_layers, num_decoder_layers=cfg.decoder_layers, d_ff=cfg.d_ff, feed_forward_proj=ff,
              relative_attention_num_buckets=cfg.relative_buckets,
              relative_attention_max_distance=cfg.relative_max_distance, layer_norm_epsilon=cfg.norm_eps,
              pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id, decoder_start_token_id=cfg.decoder_start_id,
              is_encoder_decoder=True, tie_word_embeddings=cfg.tie_embeddings and cfg.scale_tied_logits)
    hf.pop('scale_decoder_outputs', None)
    hf.pop('dense_act_fn', None)
    hf.pop('is_gated_act', None)
  else:
    hf.update(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_width, num_hidden_layers=cfg.num_layers,
              intermediate_size=cfg.d_ff, hidden_act=act, rms_norm_eps=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_embeddings, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
              pad_token_id=cfg.pad_id, attention_bias=False, mlp_bias=False)
    hf.setdefault('max_position_embeddings', cfg.max_len)
    hf.pop('rope_theta', None)
    hf.pop('rope_scaling', None)
    hf['rope_parameters'] = {'rope_theta': cfg.rope_theta, 'rope_type': 'default'}
  return hf


def _validate_export(conv: Converted):
  cfg, fam = conv.cfg, conv.family
  if fam not in FAMILIES:
    raise ConversionError(f'family {fam!r} is not one of {FAMILIES}.')
  bad = []
  if fam in ('bert', 'roberta', 'electra') and (cfg.pre_norm or cfg.norm != 'layernorm' or cfg.position != 'learned'):
    bad.append('a post-LN layernorm encoder with learned positions')
  if fam == 'gpt2' and not (cfg.pre_norm and cfg.position == 'learned' and cfg.use_bias):
    bad.append('pre-LN, learned positions and biases')
  if fam in ('llama', 'mistral') and not (cfg.position == 'rope' and cfg.gated_mlp and not cfg.use_bias):
    bad.append('rope, a gated MLP and no biases')
  if fam == 't5' and cfg.position != 'relative':
    bad.append('relative positions')
  if bad:
    raise ConversionError(f'this ModelConfig cannot be written as a {fam} checkpoint: the family needs {bad[0]}.')


def to_hf_state(conv: Converted) -> dict[str, np.ndarray]:
  """Our params -> the HF state dict (tied copies omitted, as save_pretrained does)."""
  _validate_export(conv)
  cfg = conv.cfg.replace(scan_layers=False)
  import jax
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), conv.params)
  params = unstack_layers(params) if conv.cfg.scan_layers else params
  flat = _flatten(params)
  prefix = {'bert': 'bert.', 'roberta': 'roberta.', 'electra': 'electra.', 'gpt2': 'transformer.'}.get(conv.family, '')
  if not conv.heads and conv.family in ('bert', 'roberta', 'electra', 'gpt2'):
    prefix = ''  # a bare base model saves its tensors unprefixed
  dims = {'n': cfg.num_heads, 'k': cfg.kv_heads, 'h': cfg.head_width}
  state = {}
  for rule in _rules(conv.family, cfg, conv.heads, prefix):
    if rule.ours not in flat:
      raise ConversionError(f'params have no {rule.ours!r}, which the {conv.family} checkpoint needs for {rule.hf!r}.')
    state[rule.hf] = np.ascontiguousarray(rule.layout[1](flat[rule.ours], dims), dtype=np.float32)
  if conv.family == 'roberta':
    pos = f'{prefix}embeddings.position_embeddings.weight'
    rows = conv.extras.get('position_prefix')
    if rows is None:
      rows = np.zeros((cfg.pad_id + 1, cfg.embed_width), np.float32)
    state[pos] = np.concatenate([np.asarray(rows, np.float32), state[pos]])
  if conv.family == 'gpt2':
    for i in range(cfg.num_layers):
      for suffix in ('weight', 'bias'):
        parts = [state.pop(f'{prefix}h.{i}.attn.{p}.{suffix}') for p in 'qkv']
        state[f'{prefix}h.{i}.attn.c_attn.{suffix}'] = np.concatenate(parts, axis=-1)
  if conv.family == 't5' and cfg.tie_embeddings and not cfg.scale_tied_logits:
    # transformers reads tie_word_embeddings=False as 'do not scale' (v1.1) and then expects lm_head.weight; a tied
    # unscaled head is therefore written as an explicit copy. (An untied head is written by its rule.)
    state['lm_head.weight'] = state['shared.weight'].copy()
  return state


def export_hf(conv: Converted, out_dir) -> Path:
  """Writes config.json + model.safetensors (+ the tokenizer files that came with the checkpoint) to out_dir."""
  from safetensors.numpy import save_file
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  state = to_hf_state(conv)
  save_file(state, str(out / 'model.safetensors'), metadata={'format': 'pt'})
  (out / 'config.json').write_text(json.dumps(hf_config(conv), indent=2, sort_keys=True))
  _copy_tokenizer(conv, out)
  return out


def _copy_tokenizer(conv: Converted, out: Path):
  if conv.tokenizer is not None:
    conv.tokenizer.save(str(out / 'tokenizer.json'))
  if conv.tokenizer_dir and Path(conv.tokenizer_dir).resolve() != out.resolve():
    for name in TOKENIZER_FILES:
      src = Path(conv.tokenizer_dir) / name
      if src.exists() and not (out / name).exists():
        shutil.copyfile(src, out / name)


# ------------------------------------------------------------------------------------------------------ ELECTRA


def electra_params(generator: Converted, discriminator: Converted):
  """Two imported ELECTRA checkpoints (generator with 'mlm', discriminator with 'rtd') -> (generator_cfg,
  discriminator_cfg, params of model.heads.Electra). The embedding table is the discriminator's (ELECTRA trains one
  shared table; HF stores a copy in each checkpoint)."""
  if 'mlm' not in generator.heads or 'rtd' not in discriminator.heads:
    raise ConversionError(f'electra_params needs a generator with an MLM head and a discriminator with an RTD head; '
                          f'got heads {generator.heads} and {discriminator.heads}.')
  g, d = generator.params, discriminator.params
  if generator.cfg.scan_layers != discriminator.cfg.scan_layers:
    raise ConversionError('generator and discriminator must both be imported with the same scan_layers.')
  params = {'embed': d['embed'], 'generator': g['transformer'], 'mlm': g['mlm'],
            'discriminator': d['transformer'], 'rtd': d['rtd']}
  return generator.cfg, discriminator.cfg, params


# --------------------------------------------------------------------------------------------------------- GGUF

_GGUF_LAYER = {'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm', 'attn_q': 'self_attn.q_proj',
               'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
               'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj', 'ffn_down': 'mlp.down_proj'}
_GGUF_TOP = {'token_embd.weight': 'model.embed_tokens.weight', 'output_norm.weight': 'model.norm.weight',
             'output.weight': 'lm_head.weight'}


def _unpermute(w, n_heads):
  """llama.cpp stores q/k rows interleaved per head (rotary pairs adjacent); HF's layout is half-split."""
  return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute(w, n_heads):
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_reader(path):
  try:
    import gguf
  except ImportError:
    raise ConversionError('reading GGUF files needs the `gguf` package (pip install gguf).') from None


  class Reader(gguf.GGUFReader):
    # GGUFReader slices a np.memmap once per metadata item, and each memmap slice is slow (13 s for a 49k-token
    # vocabulary); a plain ndarray view of the same mapping parses in under 2 s and copies nothing.
    data = property(lambda self: self._data, lambda self, v: setattr(self, '_data', np.asarray(v)))

  try:
    return gguf, Reader(str(path))
  except FileNotFoundError:
    raise ConversionError(f'{path}: no such GGUF file.') from None
  except Exception as e:
    raise ConversionError(f'{path}: cannot read this GGUF file ({type(e).__name__}: {e}); it is truncated or not a '
                          'GGUF file.') from None


def gguf_metadata(reader) -> dict:
  out = {}
  for k, f in reader.fields.items():
    if k.startswith('GGUF.'):
      continue
    try:
      out[k] = f.contents()
    except Exception:  # an exotic field type: not needed for conversion
      continue
  return out


_DIGIT_SPLIT_PRE = ('smollm', 'starcoder', 'refact', 'command-r', 'codeshell', 'exaone', 'minerva')


def gguf_tokenizer(meta: dict, where='GGUF'):
  """A `tokenizers.Tokenizer` from GGUF metadata (tokenizer.ggml.*): byte-level BPE ('gpt2', as SmolLM2/Llama 3)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  kind = meta.get('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ConversionError(f'{where}: tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE (\'gpt2\') '
                          'tokenizers are built from GGUF metadata.')
  tokens = list(meta['tokenizer.ggml.tokens'])
  merges = [tuple(m.split(' ', 1)) for m in meta.get('tokenizer.ggml.merges', [])]
  vocab = {t: i for i, t in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get('tokenizer.ggml.add_space_prefix', False)),
                                        use_regex=True)
  if meta.get('tokenizer.ggml.pre') in _DIGIT_SPLIT_PRE:
    # llama.cpp's pre-tokenizer for these isolates every digit (\p{N}) before the GPT-2 regex, as their original
    # tokenizer.json does with Digits(individual_digits=True).
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  types = list(meta.get('tokenizer.ggml.token_type', []))
  # 3 = CONTROL (special tokens such as <|im_start|>), 4 = USER_DEFINED (matched whole, not special).
  special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3]
  user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
  if special:
    tok.add_special_tokens(special)
  if user:
    tok.add_tokens(user)
  return tok


def import_gguf(path, *, scan_layers: bool = True, param_dtype: str = 'float32') -> Converted:
  """A llama.cpp GGUF file of a LLaMA-family model -> Converted (weights dequantized to float32, tokenizer built)."""
  gguf, reader = _gguf_reader(path)
  meta = gguf_metadata(reader)
  where = str(path)
  arch = meta.get('general.architecture')
  if arch not in ('llama', 'mistral'):
    raise ConversionError(f'{where}: general.architecture={arch!r} is not supported; only LLaMA-family GGUF files '
                          '(llama, mistral) are.')
  g = lambda key, default=dataclasses.MISSING: _field({key: meta.get(f'{arch}.{key}'), 'model_type': arch},
                                                      key, default, where=f'{where} metadata {arch}.')
  n, d = int(g('attention.head_count')), int(g('embedding_length'))
  kv = int(g('attention.head_count_kv', n))
  tokens = meta.get('tokenizer.ggml.tokens')
  hf = {'model_type': arch, 'hidden_size': d, 'num_attention_heads': n, 'num_key_value_heads': kv,
        'num_hidden_layers': int(g('block_count')), 'intermediate_size': int(g('feed_forward_length')),
        'max_position_embeddings': int(g('context_length', 2048)),
        'rope_parameters': {'rope_theta': float(g('rope.freq_base', 10_000.0)), 'rope_type': 'default'},
        'rms_norm_eps': float(g('attention.layer_norm_rms_epsilon', 1e-5)), 'hidden_act': 'silu',
        'vocab_size': int(g('vocab_size', len(tokens) if tokens is not None else dataclasses.MISSING)),
        'bos_token_id': meta.get('tokenizer.ggml.bos_token_id'),
        'eos_token_id': meta.get('tokenizer.ggml.eos_token_id'),
        'pad_token_id': meta.get('tokenizer.ggml.padding_token_id')}
  if meta.get(f'{arch}.rope.dimension_count') not in (None, d // n):
    hf['head_dim'] = int(meta[f'{arch}.rope.dimension_count'])
  if meta.get(f'{arch}.rope.scaling.type') not in (None, 'none'):
    raise ConversionError(f'{where}: {arch}.rope.scaling.type={meta[f"{arch}.rope.scaling.type"]!r} is not supported.')
  state = {}
  for t in reader.tensors:
    name = t.name
    m = re.match(r'^blk\.(\d+)\.(\w+)\.weight$', name)
    if m and m.group(2) in _GGUF_LAYER:
      hf_name = f'model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.weight'
    elif name in _GGUF_TOP:
      hf_name = _GGUF_TOP[name]
    else:
      state[name] = None  # reported as unused
      continue
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise ConversionError(f'{where}: tensor {name!r} has quantization {t.tensor_type.name}, which the gguf package '
                            'cannot dequantize.') from None
    w = np.asarray(w, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
    if m and m.group(2) == 'attn_q':
      w = _unpermute(w, n)
    elif m and m.group(2) == 'attn_k':
      w = _unpermute(w, kv)
    state[hf_name] = w
  hf['tie_word_embeddings'] = 'lm_head.weight' not in state
  unused_raw = [k for k, v in state.items() if v is None]
  state = {k: v for k, v in state.items() if v is not None}
  tokenizer = gguf_tokenizer(meta, where) if tokens is not None else None
  conv = _import_state(arch, hf, state, where=where, scan_layers=scan_layers, param_dtype=param_dtype,
                       tokenizer=tokenizer)
  conv.unused = sorted(set(conv.unused) | set(unused_raw))
  conv.hf_config = hf
  return conv


def to_gguf_layout(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF q/k weight rows -> llama.cpp's interleaved order (for tests and for writing GGUF files)."""
  return _permute(w, n_heads)


# ------------------------------------------------------------------------------------------ our on-disk format


def save(conv: Converted, out_dir) -> Path:
  """params.safetensors (keys 'embed/token/embedding', ...) + lmlab_model.json + tokenizer files."""
  import jax
  from safetensors.numpy import save_file
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  flat = {k: np.asarray(v) for k, v in _flatten(jax.tree.map(np.asarray, conv.params)).items()}
  flat.update({f'extras/{k}': np.asarray(v) for k, v in conv.extras.items()})
  save_file(flat, str(out / PARAMS_FILE))
  meta = {'model_config': conv.cfg.to_dict(), 'heads': list(conv.heads), 'family': conv.family,
          'hf_config': conv.hf_config}
  (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
  _copy_tokenizer(conv, out)
  return out


def load(path) -> Converted:
  """The inverse of `save`: a directory with lmlab_model.json + params.safetensors -> Converted."""
  d = Path(path)
  if not (d / CONFIG_FILE).exists():
    raise ConversionError(f'{d}: no {CONFIG_FILE}; write one with `python -m model.convert import`.')
  meta = json.loads((d / CONFIG_FILE).read_text())
  try:
    cfg = ModelConfig(**meta['model_config'])
  except (TypeError, ValueError) as e:
    raise ConversionError(f'{d / CONFIG_FILE}: model_config is not a valid ModelConfig: {e}') from None
  flat = read_safetensors(d / PARAMS_FILE)
  extras = {k[len('extras/'):]: v for k, v in flat.items() if k.startswith('extras/')}
  params = _nest({k: v for k, v in flat.items() if not k.startswith('extras/')})
  return Converted(cfg=cfg, params=params, heads=tuple(meta['heads']), family=meta['family'],
                   hf_config=meta.get('hf_config', {}), extras=extras, tokenizer_dir=str(d))


def import_any(path, **kw) -> Converted:
  """A HF model directory or a .gguf file."""
  p = Path(path)
  if p.suffix == '.gguf':
    return import_gguf(p, **kw)
  if p.is_dir() and (p / CONFIG_FILE).exists():
    return load(p)
  return import_hf(p, **kw)


# ------------------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str]):
  from absl import flags, logging
  FLAGS = flags.FLAGS
  if len(argv) != 2 or argv[1] not in ('import', 'export'):
    raise SystemExit('usage: python -m model.convert import|export --from=SRC --to=DST')
  src, dst = getattr(FLAGS, 'from'), FLAGS.to
  if not src or not dst:
    raise SystemExit('both --from and --to are required.')
  try:
    if argv[1] == 'import':
      conv = import_any(src, scan_layers=FLAGS.scan_layers, param_dtype=FLAGS.param_dtype)
      save(conv, dst)
    else:
      conv = import_any(src)
      export_hf(conv, dst)
  except ConversionError as e:
    raise SystemExit(f'error: {e}') from None
  if conv.unused:
    logging.warning('tensors not converted: %s', ', '.join(conv.unused))
  print(f'{argv[1]}ed {conv.family} ({", ".join(conv.heads) or "no heads"}) {src} -> {dst}')


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('from', None, 'HF model directory, .gguf file, or (export) a directory written by import.')
  flags.DEFINE_string('to', None, 'Output directory.')
  flags.DEFINE_bool('scan_layers', True, 'Store layers stacked for nn.scan (import).')
  flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16'], 'Parameter dtype (import).')
  app.run(main)
