"""``torch.nn.MultiheadAttention`` as a pruning target: masks against a slow reference that computes every statistic by
hand (query/key/value inputs, the attention output before ``out_proj``), block by block, in float64."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from wanda_lightning import CalibrationOptions, WandaPruningCallback, prune
from wanda_lightning.core.blocks import find_block_stack
from wanda_lightning.core.targets import find_targets, parameter_masks

SPARSITY = 0.5


# --- a faithful stand-in for torchvision's VisionTransformer layout ---------------------------------------------------
# torchvision does not import beside this torch build; these classes reproduce the module tree and the calls that
# matter here: blocks in an nn.Sequential built from an OrderedDict ("encoder_layer_<i>"), attention called with
# keyword arguments (query=x, key=x, value=x), the MLP as an nn.Sequential of Linear/GELU/Dropout.


class EncoderBlock(nn.Module):
    def __init__(self, heads: int, hidden: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden, heads, dropout=0.1, batch_first=True)
        self.dropout = nn.Dropout(0.1)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp), nn.GELU(), nn.Dropout(0.1), nn.Linear(mlp, hidden), nn.Dropout(0.1)
        )

    def forward(self, input: Tensor) -> Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(query=x, key=x, value=x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq_length: int, layers: int, heads: int, hidden: int, mlp: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, seq_length, hidden) * 0.02)
        self.dropout = nn.Dropout(0.1)
        self.layers = nn.Sequential(
            OrderedDict((f"encoder_layer_{i}", EncoderBlock(heads, hidden, mlp)) for i in range(layers))
        )
        self.ln = nn.LayerNorm(hidden, eps=1e-6)

    def forward(self, input: Tensor) -> Tensor:
        return self.ln(self.layers(self.dropout(input + self.pos_embedding)))


class VisionTransformer(nn.Module):
    def __init__(self, image: int = 8, patch: int = 2, layers: int = 2, heads: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.patch, self.hidden = patch, hidden
        self.conv_proj = nn.Conv2d(1, hidden, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.encoder = Encoder((image // patch) ** 2 + 1, layers, heads, hidden, 2 * hidden)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden, 10)))

    def embed(self, images: Tensor) -> Tensor:
        x = self.conv_proj(images).flatten(2).transpose(1, 2)  # (B, patches, hidden)
        return torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.heads(self.encoder(self.embed(images))[:, 0])


# --- the slow reference -----------------------------------------------------------------------------------------------


def wanda_keep(weight: Tensor, sum_sq: Tensor, sequences: int, sparsity: float = SPARSITY) -> Tensor:
    """The reference code's selection: |W| * sqrt(mean over sequences of sum_t x^2), stable ascending sort per row."""
    scores = weight.double().abs() * (sum_sq / sequences).sqrt()
    order = torch.sort(scores, dim=1, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    pruned = int(weight.shape[1] * sparsity)
    keep.scatter_(1, order[:, :pruned], False)
    return keep


def squares(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).double().square().sum(0)


def attention_by_hand(
    attention: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(B, L, E) float64 inputs -> (output before out_proj, output, the projections' weights), batch first."""
    e, h = attention.embed_dim, attention.num_heads
    d = e // h
    if attention._qkv_same_embed_dim:
        packed = attention.in_proj_weight.double()
        weights = {"q": packed[:e], "k": packed[e : 2 * e], "v": packed[2 * e :]}
    else:
        weights = {p: getattr(attention, f"{p}_proj_weight").double() for p in "qkv"}
    bias = attention.in_proj_bias.double() if attention.in_proj_bias is not None else torch.zeros(3 * e).double()
    q = query @ weights["q"].T + bias[:e]
    k = key @ weights["k"].T + bias[e : 2 * e]
    v = value @ weights["v"].T + bias[2 * e :]
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    q, k, v = (t.view(b, -1, h, d).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    context = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, e)  # heads side by side
    output = context @ attention.out_proj.weight.double().T + attention.out_proj.bias.double()
    assert lk == k.shape[2]
    return context, output, weights


def prune_attention_by_hand(
    name: str, attention: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, masks: dict[str, Tensor]
) -> None:
    """Masks for the q/k/v thirds from their own inputs (written into ``attention``), with sequences = dim 0."""
    sequences = query.shape[0]
    inputs = {"q": query, "k": key, "v": value}
    e = attention.embed_dim
    for index, part in enumerate("qkv"):
        if attention._qkv_same_embed_dim:
            weight = attention.in_proj_weight.data[index * e : (index + 1) * e]
            label = f"{name}.in_proj_weight.{part}"
        else:
            weight = getattr(attention, f"{part}_proj_weight").data
            label = f"{name}.{part}_proj_weight"
        masks[label] = wanda_keep(weight, squares(inputs[part]), sequences)
        weight.masked_fill_(~masks[label], 0)


def prune_linear_by_hand(name: str, layer: nn.Linear, x: Tensor, sequences: int, masks: dict[str, Tensor]) -> None:
    masks[name] = wanda_keep(layer.weight.data, squares(x), sequences)
    layer.weight.data.masked_fill_(~masks[name], 0)


def layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)


def linear(layer: nn.Linear, x: Tensor) -> Tensor:
    return x @ layer.weight.double().T + layer.bias.double()


def reference_encoder(
    model: nn.TransformerEncoder, batches: list[Tensor], sequential: bool = True
) -> dict[str, Tensor]:
    """Wanda of a post-norm, batch-first nn.TransformerEncoder (ReLU), computed by hand: block-sequential (each block's
    statistics from the pruned blocks before it), or one-shot (every statistic from the dense model)."""
    model = copy.deepcopy(model)
    masks: dict[str, Tensor] = {}
    hidden = torch.cat(batches).double()
    sequences = hidden.shape[0]
    for index, block in enumerate(model.layers):
        prefix = f"layers.{index}"
        attention = block.self_attn
        # Statistics of every layer of the block come from the dense block (one pass), then the block is pruned.
        context, output, _ = attention_by_hand(attention, hidden, hidden, hidden)
        x1 = layer_norm(block.norm1, hidden + output)
        h = linear(block.linear1, x1).relu()
        stats = {"out_proj": squares(context), "linear1": squares(x1), "linear2": squares(h)}
        dense_output = layer_norm(block.norm2, x1 + linear(block.linear2, h))
        prune_attention_by_hand(f"{prefix}.self_attn", attention, hidden, hidden, hidden, masks)
        for layer_name, layer in (
            ("self_attn.out_proj", attention.out_proj),
            ("linear1", block.linear1),
            ("linear2", block.linear2),
        ):
            key = layer_name.rpartition(".")[2]
            masks[f"{prefix}.{layer_name}"] = wanda_keep(layer.weight.data, stats[key], sequences)
            layer.weight.data.masked_fill_(~masks[f"{prefix}.{layer_name}"], 0)
        if not sequential:
            hidden = dense_output
            continue
        # The pruned block makes the next block's inputs.
        _, output, _ = attention_by_hand(attention, hidden, hidden, hidden)
        x1 = layer_norm(block.norm1, hidden + output)
        hidden = layer_norm(block.norm2, x1 + linear(block.linear2, linear(block.linear1, x1).relu()))
    return masks


def reference_vit(model: VisionTransformer, batches: list[Tensor]) -> dict[str, Tensor]:
    """Block-sequential Wanda of the ViT layout, by hand; the head (after the stack) on the pruned model's output."""
    model = copy.deepcopy(model).double()
    masks: dict[str, Tensor] = {}
    images = torch.cat(batches).double()
    sequences = images.shape[0]
    with torch.no_grad():
        hidden = model.embed(images) + model.encoder.pos_embedding
    for key, block in model.encoder.layers.named_children():
        prefix = f"encoder.layers.{key}"
        x = layer_norm(block.ln_1, hidden)
        context, output, _ = attention_by_hand(block.self_attention, x, x, x)
        x2 = output + hidden
        y = layer_norm(block.ln_2, x2)
        g = F.gelu(linear(block.mlp[0], y))
        prune_attention_by_hand(f"{prefix}.self_attention", block.self_attention, x, x, x, masks)
        prune_linear_by_hand(
            f"{prefix}.self_attention.out_proj", block.self_attention.out_proj, context, sequences, masks
        )
        prune_linear_by_hand(f"{prefix}.mlp.0", block.mlp[0], y, sequences, masks)
        prune_linear_by_hand(f"{prefix}.mlp.3", block.mlp[3], g, sequences, masks)
        x = layer_norm(block.ln_1, hidden)
        _, output, _ = attention_by_hand(block.self_attention, x, x, x)
        x2 = output + hidden
        hidden = x2 + linear(block.mlp[3], F.gelu(linear(block.mlp[0], layer_norm(block.ln_2, x2))))
    cls = layer_norm(model.encoder.ln, hidden)[:, 0]
    prune_linear_by_hand("heads.head", model.heads.head, cls, sequences, masks)
    return masks


def assert_masks(found: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert sorted(found) == sorted(expected)
    for name, keep in expected.items():
        assert torch.equal(found[name].cpu(), keep), name


def collect(model: nn.Module, batches: list[Any], **kwargs: Any) -> dict[str, Tensor]:
    masks: dict[str, Tensor] = {}
    prune(model, batches, sparsity=SPARSITY, on_layer_pruned=lambda n, k: masks.__setitem__(n, k.clone()), **kwargs)
    return masks


def encoder(seed: int = 0, layers: int = 2) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    for parameter in model.parameters():  # non-zero biases everywhere, so that a forgotten bias would show
        if parameter.dim() == 1:
            nn.init.normal_(parameter, std=0.1)
    return model.eval()


def token_batches(count: int = 2, batch: int = 3, length: int = 6, width: int = 32) -> list[Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(batch, length, width, generator=generator) for _ in range(count)]


# --- the core ---------------------------------------------------------------------------------------------------------


def test_targets_are_the_qkv_thirds_and_out_proj_and_the_fast_path_comes_back(single_thread):
    model = encoder()
    layers, _ = find_targets(model)
    assert [t.name for t in layers[:6]] == [
        "layers.0.self_attn.in_proj_weight.q",
        "layers.0.self_attn.in_proj_weight.k",
        "layers.0.self_attn.in_proj_weight.v",
        "layers.0.self_attn.out_proj",
        "layers.0.linear1",
        "layers.0.linear2",
    ]
    assert {t.parameter_name for t in layers[:3]} == {"layers.0.self_attn.in_proj_weight"}
    assert layers[1].weight_2d.data_ptr() == model.layers[0].self_attn.in_proj_weight[32:].data_ptr()  # a view
    assert layers[3].attention is model.layers[0].self_attn
    before = torch.backends.mha.get_fastpath_enabled()
    collect(model, token_batches())
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert isinstance(model.layers[0].self_attn.out_proj, nn.Linear)  # the split is undone


@pytest.mark.parametrize("sequential", [True, False])
def test_transformer_encoder_masks_equal_the_hand_computed_reference(single_thread, sequential):
    model, batches = encoder(), token_batches()
    dense = copy.deepcopy(model)
    found = collect(model, batches, sequential=sequential)
    assert_masks(found, reference_encoder(dense, batches, sequential))
    # The weights are zero exactly where pruned, in the packed parameter too.
    packed = model.layers[1].self_attn.in_proj_weight
    expected_packed = torch.cat([found[f"layers.1.self_attn.in_proj_weight.{p}"] for p in "qkv"])
    assert torch.equal(packed != 0, expected_packed)


def test_cross_attention_takes_key_and_value_statistics_from_the_memory(single_thread):
    torch.manual_seed(0)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, batch_first=True), 1).eval()
    generator = torch.Generator().manual_seed(2)
    target = torch.randn(4, 5, 16, generator=generator)
    memory = torch.randn(4, 7, 16, generator=generator) * 3.0  # different scale: the statistics can be told apart
    dense = copy.deepcopy(decoder)
    found = collect(decoder, [(target, memory)], forward_fn=lambda m, b: m(b[0], b[1]), targets=["*multihead_attn*"])

    block = dense.layers[0]
    x = target.double()
    _, self_out, _ = attention_by_hand(block.self_attn, x, x, x)
    x1 = layer_norm(block.norm1, x + self_out)
    context, _, _ = attention_by_hand(block.multihead_attn, x1, memory.double(), memory.double())
    expected: dict[str, Tensor] = {}
    prune_attention_by_hand(
        "layers.0.multihead_attn", block.multihead_attn, x1, memory.double(), memory.double(), expected
    )
    expected["layers.0.multihead_attn.out_proj"] = wanda_keep(block.multihead_attn.out_proj.weight, squares(context), 4)
    assert_masks(found, expected)


def test_separate_query_key_value_weights_are_pruned_from_their_own_inputs(single_thread):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, kdim=8, vdim=12, batch_first=True).eval()
    nn.init.normal_(attention.in_proj_bias, std=0.1)
    nn.init.normal_(attention.out_proj.bias, std=0.1)
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(3, n, d, generator=generator) for n, d in ((5, 16), (6, 8), (6, 12)))
    dense = copy.deepcopy(attention)
    found = collect(attention, [(query, key, value)], forward_fn=lambda m, b: m(*b, need_weights=False))

    assert found["q_proj_weight"].shape == (16, 16) and found["k_proj_weight"].shape == (16, 8)
    context, _, _ = attention_by_hand(dense, query.double(), key.double(), value.double())
    expected: dict[str, Tensor] = {}
    prune_attention_by_hand("", dense, query.double(), key.double(), value.double(), expected)
    expected = {name.lstrip("."): keep for name, keep in expected.items()}  # the attention is the root module
    expected["out_proj"] = wanda_keep(dense.out_proj.weight, squares(context), 3)
    assert_masks(found, expected)
    assert torch.equal(attention.v_proj_weight != 0, expected["v_proj_weight"])


def test_vit_layout_blocks_are_found_by_their_ordered_names_and_masks_equal_the_reference(single_thread):
    torch.manual_seed(0)
    model = VisionTransformer().eval()
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(4, 1, 8, 8, generator=generator) for _ in range(2)]
    layers, _ = find_targets(model)
    stack = find_block_stack(model, layers)
    assert stack is not None and stack.name == "encoder.layers" and stack.keys == ["encoder_layer_0", "encoder_layer_1"]
    assert stack.index_of("encoder.layers.encoder_layer_1.mlp.0") == 1
    dense = copy.deepcopy(model)
    found = collect(model, batches)
    assert_masks(found, reference_vit(dense, batches))


def test_attention_output_before_out_proj_is_what_out_proj_hooks_see(single_thread):
    """The split forward computes what the model computes: the pruned model's output with the split equals the output
    without it (a forward through the block stack after pruning)."""
    model = encoder()
    batches = token_batches()
    prune(model, batches, sparsity=SPARSITY)
    layers, _ = find_targets(model)
    from wanda_lightning.core.attention import split_attention

    with torch.no_grad():
        plain = model(batches[0])
        with split_attention(layers):
            split = model(batches[0])
    torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-6)


# --- through a Trainer ------------------------------------------------------------------------------------------------


class DigitsLikeViT(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = VisionTransformer()

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def images(count: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(
        torch.randn(count, 1, 8, 8, generator=generator), torch.randint(0, 10, (count,), generator=generator)
    )
    return DataLoader(data, batch_size=4)


def test_callback_prunes_a_vit_with_masks_by_parameter_name(tmp_path: Path, single_thread):
    module = DigitsLikeViT()
    val = images(8, seed=5)
    expected = reference_vit(copy.deepcopy(module.model), [x for x, _ in val])
    pruning = WandaPruningCallback(
        prune_on="validate", verbose=False, calibration_options=CalibrationOptions(num_samples=8)
    )
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning]
    )
    trainer.validate(module, val)

    # Every mask, by parameter name: the reference's q/k/v thirds assembled into `in_proj_weight`.
    layers, _ = find_targets(module.model)
    by_parameter = parameter_masks(layers, expected)
    assert sorted(pruning.masks) == sorted(f"model.{name}" for name in by_parameter)
    assert len(by_parameter) == 2 * 4 + 1  # in_proj_weight, out_proj, mlp.0, mlp.3 per block, and the head
    for name, keep in by_parameter.items():
        assert torch.equal(pruning.masks[f"model.{name}"], keep), name
    block = "model.encoder.layers.encoder_layer_0.self_attention"
    assert pruning.sparsities[f"{block}.in_proj_weight"] == SPARSITY
    assert pruning.metrics["val_loss"]["pruned"] != pruning.metrics["val_loss"]["dense"]


def test_the_attention_classifier_example_trains_prunes_and_reports_accuracy(single_thread):
    pytest.importorskip("sklearn")
    import importlib.util

    path = Path(__file__).parents[2] / "examples" / "attention_classifier.py"
    spec = importlib.util.spec_from_file_location("attention_classifier", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    pruning = example.main(["--epochs", "1"])

    assert pruning.global_sparsity == SPARSITY and "encoder.layers.2.self_attn.in_proj_weight" in pruning.masks
    assert "patches.weight" not in pruning.masks and "head.weight" not in pruning.masks
    accuracy = pruning.metrics["val_acc"]
    assert 0.0 <= accuracy["pruned"] <= 1.0 and accuracy["delta"] == accuracy["pruned"] - accuracy["dense"]


def test_the_sparsity_metric_counts_the_packed_projection_too(single_thread):
    from wanda_lightning import Sparsity

    model = encoder()
    prune(model, token_batches(), sparsity=SPARSITY)
    metric = Sparsity()
    metric.update(model)
    assert float(metric.compute()) == SPARSITY  # in_proj_weight, out_proj, linear1, linear2: all at 50 %
    with torch.no_grad():
        model.layers[0].self_attn.in_proj_weight.zero_()
    metric = Sparsity()
    metric.update(model)
    assert float(metric.compute()) > SPARSITY
