"""torch twin of slotjax/train/optim.py: Adam on the official schedule (first update uses lr(0)), with epsilon
placed as Keras places it (the paper's code) or as torch does."""

import math

import torch

ADAM_EPSILONS = ("keras", "optax")


def learning_rate_schedule(learning_rate: float, warmup_steps: int, decay_steps: int, decay_rate: float = 0.5):
    def schedule(step: int) -> float:
        warmup = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
        return learning_rate * warmup * decay_rate ** (step / decay_steps)

    return schedule


class KerasAdam(torch.optim.Adam):
    """torch's Adam with Keras' epsilon: added to sqrt(v) before the step size's bias correction.

    torch adds eps to sqrt(v_hat) = sqrt(v) / sqrt(1 - b2^t); each group's eps is set to keras_eps / sqrt(1 - b2^t)
    before step t (t - 1 steps taken), which gives Keras' update sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps).
    """

    def __init__(self, params, lr: float, eps: float = 1e-8, **options):
        super().__init__(params, lr=lr, eps=eps, **options)
        for group in self.param_groups:
            group["keras_eps"] = eps

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            taken = max((int(self.state[p]["step"]) for p in group["params"] if "step" in self.state[p]), default=0)
            group["eps"] = group["keras_eps"] / math.sqrt(1 - group["betas"][1] ** (taken + 1))
        return super().step(closure)


def make_optimizer(
    parameters,
    learning_rate: float,
    warmup_steps: int,
    decay_steps: int,
    decay_rate: float = 0.5,
    adam_epsilon: str = "keras",
):
    """Returns (Adam, LambdaLR); call scheduler.step() after every optimizer.step()."""
    if adam_epsilon not in ADAM_EPSILONS:
        raise ValueError(f"adam_epsilon={adam_epsilon!r} is unknown; use 'keras' (the paper's Adam) or 'optax'.")
    adam = KerasAdam if adam_epsilon == "keras" else torch.optim.Adam
    optimizer = adam(parameters, lr=learning_rate, eps=1e-8)
    schedule = learning_rate_schedule(learning_rate, warmup_steps, decay_steps, decay_rate)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / learning_rate)
