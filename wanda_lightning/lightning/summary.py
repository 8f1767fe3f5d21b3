"""What a callback reports: metrics to every logger of the trainer, and the summary table."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
import torch

__all__ = ["format_summary", "log_to_loggers", "metric_deltas", "publish_metrics"]


def metric_deltas(
    before: Mapping[str, float], after: Mapping[str, float], stage: str = "pruned"
) -> dict[str, dict[str, float]]:
    """``{name: {"dense", stage, "delta"}}`` for every metric measured both times.

    Example::

        >>> metric_deltas({"val_loss": 2.0}, {"val_loss": 2.5})
        {'val_loss': {'dense': 2.0, 'pruned': 2.5, 'delta': 0.5}}
    """
    return {
        name: {"dense": before[name], stage: after[name], "delta": after[name] - before[name]}
        for name in before
        if name in after
    }


def log_to_loggers(trainer: pl.Trainer, values: Mapping[str, float]) -> None:
    """``logger.log_metrics(values, step=trainer.global_step)`` for every logger of the trainer (which works in any
    hook, where ``LightningModule.log`` does not)."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(values), step=trainer.global_step)


def publish_metrics(trainer: pl.Trainer, values: Mapping[str, float]) -> None:
    """Puts ``values`` in ``trainer.callback_metrics`` (as float32 CPU tensors, like logged values), where
    ``ModelCheckpoint(monitor=...)`` and ``EarlyStopping`` read what they monitor. They stay there until the trainer's
    next ``fit``/``validate`` starts, unless the module logs the same names."""
    trainer.callback_metrics.update({name: torch.tensor(float(value)) for name, value in values.items()})


def format_summary(
    owner: str,
    report: object | None,
    when: str,
    metrics: Mapping[str, Mapping[str, float]],
    evaluation_seconds: float,
    stage: str = "pruned",
) -> str:
    """The summary table: the report, then dense/``stage``/delta for each validation metric, then the evaluation time.

    Example::

        >>> print(format_summary("Cb", "report", "step 2", {"loss": {"dense": 1.0, "shrunk": 1.5, "delta": 0.5}}, 0.1,
        ...                      stage="shrunk"))
        Cb: shrunk at step 2
        report
        <BLANKLINE>
        metric         dense        shrunk         delta
        ------  ------------  ------------  ------------
        loss          1.0000        1.5000       +0.5000
        evaluation time: 0.10 s
    """
    if report is None:
        return f"{owner}: nothing {stage} yet"
    lines = [f"{owner}: {stage} at {when}", str(report)]
    if metrics:
        width = max(len("metric"), *(len(name) for name in metrics))
        lines += ["", f"{'metric':<{width}}  {'dense':>12}  {stage:>12}  {'delta':>12}"]
        lines.append("  ".join(["-" * width] + ["-" * 12] * 3))
        for name, values in metrics.items():
            lines.append(
                f"{name:<{width}}  {values['dense']:>12.4f}  {values[stage]:>12.4f}  {values['delta']:>+12.4f}"
            )
        lines.append(f"evaluation time: {evaluation_seconds:.2f} s")
    return "\n".join(lines)
