"""Resume state of a fine-tuning run (:class:`RunState`, a part of :class:`~workbench.finetune.run.TrainRun`):
continue from ``resume.safetensors`` only when it is this run's (settings, data and identity), and write
it with every rank's RNG."""
from __future__ import annotations

import json

from ..identity import differences, mismatch
from ..io import iter_jsonl
from .checkpoint import gather_rng, load_state, restore_rng, resume_state, rewrite_log, save_state

STATE_FILE = "resume.safetensors"  # next to best.safetensors in each run's checkpoint folder


class RunState:
    """:class:`~workbench.finetune.run.TrainRun`'s resume state; uses its ``tr``, ``cfg``, ``state_path``,
    ``identity``, ``history`` and ``best``."""

    def restore(self, resume: bool) -> None:
        """Continue from the resume state when asked and present (it must be this run's), else start over."""
        tr = self.tr
        if resume and self.state_path is not None and self.state_path.exists():
            st = load_state(self.state_path)
            self.check_identity(st)
            if st["fingerprint"] != self.cfg.fingerprint() or st["pairs"] != tr.n:
                raise ValueError(
                    f"run {self.run_name}: {self.state_path} was written with other settings or data ({st['config']}, "
                    f"{st['pairs']} pairs); pass resume=False to start over, or use another run directory"
                )
            tr.clip.load_state_dict(st["model"])
            try:
                tr.opt.load_state_dict(st["optimizer"])
            except ValueError as e:  # e.g. written before the optimizer's groups were split by tower
                raise ValueError(f"run {self.run_name}: the optimizer state in {self.state_path} does not fit this "
                                 f"version's optimizer ({e}); pass resume=False to start the run over") from e
            self.step0, self.history, self.best = st["step"], json.loads(st["history"]), json.loads(st["best"])
            restore_rng(st["rng"], tr.rank, tr.device)
            if self.lead:
                rewrite_log(self.log_path, self.run_name, self.step0)
                self.count_losses(r for r in iter_jsonl(self.log_path) if r.get("run") == self.run_name and "loss" in r)
        elif self.lead:
            rewrite_log(self.log_path, self.run_name, -1)

    def check_identity(self, st: dict) -> None:
        """A resume state made under another identity (weights, data, draw, captions, settings) is never
        continued or reused: the error names each setting that differs, with both values."""
        if self.identity is None:
            return
        recorded = json.loads(st["identity"]) if isinstance(st.get("identity"), str) else st.get("identity")
        how = (f"Its checkpoints are kept. To train this run under the new settings, pass resume=False "
               f"(`--set finetune.resume=false`; it overwrites {self.state_path.parent}), or use another run name "
               "(--name).")
        if recorded is None:
            raise mismatch(f"run {self.run_name}: {self.state_path}", [("identity", None, "recorded")],
                           "It was written before run identities were recorded, so what it was trained on is "
                           "unknown. " + how)
        diffs = differences(recorded, self.identity)
        if diffs:
            raise mismatch(f"run {self.run_name}: {self.state_path}", diffs, how)

    def save_state(self, step: int) -> None:
        """Write the resume state (rank 0), with every rank's RNG (all ranks take part in gathering it)."""
        if self.state_path is None:
            return
        tr = self.tr
        rng = gather_rng(tr.device, tr.world)
        if self.lead:
            save_state(self.state_path, resume_state(tr.clip, tr.opt, self.cfg, step, tr.n, tr.total, self.history,
                                                     self.best, rng, self.identity))
