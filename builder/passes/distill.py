"""distill: train a smaller student from the model (the teacher) with knowledge distillation.

loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, y)

The student is the teacher's own class built with other constructor arguments (a width or
depth multiplier, e.g. ``student_kwargs = {width = 16}``) or a factory the user names.
Early stopping uses a split of the training data, not the eval set the gate measures on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from agent.errors import ModelError
from builder.passes.base import ModelHandle, ModelKind, Pass, PassConfig, PassContext
from builder.passes.load import resolve_factory
from builder.train import accuracy, count_params, finetune, first_output, training_targets


class DistillConfig(PassConfig):
    student_factory: str | None = None
    student_kwargs: dict[str, Any] = Field(default_factory=dict)
    temperature: float = 4.0
    alpha: float = 0.7
    epochs: int = 40
    lr: float = 2e-3
    patience: int = 8
    base_dir: Path = Path(".")


def _torch_p50_ms(module: Any, example: tuple[Any, ...], runs: int = 50) -> float:
    import torch

    times = []
    with torch.no_grad():
        for _ in range(5):
            module(*example)
        for _ in range(runs):
            t0 = time.perf_counter()
            module(*example)
            times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1000, 4)


class DistillPass(Pass):
    name = "distill"
    description = (
        "Train a smaller student from the model with knowledge distillation (needs training data)"
    )
    config_class = DistillConfig
    accepts = (ModelKind.TORCH,)

    def produces(self, config: PassConfig, input_kind: ModelKind | None) -> ModelKind:
        return ModelKind.TORCH

    def _student(self, teacher: Any, config: DistillConfig) -> Any:
        import torch

        make: Any
        if config.student_factory:
            make = resolve_factory(config.student_factory, config.base_dir)
            what = f"student factory '{config.student_factory}'"
        else:
            if not config.student_kwargs:
                raise ModelError(
                    "distill: name a student_factory, or student_kwargs for the teacher's class "
                    "(e.g. {width = 16})"
                )
            make, what = type(teacher), f"{type(teacher).__name__}(**{config.student_kwargs})"
        try:
            student = make(**config.student_kwargs)
        except Exception as exc:
            raise ModelError(f"distill: {what} failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(student, torch.nn.Module):
            raise ModelError(
                f"distill: {what} returned {type(student).__name__}, not a torch.nn.Module"
            )
        return student

    def run(self, model: ModelHandle | None, config: PassConfig, ctx: PassContext) -> ModelHandle:
        assert model is not None and isinstance(config, DistillConfig)
        if ctx.data.train is None:
            raise ModelError("distill needs training data: set [data] train in the build config")
        if not 0.0 <= config.alpha <= 1.0 or config.temperature <= 0:
            raise ModelError("distill: alpha must be in [0, 1] and temperature > 0")
        import torch
        import torch.nn.functional as F

        from builder.torchio import to_torch

        torch.manual_seed(ctx.seed)
        teacher = model.module.eval()
        student = self._student(teacher, config)
        names = model.input_names
        example = to_torch(ctx.data.eval.feeds(0, min(2, ctx.data.eval.n)), names)
        try:
            with torch.no_grad():
                out = first_output(student(*example))
                ref = first_output(teacher(*example))
        except Exception as exc:
            raise ModelError(
                f"distill: the student does not accept the model's input: {type(exc).__name__}: {exc}"
            ) from None
        if out.shape != ref.shape:
            raise ModelError(
                f"distill: student outputs {tuple(out.shape)}, the teacher {tuple(ref.shape)}"
            )
        T, alpha = config.temperature, config.alpha
        train = ctx.data.train
        labelled = ctx.task == "classification" and train.y is not None
        ce = torch.nn.CrossEntropyLoss()

        def kd_loss(logits: Any, xb: tuple[Any, ...], yb: Any) -> Any:
            with torch.no_grad():
                t = first_output(teacher(*xb))
            soft = (
                F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t / T, 1), reduction="batchmean")
                * T
                * T
            )
            return alpha * soft + (1 - alpha) * ce(logits, yb)

        ctx.say(f"distilling a student for up to {config.epochs} epochs")
        if labelled:
            history = finetune(
                student,
                train,
                config.epochs,
                config.lr,
                ctx.seed,
                loss=kd_loss,
                patience=config.patience,
                names=names,
            )
        else:
            # Regression/embedding (or no labels): the student learns the teacher's outputs (MSE).
            targets = training_targets(teacher, train, names, ctx.task)
            history = finetune(
                student,
                train,
                config.epochs,
                config.lr,
                ctx.seed,
                patience=config.patience,
                names=names,
                targets=targets,
            )
        student.eval()
        ev = ctx.data.eval
        one = to_torch(ev.feeds(0, 1), names)
        report: dict[str, Any] = {
            "teacher_params": count_params(teacher),
            "student_params": count_params(student),
            "teacher_p50_ms_torch": _torch_p50_ms(teacher, one),
            "student_p50_ms_torch": _torch_p50_ms(student, one),
            "temperature": T,
            "alpha": alpha,
            "training": history,
        }
        if ev.y is not None and ctx.task == "classification":
            report["teacher_top1"] = round(accuracy(teacher, ev, names), 6)
            report["student_top1"] = round(accuracy(student, ev, names), 6)
        report["param_ratio"] = round(report["student_params"] / report["teacher_params"], 4)
        return model.with_module(student, {"distill": report, "params": report["student_params"]})
