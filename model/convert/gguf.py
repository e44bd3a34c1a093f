"""llama.cpp GGUF files of LLaMA-family models -> a `Converted`: weights dequantized, tokenizer built from metadata.

`import_gguf(file)` reads the metadata into the equivalent Hugging Face config.json, renames every tensor to its HF name
(undoing llama.cpp's interleaved q/k row order), dequantizes it to float32 with the `gguf` package and hands the result
to the same engine as import_hf (hf.import_state). `gguf_tokenizer` rebuilds a byte-level BPE `tokenizers.Tokenizer`
from the tokenizer.ggml.* fields, so generation needs no tokenizer files next to the model.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from model.convert import hf_layouts as layouts
from model.convert.hf import import_state
from model.convert.store import ConversionError, Converted

# GGUF tensor names -> HF names: within a layer ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'),
# and outside the layers.
GGUF_LAYER_TENSORS = {
    'attn_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm',
    'attn_q': 'self_attn.q_proj',
    'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj',
    'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj'
}
GGUF_TOP_TENSORS = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight'
}
_LAYER_TENSOR = re.compile(r'^blk\.(\d+)\.(\w+)\.weight$')


def from_gguf_layout(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp stores q/k rows interleaved per head (rotary pairs adjacent); HF's layout is half-split."""
  return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_layout(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF q/k weight rows -> llama.cpp's interleaved order (for tests and for writing GGUF files)."""
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
  """Every metadata field of a GGUFReader as {key: Python value} ('llama.block_count': 30, ...)."""
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


def _hf_config(meta: dict, arch: str, where: str) -> dict:
  """GGUF metadata ({arch}.*, tokenizer.ggml.*) -> the config.json a Hugging Face checkpoint of it would have."""
  g = lambda key, default=dataclasses.MISSING: layouts.field({
      key: meta.get(f'{arch}.{key}'),
      'model_type': arch
  }, key, default, where=f'{where} metadata {arch}.')
  n, d = int(g('attention.head_count')), int(g('embedding_length'))
  tokens = meta.get('tokenizer.ggml.tokens')
  hf = {
      'model_type': arch,
      'hidden_size': d,
      'num_attention_heads': n,
      'num_key_value_heads': int(g('attention.head_count_kv', n)),
      'num_hidden_layers': int(g('block_count')),
      'intermediate_size': int(g('feed_forward_length')),
      'max_position_embeddings': int(g('context_length', 2048)),
      'rope_parameters': {
          'rope_theta': float(g('rope.freq_base', 10_000.0)),
          'rope_type': 'default'
      },
      'rms_norm_eps': float(g('attention.layer_norm_rms_epsilon', 1e-5)),
      'hidden_act': 'silu',
      'vocab_size': int(g('vocab_size',
                          len(tokens) if tokens is not None else dataclasses.MISSING)),
      'bos_token_id': meta.get('tokenizer.ggml.bos_token_id'),
      'eos_token_id': meta.get('tokenizer.ggml.eos_token_id'),
      'pad_token_id': meta.get('tokenizer.ggml.padding_token_id')
  }
  if meta.get(f'{arch}.rope.dimension_count') not in (None, d // n):
    hf['head_dim'] = int(meta[f'{arch}.rope.dimension_count'])
  if meta.get(f'{arch}.rope.scaling.type') not in (None, 'none'):
    raise ConversionError(f'{where}: {arch}.rope.scaling.type={meta[f"{arch}.rope.scaling.type"]!r} is not supported.')
  return hf


def _hf_state(gguf, reader, hf: dict, where: str) -> tuple[dict, list]:
  """Every tensor, dequantized to float32 and in HF's name and layout -> ({HF name: array}, unmapped GGUF names)."""
  state, unused = {}, []
  for t in reader.tensors:
    name = t.name
    m = _LAYER_TENSOR.match(name)
    if m and m.group(2) in GGUF_LAYER_TENSORS:
      hf_name = f'model.layers.{m.group(1)}.{GGUF_LAYER_TENSORS[m.group(2)]}.weight'
    elif name in GGUF_TOP_TENSORS:
      hf_name = GGUF_TOP_TENSORS[name]
    else:
      unused.append(name)
      continue
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise ConversionError(f'{where}: tensor {name!r} has quantization {t.tensor_type.name}, which the gguf package '
                            'cannot dequantize.') from None
    w = np.asarray(w, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
    if m and m.group(2) == 'attn_q':
      w = from_gguf_layout(w, hf['num_attention_heads'])
    elif m and m.group(2) == 'attn_k':
      w = from_gguf_layout(w, hf['num_key_value_heads'])
    state[hf_name] = w
  return state, unused


def import_gguf(path, *, scan_layers: bool = True, param_dtype: str = 'float32') -> Converted:
  """A llama.cpp GGUF file of a LLaMA-family model -> Converted (weights dequantized to float32, tokenizer built)."""
  gguf, reader = _gguf_reader(path)
  meta = gguf_metadata(reader)
  where = str(path)
  arch = meta.get('general.architecture')
  if arch not in ('llama', 'mistral'):
    raise ConversionError(f'{where}: general.architecture={arch!r} is not supported; only LLaMA-family GGUF files '
                          '(llama, mistral) are.')
  hf = _hf_config(meta, arch, where)
  state, unused_raw = _hf_state(gguf, reader, hf, where)
  hf['tie_word_embeddings'] = 'lm_head.weight' not in state
  tokenizer = gguf_tokenizer(meta, where) if meta.get('tokenizer.ggml.tokens') is not None else None
  conv = import_state(arch, hf, state, where=where, scan_layers=scan_layers, param_dtype=param_dtype,
                      tokenizer=tokenizer)
  conv.unused = sorted(set(conv.unused) | set(unused_raw))
  conv.hf_config = hf
  return conv
