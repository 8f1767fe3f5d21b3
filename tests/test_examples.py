"""Every script in ``examples/`` runs, at the tiny size its ``--smoke`` flag selects, so that none of them rots.

The scripts run in this process (``main(argv)``), which shares the imports of torch, Lightning and transformers with
the rest of the suite. The three that load the bundled SmolLM2 get a tiny random Llama with SmolLM2's layout in its
place, as the README's examples do in ``test_docs.py``: reading the 135M model from its GGUF file, a full-size AdamW
step, exports and merges cost minutes on two cores, and what a smoke run guards against is a script falling behind the
library's API (``tests/pruning/test_real_model.py`` runs the real model).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers.models import tiny_smollm2  # the README examples' stand-in

from wanda_lightning.data import smollm2

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))
TINY_SMOLLM2 = {"finetune_and_prune", "lora_prune", "prune_smollm2"}
WRITES_OUT = {"finetune_and_prune", "lora_prune"}


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look a class's module up there
    spec.loader.exec_module(module)
    return module


def test_examples_found():
    assert {path.stem for path in EXAMPLES} >= TINY_SMOLLM2 | {"attention_classifier"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_runs_in_smoke_mode(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, request: pytest.FixtureRequest
) -> None:
    source = path.read_text()
    assert '"--smoke"' in source, f"{path.name} has no --smoke flag: every example must run in CI at a tiny size"
    if path.stem == "lora_prune":
        pytest.importorskip("peft")
    if path.stem == "attention_classifier":
        pytest.importorskip("sklearn")
    if path.stem in TINY_SMOLLM2:
        monkeypatch.setattr(smollm2, "load_smollm2", tiny_smollm2)
        request.getfixturevalue("single_thread")  # tiny models: thread hand-offs cost more than they save
    monkeypatch.chdir(tmp_path)  # anything a script writes by default lands here
    argv = ["--smoke"] + (["--out", str(tmp_path / "out")] if path.stem in WRITES_OUT else [])
    _load(path).main(argv)
    printed = capsys.readouterr().out
    # Each script ends by printing what it measured; a smoke run that printed nothing did not get there.
    expected = {
        "prune_smollm2": "pruned perplexity",
        "finetune_and_prune": "held-out perplexity: dense",
        "lora_prune": "merged (masks kept)",
        "attention_classifier": "validation accuracy: dense",
    }
    assert expected.get(path.stem, "") in printed, printed[-2000:]
