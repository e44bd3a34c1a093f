"""FLOPs and saved residuals of one train step, counted as XLA's cost analysis counts the compiled step: matmuls,
attention, per-element costs, forward always and backward only where a gradient flows (train/core/cost.py).

Letters: B batch, T length (S source), D model width, N heads, H head dim, F MLP width, V vocab, P MLM predictions.
"""
from __future__ import annotations

from typing import Mapping, Optional

from model import lora as lora_lib
from model.config import ModelConfig

from train.core.params import _F32, _Model

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
# What the MLP keeps per hidden unit for its backward, in compute-dtype elements, input of `wo` included (wi's output
# and the activation's intermediates as jax differentiates them); relu keeps a 1-byte mask besides. Gated: +2.
_MLP_SAVED = {'gelu': 4, 'gelu_tanh': 6, 'silu': 4, 'relu': 1}
_LOGIT_COPIES = 2.5  # float32 copies of the logits a log-softmax cross-entropy keeps for its backward (XLA, measured)
# The peak of the backward pass holds, besides everything saved, a working set of about this share of one layer's
# residuals (scan without remat: XLA's buffers around the loop; with remat: the recomputed layer and its gradients),
# as measured against XLA's memory analysis of the train step on CPU.
_WORKING = {'none': 0.5, 'unrolled': 0.1, 'full': 1.3, 'dots': 1.0, 'dots_no_batch': 1.0, 'projections': 0.75}
# Unrolled layers (scan_layers=False) let XLA fuse some of those residuals into the backward's consumers instead.
_UNROLLED = 0.85

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
  if out and _attention_vjp(cfg, det):  # attention's own VJP recomputes the scores from q and k
    c.backward += 2.0 * pairs * h
  return _dense_flops(c, cfg, f'{path}/out', out, b * t, n * h, d, det=det)


def _attention_vjp(cfg: ModelConfig, det: bool) -> bool:
  """Whether attention trains through model/attention.py's own VJP (keeps a log-sum-exp per row, recomputes the
  probabilities) rather than autodiff (kept [T,S] probabilities): all but the plain path with attention dropout."""
  return det or cfg.attention_dropout_rate == 0


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
  rows = attns * m * n * _F32  # a log-sum-exp per query row and head, kept by attention's own VJP
  if policy in ('dots', 'dots_no_batch', 'projections'):  # the matmul outputs ('dots': PV and the scores too)
    stream = m * d * a * (1 + attns + (not cfg.pre_norm))  # input, `out` projections (post-LN: `wo` too)
    wide = (qkv + m * f * (1 + cfg.gated_mlp)) * a
    if policy != 'projections':  # these cannot keep the MLP's input (`projection`'s own VJP hides its matmul), which
      # the backward recomputes; counting it here matches XLA's peak on CPU better than leaving it out (fitted)
      return stream, wide + (pv * a + pairs * _F32 if policy == 'dots' else 0.0)
    return stream, wide + (pv * a + rows if _attention_vjp(cfg, det) else 0.0)  # attention's output and lse
  drop = lambda rate: rate > 0 and not det
  norms = attns + 1
  inner = 3 if cfg.norm == 'layernorm' else 2  # layernorm: x - mean, normalized, scaled; rmsnorm: input, normalized
  # Each norm keeps `inner` float32 copies and its output (read by a matmul; post-LN: all but the last, and the
  # block's input instead), two float32 row statistics, and a 1-byte mask per residual dropout.
  stream = m * (d * _F32 * norms * (inner + 1) + norms * 2 * _F32 + d * norms * drop(cfg.dropout_rate))
  if _attention_vjp(cfg, det):  # q, k, v, the output and a log-sum-exp per row; the mask once per example
    wide = (qkv + pv) * a + rows + b * t * (t + (s if cross else 0))
  else:  # autodiff: mask, scores, exp, probs and the dropout mask per pair, and the softmax's row statistics
    wide = (qkv + pv) * a + pairs * (4 * _F32 + 2) + 2 * rows
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
                 bias: Optional[bool] = None, cross: Optional[tuple[bool, int]] = None, looped: bool = False) -> bool:
  """layers.Block on x [B,T,D] (cross: the encoder output's flag and its length S; looped: inside a scan loop)
  -> the output's flag."""
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
    if policy in ('dots', 'dots_no_batch'):  # they cannot keep the MLP's input matmul (see _block_saved)
      mm -= 2.0 * m * d * cfg.d_ff * (1 + cfg.gated_mlp)
    # 'full' recomputes the whole forward but `wo`, whose output only the next layer reads (XLA drops it).
    c.backward += {
        'full': fwd - 2.0 * m * cfg.d_ff * d,
        'dots': fwd - mm,
        'dots_no_batch': fwd - mm + bmm,
        'projections': fwd - mm
    }[policy]
  s = cross[1] if cross else 0
  saved = _block_saved(cfg, b, t, s, cross=cross is not None, det=det, policy=policy)
  share = 1.0 if looped or policy != 'none' else _UNROLLED
  c.save(x, saved[0] * share, saved[1] * share)
  if x:  # a layer the backward pass goes through
    work = policy if policy != 'none' else 'none' if looped else 'unrolled'
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
  # A scanned stack that runs all its layers in one iteration (ModelConfig.layers_per_iteration) is laid out as
  # unrolled layers are: no loop buffers.
  looped = cfg.scan_layers and cfg.layers_per_iteration(layers) < layers
  policy = cfg.remat_for(layers, policy)  # 'auto' -> what this stack runs with
  for i in range(layers):
    layer = f'{path}/layers' if cfg.scan_layers else f'{path}/layers_{i}'
    x = _block_flops(c, cfg, layer, x, b, t, det=det, policy=policy, bias=bias, cross=cross, looped=looped)
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
  """train/tasks/losses.py electra_loss: the generator's MLM at P positions, a sampled replacement per position
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
