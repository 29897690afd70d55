"""Settings of one fine-tuning run: plain values, checked once, with the notebook's defaults."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

from ..runs import FINETUNE_METHODS as METHODS
from .losses import LOSSES

ATTENTION = ("auto", "default", "flash", "cudnn", "efficient")


@dataclass
class FinetuneConfig:
    """One run's settings. The defaults are ``03_finetune``'s (the CPU demo with the tiny model), and
    :meth:`from_params` takes them from a stage's parameter section by name (a test keeps the two equal)."""

    method: str = "gist"  # "gist" (matched captions), "finetune-classname" ("a photo of a <class>."), or a control (runs.py)
    loss: str = "clip"  # "clip", "class-aware" or "filip"
    captions_per_image: int = 4  # GIST trains on 4 of the top-5 captions, each its own pair
    epochs: int = 3  # passes over the pairs, at least (``steps`` may add more)
    steps: int = 0  # minimum optimizer steps (0: off, ``epochs`` decide): epochs rise to cover them (epochs_for)
    batch_size: int = 128  # global batch, at most (evened so each epoch uses every pair; split across ranks)
    lr: float = 3e-4  # the tiny demo model; real CLIPs want ~1e-5 (FLYP), GIST used 1e-6
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: float = 0.1  # warm-up steps; < 1 means a fraction of all steps
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16", "fp32"
    compile: bool = False  # torch.compile each transformer block (fast to compile, same kernels)
    attention: str = "auto"  # GPU attention kernel: "auto" (time cuDNN vs flash once), "default", "flash", "cudnn", "efficient"
    grad_checkpointing: bool = False
    freeze_text: bool = False
    class_weight: float = 1.0  # class-aware loss: target weight of same-class (other image) pairs
    filip_block: int = 64  # FILIP: block size of the token-similarity computation
    crop_scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop area range
    flip: bool = True
    seed: int = 0
    validate: bool = True  # zero-shot + probe on val after every epoch (or validate_every steps); picks the checkpoint
    validate_every: int = 0  # validate every N optimizer steps and at the end instead (0: at epoch ends)
    checkpoint_every: int = 0  # also write the resume state every N steps (0: at epoch ends and validations only)
    log_every: int = 10  # steps between loss flushes (one device sync each)
    max_steps: int | None = None  # stop early (as if interrupted) after this many steps in total

    def __post_init__(self):
        self.betas, self.crop_scale = tuple(self.betas), tuple(self.crop_scale)
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (self.captions_per_image >= 1, "captions_per_image must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 0,
             f"steps must be an integer >= 0 (0: off, epochs decide), got {self.steps!r}"),
            (isinstance(self.validate_every, int) and not isinstance(self.validate_every, bool)
             and self.validate_every >= 0,
             f"validate_every must be an integer >= 0 (0: validate at epoch ends), got {self.validate_every!r}"),
            (self.batch_size >= 2, "batch_size must be >= 2 (a contrastive loss needs negatives)"),
            (self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0"),
            (self.precision in ("auto", "bf16", "fp32"), f"precision must be auto/bf16/fp32, got {self.precision!r}"),
            (self.warmup >= 0 and self.grad_clip >= 0, "warmup and grad_clip must be >= 0"),
            (self.attention in ATTENTION, f"attention must be one of {ATTENTION}, got {self.attention!r}"),
            # compiled blocks inside non-reentrant activation checkpointing raise CheckpointError
            (not (self.compile and self.grad_checkpointing),
             "compile=True with grad_checkpointing=True is not supported: PyTorch reports compiled blocks inside "
             "activation checkpointing failing (pytorch/pytorch#144637); turn one of them off"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @classmethod
    def from_params(cls, p: dict, **overrides) -> FinetuneConfig:
        """The settings a parameter section (``03_finetune``'s) holds, by field name; ``overrides`` win."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in p.items() if k in names}, **overrides})

    def epochs_for(self, steps_per_epoch: int) -> int:
        """The epochs a run with ``steps_per_epoch`` steps per epoch trains: ``epochs``, raised to
        ``ceil(steps / steps_per_epoch)`` when ``steps`` is set. Every epoch is a whole pass over the pairs
        (each pair once), so the run takes ``steps_per_epoch * epochs_for(...)`` optimizer steps: at least
        ``max(epochs * steps_per_epoch, steps)``, exactly that when ``steps_per_epoch`` divides ``steps``
        (always at 1 step per epoch, a few-shot run whose pairs fit one batch), and with ``steps`` set fewer than ``steps + steps_per_epoch``."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        return max(self.epochs, math.ceil(self.steps / steps_per_epoch))

    # settings that do not change what a run computes: outside its identity and its resume fingerprint
    OUTPUT_NEUTRAL = ("checkpoint_every", "log_every", "max_steps", "compile", "grad_checkpointing", "attention")

    # settings added after runs recorded their identities, with the value that means "as before": left out of
    # :meth:`settings` at that value, so a run recorded without them keeps its identity and resume fingerprint
    ADDED_OFF = {"steps": 0, "validate_every": 0}

    def settings(self) -> dict:
        """The settings a run's result depends on (everything but :attr:`OUTPUT_NEUTRAL`; :attr:`ADDED_OFF`
        ones only when set)."""
        return {k: v for k, v in asdict(self).items()
                if k not in self.OUTPUT_NEUTRAL and not (k in self.ADDED_OFF and v == self.ADDED_OFF[k])}

    def fingerprint(self) -> str:
        """What must match for a checkpoint to resume this run exactly."""
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True, default=str).encode()).hexdigest()[:16]
