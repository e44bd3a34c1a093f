"""ModelConfig, the one frozen dataclass that describes a whole architecture, and the named presets.

A preset, an override from the command line and a converted Hugging Face checkpoint all produce this same kind of
object, and every module takes it whole instead of long argument lists. It validates itself on construction, so a bad
field fails with its name and the fix before anything is traced or compiled.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp

ARCHS = ('encoder', 'decoder', 'encoder_decoder')
# How a model built from scratch is initialized (weights loaded from a checkpoint replace it; model/layers.py applies it):
#   'normal': every kernel and embedding table N(0, init_std): BERT's initializer_range 0.02 (google-research/bert
#     modeling.py), GPT-2's and LLaMA's 0.02 (their Hugging Face configs' initializer_range); biases zero, norms one.
#   't5': Mesh TensorFlow's, which Hugging Face's T5PreTrainedModel._init_weights reproduces: a kernel N(0, fan_in^-0.5)
#     (k, v, wi: d_model^-0.5; attention out: (heads x d_kv)^-0.5; wo: d_ff^-0.5), the query N(0, (d_model x
#     d_kv)^-0.5) because T5 folds attention's 1/sqrt(d_kv) into it (attention_scale=1.0), the token embeddings N(0, 1),
#     the relative-position bias N(0, d_model^-0.5). An untied output layer is a fan-in kernel too (d_model^-0.5, so
#     the first logits have unit scale; Hugging Face draws it at std 1.0); init_std is not read.
INITS = ('normal', 't5')
POSITIONS = ('learned', 'sinusoidal', 'rope', 'relative', 'none')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The projections' and the MLP's matmul outputs and what attention's own VJP keeps (model/attention.py: its output
    # and a log-sum-exp per row): the backward recomputes norms, activations and, in attention's VJP, the
    # probabilities. ('dots' and 'dots_no_batch' recompute the MLP's input matmul: `projection` hides it from them.)
    'projections': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names('attention_out', 'attention_lse', 'mlp_in')),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture. Defaults are a tiny BERT; presets below fill in published shapes."""
  # yapf: disable (one field per line, its meaning aligned beside it)
  arch: str = 'encoder'
  vocab_size: int = 30522
  d_model: int = 128
  num_heads: int = 2
  num_layers: int = 2
  d_ff: int = 512
  num_kv_heads: Optional[int] = None      # None: = num_heads; fewer: grouped-query; 1: multi-query
  head_dim: Optional[int] = None          # None: d_model // num_heads
  num_decoder_layers: Optional[int] = None  # encoder_decoder only; None: = num_layers
  embed_dim: Optional[int] = None         # factorized embeddings (ELECTRA/ALBERT): E != D adds a projection
  max_len: int = 512
  position: str = 'learned'
  rope_theta: float = 10_000.0
  relative_buckets: int = 32
  relative_max_distance: int = 128
  type_vocab_size: int = 0
  activation: str = 'gelu'
  gated_mlp: bool = False                 # SwiGLU (silu) / GeGLU (gelu_tanh)
  norm: str = 'layernorm'
  norm_eps: float = 1e-12
  pre_norm: bool = False
  embed_norm: bool = False
  final_norm: Optional[bool] = None       # None: = pre_norm
  use_bias: bool = True
  attention_scale: Optional[float] = None  # None: 1/sqrt(head_dim); T5 folds it into the init and uses 1.0
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  mlp_dropout_rate: float = 0.0
  tie_embeddings: bool = True
  scale_tied_logits: bool = False         # T5 v1.0 multiplies the decoder output by d_model**-0.5 before tied logits
  pad_id: int = 0
  bos_id: Optional[int] = None
  eos_id: Optional[int] = None
  decoder_start_id: int = 0
  init_std: float = 0.02                  # init='normal': the std of every kernel and embedding table
  init: str = 'normal'                    # INITS: 'normal' (BERT, GPT-2, LLaMA) or 't5' (fan-in; see INITS)
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  scan_layers: bool = True
  scan_unroll: int = 0                    # layers per iteration of the scanned loop; 0: all for a small stack, else 1
  remat_policy: str = 'auto'              # REMAT_POLICIES or 'auto' (remat_for: by layout and backend)
  attention_impl: str = 'auto'
  attention_chunk: int = 128
  lora_rank: int = 0                      # LoRA adapters on the targeted projections (model/lora.py); 0: none
  lora_alpha: float = 16.0                # the adapter's update is scaled by alpha / rank (peft's convention)
  lora_dropout: float = 0.0               # dropout on the adapter's input only
  lora_targets: tuple[str, ...] = ('query', 'value')  # Dense names or '/'-joined path globs/regexes ('mlp/*')
  # yapf: enable

  def __post_init__(self):
    # config.json gives lists back for tuples, a command line a single string; keep the field hashable either way.
    targets = self.lora_targets
    object.__setattr__(self, 'lora_targets', (targets,) if isinstance(targets, str) else tuple(targets))
    self.validate()

  def validate(self):
    """Raises ValueError naming the field and the fix; called on construction, so before anything compiles."""

    def bad(field, why):
      raise ValueError(f'ModelConfig.{field}={getattr(self, field)!r}: {why}')

    if self.arch not in ARCHS:
      bad('arch', f'must be one of {ARCHS}.')
    if self.position not in POSITIONS:
      bad('position', f'must be one of {POSITIONS}.')
    if self.init not in INITS:
      bad('init', f'must be one of {INITS} (model/config.py says what each draws).')
    if self.norm not in ('layernorm', 'rmsnorm'):
      bad('norm', "must be 'layernorm' or 'rmsnorm'.")
    if self.activation not in ('gelu', 'gelu_tanh', 'relu', 'silu'):
      bad('activation', "must be one of 'gelu', 'gelu_tanh', 'relu', 'silu'.")
    if self.remat_policy != 'auto' and self.remat_policy not in REMAT_POLICIES:
      bad('remat_policy', f"must be 'auto' or one of {tuple(REMAT_POLICIES)}.")
    if self.attention_impl not in ('auto', 'plain', 'chunked', 'cudnn'):
      bad('attention_impl', "must be 'auto', 'plain', 'chunked' or 'cudnn'.")
    if self.scan_unroll < 0:
      bad('scan_unroll', 'must be >= 0 (0: automatic, N: layers per iteration of the scanned loop).')
    for f in ('dropout_rate', 'attention_dropout_rate', 'mlp_dropout_rate'):
      if not 0.0 <= getattr(self, f) < 1.0:  # a probability of dropping; at 1 or above nothing would pass
        bad(f, 'must be in [0, 1) (0 turns that dropout off).')
    for f in ('vocab_size', 'd_model', 'num_heads', 'num_layers', 'd_ff', 'max_len'):
      if getattr(self, f) <= 0:
        bad(f, 'must be positive.')
    if self.head_dim is None and self.d_model % self.num_heads:
      bad('d_model', f'is not divisible by num_heads={self.num_heads}; change one of them or set head_dim.')
    if self.num_heads % self.kv_heads:
      bad('num_kv_heads', f'must divide num_heads={self.num_heads} (grouped-query attention).')
    if self.position == 'rope' and self.head_width % 2:
      bad('head_dim', 'must be even for rotary position embeddings.')
    if self.dtype not in ('float32', 'bfloat16', 'float16') or self.param_dtype not in ('float32', 'bfloat16'):
      bad('dtype', "dtype must be float32/bfloat16/float16 and param_dtype float32/bfloat16.")
    self._validate_lora(bad)

  def _validate_lora(self, bad):
    if self.lora_rank < 0:
      bad('lora_rank', 'must be >= 0 (0 turns LoRA off).')
    if not 0.0 <= self.lora_dropout < 1.0:
      bad('lora_dropout', 'must be in [0, 1).')
    if self.lora_rank and not self.lora_targets:
      bad('lora_targets', "is empty while lora_rank > 0; name the projections, e.g. ('query', 'value').")
    # A scanned stack holds one set of params for all layers, so adapters cannot differ per layer.
    if any(re.search(r'layers_\d', t) for t in self.lora_targets):
      bad('lora_targets', "names a layer ('layers_<i>'); adapters go on every layer, name projections instead.")

  # Derived values, so modules never repeat the defaulting rules.
  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_width(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def embed_width(self) -> int:
    return self.embed_dim or self.d_model

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_layers

  def layers_per_iteration(self, num_layers: int) -> int:
    """How many layers one iteration of the scanned stack runs (the parameters stay stacked either way).

    Auto (scan_unroll=0): the whole stack when it is small, num_layers x d_model <= 2304 (up to 6 layers of 384, 4 of
    512): there the loop's own work per layer (slicing the stacked weights, writing stacked residuals into buffers
    it first zeroes) costs more than the layer, and unrolling measured 1.08-1.7x faster on a 2-core CPU (GPT 4x128,
    BERT 4x256, MiniLM 6x384, LLaMA and T5 4x256), while a GPT 6x512 ran 0.85x; larger stacks keep a plain loop,
    so compile time stays flat in depth. benchmarks/train_throughput.py measures it."""
    if self.scan_unroll:
      return min(self.scan_unroll, num_layers)
    return num_layers if num_layers * self.d_model <= 2304 else 1

  def remat_for(self, num_layers: int, policy: Optional[str] = None) -> str:
    """The REMAT_POLICIES name a stack of num_layers runs with: policy (default remat_policy), 'auto' resolved.

    Auto, for a stack that runs as a loop (layers_per_iteration < num_layers) on CPU: 'projections' for pre-norm
    layers, 'dots' for post-norm ones; otherwise 'none'. In the loop every residual is written into a per-layer
    buffer XLA:CPU zero-fills each step, and on a 2-core CPU recomputing the softmax, GELU and norms from the saved
    matmul outputs costs less than storing them. Measured with benchmarks/train_throughput.py's step (tokens/s):
    'dots' against none: GPT 6x512 at 8 x 256 +15%, 8x512 +22%, 12x768 +7%, LLaMA 8x512 +7%, BERT 4x768 +1%, BERT
    12x768 and T5 6x512 within -1.4%; 'projections' against 'dots' (with attention's own VJP): GPT 6x512 +8-10%,
    LLaMA 8x512 +6%, T5 6x512 within the noise (+-3%), but BERT 12x768 (post-norm) -7 to -12%, hence 'dots' there.
    Unrolled stacks and accelerators keep every residual."""
    policy = self.remat_policy if policy is None else policy
    if policy != 'auto':
      return policy
    looped = self.scan_layers and self.layers_per_iteration(num_layers) < num_layers
    if not looped or jax.default_backend() != 'cpu':
      return 'none'
    return 'projections' if self.pre_norm else 'dots'

  @property
  def has_final_norm(self) -> bool:
    return self.pre_norm if self.final_norm is None else self.final_norm

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> 'ModelConfig':
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    """JSON-shaped (tuples as lists), so a dict read back from config.json compares equal to a fresh one."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _bert(layers, d, **kw):
  base = dict(arch='encoder', vocab_size=30522, d_model=d, num_heads=max(d // 64, 2), num_layers=layers, d_ff=4 * d,
              max_len=512, position='learned', type_vocab_size=2, activation='gelu', norm='layernorm', norm_eps=1e-12,
              pre_norm=False, embed_norm=True, pad_id=0)
  base.update(kw)
  return base


def _gpt2(layers, d, heads, **kw):
  return dict(arch='decoder', vocab_size=50257, d_model=d, num_heads=heads, num_layers=layers, d_ff=4 * d, max_len=1024,
              position='learned', activation='gelu_tanh', norm='layernorm', norm_eps=1e-5, pre_norm=True, bos_id=50256,
              eos_id=50256, pad_id=50256, **kw)


def _llama(layers, d, heads, kv, ff, **kw):
  base = dict(arch='decoder', vocab_size=32000, d_model=d, num_heads=heads, num_kv_heads=kv, num_layers=layers, d_ff=ff,
              max_len=2048, position='rope', activation='silu', gated_mlp=True, norm='rmsnorm', norm_eps=1e-5,
              pre_norm=True, use_bias=False, tie_embeddings=False, dropout_rate=0.0, attention_dropout_rate=0.0,
              bos_id=1, eos_id=2, pad_id=0)
  base.update(kw)
  return base


def _t5(layers, d, heads, ff, v11=False, **kw):
  base = dict(arch='encoder_decoder', vocab_size=32128, d_model=d, num_heads=heads, head_dim=64, num_layers=layers,
              d_ff=ff, max_len=512, position='relative', activation='gelu_tanh' if v11 else 'relu', gated_mlp=v11,
              norm='rmsnorm', norm_eps=1e-6, pre_norm=True, use_bias=False, attention_scale=1.0,
              attention_dropout_rate=0.1, mlp_dropout_rate=0.1, tie_embeddings=not v11, scale_tied_logits=not v11,
              pad_id=0, eos_id=1, decoder_start_id=0, init='t5')
  base.update(kw)
  return base


def _electra(d, heads, ff, **kw):
  return _bert(12, d, embed_dim=128, num_heads=heads, d_ff=ff, **kw)


PRESETS: dict[str, dict[str, Any]] = {
    # BERT and Google's BERT miniatures (Turc et al. 2019): heads = width / 64.
    'bert-tiny': _bert(2, 128),
    'bert-mini': _bert(4, 256),
    'bert-small': _bert(4, 512),
    'bert-base': _bert(12, 768),
    'roberta-base': dict(_bert(12, 768), vocab_size=50265, max_len=514, type_vocab_size=1, norm_eps=1e-5, pad_id=1),
    'gpt2-tiny': _gpt2(2, 128, 2),
    'gpt2-small': _gpt2(12, 768, 12),
    'llama-tiny': _llama(2, 128, 4, 2, 344),
    # SmolLM2-135M's exact shape (HuggingFaceTB/SmolLM2-135M config.json).
    'smollm2-135m': _llama(30, 576, 9, 3, 1536, vocab_size=49152, max_len=8192, rope_theta=100_000.0,
                           tie_embeddings=True, bos_id=1, eos_id=2, pad_id=2),
    't5-tiny': _t5(2, 128, 2, 512),
    't5-small': _t5(6, 512, 8, 2048),
    't5-v1_1-small': _t5(8, 512, 6, 1024, v11=True),
    # ELECTRA-small: discriminator and its 1/4-width generator share 128-wide embeddings.
    'electra-small-discriminator': _electra(256, 4, 1024),
    'electra-small-generator': _electra(64, 1, 256),
}


def register_preset(name: str, fields: dict[str, Any], *, replace: bool = False) -> None:
  """Adds a named architecture (ModelConfig fields) that configs and preset() then offer, e.g. a new family's sizes
  from its own config file; a name taken is an error unless replace=True."""
  if name in PRESETS and not replace:
    raise ValueError(f'model preset {name!r} is already registered; pick another name or pass replace=True.')
  ModelConfig(**fields)  # validated now, naming the field
  PRESETS[name] = dict(fields)


def preset(name: str, **overrides) -> ModelConfig:
  """A named preset, with fields overridden: preset('bert-tiny', vocab_size=1000)."""
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; known: {", ".join(sorted(PRESETS))}.')
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f'unknown ModelConfig field(s) {sorted(unknown)}; known: {sorted(fields)}.')
  return ModelConfig(**{**PRESETS[name], **overrides})


def set_fields(overrides) -> dict[str, Any]:
  """A mapping of ModelConfig fields (config.model.overrides, a dict or ConfigDict) -> the fields it sets.

  None means "not set": a config lists every field with None so each can be overridden from the command line.
  """
  return {k: v for k, v in dict(overrides or {}).items() if v is not None}
