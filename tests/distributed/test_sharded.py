"""FSDP2 (row-sharded DTensor weights): 2 CPU processes over gloo, compared with one process over the union of
their calibration batches."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.models import make_batches, tiny_llama
from helpers.processes import ProcessesFailed, launch_processes

from wanda_lightning import prune
from wanda_lightning.methods import ADMM

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

WORKER = Path(__file__).with_name("sharded_worker.py")
TIMEOUT = 240  # seconds: a hang fails the test instead of the suite


def run_two_processes(scenario: str, out: Path) -> list[dict[str, Any]]:
    try:
        return launch_processes([sys.executable, str(WORKER), scenario, str(out)], out, timeout=TIMEOUT)
    except ProcessesFailed as error:
        pytest.fail(str(error))


def _single_process(llama: Any, batches: list[dict], structure: str) -> dict[str, torch.Tensor]:
    prune(llama, batches, structure=structure, sparsity=None if ":" in structure else 0.5, num_samples=None)
    return {name: param.detach().clone() for name, param in llama.named_parameters()}


def _agreement(sharded: dict[str, torch.Tensor], single: dict[str, torch.Tensor]) -> float:
    same = total = 0
    for name, weight in single.items():
        if name.endswith("proj.weight"):
            same += int(((sharded[name] == 0) == (weight == 0)).sum())
            total += weight.numel()
    return same / total


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_fsdp2_masks_equal_one_process_over_all_batches(tmp_path, llama, structure):
    scenario = "functional" if structure == "unstructured" else "functional-2:4"
    ranks = run_two_processes(scenario, tmp_path)
    single = _single_process(llama, make_batches(num_batches=4, batch=2, seed=3), structure)
    for result in ranks:
        assert _agreement(result["full"], single) >= 0.999
        # Every rank's own rows are exactly as sparse as asked.
        assert all(value == 0.5 for value in result["local_sparsity"].values()), result["local_sparsity"]
        assert result["report_sparsity"] == pytest.approx(0.5)
        # No weight was gathered to compute masks; only statistics (float32 sums, int64 counts) were all-reduced.
        assert result["counts"]["full_tensor"] == 0 and result["counts"]["redistribute"] == 0
        in_features = sum(p.shape[1] for n, p in single.items() if n.endswith("proj.weight"))
        assert 0 < result["counts"]["all_reduce_bytes"] < 64 * in_features
    # Kept weights are untouched, so both ranks' gathered models are identical.
    assert all(torch.equal(ranks[0]["full"][n], ranks[1]["full"][n]) for n in ranks[0]["full"])


def test_fsdp2_methods_comparing_across_rows_are_refused_and_owl_dsnot_match(tmp_path, llama):
    ranks = run_two_processes("options", tmp_path)
    batches = make_batches(num_batches=4, batch=2, seed=3)
    for result in ranks:
        errors = result["errors"]
        assert set(errors) == {"sparsegpt", "ria", "variant", "device", "ria-permuted"}
        assert "'ria (a=0.5, permuted channels)'" in errors["ria-permuted"]
        assert "compares weights across output rows" in errors["sparsegpt"] and "'sparsegpt'" in errors["sparsegpt"]
        assert "'ria (a=0.5)'" in errors["ria"] and "'wanda (variant)'" in errors["variant"]
        assert "`device`='cpu'" in errors["device"]
        for label, kwargs in {
            "owl": dict(allocation="owl"),
            "dsnot": dict(refine="dsnot"),
            "sparsegpt-2:4": dict(method="sparsegpt", structure="2:4", sparsity=None),
        }.items():
            single = copy.deepcopy(llama)
            report = prune(single, batches, **{"sparsity": 0.5, **kwargs}, num_samples=None)
            expected = {name: param.detach() for name, param in single.named_parameters()}
            assert _agreement(result["results"][label]["full"], expected) >= 0.999, label
            if label == "owl":
                got = result["results"][label]["block_sparsity"]
                assert got.keys() == report.block_sparsity.keys()
                assert all(abs(got[k] - v) < 1e-9 for k, v in report.block_sparsity.items())


def test_fsdp2_admm_equals_one_process_with_per_row_selection(tmp_path, llama):
    ranks = run_two_processes("admm", tmp_path)
    batches = make_batches(num_batches=4, batch=2, seed=3)
    for label, kwargs in {
        "admm": dict(method=ADMM(selection="row"), sparsity=0.5),
        "admm-2:4": dict(method=ADMM(selection="row"), structure="2:4"),
        "wanda+admm-update": dict(refine="admm-update", sparsity=0.5),
    }.items():
        single = copy.deepcopy(llama)
        prune(single, batches, num_samples=None, **kwargs)
        expected = {name: param.detach() for name, param in single.named_parameters()}
        for result in ranks:
            got = result[label]
            assert got["gathers"] == {"full_tensor": 0, "redistribute": 0}, label  # row shards pruned in place
            assert got["sparsity"] == pytest.approx(0.5), label
            for name, weight in expected.items():
                if name.endswith("proj.weight"):
                    assert torch.equal(got["full"][name] == 0, weight == 0), (label, name)
                    assert torch.allclose(got["full"][name], weight, rtol=1e-4, atol=1e-6), (label, name)
    for label in ("admm", "admm-2:4"):  # even N:M: the gradual order is ranked over the layer by default
        switched = [w for w in ranks[0][label]["warnings"] if "ranks weights across output rows" in w]
        assert ranks[0][label]["method"] == "admm (per-row selection)" and len(switched) == 1, label
    assert not any("ranks weights across" in w for w in ranks[0]["wanda+admm-update"]["warnings"])
    assert all(
        torch.equal(ranks[0][k]["full"][n], ranks[1][k]["full"][n]) for k in ranks[0] for n in ranks[0][k]["full"]
    )


def test_fsdp2_uneven_batch_counts_are_truncated_not_hung(tmp_path, llama):
    ranks = run_two_processes("uneven", tmp_path)
    batches = make_batches(num_batches=4, batch=2, seed=3)
    single = _single_process(llama, [batches[0], batches[1]], "unstructured")
    assert any("differ across processes" in w for w in ranks[0]["warnings"])
    for result in ranks:
        assert _agreement(result["full"], single) >= 0.999


@pytest.mark.parametrize("checkpoint", ["distributed", "full"])
def test_fsdp2_trainer_prunes_checkpoints_and_resumes_sparse(tmp_path, checkpoint):
    ranks = run_two_processes("trainer" if checkpoint == "distributed" else "trainer-full-checkpoint", tmp_path)
    for result in ranks:
        assert result["global_sparsity"] == pytest.approx(0.5)
        for name, weight in result["weights"].items():
            assert (weight == 0).float().mean().item() == pytest.approx(0.5), name
            # Two more optimizer steps after resuming: pruned weights stay exactly 0, the kept ones moved.
            after = result["after_resume"][name]
            assert torch.equal(after == 0, weight == 0), name
            assert not torch.equal(after, weight), name
        assert result["resumed_step"] == 4
        assert not result["resumed_pruned_again"]
        assert result["state"]["masks"] is None and result["state"]["masks_from_weights"]
        assert "val_loss" in result["metrics"]
    assert all(torch.equal(ranks[0]["weights"][n], ranks[1]["weights"][n]) for n in ranks[0]["weights"])
    if checkpoint == "full":
        # One file with the whole state dict: loads anywhere, without FSDP, and is as sparse as the live model.
        from wanda_lightning.lightning.module import CausalLMModule

        state = torch.load(tmp_path / "ckpt", weights_only=False)["state_dict"]
        for name, weight in ranks[0]["weights"].items():
            assert torch.equal(state[name], weight), name
        module = CausalLMModule.load_from_checkpoint(tmp_path / "ckpt", model=tiny_llama())
        q_proj = module.model.model.layers[0].self_attn.q_proj.weight
        assert (q_proj == 0).float().mean().item() == pytest.approx(0.5)


def test_fsdp1_prunes_one_unit_at_a_time_like_one_process(tmp_path, llama):
    ranks = run_two_processes("fsdp1", tmp_path)
    batches = make_batches(num_batches=4, batch=2, seed=3)
    block_params = sum(p.numel() for p in llama.model.layers[0].parameters())
    for label, kwargs in {
        "wanda-orig": dict(sparsity=0.5),
        "wanda-flat": dict(sparsity=0.5),
        "sparsegpt-orig": dict(sparsity=0.5, method="sparsegpt"),
        "ria-2:4-flat": dict(structure="2:4", method="ria"),
    }.items():
        single = copy.deepcopy(llama)
        prune(single, batches, sequential=False, num_samples=None, **kwargs)
        expected = {n: p.detach() for n, p in single.named_parameters()}
        for result in ranks:
            got = result[label]
            sharded = {f"{name}.weight": weight for name, weight in got["full"].items()}
            assert _agreement(sharded, expected) >= 0.999, label
            assert got["sparsity"] == pytest.approx(0.5) and not got["sequential"]
            assert any("calibrated in one pass" in w for w in got["warnings"])
            # Only decoder-block units were summoned, never recursively: peak memory is one block's parameters.
            assert len(got["summoned"]) == 2
            assert all(not recurse and numel <= block_params for numel, recurse in got["summoned"]), got["summoned"]


def test_fsdp1_lightning_strategy_calibrates_and_evaluates_through_the_root(tmp_path):
    ranks = run_two_processes("fsdp1-trainer", tmp_path)
    for result in ranks:
        assert result["sparsity"] == pytest.approx(0.5)
        for name, weight in result["full"].items():
            assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all(), name  # every row exactly 50 %
        assert "val_loss" in result["metrics"] and result["metrics"]["val_loss"]["delta"] != 0
        assert result["state"]["masks"] is None and result["state"]["masks_from_weights"]
    assert all(torch.equal(ranks[0]["full"][n], ranks[1]["full"][n]) for n in ranks[0]["full"])
