"""Pretrained weights in and out: Hugging Face checkpoints (safetensors, pytorch_model.bin), GGUF files, our layout.

One module per concern: store.py (the `Converted` record and our on-disk layout: params.safetensors +
lmlab_model.json + tokenizer files), hf_layouts.py (per-family rule tables and the config.json <-> ModelConfig
translation), hf.py (the import/export engine over those tables), gguf.py (llama.cpp GGUF files, dequantized, with
their tokenizer), kinds.py (what kind of checkpoint a path is: the one dispatch the CLI and train/core/pretrained.py share)
and cli.py (`python -m model.convert import|export --from=SRC --to=DST`). The names below are the library's API:
`from model import convert; convert.import_hf(dir)`.
"""
from model.convert.gguf import (GGUF_LAYER_TENSORS, GGUF_TOP_TENSORS, from_gguf_layout, gguf_metadata, gguf_tokenizer,
                                import_gguf, to_gguf_layout)
from model.convert.hf import electra_params, export_hf, import_hf, read_hf_weights, to_hf_state
from model.convert.hf_layouts import FAMILIES, hf_config
from model.convert.kinds import KINDS, checkpoint_kind, import_any
from model.convert.store import (CONFIG_FILE, PARAMS_FILE, TOKENIZER_FILES, ConversionError, Converted, load,
                                 read_safetensors, save)

__all__ = [
    'CONFIG_FILE',
    'FAMILIES',
    'GGUF_LAYER_TENSORS',
    'GGUF_TOP_TENSORS',
    'KINDS',
    'PARAMS_FILE',
    'TOKENIZER_FILES',
    'ConversionError',
    'Converted',
    'checkpoint_kind',
    'electra_params',
    'export_hf',
    'from_gguf_layout',
    'gguf_metadata',
    'gguf_tokenizer',
    'hf_config',
    'import_any',
    'import_gguf',
    'import_hf',
    'load',
    'read_hf_weights',
    'read_safetensors',
    'save',
    'to_gguf_layout',
    'to_hf_state',
]
