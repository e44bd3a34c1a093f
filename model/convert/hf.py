"""The Hugging Face import/export engine: a model directory (config.json + weights) <-> a `Converted`.

`import_hf(dir)` reads a BERT, RoBERTa, ELECTRA, GPT-2, T5 (v1.0 / v1.1) or LLaMA-family (Llama, SmolLM2, Mistral)
checkpoint into our ModelConfig, the params of `LanguageModel(cfg, heads)` and the heads the checkpoint has weights
for; `export_hf(conv, dir)` writes it back in the same layout, so `transformers` loads it. Both walk the rule tables of
hf_layouts.py, so a missing tensor or a wrong shape names itself. Weights are read with numpy; torch is imported only to
read a pytorch_model.bin. `import_state` is the engine behind import_hf, shared with the GGUF reader.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from model import lora, pytree
from model.config import ModelConfig
from model.convert import hf_layouts as layouts
from model.convert.hf_layouts import hf_config  # noqa: F401  (export's config.json; public here as well)
from model.convert.store import ConversionError, Converted, copy_tokenizer, read_safetensors
from model.heads import abstract_params
from model.transformer import stack_layers, unstack_layers

# --------------------------------------------------------------------------------------------- reading weights


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


def _expected_shapes(cfg: ModelConfig, heads, pooler: bool = False) -> dict[str, tuple]:
  """Flat {our path: shape} of LanguageModel(cfg, heads) with unrolled layers, computed without allocating; pooler:
  with the pooler's params too (the model builds one for NSP, so its shapes are those of an NSP model's)."""
  shapes = abstract_params(cfg.replace(scan_layers=False), (*heads, 'nsp') if pooler and 'nsp' not in heads else heads)
  flat = {pytree.path_str(path): tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  if pooler and 'nsp' not in heads:
    flat = {k: v for k, v in flat.items() if not k.startswith('nsp/')}
  return flat


def _apply_rules(rules, state, cfg, heads, where, pooler: bool = False) -> tuple[dict, list]:
  expected = _expected_shapes(cfg, heads, pooler)
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
  probe = {
      'bert': 'embeddings.word_embeddings.weight',
      'roberta': 'embeddings.word_embeddings.weight',
      'electra': 'embeddings.word_embeddings.weight',
      'gpt2': 'wte.weight'
  }[family]
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
    return tuple(
        h for h, k in (('mlm', 'generator_lm_head.bias'), ('rtd', 'discriminator_predictions.dense.weight')) if has(k))
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
  family = layouts.model_family(hf, where)
  state = read_hf_weights(d) if state is None else state
  return import_state(family, hf, state, where=where, scan_layers=scan_layers, param_dtype=param_dtype,
                      tokenizer_dir=str(d))


def _config_fields(family, hf, state, prefix, heads, where) -> tuple[dict, dict, dict]:
  """config.json and the tensors -> (ModelConfig fields, the state to map, extras). Ties are read off the tensors."""
  extras = {}
  if family in ('bert', 'roberta', 'electra'):
    fields = layouts.bert_like_config(hf, family, where)
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
    fields = layouts.gpt2_config(hf, where)
    fields['tie_embeddings'] = tied
    state = _gpt2_split(state, prefix, int(layouts.field(hf, 'n_layer', where=where)))
  elif family == 't5':
    fields = layouts.t5_config(hf, where, tied=_tied(state, 'shared.weight', 'lm_head.weight'))
  else:
    tied = 'lm_head.weight' not in state or _tied(state, 'model.embed_tokens.weight', 'lm_head.weight')
    fields = layouts.llama_config(hf, where, tied=tied)
  return fields, state, extras


def import_state(family, hf, state, *, where, scan_layers, param_dtype, tokenizer_dir=None,
                 tokenizer=None) -> Converted:
  """A checkpoint's config.json (as a dict) and its HF-named tensors -> Converted; where names the source in errors."""
  prefix = _strip_prefix(state, family) if family in ('bert', 'roberta', 'electra', 'gpt2') else ''
  heads = _heads_present(family, state, prefix)
  # A base model's pooler (BertModel, BertForSequenceClassification, sentence encoders) is kept in params['pooler'],
  # so a LanguageModel that builds one (NSP, classifier_pooling='cls') starts from it and export writes it back.
  pooler = family in layouts.POOLER_FAMILIES and f'{prefix}pooler.dense.weight' in state
  fields, state, extras = _config_fields(family, hf, state, prefix, heads, where)
  try:
    cfg = ModelConfig(**fields, scan_layers=False, param_dtype=param_dtype)
  except ValueError as e:
    raise ConversionError(f'{where}: the config converts to an invalid ModelConfig: {e}') from None
  flat, unused = _apply_rules(layouts.rules(family, cfg, heads, prefix, pooler=pooler), state, cfg, heads, where,
                              pooler)
  # Tensors that are tied copies or buffers rather than weights are not "unused".
  ignore = re.compile(r'(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$|position_ids$|lm_head\.weight$|'
                      r'decoder\.weight$|decoder\.bias$|embed_tokens\.weight$)')
  unused = [u for u in unused if not ignore.search(u)]
  if param_dtype != 'float32':
    import ml_dtypes  # jax depends on it
    flat = {k: v.astype(getattr(ml_dtypes, param_dtype, param_dtype)) for k, v in flat.items()}
  params = pytree.unflatten(flat)
  cfg = cfg.replace(scan_layers=scan_layers)
  if scan_layers:
    params = stack_layers(params)
  return Converted(cfg=cfg, params=params, heads=heads, family=family, hf_config=hf, extras=extras, unused=unused,
                   tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)


# --------------------------------------------------------------------------------------------------- export


def merge_adapters(conv: Converted) -> Converted:
  """conv with its LoRA adapters folded into the kernels and cfg.lora_rank=0 (conv itself when it has none): a
  Hugging Face checkpoint has no place for adapters, and the merged model computes the same function."""
  if not lora.lora_paths(conv.params):
    return conv
  return dataclasses.replace(conv, cfg=lora.merged_config(conv.cfg), params=lora.merge(conv.params, conv.cfg))


def to_hf_state(conv: Converted) -> dict[str, np.ndarray]:
  """Our params -> the HF state dict (tied copies omitted, as save_pretrained does); LoRA adapters merged in."""
  conv = merge_adapters(conv)
  layouts.validate_export(conv)
  cfg = conv.cfg.replace(scan_layers=False)
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), conv.params)
  params = unstack_layers(params) if conv.cfg.scan_layers else params
  flat = pytree.flatten(params)
  prefix = {'bert': 'bert.', 'roberta': 'roberta.', 'electra': 'electra.', 'gpt2': 'transformer.'}.get(conv.family, '')
  if not conv.heads and conv.family in ('bert', 'roberta', 'electra', 'gpt2'):
    prefix = ''  # a bare base model saves its tensors unprefixed
  dims = {'n': cfg.num_heads, 'k': cfg.kv_heads, 'h': cfg.head_width}
  state = {}
  # The pooler goes back whenever the params have one (an imported BertModel's, or one trained for a classifier):
  # transformers would otherwise initialize BertModel's pooler at random. ELECTRA has no place for it.
  pooler = 'pooler/dense/kernel' in flat
  for rule in layouts.rules(conv.family, cfg, conv.heads, prefix, pooler=pooler):
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
  """Writes config.json + model.safetensors (+ the tokenizer files that came with the checkpoint) to out_dir; LoRA
  adapters are merged into the kernels first (merge_adapters)."""
  from safetensors.numpy import save_file
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  conv = merge_adapters(conv)
  state = to_hf_state(conv)
  save_file(state, str(out / 'model.safetensors'), metadata={'format': 'pt'})
  (out / 'config.json').write_text(json.dumps(hf_config(conv), indent=2, sort_keys=True))
  copy_tokenizer(conv, out)
  return out


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
  params = {
      'embed': d['embed'],
      'generator': g['transformer'],
      'mlm': g['mlm'],
      'discriminator': d['transformer'],
      'rtd': d['rtd']
  }
  return generator.cfg, discriminator.cfg, params
