"""The ``closure`` argument of ``torch.optim.Optimizer.step``, for the optimizers written here."""
import torch


def closure_loss(closure):
    """The loss ``closure`` re-evaluates, with autograd on (``step`` itself runs under no_grad), or
    None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
