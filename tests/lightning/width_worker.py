"""One process of a 2-process CPU (gloo) DDP run of ``WandaShrinkCallback``, started by ``test_width_callback.py``.

Usage: ``python width_worker.py SCENARIO OUT_DIR`` with the environment ``launch_processes`` sets. Each rank writes
``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the helpers package


def ddp(out: str, rank: int) -> None:
    from helpers.trainer import Snapshot, loader, make_module, make_trainer

    from wanda_lightning import AfterStep, CalibrationOptions, WandaShrinkCallback

    class Recording(WandaShrinkCallback):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seen = []

        def calibration_forward(self, pl_module, batch):
            self.seen.append(batch["input_ids"].clone())
            return super().calibration_forward(pl_module, batch)

    snapshot = Snapshot()
    shrinking = Recording(
        mlp=0.5,
        heads=0.5,
        prune_on=AfterStep(1),
        calibration_options=CalibrationOptions(num_samples=None),
        evaluate=False,
    )
    trainer = make_trainer(out, strategy="ddp", devices=2, max_steps=3, callbacks=[snapshot, shrinking], logger=False)
    module = make_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(24, seed=1), loader(8, seed=2))
    torch.save(
        dict(
            kept=[g.kept_units for g in shrinking.report.groups],
            seen=shrinking.seen,
            dense=snapshot.states[(0, 0)],
            final={k: v.detach().clone() for k, v in module.state_dict().items()},
            global_step=trainer.global_step,
        ),
        os.path.join(out, f"rank{rank}.pt"),
    )


def main() -> None:
    torch.set_num_threads(1)
    scenario, out = sys.argv[1], sys.argv[2]
    {"ddp": ddp}[scenario](out, int(os.environ["RANK"]))


if __name__ == "__main__":
    main()
