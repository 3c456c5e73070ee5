"""PyTorch reference losses: Hungarian-matched Huber loss and MSE.

Independent of `slotjax.train.losses`: the assignment is solved on the host with
scipy's `linear_sum_assignment` on the detached cost matrices; gradients flow
through the matched costs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def pairwise_huber_cost(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, K, D] predictions, [B, M, D] targets -> [B, M, K] mean Huber (delta 1) cost."""
    num_targets, num_predictions = targets.shape[1], predictions.shape[1]
    expanded_targets = targets[:, :, None, :].expand(-1, -1, num_predictions, -1)
    expanded_predictions = predictions[:, None, :, :].expand(-1, num_targets, -1, -1)
    elementwise = F.huber_loss(expanded_predictions, expanded_targets, reduction="none", delta=1.0)  # [B, M, K, D]
    return elementwise.mean(dim=-1)


def optimal_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, R, C] costs -> (row_indices, col_indices), each long [B, min(R, C)], rows sorted."""
    assignments = [linear_sum_assignment(matrix) for matrix in cost.detach().cpu().numpy()]
    row_indices, col_indices = (np.stack(indices) for indices in zip(*assignments))
    return torch.from_numpy(row_indices), torch.from_numpy(col_indices)


def hungarian_matching(predictions: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(target_indices, prediction_indices), each [B, min(M, K)], of the optimal matching."""
    return optimal_assignment(pairwise_huber_cost(predictions, targets))


def hungarian_huber_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Matched Huber costs summed per image, averaged over the batch (scalar)."""
    cost = pairwise_huber_cost(predictions, targets)  # [B, M, K]
    target_indices, prediction_indices = optimal_assignment(cost)
    batch_indices = torch.arange(cost.shape[0])[:, None]
    matched_costs = cost[batch_indices, target_indices, prediction_indices]  # [B, min(M, K)]
    return matched_costs.sum(dim=1).mean()


def mse_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements."""
    return torch.mean((predictions - targets) ** 2)
