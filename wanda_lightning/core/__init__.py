"""The calibration engine: which layers (:mod:`.targets`, :mod:`.layers`), in which blocks (:mod:`.blocks`), fed
which batches (:mod:`.batches`), summarised how (:mod:`.statistics`, gathered by :mod:`.collector`), and the
:mod:`.pipeline` that runs blocks and hands their statistics to an action. Plus the pure pieces every action uses:
sparsity patterns (:mod:`.structure`), mask selection (:mod:`.masks`), argument checks (:mod:`.validation`), the
sparsity and perplexity measures (:mod:`.measures`), a name registry (:mod:`.registry`) and report layout
(:mod:`.tables`).
"""
