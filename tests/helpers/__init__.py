"""Helpers shared by the tests (and the multi-process benchmarks): tiny models and batches (:mod:`.models`), the
command line (:mod:`.cli`), Trainer runs (:mod:`.trainer`) and local multi-process launches (:mod:`.processes`).

``tests/`` is on pytest's ``pythonpath``, so tests import them as ``from helpers.models import tiny_llama``.
"""
