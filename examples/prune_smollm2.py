"""Prune SmolLM2-135M with the functional API, offline, and compare held-out perplexity.

python examples/prune_smollm2.py --structure 2:4

``--smoke`` runs it at a tiny size (2 calibration sequences, 2 held-out windows of 64 tokens), as CI does.
"""

from __future__ import annotations

import argparse

from wanda_lightning import prune
from wanda_lightning.data.corpus import split_tokens
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import load_smollm2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=None)
    parser.add_argument("--structure", default="unstructured")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="a tiny run: 2 sequences of 64 tokens")
    args = parser.parse_args(argv)
    seqlen, eval_windows = (64, 2) if args.smoke else (256, 32)
    if args.smoke:
        args.samples = 2

    model, tokenizer = load_smollm2()
    splits = split_tokens(tokenizer, num_samples=args.samples, seqlen=seqlen, max_eval_windows=eval_windows)
    print(f"dense perplexity:  {perplexity(model, splits.heldout):.2f}")

    # Any iterable of batches works: a DataLoader, a list of tensors, or mappings fed as model(**batch).
    batches = [{"input_ids": ids} for ids in splits.calibration.split(8)]
    report = prune(model, batches, sparsity=args.sparsity, structure=args.structure, progress=True)
    print(report)
    print(f"pruned perplexity: {perplexity(model, splits.heldout):.2f}")


if __name__ == "__main__":
    main()
