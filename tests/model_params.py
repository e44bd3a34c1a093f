"""Random parameters for model tests, shared by the model test files."""
import jax
import jax.numpy as jnp
import numpy as np

from model.heads import init_params


def random_params(module, batch, std, seed=0):
  """Random params with the module's tree, drawn in numpy from jax.eval_shape: no init program is compiled (that
  costs seconds per model on CPU). Norm scales near 1 and non-zero biases, so no path is trivially the identity."""
  shapes = jax.eval_shape(lambda: init_params(module, jax.random.key(0), batch))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    elif name.endswith("['bias']"):
      value = 0.02 * rng.normal(size=leaf.shape)
    else:
      value = std * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)
