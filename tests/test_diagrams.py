"""Pictures of the machinery (train/viz/diagrams.py): token roles read off examples as the pipeline builds them (MLM's
80/10/10 replacements, NSP segments, CLM targets with weight 0 at a document end, T5 sentinels, ELECTRA's replaced
tokens), the boxes drawn for them, attention masks as images, and which device holds which block of an array."""
import types

import jax.numpy as jnp
import numpy as np
import pytest

from model import attention
from train.viz import diagrams
from train.data import examples

VOCAB = ['[PAD]', '[CLS]', '[SEP]', '[MASK]', '</s>', '<extra_id_0>', '<extra_id_1>'] + [f'w{i}' for i in range(20)]
W = {w: i for i, w in enumerate(VOCAB)}


def _tokenizer():
  return types.SimpleNamespace(id_to_token=lambda i: VOCAB[i]
                               if 0 <= i < len(VOCAB) else None, special_ids=np.arange(7), mask_id=W['[MASK]'],
                               eos_id=W['</s>'], sentinel_ids=[W['<extra_id_0>'], W['<extra_id_1>']])


def _mlm_example():
  # [CLS] w0 [MASK] w9 w3 [SEP] [PAD] [PAD]: slot 2 was w1 (masked), slot 3 was w2 (random w9), slot 4 is w3 (kept).
  return {
      'tokens': np.array([1, 7, 3, 16, 10, 2, 0, 0]),
      'segment_ids': np.array([1, 1, 1, 1, 1, 1, 0, 0]),
      'token_type_ids': np.array([0, 0, 0, 1, 1, 1, 0, 0]),
      'masked_positions': np.array([2, 3, 4, 0]),
      'masked_ids': np.array([8, 9, 10, 0]),
      'masked_weights': np.array([1.0, 1.0, 1.0, 0.0]),
      'nsp_labels': np.int32(1),
  }


def test_mlm_and_nsp_roles():
  rows = diagrams.example_rows('nsp', _mlm_example(), _tokenizer())
  assert [r.label for r in rows] == ['input', 'segments (B is random)', 'MLM target']
  assert rows[0].roles == ('special', 'context', 'masked', 'random', 'kept', 'special', 'pad', 'pad')
  assert rows[0].tokens[:4] == ('[CLS]', 'w0', '[MASK]', 'w9')
  assert rows[1].roles == ('segment_a', 'segment_a', 'segment_a', 'segment_b', 'segment_b', 'segment_b', 'pad', 'pad')
  assert rows[2].tokens == ('', '', 'w1', 'w2', 'w3', '', '', '') and rows[2].roles[2:5] == ('target',) * 3
  # A batch: its row; limit: the first positions.
  batch = {k: np.stack([np.asarray(v)] * 2) for k, v in _mlm_example().items()}
  assert diagrams.example_rows('mlm', batch, _tokenizer(), row=1, limit=3)[0].roles == ('special', 'context', 'masked')


def test_roles_of_a_real_masking_count_every_prediction():
  rng = np.random.default_rng(0)
  specials = examples.Specials(vocab_size=len(VOCAB), pad=0, cls=1, sep=2, mask=3, eos=4, bos=None,
                               special_ids=np.arange(7, dtype=np.int32), sentinel_ids=np.array([5, 6], np.int32),
                               word_start=np.ones(len(VOCAB), bool))
  tokens = np.concatenate([[1], rng.integers(7, len(VOCAB), 60), [2]]).astype(np.int32)
  ex = examples.mask_tokens(tokens, rng=rng, specials=specials, max_predictions=12, mask_rate=0.15,
                            random_ids=specials.normal_ids)
  ex['segment_ids'] = np.ones_like(tokens)
  roles = diagrams.example_rows('mlm', ex, _tokenizer())[0].roles
  predicted = [i for i, r in enumerate(roles) if r in ('masked', 'random', 'kept')]
  assert predicted == sorted(ex['masked_positions'][ex['masked_weights'] > 0].tolist())
  now, was = ex['tokens'][predicted], tokens[predicted]
  assert roles.count('masked') == int((now == 3).sum())
  assert roles.count('kept') == int((now == was).sum()) and roles.count('random') == int(
      ((now != 3) & (now != was)).sum())


def test_clm_span_and_rtd_roles():
  clm = {
      'tokens': np.array([7, 8, 4, 9, 0]),
      'targets': np.array([8, 4, 9, 10, 0]),
      'weights': np.array([1.0, 1.0, 0.0, 1.0, 0.0]),
      'segment_ids': np.array([1, 1, 1, 2, 0])
  }
  inp, tgt = diagrams.example_rows('clm', clm, _tokenizer())
  assert inp.roles == ('context', 'context', 'special', 'context', 'pad')
  assert tgt.roles == ('target', 'target', 'ignored', 'target', 'ignored') and tgt.tokens[:2] == ('w1', '</s>')

  span = {
      'encoder_tokens': np.array([7, 5, 10, 6, 4, 0]),
      'encoder_segment_ids': np.array([1, 1, 1, 1, 1, 0]),
      'decoder_targets': np.array([5, 8, 9, 6, 11, 4]),
      'decoder_segment_ids': np.ones(6, int)
  }
  enc, dec = diagrams.example_rows('span', span, _tokenizer())
  assert enc.roles == ('context', 'sentinel', 'context', 'sentinel', 'special', 'pad')
  assert dec.roles == ('sentinel', 'target', 'target', 'sentinel', 'target', 'special')
  assert enc.tokens[1] == '<x0>'  # sentinels shortened so that they fit a box

  ex = _mlm_example()
  corrupted = np.array([1, 7, 8, 20, 10, 2, 0, 0])  # slot 2: the sample equals the original; slot 3: replaced
  gen, disc = diagrams.example_rows('rtd', ex, _tokenizer(), corrupted=corrupted)
  assert disc.roles == ('original', 'original', 'original', 'replaced', 'original', 'original', 'pad', 'pad')
  assert gen.roles == diagrams.example_rows('mlm', ex, _tokenizer())[0].roles
  with pytest.raises(ValueError, match='corrupted='):
    diagrams.example_rows('rtd', ex, _tokenizer())
  with pytest.raises(ValueError, match="objective 'sop'.*mlm"):
    diagrams.example_rows('sop', ex, _tokenizer())


def test_plot_token_rows_boxes_legend_and_wrap(tmp_path):
  rows = diagrams.example_rows('nsp', _mlm_example(), _tokenizer())
  ax = diagrams.plot_token_rows(rows, title='t', path=str(tmp_path / 'rows.png'))
  assert len(ax.patches) == sum(len(r.tokens) for r in rows)
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  used = [r for r in diagrams.ROLES if r != 'pad' and any(r in row.roles for row in rows)]
  assert legend == [diagrams.ROLES[r][1] for r in used]
  assert (tmp_path / 'rows.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  wrapped = diagrams.wrap_rows(rows, 5)
  assert [r.label for r in wrapped] == [
      'input [0:5]', 'segments (B is random) [0:5]', 'MLM target [0:5]', 'input [5:8]', 'segments (B is random) [5:8]',
      'MLM target [5:8]'
  ]
  assert sum(len(r.tokens) for r in wrapped) == sum(len(r.tokens) for r in rows)
  with pytest.raises(ValueError, match="unknown role.*'hidden'"):
    diagrams.TokenRow('x', ('a',), ('hidden',))


def test_plot_masks_draws_the_library_masks():
  seg = jnp.array([[1, 1, 2, 0]])
  pos = jnp.arange(4)[None]
  masks = {'causal': attention.causal_mask(pos, pos), 'segments': attention.segment_mask(seg, seg)}
  fig = diagrams.plot_masks(masks, labels=['a', 'b', 'c', 'pad'])
  axes = fig.get_axes()
  assert len(axes) == 2
  np.testing.assert_array_equal(axes[0].images[0].get_array(), np.tril(np.ones((4, 4), bool)))
  np.testing.assert_array_equal(axes[1].images[0].get_array(), np.asarray(masks['segments'])[0, 0])
  assert '(10 of 16 pairs attend)' in axes[0].get_title()
  with pytest.raises(ValueError, match=r"masks\['bad'\].*\[T, S\]"):
    diagrams.plot_masks({'bad': np.ones((2, 3, 4, 4), bool)})


class _Device:

  def __init__(self, i):
    self.id = i

  def __hash__(self):
    return self.id


class _Sharding:
  """A [4, 6] array split in 2 x 3 blocks, each block on two devices (a replica axis), as devices_indices_map says."""
  spec = ('rows', 'cols')

  def devices_indices_map(self, shape):
    out = {}
    for d in range(12):
      block = d % 6
      r, c = divmod(block, 3)
      rows = slice(r * shape[-2] // 2, (r + 1) * shape[-2] // 2)
      cols = slice(c * shape[-1] // 3, (c + 1) * shape[-1] // 3)
      out[_Device(d)] = (slice(None),) * (len(shape) - 2) + (rows, cols)
    return out


def test_shard_blocks_and_plot_layout():
  blocks = diagrams.shard_blocks((4, 6), _Sharding())
  assert len(blocks) == 6 and blocks[((0, 2), (0, 2))] == [0, 6] and blocks[((2, 4), (4, 6))] == [5, 11]
  ax = diagrams.plot_layout((4, 6), _Sharding(), title='w')
  assert len(ax.patches) == 6 and sorted(t.get_text() for t in ax.texts)[0] == 'dev 0,6'
  # A stacked [layers, 4, 6] array whose layer dim is whole draws as its last two dims.
  ax = diagrams.plot_layout((3, 4, 6), _Sharding())
  assert len(ax.patches) == 6 and ax.get_xlim() == (0, 6)
  with pytest.raises(ValueError, match='scalar'):
    diagrams.plot_layout((), _Sharding())
