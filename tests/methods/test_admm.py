"""ADMM pruning and the ADMM weight update, against a slow, independently written ADMM and an exact least-squares
solve, through prune(), and on ill-conditioned Gram matrices."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from wanda_lightning import prune
from wanda_lightning.core.statistics import GramStatistics
from wanda_lightning.core.structure import parse_structure
from wanda_lightning.methods import ADMM, ADMMUpdate, PruningWarning, SparseGPT, Wanda, get_method, get_refinement
from wanda_lightning.methods.admm import admm_iterations, admm_prune, admm_system, admm_update
from wanda_lightning.methods.dsnot import reconstruction_error


def _layer_data(rows=12, cols=16, tokens=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    # Correlated inputs with uneven scales: the preconditioning and the weight update both matter.
    mix = torch.randn(cols, cols, generator=g) * 0.3 + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=g) * torch.linspace(0.2, 3.0, cols)) @ mix
    stats = GramStatistics(cols, torch.device("cpu"))
    stats.update(x.view(8, tokens // 8, cols), None, num_sequences=8)
    return weight, x, stats


# --- a slow ADMM written from the paper's equations -------------------------------------------------------------------


def _lowest(values, count):
    """Indices of the ``count`` smallest values, ties to the lower index (Python sorting)."""
    return sorted(range(len(values)), key=lambda i: (values[i], i))[:count]


def _reference_mask(magnitude, fraction, target, n, m, per_row):
    """Keep mask pruning the ``fraction`` smallest magnitudes; N:M: only weights outside their group's n largest."""
    rows, cols = magnitude.shape
    values = magnitude.tolist()
    candidate = [[True] * cols for _ in range(rows)]
    if m:
        for r in range(rows):
            for start in range(0, cols, m):
                group = values[r][start : start + m]
                kept = set(range(m)) - set(_lowest(group, m - n))
                for c in kept:
                    candidate[r][start + c] = False
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    if per_row:
        for r in range(rows):
            row = [values[r][c] if candidate[r][c] else math.inf for c in range(cols)]
            for c in _lowest(row, int(cols * fraction)):
                pruned[r, c] = True
    else:
        flat = [values[r][c] if candidate[r][c] else math.inf for r in range(rows) for c in range(cols)]
        for i in _lowest(flat, int(rows * cols * fraction)):
            pruned[i // cols, i % cols] = True
    return ~pruned


def _reference_admm(
    weight,
    gram,
    sparsity,
    n=0,
    m=0,
    *,
    keep=None,
    iterations=8,
    ramp=6,
    rho=0.5,
    relaxation=1.8,
    percdamp=0.1,
    per_row=False,
):
    """ADMM on the norm-preconditioned problem, one explicit linear solve per iteration, in float64."""
    g = gram.double()
    cols = g.shape[0]
    norms = [math.sqrt(max(g[j, j].item(), 0.0)) for j in range(cols)]
    mean = sum(norms) / cols
    s = torch.tensor([max(v, 1e-3 * mean) for v in norms] if mean > 0 else [1.0] * cols, dtype=torch.float64)
    a = g / torch.outer(s, s)
    a = a + torch.eye(cols, dtype=torch.float64) * (percdamp * torch.trace(a).item() / cols)
    w0 = weight.double() * s  # (out, in)
    target = 1 - n / m if m else sparsity
    w, u = w0.clone(), torch.zeros_like(w0)
    z = w0.clone()
    mask = keep
    if mask is None and ramp == 0:
        mask = _reference_mask(w0.abs(), target, target, n, m, per_row)
    for t in range(iterations):
        v = w + u
        if keep is None and t < ramp:
            fraction = target - target * (1 - (t + 1) / ramp) ** 3
            mask = _reference_mask(v.abs(), fraction, target, n, m, per_row)
        z = v * mask
        u = v - z
        # Each row minimises (w - w0) A (w - w0)^T / 2 + rho / 2 ||w - z + u||^2.
        solved = torch.linalg.solve(a + rho * torch.eye(cols, dtype=torch.float64), (w0 @ a + rho * (z - u)).t()).t()
        w = relaxation * solved + (1 - relaxation) * z
    return ((w + u) * mask) / s, mask


def _exact_masked_solution(weight, gram, keep, percdamp=0.1):
    """Per row: the damped least-squares optimum with pruned weights fixed at zero (float64 solves)."""
    g = gram.double()
    cols = g.shape[0]
    s = torch.diagonal(g).sqrt()
    a = g / torch.outer(s, s)
    a = a + torch.eye(cols, dtype=torch.float64) * (percdamp * torch.trace(a).item() / cols)
    w0 = weight.double() * s
    out = torch.zeros_like(w0)
    for r in range(w0.shape[0]):
        kept, pruned = keep[r], ~keep[r]
        out[r, kept] = w0[r, kept] + torch.linalg.solve(a[kept][:, kept], a[kept][:, pruned] @ w0[r, pruned])
    return out / s


@pytest.mark.parametrize(
    ("structure", "per_row"),
    [("unstructured", False), ("unstructured", True), ("2:4", False), ("2:4", True), ("4:8", False), ("1:4", True)],
)
@pytest.mark.parametrize(
    "schedule",
    [
        dict(iterations=8, ramp_iterations=6, rho=0.5, relaxation=1.8),
        dict(iterations=20, ramp_iterations=15, rho=1.0, relaxation=1.0),  # the paper's code's schedule
        dict(iterations=5, ramp_iterations=0, rho=0.7, relaxation=1.5, percdamp=0.0),
    ],
)
def test_admm_matches_slow_reference(structure, per_row, schedule):
    weight, _, stats = _layer_data(seed=1)
    parsed = parse_structure(structure, 0.6 if structure == "unstructured" else None)
    new, keep = admm_prune(weight, stats.gram, parsed.sparsity, parsed.n, parsed.m, per_row=per_row, **schedule)
    ref_w, ref_keep = _reference_admm(
        weight,
        stats.gram,
        parsed.sparsity,
        parsed.n or 0,
        parsed.m or 0,
        iterations=schedule["iterations"],
        ramp=schedule["ramp_iterations"],
        rho=schedule["rho"],
        relaxation=schedule["relaxation"],
        percdamp=schedule.get("percdamp", 0.1),
        per_row=per_row,
    )
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(new.double(), ref_w, atol=1e-4, rtol=1e-4)
    assert new.dtype == torch.float32 and bool((new[~keep] == 0).all())
    pruned_per_row = (~keep).sum(dim=1)
    if parsed.is_n_m:
        assert bool((keep.view(keep.shape[0], -1, parsed.m).sum(-1) == parsed.n).all())
    elif per_row:
        assert bool((pruned_per_row == int(16 * 0.6)).all())
    else:
        assert int(pruned_per_row.sum()) == int(keep.numel() * 0.6)
        assert pruned_per_row.unique().numel() > 1  # ranked over the layer: rows differ


def test_admm_update_keeps_the_mask_and_converges_to_the_exact_optimum():
    weight, _, stats = _layer_data(rows=10, cols=24, tokens=256, seed=2)
    keep = Wanda().select(Wanda().score(weight, stats), parse_structure("unstructured", 0.5), 0.5)
    exact = _exact_masked_solution(weight, stats.gram, keep)
    converged = admm_update(weight, stats.gram, keep, iterations=300)
    assert bool((converged[~keep] == 0).all())
    assert torch.allclose(converged.double(), exact, atol=1e-4, rtol=1e-3)
    ref, ref_keep = _reference_admm(weight, stats.gram, 0.5, keep=keep, iterations=8)
    default = admm_update(weight, stats.gram, keep)
    assert torch.equal(ref_keep, keep) and torch.allclose(default.double(), ref, atol=1e-4, rtol=1e-4)
    # 8 iterations already land within 2 % of the optimum's reconstruction error, far below plain masking.
    best = reconstruction_error(weight, exact.float(), stats.gram)
    assert reconstruction_error(weight, default, stats.gram) < 1.02 * best
    assert reconstruction_error(weight, weight * keep, stats.gram) > 2 * best


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_admm_reconstructs_better_than_sparsegpt_and_wanda(structure):
    weight, _, stats = _layer_data(rows=48, cols=64, tokens=512, seed=3)
    parsed = parse_structure(structure)
    errors = {}
    for method in (ADMM(), SparseGPT(), Wanda()):
        pruned = weight.clone()
        keep = method.prune_layer(pruned, stats, parsed, parsed.sparsity)
        assert int((~keep).sum()) == int(weight.numel() * 0.5) and bool((pruned[~keep] == 0).all())
        errors[method.name] = reconstruction_error(weight, pruned, stats.gram).item()
    assert errors["admm"] < 0.9 * errors["sparsegpt"] < 0.9 * errors["wanda"], errors


def test_admm_keeps_the_model_dtype_and_solves_in_float32():
    weight, _, stats = _layer_data(seed=4)
    parsed = parse_structure("unstructured", 0.5)
    half = weight.to(torch.bfloat16)
    keep = ADMM(selection="row").prune_layer(half, stats, parsed, 0.5)
    expected, expected_keep = admm_prune(weight.to(torch.bfloat16), stats.gram, 0.5, per_row=True)
    assert half.dtype == torch.bfloat16 and torch.equal(keep, expected_keep)
    assert torch.equal(half, expected.to(torch.bfloat16))


# --- through prune(), the registry and the refinement -------------------------------------------------------------


def _prunable_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers")}


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_admm_through_prune_beats_sparsegpt_on_each_layer(llama, calibration_batches, structure):
    options = dict(structure=structure, sparsity=0.5 if structure == "unstructured" else None)
    sgpt = copy.deepcopy(llama)
    prune(sgpt, calibration_batches, method="sparsegpt", **options)
    dense = {n: m.weight.detach().clone() for n, m in _prunable_layers(llama).items()}
    report = prune(llama, calibration_batches, method="admm", **options)
    assert report.method == "admm" and report.global_sparsity == pytest.approx(0.5)
    for layer in report.layers:
        weight = llama.get_submodule(layer.name).weight
        assert torch.isfinite(weight).all()
        assert layer.num_pruned == int((weight == 0).sum()) == weight.numel() // 2
    changed = [
        n
        for n, m in _prunable_layers(llama).items()
        if not torch.equal(m.weight[m.weight != 0], dense[n][m.weight != 0])
    ]
    assert changed  # kept weights were updated, not only masked
    # The first layer's inputs are the same dense activations in both runs: ADMM's error is lower there.
    first = "model.layers.0.self_attn.q_proj"
    stats = GramStatistics(64, torch.device("cpu"))
    embedded = llama.model.embed_tokens(calibration_batches[0]["input_ids"])
    normed = llama.model.layers[0].input_layernorm(embedded)
    stats.update(normed.detach(), None, num_sequences=normed.shape[0])
    admm_error = reconstruction_error(dense[first], llama.get_submodule(first).weight.detach(), stats.gram)
    sgpt_error = reconstruction_error(dense[first], sgpt.get_submodule(first).weight.detach(), stats.gram)
    assert admm_error < sgpt_error


def test_wanda_mask_plus_admm_update_is_one_call(llama, calibration_batches):
    wanda = copy.deepcopy(llama)
    prune(wanda, calibration_batches, sparsity=0.5)
    report = prune(llama, calibration_batches, sparsity=0.5, refine="admm-update")
    assert (report.method, report.refinement) == ("wanda", "admm-update")
    first = True
    for name, module in _prunable_layers(llama).items():
        updated, masked = module.weight, wanda.get_submodule(name).weight
        if first:  # block 0's inputs are the same in both runs, so Wanda's masks are too
            assert torch.equal(updated == 0, masked == 0)
            first = False
        assert int((updated == 0).sum()) == updated.numel() // 2
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(llama.state_dict()[q_proj], wanda.state_dict()[q_proj])


def test_layers_fed_the_same_input_share_one_inverse_and_nothing_outlives_a_block(
    llama, calibration_batches, monkeypatch
):
    import wanda_lightning.methods.admm as admm_module

    uncached = copy.deepcopy(llama)
    real = torch.linalg.inv_ex
    sizes = []

    def counting(matrix, *args, **kwargs):
        sizes.append(matrix.shape[0])
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "inv_ex", counting)
    method = ADMM()
    prune(llama, calibration_batches, method=method, refine="admm-update")
    # Per block: q/k/v share one inverse, o_proj has its own, gate/up share one, down_proj has its own (14 layers,
    # 8 inverses); the refinement (pruning the same layer right after the method) keeps a cache of its own.
    assert sizes == [64, 64, 64, 64, 64, 64, 128, 128] * 2
    assert method._cache._gram is None  # cleared after each block: nothing held once prune() returns
    monkeypatch.setattr(
        admm_module._SystemCache, "get", lambda self, gram, percdamp, rho: admm_system(gram, percdamp=percdamp, rho=rho)
    )
    prune(uncached, calibration_batches, method="admm", refine="admm-update")
    assert all(
        torch.equal(a, b) for a, b in zip(llama.state_dict().values(), uncached.state_dict().values(), strict=True)
    )


def test_registry_names_and_options():
    assert isinstance(get_method("admm"), ADMM)
    assert get_method("admm", iterations=8, ramp_iterations=6).describe() == "admm (iterations=8, ramp_iterations=6)"
    assert ADMM(iterations=20, ramp_iterations=15, rho=1.0, relaxation=1.0).describe() == "admm"  # the defaults
    assert isinstance(get_refinement("admm-update"), ADMMUpdate)
    assert ADMMUpdate(iterations=4).describe() == "admm-update (iterations=4)"
    assert ADMM().shard_local(parse_structure("2:4")) is False
    row = ADMM(rho=0.7).for_row_shards(parse_structure("unstructured"))
    assert row.selection == "row" and row.rho == 0.7 and row.shard_local(parse_structure("unstructured"))
    assert ADMMUpdate().shard_local(parse_structure("unstructured"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(iterations=0), r"`iterations` must be a positive integer, got 0"),
        (
            dict(iterations=4, ramp_iterations=5),
            r"`ramp_iterations` must be an integer from 0 to `iterations`=4, got 5",
        ),
        (dict(rho=0.0), r"`rho` must be a number > 0, got 0.0"),
        (dict(relaxation=2.0), r"`relaxation` must be in \(0, 2\), got 2.0"),
        (dict(percdamp=-0.1), r"`percdamp` must be a number >= 0, got -0.1"),
        (dict(selection="column"), r"`selection` must be one of \['layer', 'row'\], got 'column'"),
    ],
)
def test_bad_options_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ADMM(**kwargs)
    with pytest.raises(ValueError, match=message):
        get_method("admm", **kwargs)
    if "selection" not in kwargs and "ramp_iterations" not in kwargs:
        with pytest.raises(ValueError, match=message.replace("ADMM", "")):
            ADMMUpdate(**kwargs)


# --- ill-conditioned Gram matrices --------------------------------------------------------------------------------


def _dead_feature_model():
    """Linear(8 -> 24) + ReLU feeding a Linear(24 -> 6): biases kill 5 of the 24 hidden features, keep the rest."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 6))
    with torch.no_grad():
        model[0].bias[:5] = -100.0
        model[0].bias[5:] = 100.0
    return model


def test_many_layers_warning_alike_give_one_summary_warning_and_the_details_in_the_report():
    torch.manual_seed(0)
    blocks = [_dead_feature_model() for _ in range(3)]
    model = nn.Sequential(*[layer for block in blocks for layer in block], nn.Linear(6, 8))  # 8 -> ... -> 6 -> 8
    for index in (3, 6):  # the later blocks read 6 features: their first layers take 6 inputs
        model[index] = nn.Linear(6, 24)
        with torch.no_grad():
            model[index].bias[:5] = -100.0
            model[index].bias[5:] = 100.0
    consumers = ["2", "5", "8"]  # each fed 24 features of which 5 are dead
    batches = [torch.randn(16, 8, generator=torch.Generator().manual_seed(1))]
    with pytest.warns(PruningWarning) as caught:
        report = prune(model, batches, method="admm", targets=consumers, sparsity=0.5, sequential=False)
    weak = [w for w in caught if "input features had (almost) no calibration signal" in str(w.message)]
    assert len(weak) == 1  # one warning for the run, not one per layer
    assert str(weak[0].message).startswith("3 layers (layer '2', ..., layer '8'): ADMM: 5 of 24 input features")
    assert [m.split(":")[0] for m in report.warnings if "calibration signal" in m] == [
        f"layer '{c}'" for c in consumers
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dead_features_and_a_tiny_calibration_set_stay_finite_and_warn(dtype):
    model = _dead_feature_model().to(dtype)
    tiny = [
        torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    ]  # 3 tokens for 24 inputs: a singular Gram matrix
    dense = model[2].weight.detach().clone()
    with pytest.warns(PruningWarning, match=r"layer '2': ADMM: 5 of 24 input features had \(almost\) no calibration"):
        prune(model, tiny, method="admm", targets=["2"], sparsity=0.5)
    weight = model[2].weight.detach()
    assert weight.dtype == dtype and bool(torch.isfinite(weight).all())
    # Dead features cost nothing to prune: they go first.
    assert bool((weight[:, :5] == 0).all())
    assert int((weight == 0).sum()) == weight.numel() // 2
    assert float(weight.float().abs().max()) < 100 * float(dense.float().abs().max())


def test_non_finite_rows_fall_back_to_dense_weights_under_wandas_mask(monkeypatch):
    import wanda_lightning.methods.admm as admm_module

    real = admm_module.admm_iterations

    def overflowing(weight, system, **kwargs):
        new, keep = real(weight, system, **kwargs)
        new[1, keep[1]] = math.inf
        return new, keep

    monkeypatch.setattr(admm_module, "admm_iterations", overflowing)
    model = nn.Sequential(nn.Linear(16, 4))
    dense = model[0].weight.detach().clone()
    batches = [torch.randn(32, 16)]
    with pytest.warns(PruningWarning, match=r"layer '0': ADMM: the updated weights of 1 of 4 rows are not finite"):
        prune(model, batches, method="admm", sparsity=0.5)
    weight = model[0].weight.detach()
    assert bool(torch.isfinite(weight).all())
    stats = GramStatistics(16, torch.device("cpu"))
    stats.update(batches[0], None, num_sequences=1)
    wanda_keep = ~torch.zeros(4, 16, dtype=torch.bool)
    scores = dense.abs() * torch.diagonal(stats.gram).sqrt()
    count = int((weight[1] == 0).sum())
    wanda_keep[1] = scores[1] > scores[1].sort().values[count - 1]
    assert torch.equal(weight[1], dense[1] * wanda_keep[1])
    assert not torch.equal(weight[0], dense[0] * (weight[0] != 0))  # the other rows were updated


def test_a_system_that_cannot_be_inverted_retries_then_falls_back(monkeypatch, llama, calibration_batches):
    real = torch.linalg.inv_ex
    calls = []

    def failing(matrix, *args, **kwargs):
        calls.append(float(torch.diagonal(matrix).mean()))
        inverse, info = real(matrix, *args, **kwargs)
        return inverse, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "inv_ex", failing)
    layer = "model.layers.0.self_attn.q_proj"
    wanda = copy.deepcopy(llama)
    prune(wanda, calibration_batches, targets=[layer], sparsity=0.5)
    with pytest.warns(PruningWarning, match=rf"layer '{layer}': ADMM: .*cannot be inverted.*mask of Wanda's scores"):
        prune(llama, calibration_batches, method="admm", targets=[layer], sparsity=0.5)
    assert len(calls) == 4 and calls[1] > calls[0]  # 3 retries with more damping
    assert torch.equal(llama.get_submodule(layer).weight, wanda.get_submodule(layer).weight)


def test_nan_gram_is_an_error_naming_the_problem():
    stats = GramStatistics(4, torch.device("cpu"))
    stats.gram[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="Gram matrix holds NaN"):
        ADMM().prune_layer(torch.randn(2, 4), stats, parse_structure("unstructured"), 0.5)


def test_all_zero_inputs_prune_by_magnitude_without_nan():
    stats = GramStatistics(8, torch.device("cpu"))
    stats.update(torch.zeros(16, 8), None, num_sequences=1)
    system = admm_system(stats.gram)
    assert system.weak_features == 8 and torch.equal(system.scale, torch.ones(8))
    weight = torch.randn(3, 8)
    new, keep = admm_iterations(weight, system, sparsity=0.5, per_row=True)
    assert bool(torch.isfinite(new).all())
    assert torch.equal(keep, Wanda().select(weight.abs(), parse_structure("unstructured"), 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        admm_iterations(weight, system, sparsity=0.5)  # the pure function itself never warns
