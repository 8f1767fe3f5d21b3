"""LoRA fine-tuning of SmolLM2-135M with Lightning, Wanda pruning of its base weights, more LoRA training on the pruned
model, and a merge that keeps the model sparse. Offline.

    python examples/lora_prune.py --out lora-pruned [--sparsity 0.5] [--steps 6]

``--smoke`` runs it at a tiny size (one step an epoch on 32-token windows, one held-out window), as CI does.

One epoch of ``--steps`` LoRA steps on the dense model, then WandaPruningCallback prunes the base weights at the end
of that epoch (from the statistics of each LoRA layer's input; ``lora_A`` / ``lora_B`` are never pruned), the adapters
train one more epoch on the pruned base (the masks hold: the base is frozen and masked), and ``export`` writes the
merged model. :func:`wanda_lightning.merge_adapters` merges each adapter and zeroes the pruned entries again; peft's own
``merge_and_unload`` cannot know the masks and fills them with the adapters' dense update, which this script shows.

The table it prints tells the cost of that choice: the adapters' update is dense, so the model with adapters (or
peft's dense merge) is not what the sparse merged model computes; the difference is the update at the pruned entries.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import lightning.pytorch as pl
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from wanda_lightning import AfterEpoch, CausalLMModule, WandaPruningCallback, load_pruned, merge_adapters
from wanda_lightning.cli.demo import WindowDataset
from wanda_lightning.core.options import CalibrationOptions
from wanda_lightning.data.corpus import pydoc_text, token_windows
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import load_smollm2


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros in the decoder's projection weights."""
    weights = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("lora-pruned"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=6, help="LoRA steps per epoch (default 6)")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a tiny run: 1 step per epoch, 32-token windows")
    args = parser.parse_args(argv)
    eval_seqlen = 256
    if args.smoke:
        args.steps, args.seqlen, args.eval_windows, eval_seqlen = 1, 32, 1, 32
    pl.seed_everything(0, verbose=False)

    # Data: CPython's help topics; calibration and training from the first 70 %, held-out windows from the rest.
    base, tokenizer = load_smollm2()
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    cut = int(ids.numel() * 0.7)
    windows = token_windows(ids[:cut], args.seqlen)
    calibration, train = windows[:16], windows[16 : 16 + 4 * args.steps]
    heldout = token_windows(ids[cut:], eval_seqlen, args.eval_windows)
    dense_ppl = perplexity(base, heldout, batch_size=4)

    # LoRA on every projection of the decoder: only the adapters train.
    base.train()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    module = CausalLMModule(model, learning_rate=1e-3)
    pruning = WandaPruningCallback(
        sparsity=args.sparsity,
        prune_on=AfterEpoch(0),
        calibration=DataLoader(WindowDataset(calibration), batch_size=4),
        calibration_options=CalibrationOptions(num_samples=16),
        export=str(args.out),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[pruning],
    )
    trainer.fit(
        module,
        DataLoader(WindowDataset(train), batch_size=4),
        DataLoader(WindowDataset(heldout), batch_size=4),
    )

    results = {
        "dense": dense_ppl,
        "lora, dense base": pruning.metrics["val_ppl"]["dense"],
        "lora, pruned base": pruning.metrics["val_ppl"]["pruned"],
        "lora, pruned base, trained on": perplexity(model, heldout, batch_size=4),
    }
    # The export: merged with the masks kept, a plain transformers model as sparse as the base.
    exported = load_pruned(args.out)
    results["merged (masks kept)"] = perplexity(exported, heldout, batch_size=4)
    by_peft = copy.deepcopy(model).merge_and_unload()  # what peft's merge gives: the pruned entries filled back in
    results["merged by peft"] = perplexity(by_peft, heldout, batch_size=4)
    masks = {name.removeprefix("model."): keep for name, keep in pruning.masks.items()}  # relative to `model`
    assert sparsity(merge_adapters(copy.deepcopy(model), masks)) == sparsity(exported)

    print(f"\n{'held-out perplexity':<32}{'ppl':>10}{'sparsity':>10}")
    sparsities = {"dense": 0.0, "merged (masks kept)": sparsity(exported), "merged by peft": sparsity(by_peft)}
    for name, value in results.items():
        shown = f"{sparsities[name]:.2%}" if name in sparsities else ""
        print(f"{name:<32}{value:>10.2f}{shown:>10}")
    print(f"\nexport: {args.out} (load it with wanda_lightning.load_pruned)")
    return results


if __name__ == "__main__":
    main()
