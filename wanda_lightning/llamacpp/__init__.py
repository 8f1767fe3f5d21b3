"""llama.cpp, where users run small models: perplexity and tokens per second of a GGUF computed by llama.cpp itself
(through the optional llama-cpp-python, ``pip install wanda-lightning[llamacpp]``).

- :mod:`.runtime`: whether llama-cpp-python is installed, and a GGUF loaded on the CPU with one thread per core.
- :mod:`.perplexity`: held-out perplexity from llama.cpp's own logits, on the token windows PyTorch scores.
- :mod:`.speed`: decode and prefill tokens/s of a GGUF, several timed in turns, and ``measure_speed`` for both
  runtimes (PyTorch eager and llama.cpp).

This package imports only :mod:`wanda_lightning.core` and :mod:`wanda_lightning.gguf`, so the speed target can use it.
"""

from .perplexity import gguf_perplexity, window_nll
from .runtime import CACHE_TYPES, INSTALL_HINT, default_threads, import_llama_cpp, is_available, load_gguf
from .speed import RUNTIMES, GGUFTimer, measure_gguf_speed, measure_speed, temporary_gguf, time_in_turns

__all__ = [
    "CACHE_TYPES",
    "INSTALL_HINT",
    "RUNTIMES",
    "GGUFTimer",
    "default_threads",
    "gguf_perplexity",
    "import_llama_cpp",
    "is_available",
    "load_gguf",
    "measure_gguf_speed",
    "measure_speed",
    "temporary_gguf",
    "time_in_turns",
    "window_nll",
]
