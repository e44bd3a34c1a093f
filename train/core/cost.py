"""The analytic cost of training one configuration, without tracing or compiling it: the exact parameter count, the
FLOPs of one optimizer step and the bytes each device holds, from a ModelConfig, the heads, the batch, the mesh and what
trains. `estimate(...)` takes those directly and `of_config(config)` resolves them from a full lmlab config as the
trainer would; `calibrate()` measures this machine's FLOP/s, `predict_seconds` turns a Cost into a step time and
`check_fits` refuses a run that does not fit a device, naming the numbers and the fix. FLOPs are counted the way XLA's
cost analysis counts the trainer's compiled step: 2*M*N*K per matmul forward and, backward, one more such matmul per
operand that carries a gradient (so a frozen backbone runs forward only, as train/core/steps.py differentiates only the
trained leaves); the full TxS attention even when causal; the MLM head at its gathered positions only; and per-element
costs of activations, norms, softmax, dropout's random bits and the optimizer update, as XLA's CPU cost analysis counts
them. Memory is the params, the gradients and optimizer state of the trained leaves, and the activations saved for the
backward pass: per layer what jax.linearize keeps of model/layers.py's Block (without remat, under scan) or what the
remat policy keeps, plus one layer's working set; each divided over the mesh as train/core/partitioning.py's rules shard it.

The leaves are counted in params.py, the step's FLOPs and saved residuals in flops.py.

Letters: B batch, T length (U decoder length and S source length of an encoder-decoder), D model width, E embedding
width, N heads, K kv heads, H head dim, F MLP width, V vocab, P MLM predictions per row, L layers, C labels, R LoRA rank.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax

from model.config import REMAT_POLICIES, ModelConfig

from train.core.flops import _Count, _electra_flops, _language_model_flops
from train.core.params import param_shapes  # noqa: F401  (the public count, callers read it here)
from train.core.params import Leaves, Trainable, _Leaf, _leaves, _model, _Model, _trains

MiB = 2**20

# Update FLOPs per trained parameter: the optimizer's core, clipping, weight decay, and the step's own finite check
# (the gradient norm; the update then runs in one branch of a cond); frozen leaves cost their zero gradient's norm.
_UPDATE = {'adamw': 13, 'adafactor': 18, 'sgd': 1}
_CLIP, _DECAY, _MOMENTUM, _STEP_CHECK, _FROZEN = 4, 3, 2, 2, 2


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


# ---------------------------------------------------------------------------------------- optimizer and mesh


def _optimizer(optimizer: Union[str, Mapping[str, Any]]) -> dict[str, Any]:
  """config.optim (or just the optimizer's name) over train/core/optim.py's defaults."""
  from train.core import optim  # pylint: disable=g-import-not-at-top
  given = {'optimizer': optimizer} if isinstance(optimizer, str) else dict(optimizer.items())
  c = {**optim.default_config().to_dict(), **given}
  if c['optimizer'] not in _UPDATE:
    raise ValueError(f'optimizer={c["optimizer"]!r}: the cost model knows {sorted(_UPDATE)} (train/core/optim.py).')
  if int(c['grad_accum_steps']) < 1:
    raise ValueError(f'optimizer grad_accum_steps={c["grad_accum_steps"]}: must be an integer >= 1.')
  return c


def _opt_state_leaves(leaf: _Leaf, opt: Mapping[str, Any]) -> list[tuple[int, bool]]:
  """(elements, sharded like the param) of each optimizer-state array one trained leaf gets (train/core/optim.py's chain:
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
  """Into how many pieces the sharding rules cut this parameter (train/core/partitioning.py param_shardings)."""
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
  (data, fsdp, tensor) sizes; rules: logical-axis rules (train/core/partitioning.py DEFAULT_RULES). remat_policy: None
  keeps model_cfg's. optimizer: a name or config.optim (its optimizer, clip_norm, weight_decay, momentum,
  adafactor_momentum and grad_accum_steps are read: an optimizer step is grad_accum_steps calls). model_kw:
  LanguageModel's num_labels, num_tags, classifier_pooling, backbone_deterministic, soft_prompt_length.
  """
  from train.core import partitioning as part  # pylint: disable=g-import-not-at-top
  policy = model_cfg.remat_policy if remat_policy is None else remat_policy
  if policy != 'auto' and policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={policy!r}: must be 'auto' or one of {tuple(REMAT_POLICIES)}.")
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


def _lengths(config, model: _Model) -> dict[str, int]:
  """seq_len, targets_len and max_predictions of the batches config's example builder makes (train/tasks/)."""
  from train.data import examples  # pylint: disable=g-import-not-at-top
  data, objectives = config.data, dict(config.objectives)
  seq_len, targets = int(data.seq_len), int(data.get('targets_len') or 0)
  if model.cfg.arch == 'encoder_decoder' and not targets:
    targets = examples.span_corruption_lengths(seq_len)[1] if 'span' in objectives else seq_len
  masked = model.generator is not None or 'mlm' in model.heads
  predictions = int(data.get('max_predictions') or 0) or examples.default_max_predictions(
      seq_len, float(data.get('mask_rate', 0.15)))
  return dict(seq_len=seq_len, targets_len=targets, max_predictions=predictions if masked else 0)


def of_config(config, *, num_devices: Optional[int] = None) -> Cost:
  """The Cost of the run a full lmlab config describes (configs/bert.py, gpt.py, t5.py, electra.py, finetune.py, ...).

  The model is what train/core/trainer.py builds, through train/core/resolve.py: the preset with its overrides, or
  the init_from checkpoint's architecture read from its config file only (checkpoint_model_cfg), with the vocabulary
  of config.data.vocab_size or of the tokenizer at config.data.tokenizer_path, and build_model's heads, label and tag
  counts (from config.data.label_names / tag_names, which a run reads from its training file: 2 when the config leaves
  them empty). What trains follows
  config.finetune.strategy (train/finetune/strategies.py) and config.optim.trainable / frozen; lengths come from config.data;
  the mesh is config.mesh.shape over num_devices (default: this process's jax.device_count()). No data is read and
  no tokenizer trained. Prompt-based classification (config.finetune.prompt) is refused with a ValueError.
  """
  from train.core import partitioning as part  # pylint: disable=g-import-not-at-top
  from train.core import resolve  # pylint: disable=g-import-not-at-top
  from train.finetune import strategies  # pylint: disable=g-import-not-at-top
  if resolve.prompting(config):
    raise ValueError('config.finetune.prompt: prompt-based classification (G template rows per example) is not '
                     "modelled; estimate() the MLM or LM head it reads, or set config.finetune.prompt=False.")
  init = config.model.get('init_from')
  model_cfg = resolve.model_config_of(config, init_cfg=resolve.checkpoint_model_cfg(init) if init else None)
  task = resolve.record(config)
  ft = config.get('finetune') or {}
  if task.kind == 'task' and ft.get('strategy'):  # a run's own saved config already holds the strategy's patterns
    patterns = strategies.trainable_patterns(ft.strategy, resolve.heads(config, model_cfg.arch),
                                             train_pooler=bool(ft.get('train_pooler', False)))
    if tuple(config.optim.get('trainable') or ()) != patterns:
      config = resolve.with_strategy(config, model_cfg.arch)
  built = resolve.build_model(config, model_cfg)
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


def check_config(config, *, num_devices: Optional[int] = None, log=print) -> None:
  """train.prepare's check: a run whose estimate does not fit a device's memory is refused with its numbers before
  anything is built (config.train.memory_check=False trusts the run instead). Prompt-based runs, GGUF starting
  points and models the cost model does not cover go unchecked (the last with a log line)."""
  if not config.train.get('memory_check', True) or bool((config.get('finetune') or {}).get('prompt')):
    return
  if str(config.model.get('init_from') or '').endswith('.gguf'):
    return
  try:
    estimate_ = of_config(config, num_devices=num_devices)
  except Exception as e:  # pylint: disable=broad-except  (a model the cost model does not cover: run unchecked)
    log(f'memory check skipped: the cost model does not cover this run ({type(e).__name__}: {e})')
    return
  try:
    check_fits(estimate_)
  except ValueError as e:
    raise ValueError(f'{e} (config.train.memory_check=False skips this check)') from None


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
