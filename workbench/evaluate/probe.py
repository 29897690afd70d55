"""Linear probes on cached image features.

:func:`linear_probe` is the workbench probe: multinomial logistic regression (all classes in one
matmul) fitted full-batch with L-BFGS on standardised features, sweeping the weight decay on the
validation split and refitting on train (or train+val). :func:`reference_probe` replicates the GIST
recipe (raw features, SGD lr 0.5, batch 64, 1000 epochs, best validation epoch kept) so that the
benchmark can run both in one process.

Objective: ``mean_i CE(x_i W + b, y_i) + weight_decay / 2 * ||W||^2`` (bias not penalised), i.e.
scikit-learn's ``LogisticRegression(C=1 / (weight_decay * n_train))``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..clip.device import auto_device

# Strongest first: each fit warm-starts from the previous, more regularised solution.
DEFAULT_WEIGHT_DECAYS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


@dataclass
class ProbeResult:
    """A fitted linear classifier: ``logits = ((x - mean) / std) @ W + b``."""

    W: torch.Tensor  # D x C
    b: torch.Tensor  # C
    mean: torch.Tensor  # D (zeros for raw-feature probes)
    std: torch.Tensor  # D (ones for raw-feature probes)
    weight_decay: float | None
    fit_on: str  # "train" or "train+val"
    sweep: list[dict] = field(default_factory=list)  # one {weight_decay, val_top1, val_loss, iters} per value

    @torch.no_grad()
    def logits(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.W.device, torch.float32)
        return torch.addmm(self.b, (X - self.mean) / self.std, self.W)

    @property
    def val_top1(self) -> float | None:
        best = [s for s in self.sweep if s["weight_decay"] == self.weight_decay]
        return best[0]["val_top1"] if best else None


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Bool per example: is the label among the ``k`` highest logits (k clipped to the class count)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y.to(logits.device)[:, None]).any(dim=1)


def _check_xy(X, y, num_classes: int, what: str):
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(f"{what}: expected features N x D and labels N, got {tuple(X.shape)} and {tuple(y.shape)}")
    if len(y) == 0:
        raise ValueError(f"{what}: no examples")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    if not torch.isfinite(X).all():
        raise ValueError(f"{what}: features contain NaN or inf")


def fit_logreg(
    X: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Full-batch L-BFGS on the objective in the module docstring; returns ``W, b, iterations``.

    Stops when the largest gradient entry is below ``tol`` (scikit-learn's default ``gtol`` for the
    same mean-scaled objective), the loss stops changing, or after ``max_iter`` iterations.
    """
    D = X.shape[1]
    if init is None:
        W = X.new_zeros(D, num_classes)
        b = X.new_zeros(num_classes)
    else:
        W, b = (t.detach().clone().to(X) for t in init)
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [W, b], lr=1, max_iter=max_iter, history_size=10, tolerance_grad=tol, tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )
    # On CPU, L-BFGS's own vector updates (dots and axpys over D*C values, hundreds per fit) are too
    # small to gain from intra-op threads, and on a busy machine each loses milliseconds waiting for
    # a thread to wake: run them on one thread and give all threads to the matmuls in the closure.
    threads = torch.get_num_threads() if X.device.type == "cpu" else None

    def closure():
        if threads:
            torch.set_num_threads(threads)
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(torch.addmm(b, X, W), y) + 0.5 * weight_decay * W.pow(2).sum()
        loss.backward()
        if threads:
            torch.set_num_threads(1)
        return loss

    try:
        if threads:
            torch.set_num_threads(1)
        with torch.enable_grad():
            opt.step(closure)
    finally:
        if threads:
            torch.set_num_threads(threads)
    iters = opt.state[W].get("n_iter", 0)  # L-BFGS keeps its state on the first parameter
    return W.detach(), b.detach(), int(iters)


def _stats(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = X.mean(0)
    # Constant dimensions (possible in 1-shot) get unit scale instead of a division by zero.
    std = X.std(0, unbiased=False).clamp_min(1e-6)
    return mean, std


def linear_probe(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    weight_decays=DEFAULT_WEIGHT_DECAYS,
    use_trainval: bool = False,
    device: str | torch.device | None = "auto",
    max_iter: int = 300,
    tol: float = 1e-4,
    patience: int | None = 2,
) -> ProbeResult:
    """Sweep ``weight_decays`` on the validation split, keep the best, refit on train+val if asked.

    Selection: highest validation top-1, ties broken by lower validation loss. The sweep runs from
    the strongest to the weakest weight decay (each fit warm-started from the previous one) and
    stops early once ``patience`` consecutive values did worse than the best so far (validation
    accuracy is unimodal in practice; weak regularisation is the slow end). Features are
    standardised with the statistics of the set the final model is fitted on. Runs in fp32 on
    ``device`` (``auto``: the GPU when there is one).
    """
    device = auto_device(device)
    weight_decays = sorted({float(w) for w in weight_decays}, reverse=True)
    if not weight_decays or min(weight_decays) < 0:
        raise ValueError(f"weight_decays must be a non-empty list of values >= 0, got {weight_decays}")
    Xtr, ytr, Xva, yva = (t.to(device) for t in (X_train, y_train, X_val, y_val))
    Xtr, Xva = Xtr.float(), Xva.float()
    ytr, yva = ytr.long(), yva.long()
    _check_xy(Xtr, ytr, num_classes, "train")
    _check_xy(Xva, yva, num_classes, "val")
    if Xtr.shape[1] != Xva.shape[1]:
        raise ValueError(f"train and val features differ in width: {Xtr.shape[1]} vs {Xva.shape[1]}")

    mean, std = _stats(Xtr)
    Ztr, Zva = (Xtr - mean) / std, (Xva - mean) / std
    sweep, best, init = [], None, None
    for wd in weight_decays:
        W, b, iters = fit_logreg(Ztr, ytr, num_classes, wd, init=init, max_iter=max_iter, tol=tol)
        init = (W, b)
        with torch.no_grad():
            logits = torch.addmm(b, Zva, W)
            top1 = topk_correct(logits, yva, 1).float().mean().item() * 100
            loss = F.cross_entropy(logits, yva).item()
        sweep.append({"weight_decay": wd, "val_top1": top1, "val_loss": loss, "iters": iters})
        if best is None or (top1, -loss) > (best[0], -best[1]):
            best, worse = (top1, loss, wd, W, b), 0
        else:
            worse += 1
            if patience is not None and worse >= patience:
                break
    _, _, wd, W, b = best
    if not use_trainval:
        return ProbeResult(W, b, mean, std, wd, "train", sweep)
    Xall, yall = torch.cat([Xtr, Xva]), torch.cat([ytr, yva])
    mean, std = _stats(Xall)
    W, b, _ = fit_logreg((Xall - mean) / std, yall, num_classes, wd, init=(W, b), max_iter=max_iter, tol=tol)
    return ProbeResult(W, b, mean, std, wd, "train+val", sweep)


def reference_probe(
    X_train: torch.Tensor,
    y_train: torch.Tensor,
    X_val: torch.Tensor,
    y_val: torch.Tensor,
    num_classes: int,
    lr: float = 0.5,
    batch_size: int = 64,
    epochs: int = 1000,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
) -> ProbeResult:
    """The GIST reference recipe: ``nn.Linear`` on raw features, plain SGD, shuffled mini-batches,
    no regularisation, validation top-1 after every epoch, the last best epoch (``>=``) kept.

    Batches are sliced from tensors rather than going through a ``DataLoader``, which makes this
    replica faster than the original script, never slower: speedups measured against it are
    conservative.
    """
    device = auto_device(device)
    Xtr, ytr, Xva, yva = (t.to(device) for t in (X_train, y_train, X_val, y_val))
    Xtr, Xva, ytr, yva = Xtr.float(), Xva.float(), ytr.long(), yva.long()
    _check_xy(Xtr, ytr, num_classes, "train")
    _check_xy(Xva, yva, num_classes, "val")
    torch.manual_seed(seed)
    net = torch.nn.Linear(Xtr.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(Xtr)
    best_acc, best_state, sweep = -1.0, None, []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(net(Xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (net(Xva).argmax(1) == yva).float().mean().item() * 100
        if acc >= best_acc:
            best_acc, best_state = acc, copy.deepcopy(net.state_dict())
            sweep = [{"weight_decay": None, "val_top1": acc, "val_loss": None, "iters": epoch + 1}]
    W, b = best_state["weight"].t().contiguous(), best_state["bias"]
    D = Xtr.shape[1]
    return ProbeResult(W, b, torch.zeros(D, device=device), torch.ones(D, device=device), None, "train", sweep)
