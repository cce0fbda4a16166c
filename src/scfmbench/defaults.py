"""Defaults shared by layers below the run configuration (read, never restated, elsewhere)."""

DEFAULT_SEED = 42
"""The seed of splits, probes, random-init controls, tokenization and fine-tuning unless set
(the study's seed); every command and function defaults to it."""
MAX_SEED = 2**31 - 1
"""The largest seed a run takes: folds, repeats and bootstraps add to it, and scikit-learn
and NumPy's legacy generators take seeds below 2**32."""

DEFAULT_BATCH_SIZE = 32
"""Cells per embedding batch."""
DEFAULT_DEVICE = "auto"
"""Where models run: a GPU when one is present, else the CPU."""
DEFAULT_PRECISION = "float32"
"""Embedding precision (bfloat16 and float16 autocast on CUDA only)."""
DEFAULT_CHUNK_SIZE = 2048
"""Cells read, tokenized and embedded at a time when streaming a file."""
