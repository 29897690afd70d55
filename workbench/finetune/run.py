"""One fine-tuning run around a :class:`~workbench.finetune.trainer.Trainer`: resume (``runstate.py``),
validate every epoch and keep the best weights, write the resume state, log losses checked finite and
summarise (``steplog.py``)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from ..io import append_jsonl
from ..progress import progress_bar
from .checkpoint import save_weights
from .runstate import STATE_FILE, RunState
from .step import lr_at
from .steplog import StepLog

if TYPE_CHECKING:  # the Trainer imports this module
    from .trainer import Trainer


class TrainRun(RunState, StepLog):
    """One fine-tuning run around a :class:`Trainer`: resume, validate every epoch (or every
    ``cfg.validate_every`` steps), keep the best
    weights, write the resume state, log losses (checked finite first) and summarise."""

    def __init__(self, tr: Trainer, validate, out_dir, log_path, run: str, meta: dict | None, progress: bool,
                 identity: dict | None = None):
        self.tr, self.cfg, self.run_name, self.identity = tr, tr.cfg, run, identity
        self.validate_fn = validate if tr.cfg.validate else None
        self.lead = tr.rank == 0
        out_dir = Path(out_dir) if out_dir is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.state_path = out_dir / STATE_FILE if out_dir else None
        self.best_path = out_dir / "best.safetensors" if out_dir else None
        self.meta = dict(meta or {})
        self.progress = progress
        self.step0, self.history, self.best = 0, [], {"epoch": None, "val_top1": -1.0}
        self.pending: list = []  # (step, epoch, lr, loss, grad norm) not yet checked: flushed with one sync
        self.epoch_loss: dict[int, list[float]] = {}  # epoch -> [sum, count] of logged losses (collapse check)
        self.bar = None

    def validate(self, epoch: int, step: int) -> None:
        """Score the model (rank 0); a new best is written to ``best.safetensors`` at once."""
        if self.validate_fn is None:
            return
        if self.lead:
            r = self.validate_fn(self.tr.clip)
            self.tr.clip.train()
            row = {"run": self.run_name, "epoch": epoch, "step": step, **r}
            self.history.append(row)
            if self.log_path:
                append_jsonl(self.log_path, row)
            if r["val_top1"] > self.best["val_top1"]:
                self.best.update(epoch=epoch, step=step, **r)
                if self.best_path is not None:
                    save_weights(self.best_path, self.tr.clip,
                                 {**self.meta, "run": self.run_name, "epoch": epoch, "val_top1": r["val_top1"]})
        if self.tr.world > 1:
            dist.barrier()

    def validates_at(self, done: int) -> bool:
        """Whether validation follows step ``done``: at epoch ends, or with ``cfg.validate_every`` every that
        many steps and after the last step."""
        every = self.cfg.validate_every
        if every:
            return done % every == 0 or done == self.tr.total
        return done % self.tr.steps_per_epoch == 0

    def epoch_at(self, done: int) -> int | float:
        """Epochs completed after ``done`` steps: an int at epoch ends, a fraction between them."""
        spe = self.tr.steps_per_epoch
        return done // spe if done % spe == 0 else done / spe

    def loop(self) -> tuple[int, bool, float]:
        """Train from ``step0`` to the end (or ``max_steps``): ``(steps done, interrupted, training seconds)``;
        validation and checkpoint writes are not training time."""
        tr, cfg, spe = self.tr, self.cfg, self.tr.steps_per_epoch
        t_train, done, ckpt_now, stop = 0.0, self.step0, False, False
        t0 = time.perf_counter()
        for step in range(self.step0, tr.total):
            loss, gnorm = tr.train_step(step)
            done = step + 1
            self.pending.append((done, step // spe + 1, lr_at(step, tr.total, cfg.lr, cfg.warmup), loss, gnorm))
            self.bar.update(1)
            validate_now = self.validate_fn is not None and self.validates_at(done)
            # every validation writes the resume state too: its history (and the best) is then never ahead of it
            ckpt_now = done % spe == 0 or validate_now or bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
            stop = cfg.max_steps is not None and cfg.max_steps <= done < tr.total
            if ckpt_now or stop or done % cfg.log_every == 0:
                self.flush()  # syncs: losses so far are known finite before any checkpoint is written
            if ckpt_now or stop:
                t_train += time.perf_counter() - t0
                if validate_now:
                    self.validate(self.epoch_at(done), done)
                if ckpt_now:
                    self.save_state(done)
                t0 = time.perf_counter()
            if stop:
                return done, True, t_train
        self.flush()
        if done > self.step0 and not ckpt_now:
            t_train += time.perf_counter() - t0
        return done, False, t_train

    def run(self, resume: bool) -> dict:
        self.restore(resume)
        if self.step0 == 0:
            self.validate(0, 0)
        self.bar = progress_bar(total=self.tr.total, initial=self.step0, disable=not (self.progress and self.lead),
                        desc=self.run_name, unit="step", leave=False)
        done, interrupted, t_train = self.loop()
        self.bar.close()
        return self.summary(done, interrupted, t_train)
