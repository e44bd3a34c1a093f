"""The loader: same seed -> same batches, other seed -> others; resumption from saved state is exact; two hosts'
batches are disjoint and make up the single-host batch; global sharded arrays from local batches."""
import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from train.data.loader import Loader, global_batch

N = 103  # not a multiple of any batch size: epochs end mid-batch


def _transform(index, rng):
  # The element records which source item it is and a draw from its rng (which depends on seed and position).
  return {"index": np.int32(index), "noise": rng.random(3).astype(np.float32)}


def _loader(seed=0, **kw):
  kw.setdefault("batch_size", 8)
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return Loader(range(N), _transform, seed=seed, **kw)


def _take(loader, n):
  return [next(loader) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_batches_other_seed_other_batches():
  a, b, c = _take(_loader(1), 30), _take(_loader(1), 30), _take(_loader(2), 30)
  assert all(_equal(x, y) for x, y in zip(a, b))
  assert not any(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))


def test_each_epoch_is_a_new_permutation_of_the_source():
  batches = _take(_loader(0), 2 * N // 8 + 1)
  stream = np.concatenate([b["index"] for b in batches])
  first, second = stream[:N], stream[N:2 * N]
  assert sorted(first) == list(range(N)) and sorted(second) == list(range(N))
  assert not np.array_equal(first, second)
  assert not np.array_equal(first, np.arange(N))
  # The same item seen in two epochs gets a different rng (masking etc. differs between epochs).
  noise = np.concatenate([b["noise"] for b in batches])
  item = first[0]
  i, j = np.flatnonzero(stream == item)[:2]
  assert not np.array_equal(noise[i], noise[j])


@pytest.mark.parametrize("k", [0, 5, 17])
def test_resumed_loader_continues_exactly(k):
  run = _loader(3)
  uninterrupted = _take(run, k + 10)
  first = _loader(3)
  _take(first, k)
  state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
  assert state == {"seed": 3, "step": k}
  resumed = _loader(3)
  resumed.set_state(state)
  assert all(_equal(x, y) for x, y in zip(uninterrupted[k:], _take(resumed, 10)))


def test_state_for_another_seed_is_refused():
  with pytest.raises(ValueError, match="seed"):
    _loader(1).set_state({"seed": 2, "step": 0})


def test_two_hosts_split_the_global_batch():
  single = _take(_loader(5, batch_size=8), 20)
  hosts = [_take(_loader(5, batch_size=8, process_index=h, process_count=2), 20) for h in range(2)]
  seen = [np.concatenate([b["index"] for b in hosts[h][:N // 8]]) for h in range(2)]
  assert not set(seen[0]) & set(seen[1]), "hosts saw the same item within an epoch"
  for s, h0, h1 in zip(single, *hosts):
    assert h0["index"].shape == (4,)
    for key in s:
      np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), s[key])


def test_finite_epochs_stop_at_whole_global_batches():
  one = list(_loader(0, num_epochs=1))
  assert len(one) == N // 8
  hosts = [list(_loader(0, num_epochs=1, process_index=h, process_count=2)) for h in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == N // 8


def test_prefetch_gives_the_same_batches():
  plain, pre = _loader(4), _loader(4, prefetch=2)
  a, b = _take(plain, 12), _take(pre, 12)
  pre.set_state({"seed": 4, "step": 3})
  c = next(pre)
  pre.close()
  assert all(_equal(x, y) for x, y in zip(a, b)) and _equal(c, a[3])


def test_bad_arguments():
  with pytest.raises(ValueError, match="divisible"):
    _loader(batch_size=7, process_count=2)
  with pytest.raises(ValueError, match="empty"):
    Loader([], _transform, batch_size=2, process_index=0, process_count=1)


def test_global_batch_makes_sharded_arrays():
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  loader = _loader(0, batch_size=4 * len(devices))
  local = next(loader)
  arrays = global_batch(local, sharding)
  assert arrays["noise"].shape == (4 * len(devices), 3)
  assert arrays["index"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(arrays["index"]), local["index"])
