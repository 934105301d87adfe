"""Labels sampled from the model's predictive distribution, for the Monte-Carlo ("true")
Fisher: the gradient of the loss on sampled labels has the Fisher as its covariance."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LIKELIHOODS = ("categorical", "gaussian")


def sampled_nll(output: Tensor, likelihood: str, reduction: str,
                generator: torch.Generator) -> Tensor:
    """Negative log-likelihood of labels drawn from the model's own predictive distribution.

    Args:
        output (Tensor): logits ``[..., C]`` (categorical) or means ``[..., D]`` (Gaussian with
            unit variance, i.e. the MSE loss ``½‖y − f‖²``).
        likelihood (str): "categorical" or "gaussian".
        reduction (str): "mean" (over all leading dims) or "sum", as the training loss.
        generator (torch.Generator): CPU generator (kept in the optimizer's checkpoint).
    """
    flat = output.reshape(-1, output.shape[-1])
    with torch.no_grad():
        if likelihood == "categorical":
            probs = torch.softmax(flat.detach().float(), -1).cpu()
            labels = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(output.device)
        else:
            noise = torch.randn(flat.shape, generator=generator, dtype=torch.float32)
            labels = flat.detach() + noise.to(device=output.device, dtype=flat.dtype)
    if likelihood == "categorical":
        return F.cross_entropy(flat, labels, reduction=reduction)
    per_row = 0.5 * (flat - labels).pow(2).sum(-1)
    return per_row.mean() if reduction == "mean" else per_row.sum()
