"""Fine-tuning runs that finished but learned nothing, said in words.

:func:`run_warnings` reads one run's summary as ``metrics.json["finetune"]["runs"][i]`` records it, so
any stage can flag the same runs: the fine-tuning stage stores its sentence there under ``"warning"``
(and notebook 03_finetune shows it); a table of results (the evaluate stage's) can call it on the
rows it reads, older metrics included (a check whose numbers are missing is skipped).
"""
from __future__ import annotations

import math

# A last epoch whose mean loss is within 2% of ln(batch) (or above it) has not left chance level: the
# loss of uniform scores, every caption equally likely for every image, for each of the losses.
CHANCE_TOLERANCE = 0.02


def run_warnings(summary: dict) -> str | None:
    """A sentence naming the run and why its result should not be trusted, or None when nothing is wrong.

    - collapsed: the mean training loss of its last epoch stayed at ``ln(batch)`` (``loss_last_epoch``
      against ``loss_chance``, or ``ln(batch_size)``): the model scores every caption alike.
    - unmoved: a finished run (``status`` "done", ``steps`` > 0) whose ``best_epoch`` is 0: no epoch
      beat the starting weights on validation, so its checkpoint is the model it started from.
    """
    problems = []
    last, chance = summary.get("loss_last_epoch"), summary.get("loss_chance")
    if chance is None and summary.get("batch_size", 0) > 1:
        chance = math.log(summary["batch_size"])
    if last is not None and chance and last >= (1 - CHANCE_TOLERANCE) * chance:
        problems.append(
            f"collapsed: its training loss ended at {last:.3f}, the chance level ln(batch) = {chance:.3f}, so the "
            "model tells no caption from another (lower the learning rate, or check the captions)")
    if summary.get("best_epoch") == 0 and (summary.get("steps") or 0) > 0 and summary.get("status", "done") == "done":
        start = summary.get("start_val_top1", summary.get("val_top1"))
        at = f" (val top-1 {start:.1f}%)" if isinstance(start, (int, float)) else ""
        problems.append(
            f"unmoved: no epoch beat the starting weights on validation{at}, so its checkpoint is the model it "
            "started from (lower the learning rate, train longer, or check the captions)")
    if not problems:
        return None
    return f"run {summary.get('run', '?')} " + "; ".join(problems) + "."


def warnings_note(summaries: list[dict], runs: list[str] | None = None) -> str | None:
    """The warnings of ``summaries`` (of the named ``runs`` only, when given) as one Markdown note, or None."""
    found = [run_warnings(s) for s in summaries if runs is None or s.get("run") in runs]
    return "\n".join(f"- **Warning:** {w}" for w in found if w) or None
