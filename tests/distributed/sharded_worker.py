"""One process of a 2-process CPU (gloo) run under FSDP2, started by ``test_sharded.py`` (not a test module itself).

Usage: ``python sharded_worker.py SCENARIO OUT_DIR`` with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. Each rank writes ``OUT_DIR/rank{r}.pt`` with what the test checks.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist

from wanda_lightning import CalibrationOptions

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the helpers package

from helpers.processes import CollectiveCounter, count_full_gathers


def tiny_llama() -> Any:
    from helpers.models import tiny_llama as conftest_tiny_llama

    return conftest_tiny_llama()


def calibration() -> list[dict[str, torch.Tensor]]:
    from helpers.models import make_batches

    return make_batches(num_batches=4, batch=2, seed=3)


def functional(out: str, rank: int, uneven: bool, structure: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from wanda_lightning import prune

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    model = tiny_llama()
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    batches = calibration()
    mine = batches[:3] if (uneven and rank == 0) else batches[rank::2][: (1 if uneven else 2)]
    gathers = count_full_gathers()
    counter = CollectiveCounter(["all_reduce"])
    with warnings.catch_warnings(record=True) as caught, counter.counting():
        warnings.simplefilter("always")
        report = prune(model, mine, structure=structure, sparsity=None if ":" in structure else 0.5, num_samples=None)
    counts = {
        **gathers,
        "all_reduce_bytes": counter.counts.get("all_reduce", 0),
        "all_reduce_calls": counter.counts.get("all_reduce_calls", 0),
    }
    local = {
        name: (param.to_local() == 0).float().mean().item()
        for name, param in model.named_parameters()
        if name.endswith("proj.weight")
    }
    full = {name: param.full_tensor().clone() for name, param in model.named_parameters()}
    torch.save(
        dict(
            counts=counts,
            local_sparsity=local,
            full=full,
            report_sparsity=report.global_sparsity,
            warnings=[str(w.message) for w in caught],
        ),
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.barrier()  # nobody tears gloo down while a peer still talks to it
    dist.destroy_process_group()


def options(out: str, rank: int) -> None:
    """Refusals for methods that compare across rows; OWL (all-reduced outlier counts) and DSnoT under FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from wanda_lightning import Wanda, prune

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    mine = calibration()[rank::2]
    errors = {}
    results = {}
    for label, kwargs in {
        "sparsegpt": dict(method="sparsegpt"),
        "ria": dict(method="ria"),
        "variant": dict(method=Wanda(variant=True)),
        "device": dict(device="cpu"),
        "owl": dict(allocation="owl"),
        "dsnot": dict(refine="dsnot"),
        "sparsegpt-2:4": dict(method="sparsegpt", structure="2:4", sparsity=None),
        "ria-permuted": dict(method="ria-permuted", structure="2:4", sparsity=None),
    }.items():
        model = tiny_llama()
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:
            report = prune(model, mine, **{"sparsity": 0.5, **kwargs}, num_samples=None)
        except ValueError as error:
            errors[label] = str(error)
            continue
        results[label] = dict(
            full={n: p.full_tensor().clone() for n, p in model.named_parameters()},
            block_sparsity=dict(report.block_sparsity),
        )
    torch.save(dict(errors=errors, results=results), os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # nobody tears gloo down while a peer still talks to it
    dist.destroy_process_group()


def admm(out: str, rank: int) -> None:
    """ADMM (unstructured: switched to per-row selection, with a warning; 2:4) and Wanda + the ADMM update."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from wanda_lightning import prune

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    mine = calibration()[rank::2]
    results = {}
    for label, kwargs in {
        "admm": dict(method="admm", sparsity=0.5),
        "admm-2:4": dict(method="admm", structure="2:4"),
        "wanda+admm-update": dict(refine="admm-update", sparsity=0.5),
    }.items():
        model = tiny_llama()
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        gathers = count_full_gathers()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = prune(model, mine, num_samples=None, **kwargs)
        gathered = dict(gathers)
        results[label] = dict(
            full={n: p.full_tensor().clone() for n, p in model.named_parameters()},
            method=report.method,
            sparsity=report.global_sparsity,
            gathers=gathered,
            warnings=[str(w.message) for w in caught],
        )
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()  # nobody tears gloo down while a peer still talks to it
    dist.destroy_process_group()


def _fsdp1_wrap(model: Any, use_orig_params: bool) -> Any:
    import functools

    from torch.distributed.fsdp.fully_sharded_data_parallel import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    return FullyShardedDataParallel(
        model, auto_wrap_policy=policy, use_orig_params=use_orig_params, device_id=torch.device("cpu")
    )


def fsdp1_functional(out: str, rank: int) -> None:
    """FSDP1: one-shot calibration, then one unit's full parameters at a time (summon_full_params, write-back)."""
    from torch.distributed.fsdp.fully_sharded_data_parallel import FullyShardedDataParallel

    from wanda_lightning import prune

    dist.init_process_group("gloo")
    summoned: list[tuple[int, bool]] = []
    original = FullyShardedDataParallel.summon_full_params

    def counting(module: Any, *args: Any, **kwargs: Any) -> Any:
        summoned.append((sum(p.numel() for p in module.parameters()), bool(kwargs.get("recurse", True))))
        return original(module, *args, **kwargs)

    results = {}
    for label, use_orig, kwargs in [
        ("wanda-orig", True, dict(sparsity=0.5)),
        ("wanda-flat", False, dict(sparsity=0.5)),
        ("sparsegpt-orig", True, dict(sparsity=0.5, method="sparsegpt")),
        ("ria-2:4-flat", False, dict(structure="2:4", method="ria")),
    ]:
        model = _fsdp1_wrap(tiny_llama(), use_orig)
        summoned.clear()
        FullyShardedDataParallel.summon_full_params = staticmethod(counting)  # type: ignore[assignment]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = prune(model, calibration()[rank::2], num_samples=None, **kwargs)
        FullyShardedDataParallel.summon_full_params = original  # type: ignore[assignment]
        calls = list(summoned)
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            full = {
                n.replace("_fsdp_wrapped_module.", ""): m.weight.detach().clone()
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        results[label] = dict(
            full=full,
            summoned=calls,
            sparsity=report.global_sparsity,
            sequential=report.sequential,
            warnings=[str(w.message) for w in caught],
        )
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _fsdp1_on_cpu() -> None:
    """Lets Lightning's FSDPStrategy wrap on CPU: it passes ``device_id=None`` there, which FSDP1 refuses without an
    accelerator. A test-only shim; the callback itself does not depend on it."""
    import torch.distributed.fsdp as fsdp_package
    from torch.distributed.fsdp.fully_sharded_data_parallel import FullyShardedDataParallel

    class CPUFullyShardedDataParallel(FullyShardedDataParallel):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("device_id") is None:
                kwargs["device_id"] = torch.device("cpu")
            super().__init__(*args, **kwargs)

    fsdp_package.FullyShardedDataParallel = CPUFullyShardedDataParallel  # type: ignore[misc]


def fsdp1_trainer(out: str, rank: int) -> None:
    """Lightning's FSDPStrategy wraps the LightningModule at the root: calibration and evaluation go through it."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.fully_sharded_data_parallel import FullyShardedDataParallel
    from torch.utils.data import DataLoader
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from wanda_lightning import WandaPruningCallback
    from wanda_lightning.lightning.module import CausalLMModule

    _fsdp1_on_cpu()

    class CPUFSDPStrategy(FSDPStrategy):  # Lightning refuses FSDPStrategy itself with accelerator="cpu"
        pass

    loader = DataLoader([dict(input_ids=ids) for b in calibration() for ids in b["input_ids"]], batch_size=2)
    module = CausalLMModule(tiny_llama(), learning_rate=1e-3)
    callback = WandaPruningCallback(
        sparsity=0.5,
        verbose=False,
        evaluate=1,
        calibration_options=CalibrationOptions(num_samples=None, sequential=False),
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}),
        max_steps=3,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader, loader)
    assert isinstance(trainer.strategy.model, FullyShardedDataParallel)
    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
        full = {
            n.replace("_fsdp_wrapped_module.", ""): m.weight.detach().clone()
            for n, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n
        }
    torch.save(
        dict(full=full, sparsity=callback.global_sparsity, metrics=callback.metrics, state=callback.state_dict()),
        os.path.join(out, f"rank{rank}.pt"),
    )


def trainer_run(out: str, rank: int, distributed_checkpoint: bool) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from wanda_lightning import WandaPruningCallback
    from wanda_lightning.lightning.module import CausalLMModule

    batches = calibration()
    rows = [dict(input_ids=ids) for b in batches for ids in b["input_ids"]]
    loader = DataLoader(rows, batch_size=2, shuffle=False)

    def make_trainer(**kwargs: Any) -> Trainer:
        return Trainer(
            accelerator="cpu",
            devices=2,
            strategy=ModelParallelStrategy(
                data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=distributed_checkpoint
            ),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **kwargs,
        )

    module = CausalLMModule(tiny_llama(), learning_rate=1e-3)
    callback = WandaPruningCallback(
        sparsity=0.5, verbose=False, evaluate=1, calibration_options=CalibrationOptions(num_samples=None)
    )
    trainer = make_trainer(max_steps=2, callbacks=[callback], enable_checkpointing=False, limit_val_batches=2)
    trainer.fit(module, loader, loader)
    weights = {n: p.full_tensor().clone() for n, p in module.named_parameters() if n.endswith("proj.weight")}
    checkpoint = os.path.join(out, "ckpt")
    trainer.save_checkpoint(checkpoint)

    # Resume: two more steps of sparse training; the masks come back from the checkpoint's zeros.
    resumed_module = CausalLMModule(tiny_llama(), learning_rate=1e-3)
    resumed_callback = WandaPruningCallback(
        sparsity=0.5, verbose=False, evaluate=1, calibration_options=CalibrationOptions(num_samples=None)
    )
    prune_calls: list[str] = []
    original_apply = resumed_callback.apply
    resumed_callback.apply = lambda *args: (prune_calls.append(args[3]), original_apply(*args))[1]  # type: ignore
    resumed = make_trainer(max_steps=4, callbacks=[resumed_callback], enable_checkpointing=False, limit_val_batches=2)
    resumed.fit(resumed_module, loader, loader, ckpt_path=checkpoint)
    after = {n: p.full_tensor().clone() for n, p in resumed_module.named_parameters() if n.endswith("proj.weight")}
    torch.save(
        dict(
            weights=weights,
            after_resume=after,
            global_sparsity=callback.global_sparsity,
            resumed_step=resumed.global_step,
            resumed_pruned_again=bool(prune_calls),
            metrics=callback.metrics,
            state=resumed_callback.state_dict(),
        ),
        os.path.join(out, f"rank{rank}.pt"),
    )


def main() -> None:
    torch.set_num_threads(1)
    scenario, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    if scenario == "functional":
        functional(out, rank, uneven=False, structure="unstructured")
    elif scenario == "functional-2:4":
        functional(out, rank, uneven=False, structure="2:4")
    elif scenario == "uneven":
        functional(out, rank, uneven=True, structure="unstructured")
    elif scenario == "options":
        options(out, rank)
    elif scenario == "admm":
        admm(out, rank)
    elif scenario == "fsdp1-trainer":
        fsdp1_trainer(out, rank)
    elif scenario == "fsdp1":
        fsdp1_functional(out, rank)
    elif scenario == "trainer":
        trainer_run(out, rank, distributed_checkpoint=True)
    elif scenario == "trainer-full-checkpoint":
        trainer_run(out, rank, distributed_checkpoint=False)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main()
