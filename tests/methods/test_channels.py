"""N:M channel permutation (RIA's channel reallocation) where the model absorbs it exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import make_batches
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from wanda_lightning import AfterEpoch, WandaPruningCallback, prune
from wanda_lightning.core.statistics import GramStatistics
from wanda_lightning.methods import RIA, get_method
from wanda_lightning.methods.channels import find_channel_couplings, reallocate_channels, retained_score


def _reference_reallocation(scores: torch.Tensor, n: int, m: int) -> list[int] | None:
    """Python-list port of RIA's reference loop (sort by column sum, zigzag deal), kept only if it retains more."""
    columns = scores.shape[1]
    sums = scores.sum(dim=0).tolist()
    order = sorted(range(columns), key=lambda j: (sums[j], j))
    index = [0] * columns
    for slot in range(m):
        chunk = order[columns * slot // m : columns * (slot + 1) // m]
        if slot % 2:
            chunk = chunk[::-1]
        for position, column in enumerate(chunk):
            index[slot + position * m] = column

    def kept(order_of_columns: list[int]) -> float:
        total = 0.0
        for row in scores.tolist():
            for start in range(0, columns, m):
                group = sorted((row[c] for c in order_of_columns[start : start + m]), reverse=True)
                total += sum(group[:n])
        return total

    return index if kept(index) > kept(list(range(columns))) else None


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reallocation_matches_loop_reference(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    # Columns of very different importance, clustered, so the identity order wastes groups.
    scores = torch.rand(6, 32, generator=g) * torch.linspace(0.1, 4.0, 32).roll(seed * 5)
    index = reallocate_channels(scores, n, m)
    expected = _reference_reallocation(scores, n, m)
    assert (index.tolist() if index is not None else None) == expected
    if index is not None:
        assert sorted(index.tolist()) == list(range(32))
        assert retained_score(scores[:, index], n, m) > retained_score(scores, n, m)


def test_reallocation_declines_when_the_identity_is_best():
    scores = torch.tensor([[4.0, 3.0, 0.0, 0.0, 2.0, 1.0, 0.0, 0.0]])
    assert reallocate_channels(scores, 2, 4) is None


def test_couplings_are_the_mlp_down_projections_only(llama, gpt2):
    llama_names = [name for name, module in llama.named_modules() if isinstance(module, nn.Linear)]
    assert sorted(find_channel_couplings(llama, llama_names)) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    coupling = find_channel_couplings(llama, ["model.layers.0.mlp.down_proj"])["model.layers.0.mlp.down_proj"]
    mlp = llama.model.layers[0].mlp
    assert coupling.producers == [mlp.gate_proj, mlp.up_proj]
    # GPT-2: the MLP's c_proj (fed by c_fc) qualifies, the attention's c_proj (fed by heads) does not.
    names = [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert list(find_channel_couplings(gpt2, names)) == ["transformer.h.0.mlp.c_proj"]


def test_a_norm_over_the_hidden_units_blocks_the_coupling():
    mlp = nn.Module()
    mlp.up_proj, mlp.down_proj, mlp.gate_proj = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 16)
    assert list(find_channel_couplings(mlp, ["down_proj"])) == ["down_proj"]
    mlp.norm = nn.LayerNorm(16)  # its affine weight would have to follow the permutation
    assert find_channel_couplings(mlp, ["down_proj"]) == {}
    mlp.norm = nn.LayerNorm(8)
    mlp.gate_proj = nn.Linear(8, 12)  # not the consumer's channel count
    assert find_channel_couplings(mlp, ["down_proj"]) == {}


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_permutation_keeps_the_model_function(model_name, llama, gpt2):
    model = {"llama": llama, "gpt2": gpt2}[model_name]
    ids = make_batches(1)[0]["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
        names = [name for name, _ in model.named_modules()]
        for name, coupling in find_channel_couplings(model, names).items():
            module = model.get_submodule(name)
            weight = module.weight.t() if type(module).__name__ == "Conv1D" else module.weight
            index = torch.randperm(weight.shape[1], generator=torch.Generator().manual_seed(3))
            parameter = module.weight
            coupling.permute(weight.data, index)
            assert module.weight is parameter  # written in place
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_statistics_follow_the_permutation():
    x = torch.randn(3, 10, 6)
    index = torch.tensor([5, 2, 0, 4, 1, 3])
    direct, permuted = GramStatistics(6, torch.device("cpu")), GramStatistics(6, torch.device("cpu"))
    direct.update(x[..., index], None, num_sequences=3)
    permuted.update(x, None, num_sequences=3)
    permuted.permute_inputs(index)
    for a, b in zip(direct.state_tensors(), permuted.state_tensors(), strict=True):
        torch.testing.assert_close(a, b)


class _ForcedPermutation(RIA):
    """RIA whose channel order is a fixed random permutation, to compare with permuting the dense model first."""

    def __init__(self) -> None:
        super().__init__(permute_channels=True)
        self.orders: dict[int, torch.Tensor] = {}

    def channel_order(self, weight, statistics, structure):
        generator = torch.Generator().manual_seed(len(self.orders))
        self.orders[len(self.orders)] = order = torch.randperm(weight.shape[1], generator=generator)
        return order


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_prune_permutes_as_if_the_dense_model_had_been_permuted(
    llama, gpt2, calibration_batches, model_name, sequential
):
    model = {"llama": llama, "gpt2": gpt2}[model_name]
    reference = copy.deepcopy(model)
    method = _ForcedPermutation()
    report = prune(model, calibration_batches, structure="2:4", method=method, sequential=sequential)
    consumer = "model.layers.{}.mlp.down_proj" if model_name == "llama" else "transformer.h.{}.mlp.c_proj"
    assert report.permuted_layers == [consumer.format(0), consumer.format(1)]
    # Reference: permute the dense model by hand, then prune it with plain RIA (statistics measured, not permuted).
    with torch.no_grad():
        for i, name in enumerate(report.permuted_layers):
            module = reference.get_submodule(name)
            weight = module.weight.data.t() if model_name == "gpt2" else module.weight.data  # Conv1D is (in, out)
            find_channel_couplings(reference, [name])[name].permute(weight, method.orders[i])
    prune(reference, calibration_batches, structure="2:4", method="ria", sequential=sequential)
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)


def test_ria_permuted_keeps_n_m_in_storage_order(llama, calibration_batches):
    plain = copy.deepcopy(llama)
    report = prune(llama, calibration_batches, structure="2:4", method="ria-permuted")
    prune(plain, calibration_batches, structure="2:4", method="ria")
    assert report.method == "ria (a=0.5, permuted channels)" and "permuted channels" in str(report)
    assert report.permuted_layers  # random weights always leave room for a better grouping
    for layer in report.layers:
        keep = llama.get_submodule(layer.name).weight != 0
        assert bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()), layer.name
    # The first block's attention (upstream of every permuted MLP) is pruned exactly as without the option.
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        module = f"model.layers.0.self_attn.{name}"
        assert torch.equal(llama.get_submodule(module).weight, plain.get_submodule(module).weight), name


def test_permutation_refusals(llama, calibration_batches):
    with pytest.raises(ValueError, match=r"permutes input channels.*'unstructured'"):
        prune(llama, calibration_batches, sparsity=0.5, method="ria-permuted")
    with pytest.raises(ValueError, match="permute_channels"):
        RIA(permute_channels=1)
    assert get_method("ria-permuted", a=1.0).describe() == "ria (a=1, permuted channels)"
    with pytest.raises(MisconfigurationException, match="train_epoch_end"):
        WandaPruningCallback(structure="2:4", method="ria-permuted", prune_on=AfterEpoch(0))
