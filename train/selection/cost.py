"""The analytic cost of training one configuration, without tracing or compiling it: the exact parameter count, the
FLOPs of one optimizer step and the bytes each device holds, from a ModelConfig, the heads, the batch, the mesh and what
trains. `estimate(...)` takes those directly and `of_config(config)` resolves them from a full lmlab config as the
trainer would; `calibrate()` measures this machine's FLOP/s, `predict_seconds` turns a Cost into a step time and
`check_fits` refuses a run that does not fit a device, naming the numbers and the fix. FLOPs are counted the way XLA's
cost analysis counts the trainer's compiled step: 2*M*N*K per matmul forward and, backward, one more such matmul per
operand that carries a gradient (so a frozen backbone runs forward only, as train/steps.py differentiates only the
trained leaves); the full TxS attention even when causal; the MLM head at its gathered positions only; and per-element
costs of activations, norms, softmax, dropout's random bits and the optimizer update, as XLA's CPU cost analysis counts
them. Memory is the params, the gradients and optimizer state of the trained leaves, and the activations saved for the
backward pass: per layer what jax.linearize keeps of model/layers.py's Block (without remat, under scan) or what the
remat policy keeps, plus one layer's working set; each divided over the mesh as train/partitioning.py's rules shard it.

Letters: B batch, T length (U decoder length and S source length of an encoder-decoder), D model width, E embedding
width, N heads, K kv heads, H head dim, F MLP width, V vocab, P MLM predictions per row, L layers, C labels, R LoRA rank.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
import types
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from model import lora as lora_lib
from model import pytree
from model.config import REMAT_POLICIES, ModelConfig
from model.heads import HEADS

MiB = 2**20
_F32 = 4

# XLA's CPU cost analysis per element (forward, backward), measured on jitted value_and_grad of each function; the
# backward share is paid only where a gradient flows. 'dropout' is mostly its threefry random bits, 'sample' the
# Gumbel noise of ELECTRA's categorical draw, 'xent' log-softmax cross-entropy per logit, 'scatter' a gather's transpose.
_POINTWISE = {
    'gelu': (64, 13),
    'gelu_tanh': (8, 16),
    'relu': (1, 2),
    'silu': (4, 6),
    'tanh': (1, 4),
    'layernorm': (9, 12),
    'rmsnorm': (5, 6),
    'softmax': (7, 9),
    'dropout': (54, 2),
    'lora_dropout': (54, 54),  # XLA recomputes the mask where the backward needs the dropped input
    'sample': (56, 0),
    'xent': (6, 4),
    'add': (1, 0),
    'bias': (1, 1),
    'mul': (1, 2),
    'rope': (6, 6),
    'scatter': (0, 1),
}
# Update FLOPs per trained parameter: the optimizer's core, clipping, weight decay, and the step's own finite check
# (grad norm, keep-or-revert selects); frozen leaves cost a zero gradient and a select.
_UPDATE = {'adamw': 13, 'adafactor': 18, 'sgd': 1}
_CLIP, _DECAY, _MOMENTUM, _STEP_CHECK, _FROZEN = 4, 3, 2, 5, 2
# What the MLP keeps per hidden unit for its backward, in compute-dtype elements, input of `wo` included (wi's output
# and the activation's intermediates as jax differentiates them); relu keeps a 1-byte mask besides. Gated: +2.
_MLP_SAVED = {'gelu': 4, 'gelu_tanh': 6, 'silu': 4, 'relu': 1}
_LOGIT_COPIES = 2.5  # float32 copies of the logits a log-softmax cross-entropy keeps for its backward (XLA, measured)
# The peak of the backward pass holds, besides everything saved, a working set of about this share of one layer's
# residuals (scan without remat: XLA's buffers around the loop; with remat: the recomputed layer and its gradients),
# as measured against XLA's memory analysis of the train step on CPU.
_WORKING = {'none': 0.5, 'unrolled': 0.1, 'full': 1.3, 'dots': 1.0, 'dots_no_batch': 1.0}
# Unrolled layers (scan_layers=False) let XLA fuse some of those residuals into the backward's consumers instead.
_UNROLLED = 0.85


@dataclasses.dataclass(frozen=True)
class Cost:
  """What one optimizer step of a configuration costs. `bytes` are per device: 'params', 'grads', 'opt_state',
  'activations' (the backward pass's peak) and 'total'; `flops` splits flops_per_step into 'forward', 'backward' and
  'update'; `devices` is the mesh's size (flops_per_step is the whole global batch's, over all of them)."""
  params: int
  trainable_params: int
  flops_per_step: float
  tokens_per_step: int
  bytes: dict[str, float]
  devices: int = 1
  flops: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def flops_per_token(self) -> float:
    return self.flops_per_step / max(self.tokens_per_step, 1)

  def summary(self) -> str:
    """'1.23M params (0.10M trainable), 4.5 GFLOP/step, 120 MiB/device'."""
    return (f'{_count(self.params)} params ({_count(self.trainable_params)} trainable), '
            f'{_si(self.flops_per_step)}FLOP/step, {_mib(self.bytes["total"])} MiB/device')


def _count(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n >= 10_000 else str(n)


def _si(x: float) -> str:
  for i, unit in enumerate(('', 'K', 'M', 'G', 'T', 'P')):
    if abs(x) < 1000**(i + 1) or unit == 'P':
      return f'{x / 1000**i:.3g} {unit}'
  return f'{x:.3g} '


def _mib(n: float) -> str:
  return f'{n / MiB:.0f}' if n >= 10 * MiB else f'{n / MiB:.3g}'


# ------------------------------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class _Leaf:
  shape: tuple[int, ...]
  axes: tuple[Optional[str], ...]  # logical axis names, as model/layers.py's with_logical_partitioning gives them
  itemsize: int

  @property
  def size(self) -> int:
    return math.prod(self.shape)


Leaves = dict[str, _Leaf]  # '/'-joined path (model/pytree.py) -> leaf


def _dense(cfg: ModelConfig, path: str, ins: tuple, outs: tuple, in_axes: tuple, out_axes: tuple,
           use_bias: Optional[bool] = None) -> Leaves:
  """layers.Dense: kernel [*in,*out], bias [*out] (use_bias, default cfg.use_bias), LoRA A [*in,R] and B [R,*out]
  where cfg.lora_targets names the module."""
  it = cfg.jnp_param_dtype.itemsize
  out = {f'{path}/kernel': _Leaf(ins + outs, in_axes + out_axes, it)}
  if cfg.use_bias if use_bias is None else use_bias:
    out[f'{path}/bias'] = _Leaf(outs, out_axes, it)
  if cfg.lora_rank and lora_lib.is_target(path, cfg.lora_targets):
    out[f'{path}/lora_a'] = _Leaf(ins + (cfg.lora_rank,), in_axes + (None,), it)
    out[f'{path}/lora_b'] = _Leaf((cfg.lora_rank,) + outs, (None,) + out_axes, it)
  return out


def _norm(cfg: ModelConfig, path: str, width: int, axis: str = 'embed') -> Leaves:
  it = cfg.jnp_param_dtype.itemsize
  out = {f'{path}/scale': _Leaf((width,), (axis,), it)}
  if cfg.norm == 'layernorm':
    out[f'{path}/bias'] = _Leaf((width,), (axis,), it)
  return out


def _embeddings(cfg: ModelConfig, path: str) -> Leaves:
  e, it = cfg.embed_width, cfg.jnp_param_dtype.itemsize
  out = {f'{path}/token/embedding': _Leaf((cfg.vocab_size, e), ('vocab', 'embed'), it)}
  if cfg.position == 'learned':
    out[f'{path}/position/embedding'] = _Leaf((cfg.max_len, e), ('length', 'embed'), it)
  if cfg.type_vocab_size:
    out[f'{path}/token_type/embedding'] = _Leaf((cfg.type_vocab_size, e), (None, 'embed'), it)
  if cfg.embed_norm:
    out.update(_norm(cfg, f'{path}/norm', e))
  return out


def _attention(cfg: ModelConfig, path: str) -> Leaves:
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_width
  return {
      **_dense(cfg, f'{path}/query', (d,), (n, h), ('embed',), ('heads', 'kv')),
      **_dense(cfg, f'{path}/key', (d,), (k, h), ('embed',), ('kv_heads', 'kv')),
      **_dense(cfg, f'{path}/value', (d,), (k, h), ('embed',), ('kv_heads', 'kv')),
      **_dense(cfg, f'{path}/out', (n, h), (d,), ('heads', 'kv'), ('embed',)),
  }


def _block(cfg: ModelConfig, path: str, cross: bool) -> Leaves:
  out = {}
  for name in ('self_attn', 'cross_attn') if cross else ('self_attn',):
    out.update(_attention(cfg, f'{path}/{name}'))
    out.update(_norm(cfg, f'{path}/{name}_norm', cfg.d_model))
  for wi in ('wi_0', 'wi_1') if cfg.gated_mlp else ('wi',):
    out.update(_dense(cfg, f'{path}/mlp/{wi}', (cfg.d_model,), (cfg.d_ff,), ('embed',), ('mlp',)))
  out.update(_dense(cfg, f'{path}/mlp/wo', (cfg.d_ff,), (cfg.d_model,), ('mlp',), ('embed',)))
  out.update(_norm(cfg, f'{path}/mlp_norm', cfg.d_model))
  return out


def _stack(cfg: ModelConfig, path: str, num_layers: int, cross: bool = False) -> Leaves:
  """transformer.Stack: the relative-position table, the layers (scanned: one leaf [L, ...] each), the final norm."""
  out = {}
  if cfg.position == 'relative':
    out[f'{path}/relative_bias/rel_embedding'] = _Leaf((cfg.relative_buckets, cfg.num_heads), (None, 'heads'),
                                                       cfg.jnp_param_dtype.itemsize)
  if cfg.scan_layers:
    for p, leaf in _block(cfg, f'{path}/layers', cross).items():
      out[p] = _Leaf((num_layers,) + leaf.shape, ('layers',) + leaf.axes, leaf.itemsize)
  else:
    for i in range(num_layers):
      out.update(_block(cfg, f'{path}/layers_{i}', cross))
  if cfg.has_final_norm:
    out.update(_norm(cfg, f'{path}/final_norm', cfg.d_model))
  return out


def _encoder(cfg: ModelConfig, path: str) -> Leaves:
  out = {}
  if cfg.embed_width != cfg.d_model:
    out.update(_dense(cfg, f'{path}/embed_proj', (cfg.embed_width,), (cfg.d_model,), ('embed_in',), ('embed',), True))
  out.update(_stack(cfg, f'{path}/stack', cfg.num_layers))
  return out


def _backbone(cfg: ModelConfig) -> Leaves:
  if cfg.arch == 'encoder':
    return _encoder(cfg, 'transformer')
  if cfg.arch == 'decoder':
    return _stack(cfg, 'transformer/stack', cfg.num_layers)
  return {
      **_encoder(cfg, 'transformer/encoder'),
      **_stack(cfg, 'transformer/decoder/stack', cfg.decoder_layers, cross=True)
  }


def _mlm_head(cfg: ModelConfig, path: str) -> Leaves:
  return {
      **_dense(cfg, f'{path}/transform', (cfg.d_model,), (cfg.embed_width,), ('embed',), ('embed_in',), True),
      **_norm(cfg, f'{path}/norm', cfg.embed_width, 'embed_in'),
      f'{path}/bias': _Leaf((cfg.vocab_size,), ('vocab',), cfg.jnp_param_dtype.itemsize),
  }


def _rtd_head(cfg: ModelConfig, path: str) -> Leaves:
  return {
      **_dense(cfg, f'{path}/dense', (cfg.d_model,), (cfg.d_model,), ('embed',), ('mlp',), True),
      **_dense(cfg, f'{path}/out', (cfg.d_model,), (1,), ('mlp',), (None,), True),
  }


@dataclasses.dataclass(frozen=True)
class _Model:
  """What the trainer builds: heads.LanguageModel(cfg, heads, **its task arguments), or heads.Electra (generator)."""
  cfg: ModelConfig
  heads: tuple[str, ...]
  num_labels: int = 2
  num_tags: int = 2
  classifier_pooling: Optional[str] = None
  backbone_deterministic: bool = False
  soft_prompt_length: int = 0
  generator: Optional[ModelConfig] = None

  @property
  def pooling(self) -> str:
    return self.classifier_pooling or ('cls' if self.cfg.arch == 'encoder' else 'last')

  def builds(self, head: str) -> bool:
    """Whether LanguageModel.setup builds this head module (the pooler and the prompt head's MLM / LM included)."""
    h, arch = set(self.heads), self.cfg.arch
    return {
        'mlm': 'mlm' in h or ('prompt' in h and arch == 'encoder'),
        'lm': 'lm' in h or ('prompt' in h and arch == 'decoder'),
        'pooler': 'nsp' in h or ('classifier' in h and self.pooling == 'cls' and arch == 'encoder'),
    }.get(head, head in h)


def _model(cfg: ModelConfig, heads: Sequence[str], generator: Optional[ModelConfig], kw: Mapping[str, Any]) -> _Model:
  unknown = sorted(set(heads) - set(HEADS))
  if unknown:
    raise ValueError(f'heads {unknown} are unknown; known heads: {HEADS}.')
  fields = {f.name for f in dataclasses.fields(_Model)} - {'cfg', 'heads', 'generator'}
  if set(kw) - fields:
    raise ValueError(f'model_kw {sorted(set(kw) - fields)} are not LanguageModel task arguments; use {sorted(fields)}.')
  if 'prompt' in heads and cfg.arch == 'encoder_decoder':
    raise ValueError("heads=('prompt',) needs an encoder (MLM head) or a decoder (LM head), not an encoder-decoder.")
  if generator is not None:
    if tuple(heads) != ('rtd',):
      raise ValueError(f"generator_cfg is ELECTRA's generator: give heads=('rtd',), not {tuple(heads)}.")
    shared = lambda c: (c.vocab_size, c.embed_width, c.max_len)
    if shared(generator) != shared(cfg):
      raise ValueError(f'ELECTRA generator and discriminator must agree on vocab_size, embed_dim and max_len; got '
                       f'generator {shared(generator)}, discriminator {shared(cfg)}.')
  return _Model(cfg, tuple(heads), generator=generator, **kw)


def _leaves(m: _Model) -> Leaves:
  cfg, it = m.cfg, m.cfg.jnp_param_dtype.itemsize
  if m.generator is not None:  # heads.Electra
    return {
        **_embeddings(cfg, 'embed'),
        **_encoder(m.generator, 'generator'),
        **_mlm_head(m.generator, 'mlm'),
        **_encoder(cfg, 'discriminator'),
        **_rtd_head(cfg, 'rtd')
    }
  d = cfg.d_model
  out = {'soft_prompt': _Leaf((m.soft_prompt_length, cfg.embed_width), (None, 'embed'), it)} if m.soft_prompt_length else {}
  out.update(_embeddings(cfg, 'embed'))
  out.update(_backbone(cfg))
  if m.builds('mlm'):
    out.update(_mlm_head(cfg, 'mlm'))
  if m.builds('pooler'):
    out.update(_dense(cfg, 'pooler/dense', (d,), (d,), ('embed',), ('mlp',), True))
  if m.builds('lm') and not cfg.tie_embeddings:
    out.update(_dense(cfg, 'lm/out', (d,), (cfg.vocab_size,), ('embed',), ('vocab',), False))
  if m.builds('rtd'):
    out.update(_rtd_head(cfg, 'rtd'))
  for head, width in (('nsp', 2), ('classifier', m.num_labels), ('tagger', m.num_tags), ('qa', 2)):
    if head in m.heads:
      out.update(_dense(cfg, head, (d,), (width,), ('embed',), (None,), True))
  return out


def param_shapes(model_cfg: ModelConfig, heads: Sequence[str], *, generator_cfg: Optional[ModelConfig] = None,
                 **model_kw) -> dict[str, tuple[int, ...]]:
  """Every parameter's '/'-joined path -> shape, as heads.LanguageModel(model_cfg, heads, **model_kw) (or, with
  generator_cfg, heads.Electra(generator_cfg, model_cfg)) creates them. model_kw: num_labels, num_tags,
  classifier_pooling, soft_prompt_length."""
  return {p: leaf.shape for p, leaf in _leaves(_model(model_cfg, heads, generator_cfg, model_kw)).items()}


# ---------------------------------------------------------------------------------------------------- trains


Trainable = Union[None, str, Sequence[str], Callable[[str], bool], Any]


def _trains(leaves: Leaves, trainable: Trainable, frozen: Sequence[str]) -> dict[str, bool]:
  """path -> whether the optimizer updates it. trainable: None (all), path patterns (train/optim.py trainable_mask:
  globs or regexes covering subtrees, with `frozen` patterns taken out), a callable(path) -> bool, or a bool pytree
  shaped like the params."""
  frozen = (frozen,) if isinstance(frozen, str) else tuple(frozen or ())
  if isinstance(trainable, str):
    trainable = (trainable,)
  if trainable is None or isinstance(trainable, (tuple, list)):
    if not trainable and not frozen:
      return {p: True for p in leaves}
    from train import optim  # pylint: disable=g-import-not-at-top
    tree = pytree.unflatten({p: jax.ShapeDtypeStruct(leaf.shape, jnp.float32) for p, leaf in leaves.items()})
    return {p: bool(t) for p, t in pytree.flatten(optim.trainable_mask(tree, trainable, frozen)).items()}
  if frozen:
    raise ValueError('frozen patterns go with trainable patterns (or None); fold them into the callable or pytree.')
  if callable(trainable):
    return {p: bool(trainable(p)) for p in leaves}
  flat = {pytree.path_str(kp): bool(v) for kp, v in jax.tree_util.tree_flatten_with_path(trainable)[0]}
  if set(flat) != set(leaves):
    odd = sorted(set(flat) ^ set(leaves))
    raise ValueError(f'trainable: a bool pytree must hold one flag per parameter; {len(odd)} paths differ, e.g. '
                     f'{", ".join(odd[:3])}; build it over the params (jax.tree.map) or pass patterns or a callable.')
  return flat


# ------------------------------------------------------------------------------------------ flops and residuals


class _Count:
  """One micro-step, op by op: FLOPs forward and backward, and the bytes saved for the backward pass.

  Every tensor is represented by a bool: whether it depends on a trained parameter. Only those carry gradients, so an
  op's backward costs one more matmul per such operand and nothing where none reaches (a frozen backbone runs forward
  only). Saved bytes are kept in two sums: along the residual stream (split over the batch axes of the mesh) and per
  head or MLP unit (split over the tensor axis as well).
  """

  def __init__(self, trains: Mapping[str, bool]):
    self.trains = trains
    self.forward = self.backward = 0.0
    self.matmuls = self.batched = 0.0  # forward FLOPs of all matmuls, and of the batched ones (QK^T, PV)
    self.saved = [0.0, 0.0]  # [residual stream, per head / MLP unit]
    self.working = (0.0, 0.0)  # the backward pass's working set: a share of the largest layer's residuals

  def param(self, path: str) -> bool:
    return self.trains[path]

  def matmul(self, flops: float, *grads: bool, batched: bool = False) -> bool:
    self.forward += flops
    self.matmuls += flops
    self.batched += flops * batched
    self.backward += flops * sum(map(bool, grads))
    return any(grads)

  def pointwise(self, elements: float, grad: bool, kind: str) -> bool:
    fwd, bwd = _POINTWISE[kind]
    self.forward += elements * fwd
    self.backward += elements * bwd if grad else 0.0
    return grad

  def work(self, residuals: tuple[float, float], share: float):
    if share * sum(residuals) > sum(self.working):
      self.working = (share * residuals[0], share * residuals[1])

  def save(self, grad: bool, stream: float, wide: float = 0.0):
    """Bytes the backward pass reads, kept only where a gradient flows back through them."""
    if grad:
      self.saved[0] += stream
      self.saved[1] += wide


def _dropout(c: _Count, elements: float, x: bool, rate: float, det: bool) -> bool:
  if rate > 0 and not det:
    c.pointwise(elements, x, 'dropout')
  return x


def _dense_flops(c: _Count, cfg: ModelConfig, path: str, x: bool, m: int, k: int, n: int,
                 use_bias: Optional[bool] = None, det: bool = True) -> bool:
  """m rows [m,k] through the Dense at path -> [m,n], its bias and LoRA adapter included (det=False: the adapter's
  input dropout runs, as in the blocks' projections); -> the output's flag."""
  y = c.matmul(2.0 * m * k * n, x, c.param(f'{path}/kernel'))
  if cfg.use_bias if use_bias is None else use_bias:
    y = c.pointwise(m * n, c.param(f'{path}/bias'), 'bias') or y
  if cfg.lora_rank and lora_lib.is_target(path, cfg.lora_targets):
    r = cfg.lora_rank
    a = c.param(f'{path}/lora_a')
    if cfg.lora_dropout and not det:
      c.pointwise(m * k, x or a, 'lora_dropout')
    xa = c.matmul(2.0 * m * k * r, x, a)
    xab = c.matmul(2.0 * m * r * n, xa, c.param(f'{path}/lora_b'))
    y = c.pointwise(2 * m * n, xab, 'mul') or y
  return y


def _norm_flops(c: _Count, cfg: ModelConfig, path: str, x: bool, m: int, width: int) -> bool:
  trained = c.param(f'{path}/scale') or (cfg.norm == 'layernorm' and c.param(f'{path}/bias'))
  return c.pointwise(m * width, x or trained, cfg.norm)


def _attention_flops(c: _Count, cfg: ModelConfig, path: str, x: bool, src: bool, b: int, t: int, s: int, *,
                     bias: Optional[bool], det: bool) -> bool:
  """Queries from x [B,T,D], keys and values from src [B,S,D] -> [B,T,D]: every one of the TxS scores is computed."""
  n, k, h, d = cfg.num_heads, cfg.kv_heads, cfg.head_width, cfg.d_model
  q = _dense_flops(c, cfg, f'{path}/query', x, b * t, d, n * h, det=det)  # [B,T,N,H]
  key = _dense_flops(c, cfg, f'{path}/key', src, b * s, d, k * h, det=det)  # [B,S,K,H]
  value = _dense_flops(c, cfg, f'{path}/value', src, b * s, d, k * h, det=det)
  if cfg.position == 'rope' and path.endswith('self_attn'):
    q, key = c.pointwise(b * t * n * h, q, 'rope'), c.pointwise(b * s * k * h, key, 'rope')
  pairs = b * n * t * s
  scores = c.matmul(2.0 * pairs * h, q, key, batched=True)  # [B,N,T,S]
  if bias is not None:
    scores = c.pointwise(pairs, bias, 'add') or scores
  probs = _dropout(c, pairs, c.pointwise(pairs, scores, 'softmax'), cfg.attention_dropout_rate, det)
  out = c.matmul(2.0 * pairs * h, probs, value, batched=True)  # [B,T,N,H]
  return _dense_flops(c, cfg, f'{path}/out', out, b * t, n * h, d, det=det)


def _mlp_flops(c: _Count, cfg: ModelConfig, path: str, x: bool, m: int, det: bool) -> bool:
  d, f = cfg.d_model, cfg.d_ff
  h = _dense_flops(c, cfg, f'{path}/wi_0' if cfg.gated_mlp else f'{path}/wi', x, m, d, f, det=det)
  h = c.pointwise(m * f, h, cfg.activation)
  if cfg.gated_mlp:
    gate = _dense_flops(c, cfg, f'{path}/wi_1', x, m, d, f, det=det)
    h = c.pointwise(m * f, h or gate, 'mul')
  h = _dropout(c, m * f, h, cfg.mlp_dropout_rate, det)
  return _dense_flops(c, cfg, f'{path}/wo', h, m, f, d, det=det)


def _block_saved(cfg: ModelConfig, b: int, t: int, s: int, *, cross: bool, det: bool,
                 policy: str) -> tuple[float, float]:
  """Bytes one Block keeps for its backward: (residual stream, per head / MLP unit). Without remat: what jax.linearize
  keeps of layers.Block (read off jax._src.ad_checkpoint.saved_residuals per component), less the zero broadcasts of
  dropout and relu, which XLA folds. With a remat policy: what the policy saves; the rest is recomputed."""
  a, d, f = cfg.jnp_dtype.itemsize, cfg.d_model, cfg.d_ff
  n, k, h, m = cfg.num_heads, cfg.kv_heads, cfg.head_width, b * t
  attns = 2 if cross else 1
  qkv = m * (n * h + 2 * k * h) + (m * n * h + b * s * 2 * k * h if cross else 0)  # [B,T,N,H] q, [B,S,K,H] k and v
  pv = attns * m * n * h  # each attention's output, the input of its `out` projection
  pairs = b * n * t * (t + (s if cross else 0))  # [B,N,T,S] scores of every attention
  if policy == 'full':
    return m * d * a, 0.0  # the layer's input
  if policy in ('dots', 'dots_no_batch'):  # the matmul outputs; 'dots' also the batched ones (PV and the scores)
    stream = m * d * a * (1 + attns + (not cfg.pre_norm))  # input, `out` projections (post-LN: `wo` too)
    wide = (qkv + m * f * (1 + cfg.gated_mlp)) * a
    return stream, wide + (pv * a + pairs * _F32 if policy == 'dots' else 0.0)
  drop = lambda rate: rate > 0 and not det
  norms = attns + 1
  inner = 3 if cfg.norm == 'layernorm' else 2  # layernorm: x - mean, normalized, scaled; rmsnorm: input, normalized
  # Each norm keeps `inner` float32 copies and its output (read by a matmul; post-LN: all but the last, and the
  # block's input instead), two float32 row statistics, and a 1-byte mask per residual dropout.
  stream = m * (d * _F32 * norms * (inner + 1) + norms * 2 * _F32 + d * norms * drop(cfg.dropout_rate))
  per_pair = 3 * _F32 + 1 + (_F32 + 1) * drop(cfg.attention_dropout_rate)  # mask, scores, exp, probs (+ dropout)
  wide = (qkv + pv) * a + pairs * per_pair + m * attns * 2 * n * _F32  # + the softmax's row statistics
  act = _MLP_SAVED[cfg.activation] + 2 * cfg.gated_mlp
  wide += m * f * (act * a + (cfg.activation == 'relu') + drop(cfg.mlp_dropout_rate))
  if cfg.position == 'rope':
    wide += m * 2 * h * _F32  # sin and cos, broadcast for queries and keys
  return stream, wide


def _forward_live(cfg: ModelConfig, b: int, t: int, s: int) -> tuple[float, float]:
  """What one layer's forward holds at once, saved or not (the peak of a frozen backbone): two float32 score-sized
  buffers or two hidden-sized ones, whichever is larger, beside two copies of the residual stream."""
  a, m = cfg.jnp_dtype.itemsize, b * t
  return 2.0 * m * cfg.d_model * a, 2.0 * max(b * cfg.num_heads * t * max(t, s) * _F32, m * cfg.d_ff * a)


def _block_flops(c: _Count, cfg: ModelConfig, path: str, x: bool, b: int, t: int, *, det: bool, policy: str,
                 bias: Optional[bool] = None, cross: Optional[tuple[bool, int]] = None) -> bool:
  """layers.Block on x [B,T,D] (cross: the encoder output's flag and its length S) -> the output's flag."""
  m, d = b * t, cfg.d_model
  before = (c.forward, c.matmuls, c.batched)

  def residual(x, fn, norm):
    if cfg.pre_norm:
      y = _dropout(c, m * d, fn(_norm_flops(c, cfg, f'{path}/{norm}', x, m, d)), cfg.dropout_rate, det)
      return c.pointwise(m * d, x or y, 'add')
    y = _dropout(c, m * d, fn(x), cfg.dropout_rate, det)
    return _norm_flops(c, cfg, f'{path}/{norm}', c.pointwise(m * d, x or y, 'add'), m, d)

  x = residual(x, lambda y: _attention_flops(c, cfg, f'{path}/self_attn', y, y, b, t, t, bias=bias, det=det),
               'self_attn_norm')
  if cross is not None:
    enc, s = cross
    x = residual(x, lambda y: _attention_flops(c, cfg, f'{path}/cross_attn', y, enc, b, t, s, bias=None, det=det),
                 'cross_attn_norm')
  x = residual(x, lambda y: _mlp_flops(c, cfg, f'{path}/mlp', y, m, det), 'mlp_norm')
  if x and policy != 'none':  # the backward pass first recomputes what the policy did not save
    fwd, mm, bmm = (now - then for now, then in zip((c.forward, c.matmuls, c.batched), before))
    # 'full' recomputes the whole forward but `wo`, whose output only the next layer reads (XLA drops it).
    c.backward += {'full': fwd - 2.0 * m * cfg.d_ff * d, 'dots': fwd - mm, 'dots_no_batch': fwd - mm + bmm}[policy]
  s = cross[1] if cross else 0
  saved = _block_saved(cfg, b, t, s, cross=cross is not None, det=det, policy=policy)
  share = 1.0 if cfg.scan_layers or policy != 'none' else _UNROLLED
  c.save(x, saved[0] * share, saved[1] * share)
  if x:  # a layer the backward pass goes through
    work = policy if policy != 'none' else 'none' if cfg.scan_layers else 'unrolled'
    c.work(_block_saved(cfg, b, t, s, cross=cross is not None, det=det, policy='none'), _WORKING[work])
  c.work(_forward_live(cfg, b, t, s), 1.0)
  return x


def _stack_flops(c: _Count, cfg: ModelConfig, path: str, x: bool, b: int, t: int, layers: int, *, det: bool,
                 policy: str, cross: Optional[tuple[bool, int]] = None) -> bool:
  """transformer.Stack: every layer (scanned or unrolled), the position bias computed once, the final norm."""
  bias = None
  if cfg.position == 'relative':
    bias = c.param(f'{path}/relative_bias/rel_embedding')
    c.save(x or bias, 0.0, b * cfg.num_heads * t * t * _F32)  # the [B,N,T,T] bias, broadcast into every layer
  if cross is not None:
    c.save(x or cross[0], b * cross[1] * cfg.d_model * cfg.jnp_dtype.itemsize)  # the encoder output each layer reads
  for i in range(layers):
    layer = f'{path}/layers' if cfg.scan_layers else f'{path}/layers_{i}'
    x = _block_flops(c, cfg, layer, x, b, t, det=det, policy=policy, bias=bias, cross=cross)
  if cfg.has_final_norm:
    x = _dropout(c, b * t * cfg.d_model, _norm_flops(c, cfg, f'{path}/final_norm', x, b * t, cfg.d_model),
                 cfg.dropout_rate, det)
    c.save(x, b * t * cfg.d_model * _F32 * 4)
  return x


def _embed_flops(c: _Count, cfg: ModelConfig, b: int, t: int, *, det: bool, soft_prompt: bool = False) -> bool:
  """Embeddings (module path 'embed'): token (+ position, token type, soft prompt) (+ norm), dropout -> [B,T,E]."""
  m, e = b * t, cfg.embed_width
  x = c.pointwise(m * e, c.param('embed/token/embedding'), 'scatter')
  for part in ('position', 'token_type'):
    if f'embed/{part}/embedding' in c.trains:
      x = c.pointwise(m * e, c.pointwise(m * e, c.param(f'embed/{part}/embedding'), 'scatter'), 'add') or x
  if cfg.position == 'sinusoidal':
    x = c.pointwise(m * e, x, 'add')
  if soft_prompt:
    x = c.pointwise(m * e, c.param('soft_prompt'), 'add') or x
  if cfg.embed_norm:
    x = _norm_flops(c, cfg, 'embed/norm', x, m, e)
    c.save(x, m * e * _F32 * 4)
  c.save(x, m * e * (cfg.dropout_rate > 0 and not det))  # the dropout's 1-byte mask
  return _dropout(c, m * e, x, cfg.dropout_rate, det)


def _encoder_flops(c: _Count, cfg: ModelConfig, path: str, x: bool, b: int, t: int, *, det: bool, policy: str) -> bool:
  if cfg.embed_width != cfg.d_model:
    c.save(x, b * t * cfg.embed_width * cfg.jnp_dtype.itemsize)
    x = _dense_flops(c, cfg, f'{path}/embed_proj', x, b * t, cfg.embed_width, cfg.d_model, True)
  return _stack_flops(c, cfg, f'{path}/stack', x, b, t, cfg.num_layers, det=det, policy=policy)


def _logits_flops(c: _Count, cfg: ModelConfig, x: bool, rows: int, width: int, path: Optional[str] = None) -> bool:
  """[rows,width] against the tied embedding table (path None) or the kernel at path -> [rows,V], and its loss."""
  v = cfg.vocab_size
  if path is None:
    logits = c.matmul(2.0 * rows * width * v, x, c.param('embed/token/embedding'))
  else:
    logits = _dense_flops(c, cfg, path, x, rows, width, v, use_bias=False)
  c.pointwise(rows * v, logits, 'xent')
  c.save(logits, rows * width * cfg.jnp_dtype.itemsize, rows * v * _F32 * _LOGIT_COPIES)
  return logits


def _mlm_flops(c: _Count, cfg: ModelConfig, path: str, x: bool, rows: int) -> bool:
  """MLMHead at `rows` positions: transform, activation, norm, tied logits + bias, and the loss."""
  e = cfg.embed_width
  x = c.pointwise(rows * e, _dense_flops(c, cfg, f'{path}/transform', x, rows, cfg.d_model, e, True), cfg.activation)
  x = _norm_flops(c, cfg, f'{path}/norm', x, rows, e)
  c.save(x, rows * e * _F32 * 8)
  c.pointwise(rows * cfg.vocab_size, c.param(f'{path}/bias'), 'bias')
  return _logits_flops(c, cfg, x or c.param(f'{path}/bias'), rows, e)


def _head_flops(c: _Count, m: _Model, h: bool, b: int, t: int, p: int) -> None:
  """Every head of the LanguageModel on the final hidden states [B,T,D] (MLM at P gathered positions when p > 0)."""
  cfg, d = m.cfg, m.cfg.d_model
  if m.builds('mlm'):
    _mlm_flops(c, cfg, 'mlm', h, b * (p or t))
  pooled = h
  if m.builds('pooler'):
    pooled = c.pointwise(b * d, _dense_flops(c, cfg, 'pooler/dense', h, b, d, d, True), 'tanh')
  if 'nsp' in m.heads:
    c.pointwise(b * 2, _dense_flops(c, cfg, 'nsp', pooled, b, d, 2, True), 'xent')
  if m.builds('lm'):
    x = c.pointwise(b * t * d, h, 'mul') if cfg.tie_embeddings and cfg.scale_tied_logits else h
    _logits_flops(c, cfg, x, b * t, d, None if cfg.tie_embeddings else 'lm/out')
  if m.builds('rtd'):
    r = c.pointwise(b * t * d, _dense_flops(c, cfg, 'rtd/dense', h, b * t, d, d, True), cfg.activation)
    c.pointwise(b * t, _dense_flops(c, cfg, 'rtd/out', r, b * t, d, 1, True), 'xent')
    c.save(r, b * t * d * cfg.jnp_dtype.itemsize * 3)
  if 'classifier' in m.heads:
    if not (m.builds('pooler') and m.pooling == 'cls'):
      pooled = c.pointwise(b * t * d, h, 'add') if m.pooling == 'mean' else h
    pooled = _dropout(c, b * d, pooled, cfg.dropout_rate, False)
    c.pointwise(b * m.num_labels, _dense_flops(c, cfg, 'classifier', pooled, b, d, m.num_labels, True), 'xent')
  for head, width in (('tagger', m.num_tags), ('qa', 2)):
    if head in m.heads:
      x = _dropout(c, b * t * d, h, cfg.dropout_rate, False) if head == 'tagger' else h
      c.pointwise(b * t * width, _dense_flops(c, cfg, head, x, b * t, d, width, True), 'xent')


def _language_model_flops(c: _Count, m: _Model, b: int, t: int, u: int, p: int, policy: str) -> None:
  """LanguageModel's training forward on a batch of B rows (T tokens; an encoder-decoder reads S=T, writes U=u)."""
  cfg, det = m.cfg, m.backbone_deterministic
  x = _embed_flops(c, cfg, b, t, det=det, soft_prompt=bool(m.soft_prompt_length))
  if cfg.arch == 'encoder':
    h = _encoder_flops(c, cfg, 'transformer', x, b, t, det=det, policy=policy)
  elif cfg.arch == 'decoder':
    h = _stack_flops(c, cfg, 'transformer/stack', x, b, t, cfg.num_layers, det=det, policy=policy)
  else:
    enc = _encoder_flops(c, cfg, 'transformer/encoder', x, b, t, det=det, policy=policy)
    y = _embed_flops(c, cfg, b, u, det=det)
    h = _stack_flops(c, cfg, 'transformer/decoder/stack', y, b, u, cfg.decoder_layers, det=det, policy=policy,
                     cross=(enc, t))
    t = u
  _head_flops(c, m, h, b, t, p)


def _electra_flops(c: _Count, m: _Model, b: int, t: int, p: int, policy: str) -> None:
  """train/objectives.py electra_loss: the generator's MLM at P positions, a sampled replacement per position
  (stop-gradient), the discriminator on the corrupted rows and its per-token logit."""
  g, d = m.generator, m.cfg
  x = _embed_flops(c, d, b, t, det=False)
  h = _encoder_flops(c, g, 'generator', x, b, t, det=False, policy=policy)
  _mlm_flops(c, g, 'mlm', h, b * p)
  c.pointwise(b * p * d.vocab_size, False, 'sample')
  x = _embed_flops(c, d, b, t, det=False)
  h = _encoder_flops(c, d, 'discriminator', x, b, t, det=False, policy=policy)
  r = c.pointwise(b * t * d.d_model, _dense_flops(c, d, 'rtd/dense', h, b * t, d.d_model, d.d_model, True),
                  d.activation)
  c.pointwise(b * t, _dense_flops(c, d, 'rtd/out', r, b * t, d.d_model, 1, True), 'xent')


# ---------------------------------------------------------------------------------------- optimizer and mesh


def _optimizer(optimizer: Union[str, Mapping[str, Any]]) -> dict[str, Any]:
  """config.optim (or just the optimizer's name) over train/optim.py's defaults."""
  from train import optim  # pylint: disable=g-import-not-at-top
  given = {'optimizer': optimizer} if isinstance(optimizer, str) else dict(optimizer.items())
  c = {**optim.default_config().to_dict(), **given}
  if c['optimizer'] not in _UPDATE:
    raise ValueError(f'optimizer={c["optimizer"]!r}: the cost model knows {sorted(_UPDATE)} (train/optim.py).')
  if int(c['grad_accum_steps']) < 1:
    raise ValueError(f'optimizer grad_accum_steps={c["grad_accum_steps"]}: must be an integer >= 1.')
  return c


def _opt_state_leaves(leaf: _Leaf, opt: Mapping[str, Any]) -> list[tuple[int, bool]]:
  """(elements, sharded like the param) of each optimizer-state array one trained leaf gets (train/optim.py's chain:
  adam's two moments; adafactor's factored second moment, optax's rule, plus its momentum; sgd's trace)."""
  shape, out = leaf.shape, []
  if opt['optimizer'] == 'adamw':
    out += [(leaf.size, True)] * 2
  elif opt['optimizer'] == 'adafactor':
    order = sorted(range(len(shape)), key=lambda i: shape[i])
    if len(shape) >= 2 and shape[order[-2]] >= 128:  # optax factorized._factored_dims, min_dim_size_to_factor=128
      out += [(leaf.size // shape[order[-1]], False), (leaf.size // shape[order[-2]], False), (1, False)]
    else:
      out += [(1, False), (1, False), (leaf.size, True)]
    if opt['adafactor_momentum']:
      out.append((leaf.size, True))
  elif opt['momentum']:
    out.append((leaf.size, True))
  if int(opt['grad_accum_steps']) > 1:
    out.append((leaf.size, True))  # optax.MultiSteps' gradient accumulator
  return out


def _update_flops(opt: Mapping[str, Any], trained: int, frozen: int) -> float:
  per = _UPDATE[opt['optimizer']] + _STEP_CHECK + _CLIP * bool(opt['clip_norm']) + _DECAY * bool(opt['weight_decay'])
  per += _MOMENTUM * bool(opt['optimizer'] == 'sgd' and opt['momentum'])
  return float(per * trained + _FROZEN * frozen)


def _mesh_axes(name: Optional[str], rules, used: set) -> tuple[str, ...]:
  """flax's logical_to_mesh: the first rule for `name` whose mesh axes the leaf has not used yet (none: replicated)."""
  for logical, axes in rules:
    if logical != name or axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if not used & set(axes):
      return axes
  return ()


def _shards(path: str, leaf: _Leaf, mesh: Mapping[str, int], rules) -> int:
  """Into how many pieces the sharding rules cut this parameter (train/partitioning.py param_shardings)."""
  used, pieces = set(), 1
  for dim, name in zip(leaf.shape, leaf.axes):
    axes = _mesh_axes(name, rules, used)
    size = math.prod(mesh[a] for a in axes)
    if dim % size:
      raise ValueError(f'parameter {path} has a dimension of {dim} sharded over mesh axes {axes} of size {size}, '
                       'which does not divide it; change mesh_shape (config.mesh.shape) or the rule for that axis.')
    used |= set(axes)
    pieces *= size
  return pieces


def _memory(leaves: Leaves, trains: Mapping[str, bool], opt, mesh: Mapping[str, int], rules,
            c: _Count) -> dict[str, float]:
  params = grads = opt_state = 0.0
  for path, leaf in leaves.items():
    pieces = _shards(path, leaf, mesh, rules)
    params += leaf.size * leaf.itemsize / pieces
    if trains[path]:
      grads += leaf.size * leaf.itemsize / pieces
      opt_state += sum(n * leaf.itemsize / (pieces if sharded else 1) for n, sharded in _opt_state_leaves(leaf, opt))
  dp = mesh['data'] * mesh['fsdp']
  activations = (c.saved[0] + c.working[0]) / dp + (c.saved[1] + c.working[1]) / (dp * mesh['tensor'])
  out = {'params': params, 'grads': grads, 'opt_state': opt_state, 'activations': activations}
  out['total'] = sum(out.values())
  return out


# ------------------------------------------------------------------------------------------------- estimate


def estimate(model_cfg: ModelConfig, *, heads: Sequence[str], batch_size: int, seq_len: int, targets_len: int = 0,
             max_predictions: int = 0, trainable: Trainable = None, frozen: Sequence[str] = (),
             mesh_shape: Sequence[int] = (1, 1, 1), remat_policy: Optional[str] = None,
             optimizer: Union[str, Mapping[str, Any]] = 'adamw', rules=None,
             generator_cfg: Optional[ModelConfig] = None, model_kw: Optional[Mapping[str, Any]] = None) -> Cost:
  """The Cost of training heads.LanguageModel(model_cfg, heads, **model_kw) (heads.Electra(generator_cfg, model_cfg)
  when generator_cfg is given, heads=('rtd',)) with the trainer's train step.

  batch_size: the global batch of one train-step call, seq_len its length (an encoder-decoder's input, targets_len its
  decoder length; 0: seq_len); max_predictions > 0: the MLM head runs at that many gathered positions per row.
  trainable/frozen: what the optimizer updates (see _trains; frozen leaves are not differentiated). mesh_shape:
  (data, fsdp, tensor) sizes; rules: logical-axis rules (train/partitioning.py DEFAULT_RULES). remat_policy: None
  keeps model_cfg's. optimizer: a name or config.optim (its optimizer, clip_norm, weight_decay, momentum,
  adafactor_momentum and grad_accum_steps are read: an optimizer step is grad_accum_steps calls). model_kw:
  LanguageModel's num_labels, num_tags, classifier_pooling, backbone_deterministic, soft_prompt_length.
  """
  from train import partitioning as part  # pylint: disable=g-import-not-at-top
  policy = model_cfg.remat_policy if remat_policy is None else remat_policy
  if policy not in REMAT_POLICIES:
    raise ValueError(f'remat_policy={policy!r}: must be one of {tuple(REMAT_POLICIES)}.')
  m = _model(model_cfg, heads, generator_cfg, dict(model_kw or {}))
  if 'prompt' in m.heads:
    raise ValueError("heads=('prompt',) (cloze / continuation examples of G rows each) is not modelled; estimate the "
                     "MLM ('mlm', max_predictions=masks) or LM ('lm') head it reads instead.")
  mesh = dict(zip(part.MESH_AXES, (int(s) for s in mesh_shape)))
  if len(tuple(mesh_shape)) != len(part.MESH_AXES) or min(mesh.values()) < 1:
    raise ValueError(f'mesh_shape={tuple(mesh_shape)}: give positive (data, fsdp, tensor) sizes, e.g. (8, 1, 1).')
  dp = mesh['data'] * mesh['fsdp']
  if batch_size <= 0 or seq_len <= 0 or batch_size % dp:
    raise ValueError(f'batch_size={batch_size}, seq_len={seq_len}: both must be positive and batch_size a multiple of '
                     f'the data-parallel degree {dp} (mesh data x fsdp); use a multiple of {dp}.')
  opt = _optimizer(optimizer)
  leaves = _leaves(m)
  trains = _trains(leaves, trainable, frozen)
  c = _Count(trains)
  u = targets_len or seq_len
  if m.generator is not None:
    _electra_flops(c, m, batch_size, seq_len, max_predictions or seq_len, policy)
  else:
    _language_model_flops(c, m, batch_size, seq_len, u, max_predictions, policy)
  accum = int(opt['grad_accum_steps'])
  n_train = sum(leaf.size for p, leaf in leaves.items() if trains[p])
  n_all = sum(leaf.size for leaf in leaves.values())
  flops = {'forward': c.forward * accum, 'backward': c.backward * accum,
           'update': _update_flops(opt, n_train, n_all - n_train)}
  tokens = batch_size * (seq_len + (u if model_cfg.arch == 'encoder_decoder' else 0)) * accum
  return Cost(params=n_all, trainable_params=n_train, flops_per_step=sum(flops.values()), tokens_per_step=tokens,
              bytes=_memory(leaves, trains, opt, mesh, rules or part.DEFAULT_RULES, c), devices=math.prod(mesh.values()),
              flops=flops)


# ------------------------------------------------------------------------------------------------ of_config


def _checkpoint_model_cfg(path: str) -> ModelConfig:
  """The ModelConfig train/pretrained.py's load(path) would give, read from the checkpoint's config file alone.

  An lmlab run's config.json, a converted directory's lmlab_model.json, a Hugging Face directory's config.json (the
  ties of LM heads as it declares them with tie_word_embeddings; the importer reads them off the weights). A GGUF
  file's architecture sits behind its whole tokenizer table and tensor index, so it is refused (ValueError)."""
  from model import convert  # pylint: disable=g-import-not-at-top
  from model.convert import hf_layouts as layouts  # pylint: disable=g-import-not-at-top
  kind = convert.checkpoint_kind(path)
  if kind == 'lmlab-run':
    with open(os.path.join(path, 'config.json')) as f:
      return ModelConfig(**json.load(f)['model'])
  if kind == 'converted':
    with open(os.path.join(path, convert.CONFIG_FILE)) as f:
      return ModelConfig(**json.load(f)['model_config']).replace(scan_layers=True)
  if kind == 'gguf':
    raise ValueError(f'config.model.init_from={path}: the cost model reads a checkpoint\'s config only, and a GGUF '
                     'file\'s lies behind its tokenizer and tensor tables; convert it once (python -m model.convert '
                     'import --from=FILE --to=DIR) and set init_from=DIR, or call estimate() with its ModelConfig.')
  where = os.path.join(path, 'config.json')
  with open(where) as f:
    hf = json.load(f)
  family = layouts.model_family(hf, where)
  if family in ('bert', 'roberta', 'electra'):
    fields = layouts.bert_like_config(hf, family, where)
  elif family == 'gpt2':
    fields = layouts.gpt2_config(hf, where)
  elif family == 't5':
    fields = layouts.t5_config(hf, where, tied=bool(hf.get('tie_word_embeddings', True)))
  else:
    fields = layouts.llama_config(hf, where)
  return ModelConfig(**fields, scan_layers=True)


def _lengths(config, model: _Model) -> dict[str, int]:
  """seq_len, targets_len and max_predictions of the batches config's example builder makes (train/tasks.py)."""
  from train.data import examples  # pylint: disable=g-import-not-at-top
  data, objectives = config.data, dict(config.objectives)
  seq_len, targets = int(data.seq_len), int(data.get('targets_len') or 0)
  if model.cfg.arch == 'encoder_decoder' and not targets:
    targets = examples.span_corruption_lengths(seq_len)[1] if 'span' in objectives else seq_len
  masked = model.generator is not None or 'mlm' in model.heads
  predictions = int(data.get('max_predictions') or 0) or examples.default_max_predictions(
      seq_len, float(data.get('mask_rate', 0.15)))
  return dict(seq_len=seq_len, targets_len=targets, max_predictions=predictions if masked else 0)


def _tokenizer_stand_in(data):
  """What with_tokenizer reads of the run's tokenizer: a given one's vocabulary (loaded, it is small), else the size
  the run would train (config.data.vocab_size; the trained one may come out a little smaller on a small corpus)."""
  if data.get('tokenizer_path'):
    from train.data import tokenizers  # pylint: disable=g-import-not-at-top
    return tokenizers.Tokenizer.load(data.tokenizer_path)
  return types.SimpleNamespace(vocab_size=int(data.vocab_size), pad_id=None, eos_id=None, bos_id=None)


def of_config(config, *, num_devices: Optional[int] = None) -> Cost:
  """The Cost of the run a full lmlab config describes (configs/bert.py, gpt.py, t5.py, electra.py, finetune.py, ...).

  The model is what train/trainer.py builds: arch_config (preset + overrides, or the init_from checkpoint's
  architecture, read from its config file only: _checkpoint_model_cfg), with_tokenizer (config.data.vocab_size, or the
  tokenizer at config.data.tokenizer_path), tasks.build_model (heads, label and tag counts from config.data.label_names
  / tag_names, which a run reads from its training file: 2 when the config leaves them empty). What trains follows
  config.finetune.strategy (train/finetune.py) and config.optim.trainable / frozen; lengths come from config.data;
  the mesh is config.mesh.shape over num_devices (default: this process's jax.device_count()). No data is read and
  no tokenizer trained. Prompt-based classification (config.finetune.prompt) is refused with a ValueError.
  """
  from train import finetune, tasks, trainer  # pylint: disable=g-import-not-at-top
  from train import partitioning as part  # pylint: disable=g-import-not-at-top
  objectives = dict(config.objectives)
  task = tasks.task_of(config) or tasks.pretraining_task(objectives)
  if tasks.prompting(config):
    raise ValueError('config.finetune.prompt: prompt-based classification (G template rows per example) is not '
                     "modelled; estimate() the MLM or LM head it reads, or set config.finetune.prompt=False.")
  ft = config.get('finetune') or {}
  if task.kind == 'task' and ft.get('strategy'):  # a run's own saved config already holds the strategy's patterns
    patterns = finetune.trainable_patterns(ft.strategy, tasks.run_heads(config),
                                           train_pooler=bool(ft.get('train_pooler', False)))
    if tuple(config.optim.get('trainable') or ()) != patterns:
      config = finetune.apply_strategy(config, tasks.run_heads(config))
  init = config.model.get('init_from')
  init_cfg = _checkpoint_model_cfg(init) if init else None
  arch = trainer.arch_config(config, types.SimpleNamespace(cfg=init_cfg) if init_cfg else None)
  model_cfg = arch if init_cfg else trainer.with_tokenizer(arch, _tokenizer_stand_in(config.data),
                                                           config.model.overrides)
  built = tasks.build_model(config, model_cfg)
  if hasattr(built, 'generator_cfg'):
    m = _model(built.discriminator_cfg, ('rtd',), built.generator_cfg, {})
  else:
    kw = {f: getattr(built, f) for f in ('num_labels', 'num_tags', 'classifier_pooling', 'backbone_deterministic',
                                         'soft_prompt_length')}
    m = _model(model_cfg, built.heads, None, kw)
  mesh = part.resolve_mesh_shape(tuple(config.mesh.shape), num_devices or jax.device_count())
  rules = part.rules_from_config(config.mesh.rules) if config.mesh.get('rules') else None
  return estimate(m.cfg, heads=m.heads, batch_size=int(config.data.batch_size), **_lengths(config, m),
                  trainable=tuple(config.optim.get('trainable') or ()), frozen=tuple(config.optim.get('frozen') or ()),
                  mesh_shape=mesh, optimizer=config.optim, rules=rules, generator_cfg=m.generator,
                  model_kw={f.name: getattr(m, f.name) for f in dataclasses.fields(m)
                            if f.name not in ('cfg', 'heads', 'generator')})


# ------------------------------------------------------------------------------------------- time and memory


def calibrate(step: Optional[Callable[[], Any]] = None, *, flops: Optional[float] = None, size: int = 1024,
              dtype: str = 'float32', repeats: int = 5) -> float:
  """Achieved FLOP/s of one device, the median of `repeats` timed runs after a warm-up (compile) run.

  Without `step`: a jitted [size,size] @ [size,size] matmul in `dtype` on the default device (2*size^3 FLOPs each),
  the op a transformer's step is mostly made of. With `step`: a zero-argument callable that runs one train step and
  returns its outputs (the caller threads the state, e.g. `lambda: run.train_fn(state, batch)` with state kept
  between calls), with `flops` its FLOPs (compiled.cost_analysis()['flops'], or a Cost's flops_per_step / devices).
  """
  if step is None:
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    step, flops = (lambda: matmul(a)), 2.0 * size**3
  elif not flops or flops <= 0:
    raise ValueError('calibrate(step=...) needs flops=, the FLOPs of one call (compiled.cost_analysis()["flops"]).')
  jax.block_until_ready(step())
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  return float(flops) / max(statistics.median(times), 1e-12)


def predict_seconds(cost: Cost, flops_per_sec: float) -> float:
  """Seconds per optimizer step: the step's FLOPs spread over the mesh's devices, each at flops_per_sec
  (calibrate()'s); communication and input time are not counted."""
  if not flops_per_sec or flops_per_sec <= 0:
    raise ValueError(f'flops_per_sec={flops_per_sec!r}: give the achieved FLOP/s of one device, e.g. calibrate().')
  return cost.flops_per_step / (flops_per_sec * max(cost.devices, 1))


def device_memory() -> tuple[int, str]:
  """(bytes, where it came from): jax's memory_stats()['bytes_limit'] of this process's first device where it reports
  one (GPU, TPU; another host's devices cannot be asked), else this host's physical memory (os.sysconf), which CPU
  devices share."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except jax.errors.JaxRuntimeError:  # a backend that keeps no statistics
    stats = {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.device_kind} bytes_limit'
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'), 'host physical memory'


def check_fits(cost: Cost, *, device_bytes: Optional[int] = None) -> None:
  """Raises ValueError when cost.bytes['total'] exceeds one device's memory (device_bytes, default device_memory()),
  naming every component, the capacity and what to change."""
  capacity, where = (int(device_bytes), 'device_bytes') if device_bytes else device_memory()
  b = cost.bytes
  if b['total'] <= capacity:
    return
  parts = ', '.join(f'{k} {_mib(b[k])} MiB' for k in ('params', 'grads', 'opt_state', 'activations'))
  state = b['params'] + b['grads'] + b['opt_state']
  raise ValueError(f'the run needs an estimated {_mib(b["total"])} MiB per device ({parts}) but the device holds '
                   f'{_mib(capacity)} MiB ({where}). Activations ({_mib(b["activations"])} MiB) shrink with a smaller '
                   'config.data.batch_size (with optim.grad_accum_steps to keep the global batch) and with '
                   "config.model.overrides.remat_policy='full' (or 'dots'); params, grads and optimizer state "
                   f'({_mib(state)} MiB) divide over an fsdp mesh axis (config.mesh.shape=(1, -1, 1)), or train '
                   'fewer parameters (config.finetune.strategy=head or lora).')
