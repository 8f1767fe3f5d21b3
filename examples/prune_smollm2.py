"""Prune SmolLM2-135M with the functional API, offline, and compare held-out perplexity.

python examples/prune_smollm2.py --structure 2:4
"""

from __future__ import annotations

import argparse

from wanda_lightning import prune
from wanda_lightning.data.corpus import split_tokens
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=None)
    parser.add_argument("--structure", default="unstructured")
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    splits = split_tokens(tokenizer, num_samples=args.samples, seqlen=256, max_eval_windows=32)
    print(f"dense perplexity:  {perplexity(model, splits.heldout):.2f}")

    # Any iterable of batches works: a DataLoader, a list of tensors, or mappings fed as model(**batch).
    batches = [{"input_ids": ids} for ids in splits.calibration.split(8)]
    report = prune(model, batches, sparsity=args.sparsity, structure=args.structure, progress=True)
    print(report)
    print(f"pruned perplexity: {perplexity(model, splits.heldout):.2f}")


if __name__ == "__main__":
    main()
