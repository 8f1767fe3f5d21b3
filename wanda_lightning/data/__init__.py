"""What runs offline out of the box: the bundled SmolLM2-135M (:mod:`.smollm2`), CPython's pydoc text as a corpus
(:mod:`.corpus`) and held-out perplexity (:mod:`.evaluation`)."""
