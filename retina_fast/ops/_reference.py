"""Pure-PyTorch references of every op: readable, slow, the ground truth the CPU and CUDA
kernels are tested against (together with torchvision where it has the same function)."""

import torch
from torch import Tensor

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_labels"]


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """torchvision.ops.sigmoid_focal_loss, written out."""
    p = torch.sigmoid(inputs)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"Invalid Value for arg 'reduction': '{reduction}'")


def labels_to_targets(labels: Tensor, num_classes: int, dtype: torch.dtype,
                      label_smoothing: float = 0.0) -> Tensor:
    """The dense targets a labels vector stands for (the one-hot the fused op never builds)."""
    t = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    fg = labels >= 0
    t[fg.nonzero().squeeze(1), labels[fg]] = 1
    return t * (1 - label_smoothing) + label_smoothing / 2


def sigmoid_focal_loss_labels(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                              reduction: str = "sum", normalizer=None, label_smoothing: float = 0.0) -> Tensor:
    K = logits.shape[1]
    valid = labels != -2
    t = labels_to_targets(labels, K, logits.dtype, label_smoothing)
    loss = sigmoid_focal_loss(logits, t, alpha, gamma, "none")
    loss = torch.where(valid[:, None], loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction != "none":
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        total = loss.to(acc).sum()
        loss = total / (valid.sum() * K) if reduction == "mean" else total
    if normalizer is not None:
        loss = loss / normalizer
    return loss
