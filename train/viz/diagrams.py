"""Pictures of the machinery, for the colabs and for anyone checking what a run sees: attention masks as [T, S]
grids, pre-training examples as rows of tokens coloured by their role (masked, replaced, predicted, ...), and how
an array is laid out over a device mesh.

The token roles are read off an example dict as the data pipeline builds it (the batch contract of
train/data/__init__.py), so the picture shows what the loss will see, not what a re-implementation thinks it sees.
Figures are made without pyplot, as train/viz/plots.py makes them: pass `ax` to draw into your own figure, `path` to
write a PNG.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence

import numpy as np

from train.viz.plots import new_axes, new_figure, save

# Role -> (fill colour, what it means), in legend order.
ROLES = {
    'context': ('#f2f2f2', 'input, not predicted'),
    'special': ('#bdbdbd', 'special token'),
    'pad': ('#ffffff', 'padding'),
    'segment_a': ('#a6cee3', 'segment A'),
    'segment_b': ('#cab2d6', 'segment B'),
    'masked': ('#fb8072', 'replaced by [MASK], predicted'),
    'random': ('#fdb462', 'replaced by a random token, predicted'),
    'kept': ('#ffffb3', 'kept as it was, predicted'),
    'target': ('#8dd3c7', 'target: the token the loss asks for'),
    'ignored': ('#e0e0e0', 'target with weight 0 (not trained on)'),
    'sentinel': ('#bebada', 'sentinel: stands for a dropped span'),
    'replaced': ('#e31a1c', 'replaced by a generator sample (label 1)'),
    'original': ('#b3de69', 'original token (label 0)'),
}
OBJECTIVES = ('mlm', 'nsp', 'clm', 'span', 'rtd')


@dataclasses.dataclass(frozen=True)
class TokenRow:
  """One row of a token picture: a label, the token strings and one ROLES key per token."""
  label: str
  tokens: tuple[str, ...]
  roles: tuple[str, ...]

  def __post_init__(self):
    if len(self.tokens) != len(self.roles):
      raise ValueError(f'row {self.label!r}: {len(self.tokens)} tokens but {len(self.roles)} roles.')
    unknown = sorted(set(self.roles) - set(ROLES))
    if unknown:
      raise ValueError(f'row {self.label!r}: unknown role(s) {unknown}; roles are {list(ROLES)}.')


def _text(tokenizer, i: int) -> str:
  s = tokenizer.id_to_token(int(i))
  s = '?' if s is None else s
  s = s.replace('\u0120', '_').replace('\u2581', '_').replace('\u010a', '\\n')
  return s.replace('<extra_id_', '<x') if s.startswith('<extra_id_') else s


def _strings(tokenizer, ids) -> tuple[str, ...]:
  return tuple(_text(tokenizer, i) for i in ids)


def _masked_roles(ex, tokenizer, n: int) -> tuple[list[str], list[str]]:
  """MLM inputs: each masked slot as [MASK] / random / kept; the targets row holds the original at those slots."""
  tokens, seg = np.asarray(ex['tokens'])[:n], np.asarray(ex['segment_ids'])[:n]
  special = set(np.asarray(tokenizer.special_ids).tolist())
  roles = ['pad' if s == 0 else 'special' if t in special else 'context' for t, s in zip(tokens, seg)]
  targets = [''] * n
  for p, orig, w in zip(ex['masked_positions'], ex['masked_ids'], ex['masked_weights']):
    if w <= 0 or p >= n:
      continue
    t = tokens[p]
    roles[p] = 'masked' if t == tokenizer.mask_id else 'kept' if t == orig else 'random'
    targets[p] = _text(tokenizer, orig)
  return roles, targets


def _mlm_rows(ex, tokenizer, n):
  roles, targets = _masked_roles(ex, tokenizer, n)
  return [
      TokenRow('input', _strings(tokenizer, ex['tokens'][:n]), tuple(roles)),
      TokenRow('MLM target', tuple(targets), tuple('target' if t else 'pad' for t in targets))
  ]


def _nsp_rows(ex, tokenizer, n):
  rows = _mlm_rows(ex, tokenizer, n)
  seg, tt = np.asarray(ex['segment_ids'])[:n], np.asarray(ex['token_type_ids'])[:n]
  label = 'B is random' if int(ex['nsp_labels']) else 'B follows A'
  ab = tuple('pad' if s == 0 else 'segment_b' if t else 'segment_a' for s, t in zip(seg, tt))
  return rows[:1] + [
      TokenRow(f'segments ({label})', tuple('B' if r == 'segment_b' else 'A' if r == 'segment_a' else '' for r in ab),
               ab)
  ] + rows[1:]


def _clm_rows(ex, tokenizer, n):
  seg, toks = np.asarray(ex['segment_ids'])[:n], np.asarray(ex['tokens'])[:n]
  special = set(np.asarray(tokenizer.special_ids).tolist())
  inp = tuple('pad' if s == 0 else 'special' if t in special else 'context' for t, s in zip(toks, seg))
  w = np.asarray(ex['weights'])[:n]
  tgt = tuple('ignored' if x <= 0 else 'target' for x in w)
  return [
      TokenRow('input', _strings(tokenizer, ex['tokens'][:n]), inp),
      TokenRow('target (next token)', _strings(tokenizer, ex['targets'][:n]), tgt)
  ]


def _span_rows(ex, tokenizer, n):
  sentinels = set(tokenizer.sentinel_ids)

  def roles(ids, seg, normal):
    return tuple('pad' if s == 0 else 'sentinel' if t in sentinels else 'special' if t == tokenizer.eos_id else normal
                 for t, s in zip(ids, seg))

  enc, enc_seg = np.asarray(ex['encoder_tokens'])[:n], np.asarray(ex['encoder_segment_ids'])[:n]
  dec, dec_seg = np.asarray(ex['decoder_targets'])[:n], np.asarray(ex['decoder_segment_ids'])[:n]
  return [
      TokenRow('encoder input', _strings(tokenizer, enc), roles(enc, enc_seg, 'context')),
      TokenRow('decoder target', _strings(tokenizer, dec), roles(dec, dec_seg, 'target'))
  ]


def _rtd_rows(ex, tokenizer, n, corrupted):
  if corrupted is None:
    raise ValueError("objective 'rtd': pass corrupted= (the discriminator's input: the generator's samples written at "
                     'the masked positions, objectives.scatter_at_positions).')
  rows = _mlm_rows(ex, tokenizer, n)
  original = np.asarray(ex['tokens'])[:n].copy()
  for p, orig, w in zip(ex['masked_positions'], ex['masked_ids'], ex['masked_weights']):
    if w > 0 and p < n:
      original[p] = orig
  corrupted, seg = np.asarray(corrupted)[:n], np.asarray(ex['segment_ids'])[:n]
  roles = tuple('pad' if s == 0 else 'replaced' if c != o else 'original' for c, o, s in zip(corrupted, original, seg))
  return [
      TokenRow('generator input', rows[0].tokens, rows[0].roles),
      TokenRow('discriminator input', _strings(tokenizer, corrupted), roles)
  ]


def example_rows(objective: str, example: Mapping[str, np.ndarray], tokenizer, *, row: int = 0,
                 limit: Optional[int] = None, corrupted=None) -> list[TokenRow]:
  """The rows that show one example of `objective` ('mlm', 'nsp', 'clm', 'span' or 'rtd'): its input tokens and what
  the loss predicts, each token with its role (ROLES). example: one example dict as the pipeline builds it, or a
  batch of them (then its `row`); tokenizer: the run's (train/data/tokenizers.py); limit: the first `limit`
  positions only; corrupted: for 'rtd', the discriminator's input ([T], or [B, T] with a batch)."""
  if objective not in OBJECTIVES:
    raise ValueError(f'objective {objective!r}: pictures are drawn for {", ".join(OBJECTIVES)}.')
  first = example.get('tokens', example.get('encoder_tokens'))
  if first is not None and np.ndim(first) == 2:  # a batch: its row
    example = {k: np.asarray(v)[row] for k, v in example.items()}
    corrupted = None if corrupted is None else np.asarray(corrupted)[row]
    first = example.get('tokens', example.get('encoder_tokens'))
  if first is None or np.ndim(first) != 1:
    raise ValueError(f"example: an example dict with 'tokens' (or 'encoder_tokens') [T], or a batch of them [B, T]; "
                     f'got keys {sorted(example)}{"" if first is None else f" and tokens of shape {np.shape(first)}"}.')
  n = len(first) if limit is None else min(int(limit), len(first))
  if objective == 'rtd':
    return _rtd_rows(example, tokenizer, n, corrupted)
  return {'mlm': _mlm_rows, 'nsp': _nsp_rows, 'clm': _clm_rows, 'span': _span_rows}[objective](example, tokenizer, n)


def wrap_rows(rows: Sequence[TokenRow], width: int) -> list[TokenRow]:
  """Long rows cut into blocks of `width` positions, every row's block k before block k + 1 (labels say where)."""
  length = max(len(r.tokens) for r in rows)
  if length <= width:
    return list(rows)
  out = []
  for start in range(0, length, width):
    for r in rows:
      sl = slice(start, start + width)
      if start >= len(r.tokens):
        continue
      out.append(TokenRow(f'{r.label} [{start}:{min(start + width, len(r.tokens))}]', r.tokens[sl], r.roles[sl]))
  return out


def plot_token_rows(rows: Sequence[TokenRow], *, title: str = '', ax=None, path: Optional[str] = None,
                    legend: bool = True, wrap: Optional[int] = None):
  """Draws rows of tokens as coloured boxes (one column per position, one line per row) -> the Axes; wrap: rows
  longer than that many positions continue in blocks below (wrap_rows). The legend names only the roles shown."""
  if not rows:
    raise ValueError('rows: nothing to draw; example_rows(objective, example, tokenizer) makes them.')
  rows = wrap_rows(rows, int(wrap)) if wrap else list(rows)
  width = max(len(r.tokens) for r in rows)
  ax = new_axes((max(6.0, 0.62 * width + 1.8), 0.62 * len(rows) + 1.3)) if ax is None else ax
  from matplotlib.patches import Patch, Rectangle
  for y, row in enumerate(rows):
    for x, (tok, role) in enumerate(zip(row.tokens, row.roles)):
      ax.add_patch(Rectangle((x, -y - 0.9), 0.96, 0.8, facecolor=ROLES[role][0], edgecolor='#777777', lw=0.5))
      if tok:
        ax.text(x + 0.48, -y - 0.5, tok if len(tok) <= 8 else tok[:7] + '…', ha='center', va='center',
                fontsize=6.5 if len(tok) > 5 else 7.5, color='#999999' if role == 'pad' else 'black')
  ax.set_xlim(-0.1, width + 0.1)
  ax.set_ylim(-len(rows) - 0.1, 0.1)
  ax.set_yticks([-y - 0.5 for y in range(len(rows))], [r.label for r in rows], fontsize=8)
  ax.set_xticks(range(0, width, 5), [str(i) for i in range(0, width, 5)], fontsize=7)
  ax.set_xlabel('position' + (' in the block' if wrap and len(rows) > 2 else ''), fontsize=8)
  for side in ('top', 'right', 'left'):
    ax.spines[side].set_visible(False)
  if title:
    ax.set_title(title, fontsize=10)
  used = [r for r in ROLES if any(r in row.roles for row in rows) and r not in ('pad',)]
  if legend and used:
    ax.legend([Patch(facecolor=ROLES[r][0], edgecolor='#777777') for r in used], [ROLES[r][1] for r in used],
              fontsize=7, loc='upper left', bbox_to_anchor=(1.0, 1.0), frameon=False)
  return save(ax, path)


# -------------------------------------------------------------------------------------------------------- masks


def plot_masks(masks: Mapping[str, np.ndarray], *, labels: Optional[Sequence[str]] = None, path: Optional[str] = None,
               figsize=None):
  """Boolean masks [T, S] (True: the query at row t may attend to the key at column s), one panel each -> the Figure.
  A mask of higher rank is squeezed ([1, 1, T, S], as model/attention.py returns it for one example). labels: a
  name per position (tokens or segment ids) for both axes."""
  if not masks:
    raise ValueError('masks: give at least one {name: [T, S] bool array}.')
  arrays = {}
  for name, m in masks.items():
    m = np.asarray(m)
    m = m.reshape(m.shape[-2:]) if m.ndim > 2 and math.prod(m.shape[:-2]) == 1 else m
    if m.ndim != 2:
      raise ValueError(f'masks[{name!r}]: shape {np.shape(masks[name])}; give [T, S] (or [1, 1, T, S]).')
    arrays[name] = m.astype(bool)
  n = len(arrays)
  fig = new_figure(figsize or (3.1 * n + 0.4, 3.6))
  axes = fig.subplots(1, n, squeeze=False)[0]
  for ax, (name, m) in zip(axes, arrays.items()):
    ax.imshow(m, cmap='Blues', vmin=-0.25, vmax=1.0, interpolation='nearest')
    t, s = m.shape
    ax.set_xticks(np.arange(s) - 0.5, minor=True)
    ax.set_yticks(np.arange(t) - 0.5, minor=True)
    ax.grid(which='minor', color='white', lw=0.8)
    ax.tick_params(which='minor', length=0)
    if labels is not None:
      ax.set_xticks(range(s), [str(x) for x in labels[:s]], rotation=90, fontsize=7)
      ax.set_yticks(range(t), [str(x) for x in labels[:t]], fontsize=7)
    ax.set_title(f'{name}\n({int(m.sum())} of {m.size} pairs attend)', fontsize=9)
    ax.set_xlabel('key', fontsize=8)
    ax.set_ylabel('query', fontsize=8)
  fig.tight_layout()
  save(fig, path)
  return fig


# --------------------------------------------------------------------------------------------------- sharding


def shard_blocks(shape: Sequence[int], sharding) -> dict[tuple[tuple[int, int], ...], list[int]]:
  """{((start, stop) per dim): [device ids holding that block]} for an array of `shape` laid out by `sharding` (a
  jax.sharding.Sharding): replicated blocks list every device that holds a copy."""
  blocks: dict[tuple[tuple[int, int], ...], list[int]] = {}
  for device, index in sharding.devices_indices_map(tuple(shape)).items():
    key = tuple((sl.start or 0, shape[d] if sl.stop is None else sl.stop) for d, sl in enumerate(index))
    blocks.setdefault(key, []).append(int(device.id))
  return {k: sorted(v) for k, v in sorted(blocks.items())}


def _last_two(shape, blocks):
  """Blocks of an array of rank > 2 whose leading dims are whole (a scanned layer stack): keyed by the last two."""
  out: dict[tuple, list[int]] = {}
  for block, devices in blocks.items():
    split = [d for d, (a, b) in enumerate(block[:-2]) if (a, b) != (0, shape[d])]
    if split:
      raise ValueError(f'shape {shape}: dim {split[0]} is split over devices; plot_layout draws the last two dims '
                       'of an array whose leading dims are whole.')
    out.setdefault(block[-2:], []).extend(devices)
  return {k: sorted(v) for k, v in out.items()}


def plot_layout(shape: Sequence[int], sharding, *, title: str = '', ax=None, path: Optional[str] = None):
  """Draws which device holds which block of an array of `shape` under `sharding` -> the Axes: one rectangle per
  block, labelled with its devices and coloured by the first of them. 1-D and 2-D arrays, and the last two dims of
  a bigger one whose leading dims are not split (a [layers, d_model, d_ff] stack)."""
  shape = tuple(int(d) for d in shape)
  if not shape:
    raise ValueError('shape (): a scalar lives whole on every device; plot_layout draws arrays.')
  blocks = shard_blocks(shape, sharding)
  blocks = _last_two(shape, blocks) if len(shape) > 2 else blocks
  ax = new_axes((4.2, 3.4)) if ax is None else ax
  from matplotlib.patches import Rectangle
  from matplotlib import colormaps
  colors = colormaps['tab10']
  rows, cols = (1, shape[0]) if len(shape) == 1 else shape[-2:]
  for block, devices in blocks.items():
    (r0, r1), (c0, c1) = ((0, 1), block[0]) if len(shape) == 1 else block
    ax.add_patch(
        Rectangle((c0, r0), c1 - c0, r1 - r0, facecolor=colors(devices[0] % 10), alpha=0.55, edgecolor='black', lw=1.0))
    name = ','.join(map(str, devices)) if len(devices) <= 4 else f'{devices[0]}..{devices[-1]} ({len(devices)})'
    ax.text((c0 + c1) / 2, (r0 + r1) / 2, f'dev {name}', ha='center', va='center', fontsize=7)
  ax.set_xlim(0, cols)
  ax.set_ylim(rows, 0)
  ax.set_xlabel(f'dim {len(shape) - 1} ({cols})', fontsize=8)
  ax.set_ylabel('' if len(shape) == 1 else f'dim {len(shape) - 2} ({rows})', fontsize=8)
  ax.tick_params(labelsize=7)
  if len(shape) == 1:
    ax.set_yticks([])
  spec = getattr(sharding, 'spec', None)
  ax.set_title(title + (f'\n{spec}' if spec is not None else ''), fontsize=8)
  return save(ax, path)
