"""What each Hugging Face family looks like: per-tensor rule tables and the config.json <-> ModelConfig translation.

A `Rule` ties one of our parameters ('transformer/stack/layers_0/self_attn/query/kernel') to one HF tensor
('bert.encoder.layer.0.attention.self.query.weight') and a layout, a pair of numpy functions (HF -> ours, ours -> HF),
so import and export read the same table both ways. `rules(family, cfg, heads)` builds the table for a model;
`bert_like_config` / `gpt2_config` / `t5_config` / `llama_config` turn a config.json into ModelConfig fields and
`hf_config` turns a converted checkpoint back into a config.json. Nothing here reads or writes files.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from model.config import ModelConfig
from model.convert.store import ConversionError, Converted

FAMILIES = ('bert', 'roberta', 'electra', 'gpt2', 't5', 'llama', 'mistral')
POOLER_FAMILIES = ('bert', 'roberta')  # whose base models have a pooler: '[bert.]pooler.dense.{weight,bias}'

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
  return (lambda w, d: w.T.reshape(w.shape[1], n(d), d['h']), lambda w, d: w.reshape(w.shape[0], -1).T)


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
  ours: str  # 'transformer/stack/layers_0/self_attn/query/kernel'
  hf: str  # 'bert.encoder.layer.0.attention.self.query.weight'
  layout: tuple  # (to_ours, to_hf)


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
  out = []
  for ours_name, kind in (('query', 'q'), ('key', 'kv'), ('value', 'kv')):
    out += _dense_rules(f'{ours}/{ours_name}', names[ours_name], bias=bias,
                        layout=_heads_in_conv(kind) if conv else _heads_in(kind), bias_layout=_heads_bias(kind))
  out += _dense_rules(f'{ours}/out', names['out'], bias=bias, layout=_heads_out_conv() if conv else _heads_out())
  return out


# ---------------------------------------------------------------------------------------- config.json -> ours

_ACTIVATIONS = {
    'gelu': 'gelu',
    'gelu_new': 'gelu_tanh',
    'gelu_pytorch_tanh': 'gelu_tanh',
    'gelu_fast': 'gelu_tanh',
    'relu': 'relu',
    'silu': 'silu',
    'swish': 'silu'
}
_ACT_TO_HF = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'relu': 'relu', 'silu': 'silu'}


def field(hf: dict, key: str, default=dataclasses.MISSING, where='config.json'):
  """hf[key], or default; a required field (no default) that is missing raises ConversionError naming it."""
  if key in hf and hf[key] is not None:
    return hf[key]
  if default is dataclasses.MISSING:
    raise ConversionError(f'{where}: field {key!r} is missing; it is required for model_type '
                          f'{hf.get("model_type")!r}.')
  return default


def _activation(hf, key, where='config.json'):
  act = field(hf, key, where=where)
  if act not in _ACTIVATIONS:
    raise ConversionError(f'{where}: {key}={act!r} is not supported; supported: {sorted(_ACTIVATIONS)}.')
  return _ACTIVATIONS[act]


def model_family(hf: dict, where='config.json') -> str:
  """config.json's model_type, checked against FAMILIES."""
  mt = hf.get('model_type')
  if mt is None:
    raise ConversionError(f'{where}: no model_type field; cannot tell which family this checkpoint is.')
  if mt not in FAMILIES:
    raise ConversionError(f'{where}: model_type={mt!r} is not supported; supported families: {", ".join(FAMILIES)}.')
  return mt


def _require(hf, key, ok: Callable[[Any], bool], why: str, where='config.json'):
  if key in hf and hf[key] is not None and not ok(hf[key]):
    raise ConversionError(f'{where}: {key}={hf[key]!r} is not supported: {why}')


def bert_like_config(hf, family, where):
  _require(hf, 'position_embedding_type', lambda v: v == 'absolute', "only 'absolute' positions are.", where)
  pad = int(field(hf, 'pad_token_id', 0 if family != 'roberta' else 1))
  max_len = int(field(hf, 'max_position_embeddings', where=where))
  if family == 'roberta':
    # RoBERTa numbers positions from pad_token_id + 1 (fairseq); the rows below are never read for a real token, so we
    # drop them and our positions (0, 1, ...) index the same rows (kept in `extras` for export).
    max_len -= pad + 1
  d = int(field(hf, 'hidden_size', where=where))
  e = int(field(hf, 'embedding_size', d)) if family == 'electra' else d
  return dict(arch='encoder', vocab_size=int(field(hf, 'vocab_size', where=where)), d_model=d,
              num_heads=int(field(hf, 'num_attention_heads',
                                  where=where)), num_layers=int(field(hf, 'num_hidden_layers', where=where)),
              d_ff=int(field(hf, 'intermediate_size', where=where)), embed_dim=None if e == d else e, max_len=max_len,
              position='learned', type_vocab_size=int(field(hf, 'type_vocab_size',
                                                            2)), activation=_activation(hf, 'hidden_act', where),
              norm='layernorm', norm_eps=float(field(hf, 'layer_norm_eps', 1e-12)), pre_norm=False, embed_norm=True,
              use_bias=True, dropout_rate=float(field(hf, 'hidden_dropout_prob', 0.1)),
              attention_dropout_rate=float(field(hf, 'attention_probs_dropout_prob',
                                                 0.1)), tie_embeddings=True, pad_id=pad, bos_id=hf.get('bos_token_id'),
              eos_id=hf.get('eos_token_id'), init_std=float(field(hf, 'initializer_range', 0.02)))


def gpt2_config(hf, where):
  _require(hf, 'scale_attn_by_inverse_layer_idx', lambda v: not v, 'per-layer attention scaling is not in our model.',
           where)
  d, n = int(field(hf, 'n_embd', where=where)), int(field(hf, 'n_head', where=where))
  scale = None if field(hf, 'scale_attn_weights', True) else 1.0
  eos = field(hf, 'eos_token_id', 50256)
  return dict(arch='decoder', vocab_size=int(field(hf, 'vocab_size', where=where)), d_model=d, num_heads=n,
              num_layers=int(field(hf, 'n_layer', where=where)), d_ff=int(field(hf, 'n_inner', 4 * d)),
              max_len=int(field(hf, 'n_positions', where=where)), position='learned',
              activation=_activation(hf, 'activation_function',
                                     where), norm='layernorm', norm_eps=float(field(hf, 'layer_norm_epsilon', 1e-5)),
              pre_norm=True, use_bias=True, attention_scale=scale, dropout_rate=float(field(hf, 'resid_pdrop', 0.1)),
              attention_dropout_rate=float(field(hf, 'attn_pdrop',
                                                 0.1)), tie_embeddings=bool(field(hf, 'tie_word_embeddings', True)),
              bos_id=field(hf, 'bos_token_id', 50256), eos_id=eos, pad_id=int(field(hf, 'pad_token_id', eos)),
              init_std=float(field(hf, 'initializer_range', 0.02)))


def t5_config(hf, where, tied: bool):
  ff = str(field(hf, 'feed_forward_proj', 'relu'))
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
  d = int(field(hf, 'd_model', where=where))
  return dict(arch='encoder_decoder', vocab_size=int(field(hf, 'vocab_size', where=where)), d_model=d,
              num_heads=int(field(hf, 'num_heads', where=where)), head_dim=int(field(hf, 'd_kv', where=where)),
              num_layers=int(field(hf, 'num_layers', where=where)),
              num_decoder_layers=int(field(hf, 'num_decoder_layers',
                                           field(hf, 'num_layers'))), d_ff=int(field(hf, 'd_ff', where=where)),
              max_len=int(field(hf, 'n_positions', 512)), position='relative', relative_buckets=int(
                  field(hf, 'relative_attention_num_buckets',
                        32)), relative_max_distance=int(field(hf, 'relative_attention_max_distance',
                                                              128)), activation=_ACTIVATIONS[act], gated_mlp=gated,
              norm='rmsnorm', norm_eps=float(field(hf, 'layer_norm_epsilon', 1e-6)), pre_norm=True, final_norm=True,
              use_bias=False, attention_scale=1.0, dropout_rate=float(field(hf, 'dropout_rate', 0.1)),
              attention_dropout_rate=float(field(hf, 'dropout_rate',
                                                 0.1)), mlp_dropout_rate=float(field(hf, 'dropout_rate',
                                                                                     0.1)), tie_embeddings=tied,
              scale_tied_logits=scale and tied, pad_id=int(field(hf, 'pad_token_id',
                                                                 0)), eos_id=field(hf, 'eos_token_id', 1),
              decoder_start_id=int(field(hf, 'decoder_start_token_id',
                                         0)), init='t5')


def _rope_theta(hf, where):
  rp = hf.get('rope_parameters') or {}
  rs = hf.get('rope_scaling') or {}
  rope_type = rp.get('rope_type', rs.get('rope_type', rs.get('type', 'default')))
  if rope_type != 'default':
    raise ConversionError(f'{where}: rope_type={rope_type!r} (rope_scaling / rope_parameters) is not supported; only '
                          "'default' rotary embeddings are in our model.")
  return float(rp.get('rope_theta', hf.get('rope_theta', 10_000.0)))


def llama_config(hf, where, tied: Optional[bool] = None):
  _require(hf, 'attention_bias', lambda v: not v, 'biases on the q/k/v/o projections are not in our LLaMA model.',
           where)
  _require(hf, 'mlp_bias', lambda v: not v, 'MLP biases are not in our LLaMA model.', where)
  _require(hf, 'pretraining_tp', lambda v: v == 1, 'only pretraining_tp=1 is supported.', where)
  d, n = int(field(hf, 'hidden_size', where=where)), int(field(hf, 'num_attention_heads', where=where))
  hd = int(field(hf, 'head_dim', d // n))
  max_len = int(field(hf, 'max_position_embeddings', 2048))
  window = hf.get('sliding_window')
  if window and hf.get('use_sliding_window', True) is not False:
    # Mistral's sliding window: our attention has none, so the model is exact only up to the window.
    max_len = min(max_len, int(window))
  eos = hf.get('eos_token_id')
  eos = eos[0] if isinstance(eos, list) else eos
  pad = hf.get('pad_token_id')
  return dict(arch='decoder', vocab_size=int(field(hf, 'vocab_size', where=where)), d_model=d, num_heads=n,
              num_kv_heads=int(field(hf, 'num_key_value_heads', n)), head_dim=None if hd * n == d else hd,
              num_layers=int(field(hf, 'num_hidden_layers',
                                   where=where)), d_ff=int(field(hf, 'intermediate_size',
                                                                 where=where)), max_len=max_len, position='rope',
              rope_theta=_rope_theta(hf, where), activation=_activation(hf, 'hidden_act', where), gated_mlp=True,
              norm='rmsnorm', norm_eps=float(field(hf, 'rms_norm_eps', 1e-6)), pre_norm=True, use_bias=False,
              attention_dropout_rate=float(field(hf, 'attention_dropout', 0.0)), dropout_rate=0.0,
              tie_embeddings=bool(field(hf, 'tie_word_embeddings', False)) if tied is None else tied,
              bos_id=hf.get('bos_token_id'), eos_id=eos, pad_id=int(pad if pad is not None else (eos or 0)),
              init_std=float(field(hf, 'initializer_range', 0.02)))


# ------------------------------------------------------------------------------------------------ rule tables


def _bert_like_rules(family, cfg: ModelConfig, heads, prefix: str, pooler: bool) -> list[Rule]:
  p = prefix
  r = [
      Rule('embed/token/embedding', f'{p}embeddings.word_embeddings.weight', _same()),
      Rule('embed/position/embedding', f'{p}embeddings.position_embeddings.weight', _same())
  ]
  if family == 'roberta':
    off = cfg.pad_id + 1
    r[1] = Rule('embed/position/embedding', r[1].hf,
                (lambda w, d, off=off: w[off:], lambda w, d, off=off: w))  # export re-adds the rows
  if cfg.type_vocab_size:
    r.append(Rule('embed/token_type/embedding', f'{p}embeddings.token_type_embeddings.weight', _same()))
  r += _norm_rules('embed/norm', f'{p}embeddings.LayerNorm')
  if cfg.embed_width != cfg.d_model:
    r += _dense_rules('transformer/embed_proj', f'{p}embeddings_project')
  for i in range(cfg.num_layers):
    ours, hf = f'transformer/stack/layers_{i}', f'{p}encoder.layer.{i}'
    r += _attention_rules(
        f'{ours}/self_attn', {
            'query': f'{hf}.attention.self.query',
            'key': f'{hf}.attention.self.key',
            'value': f'{hf}.attention.self.value',
            'out': f'{hf}.attention.output.dense'
        }, bias=True)
    r += _norm_rules(f'{ours}/self_attn_norm', f'{hf}.attention.output.LayerNorm')
    r += _dense_rules(f'{ours}/mlp/wi', f'{hf}.intermediate.dense')
    r += _dense_rules(f'{ours}/mlp/wo', f'{hf}.output.dense')
    r += _norm_rules(f'{ours}/mlp_norm', f'{hf}.output.LayerNorm')
  # BertModel and RobertaModel carry a pooler without an NSP head (sentence encoders, classifiers); ELECTRA has none.
  if 'nsp' in heads or (pooler and family in POOLER_FAMILIES):
    r += _dense_rules('pooler/dense', f'{p}pooler.dense')
  if 'nsp' in heads:
    r += _dense_rules('nsp', 'cls.seq_relationship')
  if 'mlm' in heads:
    mlm = {
        'bert': ('cls.predictions.transform.dense', 'cls.predictions.transform.LayerNorm', 'cls.predictions.bias'),
        'roberta': ('lm_head.dense', 'lm_head.layer_norm', 'lm_head.bias'),
        'electra': ('generator_predictions.dense', 'generator_predictions.LayerNorm', 'generator_lm_head.bias')
    }
    dense_, norm_, bias_ = mlm[family]
    r += _dense_rules('mlm/transform', dense_) + _norm_rules('mlm/norm', norm_)
    r.append(Rule('mlm/bias', bias_, _same()))
  if 'rtd' in heads:
    r += _dense_rules('rtd/dense', 'discriminator_predictions.dense')
    r += _dense_rules('rtd/out', 'discriminator_predictions.dense_prediction')
  return r


def _gpt2_rules(cfg, heads, prefix):
  p = prefix
  r = [
      Rule('embed/token/embedding', f'{p}wte.weight', _same()),
      Rule('embed/position/embedding', f'{p}wpe.weight', _same())
  ]
  for i in range(cfg.num_layers):
    ours, hf = f'transformer/stack/layers_{i}', f'{p}h.{i}'
    r += _norm_rules(f'{ours}/self_attn_norm', f'{hf}.ln_1')
    # c_attn is split into virtual q/k/v tensors by _gpt2_split (and fused back on export).
    r += _attention_rules(f'{ours}/self_attn', {
        'query': f'{hf}.attn.q',
        'key': f'{hf}.attn.k',
        'value': f'{hf}.attn.v',
        'out': f'{hf}.attn.c_proj'
    }, bias=True, conv=True)
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
    return _attention_rules(ours, {
        'query': f'{hf}.q',
        'key': f'{hf}.k',
        'value': f'{hf}.v',
        'out': f'{hf}.o'
    }, bias=False)

  for side, n in (('encoder', cfg.num_layers), ('decoder', cfg.decoder_layers)):
    base = f'transformer/{side}/stack'
    r.append(
        Rule(f'{base}/relative_bias/rel_embedding',
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
    r += _attention_rules(
        f'{ours}/self_attn', {
            'query': f'{hf}.self_attn.q_proj',
            'key': f'{hf}.self_attn.k_proj',
            'value': f'{hf}.self_attn.v_proj',
            'out': f'{hf}.self_attn.o_proj'
        }, bias=False)
    r += _norm_rules(f'{ours}/self_attn_norm', f'{hf}.input_layernorm', bias=False)
    r += _dense_rules(f'{ours}/mlp/wi_0', f'{hf}.mlp.gate_proj', bias=False)
    r += _dense_rules(f'{ours}/mlp/wi_1', f'{hf}.mlp.up_proj', bias=False)
    r += _dense_rules(f'{ours}/mlp/wo', f'{hf}.mlp.down_proj', bias=False)
    r += _norm_rules(f'{ours}/mlp_norm', f'{hf}.post_attention_layernorm', bias=False)
  r += _norm_rules('transformer/stack/final_norm', 'model.norm', bias=False)
  if 'lm' in heads and not cfg.tie_embeddings:
    r += _dense_rules('lm/out', 'lm_head', bias=False)
  return r


def rules(family, cfg, heads, prefix='', *, pooler: bool = False) -> list[Rule]:
  """Every tensor of `family`'s checkpoint of LanguageModel(cfg, heads) (unrolled layers); prefix: 'bert.', ...;
  pooler: the checkpoint has BERT's pooler ('pooler/dense') without an NSP head (only POOLER_FAMILIES hold one)."""
  if family in ('bert', 'roberta', 'electra'):
    return _bert_like_rules(family, cfg, heads, prefix, pooler)
  if family == 'gpt2':
    return _gpt2_rules(cfg, heads, prefix)
  if family == 't5':
    return _t5_rules(cfg, heads)
  return _llama_rules(cfg, heads)


# ---------------------------------------------------------------------------------------- ours -> config.json

_ARCHITECTURES = {
    'bert': {
        ('mlm', 'nsp'): 'BertForPreTraining',
        ('mlm',): 'BertForMaskedLM',
        ('nsp',): 'BertForPreTraining',
        (): 'BertModel'
    },
    'roberta': {
        ('mlm',): 'RobertaForMaskedLM',
        (): 'RobertaModel'
    },
    'electra': {
        ('rtd',): 'ElectraForPreTraining',
        ('mlm',): 'ElectraForMaskedLM',
        (): 'ElectraModel'
    },
    'gpt2': {
        ('lm',): 'GPT2LMHeadModel',
        (): 'GPT2Model'
    },
    't5': {
        ('lm',): 'T5ForConditionalGeneration',
        (): 'T5Model'
    },
    'llama': {
        ('lm',): 'LlamaForCausalLM',
        (): 'LlamaModel'
    },
    'mistral': {
        ('lm',): 'MistralForCausalLM',
        (): 'MistralModel'
    },
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


def validate_export(conv: Converted):
  """Raises ConversionError when conv.cfg has an architecture choice that its family's checkpoints cannot hold."""
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
