"""The step log of a fine-tuning run (:class:`StepLog`, a part of :class:`~workbench.finetune.run.TrainRun`):
losses checked finite (one sync per flush) before they are logged or any checkpoint is written, a stop
naming the last good checkpoint, per-epoch mean losses (``workbench.runs.run_warnings`` reads them) and
the run's summary."""
from __future__ import annotations

import math

import torch

from ..io import append_jsonl
from .checkpoint import save_weights, state_step


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN/inf loss; the last good checkpoint on disk is kept."""


class StepLog:
    """:class:`~workbench.finetune.run.TrainRun`'s losses and summary; uses its ``tr``, ``pending``,
    ``epoch_loss``, ``log_path``, ``bar``, ``best`` and paths."""

    def flush(self) -> None:
        """Check the pending losses (one sync) and log them; a non-finite one stops the run."""
        if not self.pending:
            return
        vals = torch.stack([torch.stack([l.float(), g.float()]) for *_, l, g in self.pending]).tolist()
        rows = []
        for (s, e, lr, _, _), (loss, gnorm) in zip(self.pending, vals):
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                self.pending.clear()
                if self.lead and self.log_path and rows:
                    append_jsonl(self.log_path, rows)
                self._stop_nonfinite(s, e, loss, gnorm)
            rows.append({"run": self.run_name, "epoch": e, "step": s, "loss": loss, "lr": lr, "grad_norm": gnorm})
        self.pending.clear()
        self.count_losses(rows)
        if self.lead and self.log_path:
            append_jsonl(self.log_path, rows)
        self.bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")

    def count_losses(self, rows) -> None:
        for r in rows:
            acc = self.epoch_loss.setdefault(r["epoch"], [0.0, 0])
            acc[0] += r["loss"]
            acc[1] += 1

    def _stop_nonfinite(self, step: int, epoch: int, loss: float, gnorm: float):
        last = "none written yet"
        if self.state_path is not None and self.state_path.exists():
            last = f"{self.state_path} (step {state_step(self.state_path)})"
        what, v = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", gnorm)
        raise NonFiniteLossError(
            f"run {self.run_name}: the {what} became {v} at step {step} (epoch {epoch}); training stopped. "
            f"The last good checkpoint is kept: {last}. "
            "Lower the learning rate, keep gradient clipping on, or check the captions."
        )

    def summary(self, done: int, interrupted: bool, t_train: float) -> dict:
        tr, best = self.tr, self.best
        losses = [s / n for _, (s, n) in sorted(self.epoch_loss.items()) if n]
        if best["epoch"] is None:  # no validation: the last weights are the result
            best.update(epoch=done // tr.steps_per_epoch, step=done, val_top1=None)
            if self.lead and self.best_path is not None and not interrupted:
                save_weights(self.best_path, tr.clip, {**self.meta, "run": self.run_name, "epoch": best["epoch"]})
        return {
            "run": self.run_name,
            "status": "interrupted" if interrupted else "done",
            "steps": done,
            "total_steps": tr.total,
            "pairs": tr.n,
            "batch_size": tr.B,
            "best_epoch": best["epoch"],  # epochs done at the kept validation (a fraction between epoch ends)
            "best_step": best.get("step"),  # optimizer steps done at the kept validation: 0 = the starting weights
            "val_top1": best.get("val_top1"),
            "val_zeroshot_top1": best.get("val_zeroshot_top1"),
            "history": self.history,
            # mean loss of the first and the last epoch trained, and of uniform scores (ln batch): a
            # last epoch still at chance is a collapsed run (workbench.runs.run_warnings)
            "loss_first_epoch": losses[0] if losses else None,
            "loss_last_epoch": losses[-1] if losses else None,
            "loss_chance": math.log(tr.B),
            "train_s": t_train,
            "pairs_per_s": (done - self.step0) * tr.B / t_train if t_train > 0 else None,
            "path": str(self.best_path) if self.best_path else None,
            "attention": tr.attention,  # the GPU attention kernel ("auto" resolved), "default" on CPU
        }
