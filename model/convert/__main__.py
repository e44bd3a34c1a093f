"""Convert checkpoints between Hugging Face / GGUF files and lmlab's own layout (model/convert/cli.py).

CLI:  python -m model.convert import --from=HF_DIR_OR_GGUF --to=OUT_DIR
      python -m model.convert export --from=OUT_DIR --to=HF_DIR

import reads a Hugging Face model directory, a .gguf file or a converted directory and writes params.safetensors +
lmlab_model.json + the tokenizer files; export reads the same kinds and writes config.json + model.safetensors, which
`transformers` loads.
"""
from absl import app
from absl import flags

from model.convert import cli

if __name__ == '__main__':
  # Defined here, in the module run as main, so that --help lists them (absl shows the main module's flags).
  flags.DEFINE_string('from', None, 'HF model directory, .gguf file, or (export) a directory written by import.')
  flags.DEFINE_string('to', None, 'Output directory.')
  flags.DEFINE_bool('scan_layers', True, 'Store layers stacked for nn.scan (import).')
  flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16'], 'Parameter dtype (import).')
  app.run(cli.main)
