"""A stage's parameter section as one value: what its notebook's parameters cell declares.

Stages take it whole (``finetune.run(p)``), so a setting is declared once, in the parameters cell,
and reaches the code by name. In a notebook: ``p = notebook_params(globals())``; elsewhere (tests,
``torchrun``): :func:`workbench.config.stage_params`.
"""
from __future__ import annotations

import os


class Params(dict):
    """A stage's parameters by name, readable as attributes (``p.epochs``): what a notebook's
    parameters cell declares, passed to the stage whole, so a setting is declared once."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no parameter {name!r}; parameters: {sorted(self)}") from None


def interactive_view(interactive: bool | None) -> bool:
    """Whether a notebook builds its ipywidgets explorers: ``interactive`` when given; ``None`` (the
    notebooks' default) means yes in a kernel that a Jupyter server started for a user (JupyterLab or
    Notebook set ``JPY_SESSION_NAME`` in its environment) and no headless (papermill, nbval; ``workbench
    run`` passes ``False`` itself, so a run started from a Lab kernel stays static too)."""
    if interactive is None:
        return bool(os.environ.get("JPY_SESSION_NAME"))
    return bool(interactive)


def notebook_params(namespace: dict) -> Params:
    """The parameters cell's values in a running notebook: ``notebook_params(globals())``.

    Annotated assignments (``k: int = 5``) land in the namespace's ``__annotations__``; papermill's
    injected cell then rebinds the names, so this sees the values the run was given."""
    return Params({name: namespace[name] for name in namespace.get("__annotations__", {})})
