"""``wanda_lightning.lightning.metrics`` against slow, independent references written with loops and ``math``."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
from torch import nn

from wanda_lightning.lightning.metrics import Perplexity, Sparsity, perplexity, sparsity


def reference_perplexity(batches, ignore_index=-100):
    """exp(mean NLL) over (logits, target, mask) batches, one token at a time, with math.log and math.exp."""
    total, count = 0.0, 0
    for logits, target, mask in batches:
        values = logits.double().tolist()
        ids = target.tolist()
        keep = mask.tolist() if mask is not None else None
        for b in range(len(ids)):
            for t in range(len(ids[b]) - 1):
                token = ids[b][t + 1]
                if (ignore_index is not None and token == ignore_index) or (keep is not None and not keep[b][t + 1]):
                    continue
                row = values[b][t]
                top = max(row)
                log_norm = top + math.log(sum(math.exp(v - top) for v in row))
                total += log_norm - row[token]
                count += 1
    return math.exp(total / count)


def _batches(dtype, ignore_index, padded, seed=0, count=3):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        logits = (torch.randn(2, 6, 11, generator=generator) * 3).to(dtype)
        target = torch.randint(0, 11, (2, 6), generator=generator)
        if ignore_index is not None:
            target[0, 2] = ignore_index
            target[1, -1] = ignore_index
        mask = None
        if padded:
            mask = torch.ones(2, 6, dtype=torch.long)
            mask[1, 4:] = 0
        batches.append((logits, target, mask))
    return batches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("ignore_index", [None, -100, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_perplexity_matches_reference(dtype, ignore_index, padded):
    batches = _batches(dtype, ignore_index, padded)
    metric = Perplexity(ignore_index=ignore_index)
    for logits, target, mask in batches:
        metric.update(logits, target, mask)
    expected = reference_perplexity(batches, ignore_index)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)
    # The functional form over one concatenated batch agrees (masks default to all ones).
    logits = torch.cat([b[0] for b in batches])
    target = torch.cat([b[1] for b in batches])
    mask = torch.cat([b[2] for b in batches]) if padded else None
    assert perplexity(logits, target, mask, ignore_index=ignore_index).item() == pytest.approx(expected, rel=1e-6)


def test_perplexity_does_not_underflow():
    # A target the model gives probability ~exp(-600): softmax-then-log (torchmetrics' way) gives inf.
    logits = torch.zeros(1, 4, 4)
    logits[0, :, 0] = 600.0
    target = torch.tensor([[0, 1, 0, 0]])
    expected = reference_perplexity([(logits, target, None)])
    value = perplexity(logits, target).item()
    assert math.isfinite(value) and value == pytest.approx(expected, rel=1e-9)
    from torchmetrics.functional.text import perplexity as torchmetrics_perplexity

    assert not math.isfinite(torchmetrics_perplexity(logits[:, :-1], target[:, 1:]).item())


def test_perplexity_shifts_by_one():
    # Logits at position t put all their mass on token t + 1: perplexity 1 after the shift, huge without it.
    target = torch.tensor([[1, 2, 3, 0]])
    logits = torch.full((1, 4, 4), -50.0)
    for t in range(3):
        logits[0, t, target[0, t + 1]] = 50.0
    assert perplexity(logits, target).item() == pytest.approx(1.0)


def test_perplexity_state_is_float64_and_resets():
    metric = Perplexity()
    assert metric.total_nll.dtype == torch.float64 and metric.count.dtype == torch.int64
    logits, target, _ = _batches(torch.float32, None, False)[0]
    metric.update(logits, target)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.count.item() == 0 and math.isnan(metric.compute().item())


@pytest.mark.parametrize(
    ("logits", "target", "mask", "error", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), None, ValueError, "`logits`"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), None, ValueError, "`target`"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3), None, TypeError, "`target`"),
        (torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), None, TypeError, "`logits`"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4), ValueError, "`attention_mask`"),
    ],
)
def test_perplexity_rejects_bad_inputs(logits, target, mask, error, match):
    with pytest.raises(error, match=match):
        perplexity(logits, target, mask)
    with pytest.raises(TypeError, match="`ignore_index`"):
        Perplexity(ignore_index=1.5)  # type: ignore[arg-type]


def reference_sparsity(tensors):
    zeros = total = 0
    for tensor in tensors:
        for value in tensor.reshape(-1).tolist():
            zeros += value == 0
            total += 1
    return zeros / total


def test_sparsity_of_tensors_and_modules():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 7, generator=generator) * (torch.rand(5, 7, generator=generator) > p) for p in (0.3, 0.8)]
    metric = Sparsity()
    for tensor in tensors:
        metric.update(tensor)
    assert metric.compute().item() == pytest.approx(reference_sparsity(tensors))
    assert sparsity(tensors[0]).item() == pytest.approx(reference_sparsity(tensors[:1]))

    net = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        net[0].weight.copy_(tensors[0])
        net[0].bias.zero_()  # biases are not counted
    expected = reference_sparsity([net[0].weight, net[2].weight])
    assert sparsity(net).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        sparsity(nn.ReLU())
    with pytest.raises(TypeError, match="`value`"):
        sparsity([1.0, 0.0])  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batches = _batches(torch.float32, -100, True, count=4)
        ppl = Perplexity()
        zeros = Sparsity()
        for logits, target, mask in batches[rank::world]:
            ppl.update(logits, target, mask)
            zeros.update(logits.clamp(min=0))
        queue.put((rank, ppl.compute().item(), zeros.compute().item()))
    finally:
        torch.distributed.destroy_process_group()


def test_metrics_reduce_across_ddp_processes():
    """Two gloo processes each update half of the batches; both compute the value of the union."""
    context = torch.multiprocessing.get_context("spawn")
    queue = context.SimpleQueue()
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(2, _free_port(), queue), nprocs=2, join=True, start_method="spawn"
    )
    results = sorted(queue.get() for _ in range(2))
    batches = _batches(torch.float32, -100, True, count=4)
    expected_ppl = reference_perplexity(batches)
    expected_sparsity = reference_sparsity([logits.clamp(min=0) for logits, _, _ in batches])
    for _, ppl, zeros in results:
        assert ppl == pytest.approx(expected_ppl, rel=1e-6)
        assert zeros == pytest.approx(expected_sparsity)
