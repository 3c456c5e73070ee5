"""torch twin of slotjax/train/optim.py: Adam on the official schedule (first update uses lr(0))."""

import torch


def learning_rate_schedule(learning_rate: float, warmup_steps: int, decay_steps: int, decay_rate: float = 0.5):
    def schedule(step: int) -> float:
        warmup = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
        return learning_rate * warmup * decay_rate ** (step / decay_steps)

    return schedule


def make_optimizer(parameters, learning_rate: float, warmup_steps: int, decay_steps: int, decay_rate: float = 0.5):
    """Returns (Adam, LambdaLR); call scheduler.step() after every optimizer.step()."""
    optimizer = torch.optim.Adam(parameters, lr=learning_rate, eps=1e-8)
    schedule = learning_rate_schedule(learning_rate, warmup_steps, decay_steps, decay_rate)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / learning_rate)
