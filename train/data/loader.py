"""The input pipeline: a grain MapDataset over any random-access source (a `tfds.data_source`, a list, a `range` of
window indices), shuffled by seed and reshuffled every epoch, mapped with a per-example transform whose rng comes from
(seed, position in the global stream), batched, and split across hosts. Because every element is a pure function of
its stream position, batch k is computed directly (`dataset[k]`, no replay), so the loader's whole state is
`{"seed", "step"}` (JSON-able, saved with each checkpoint) and a resumed loader yields exactly the batches the
uninterrupted run would have. Host h of n takes, from each global batch, rows [h*B/n, (h+1)*B/n): the hosts' local
batches are disjoint and concatenate to the single-host batch. `global_batch` turns a local numpy batch into global
sharded jax arrays."""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

from train.data.examples import example_rng

Transform = Callable[[Any, np.random.Generator], Mapping[str, np.ndarray]]


class Loader:
  """Per-host batches (dicts of numpy arrays) of `transform(source[j], example_rng(seed, i))`, where i is the
    position in the global stream and j the shuffled source index of epoch i // len(source).

    batch_size is the GLOBAL batch; each host yields batch_size // process_count rows. num_epochs=None repeats
    forever. State: `get_state()` -> {"seed", "step"}; `set_state(state)` resumes at that step in O(1).
    prefetch > 0 computes that many batches ahead on a thread pool (order and contents unchanged)."""

  def __init__(self, source: Sequence[Any], transform: Transform, *, batch_size: int, seed: int = 0,
               shuffle: bool = True, num_epochs: int | None = None, process_index: int | None = None,
               process_count: int | None = None, prefetch: int = 0):
    if process_index is None or process_count is None:
      import jax  # only here: tests and tools can use the loader without touching jax
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
      raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if len(source) == 0:
      raise ValueError("the data source is empty")
    self.source, self.transform = source, transform
    self.batch_size, self.local_batch_size = batch_size, batch_size // process_count
    self.seed, self.shuffle, self.num_epochs = int(seed), shuffle, num_epochs
    self.process_index, self.process_count = process_index, process_count
    self.prefetch = prefetch
    self.step = 0
    self._dataset = self._make_dataset()
    self._pool = concurrent.futures.ThreadPoolExecutor(prefetch) if prefetch else None
    self._pending: dict[int, concurrent.futures.Future] = {}

  def _make_dataset(self) -> grain.MapDataset:
    ds = grain.MapDataset.source(self.source)
    if self.shuffle:
      ds = ds.shuffle(seed=self.seed)  # a new permutation each epoch when repeated
    ds = ds.repeat(self.num_epochs)
    seed, transform = self.seed, self.transform
    ds = ds.map_with_index(lambda i, rec: transform(rec, example_rng(seed, i)))
    # Blocks of local_batch_size consecutive stream positions; host h takes blocks h, h+n, h+2n, ...
    ds = ds.batch(self.local_batch_size, drop_remainder=True)
    steps = len(ds) // self.process_count  # whole global batches only, so every host has the same count
    return ds[self.process_index::self.process_count][:steps]

  def __len__(self) -> int:
    """Batches per host (huge when repeating forever)."""
    return len(self._dataset)

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    """Local batch number `step` (random access; does not move the loader)."""
    return self._dataset[step]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.step >= len(self._dataset):
      raise StopIteration
    step = self.step
    if self._pool is None:
      batch = self._dataset[step]
    else:
      for s in range(step, min(step + 1 + self.prefetch, len(self._dataset))):
        if s not in self._pending:
          self._pending[s] = self._pool.submit(self._dataset.__getitem__, s)
      batch = self._pending.pop(step).result()
    self.step = step + 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"seed": self.seed, "step": self.step}

  def set_state(self, state: Mapping[str, int]) -> None:
    if int(state["seed"]) != self.seed:
      raise ValueError(f"loader state is for seed {state['seed']}, this loader has seed {self.seed}")
    self.step = int(state["step"])
    for fut in self._pending.values():
      fut.cancel()
    self._pending.clear()

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
  """Per-host numpy batch -> global jax arrays sharded along the batch axis.

    sharding: a `jax.sharding.Sharding` for every key (e.g. NamedSharding(mesh, P(("data", "fsdp")))), or a mapping
    {key: Sharding}. The global batch is the hosts' local batches concatenated in process order."""
  import jax
  shardings = {k: sharding[k] if isinstance(sharding, Mapping) else sharding for k in local_batch}
  if jax.process_count() == 1:  # the local batch is the global one: one transfer for every key
    return jax.device_put({k: np.asarray(v) for k, v in local_batch.items()}, shardings)
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in local_batch.items()}
