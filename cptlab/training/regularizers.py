"""Continual-learning baselines that a stage turns on with ``regularizer`` (``RegularizerConfig``).

Both protect the model the stage starts from (``start``: a copy, frozen):

- ``EWC`` (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks"): the loss gains
  ``weight / 2 * sum_i F_i (theta_i - start_i)^2``. ``F`` is the diagonal empirical Fisher of the start
  model: the mean over sequences of each parameter's squared gradient of the sequence's mean next-token
  loss, on ``fisher_batches`` batches of the protected data (``estimate_fisher``). Its gradient is added
  to ``.grad`` after the backward pass (``add_penalty_grad``), so the forward pass is the plain one.
- ``LwF`` (Li & Hoiem 2017, "Learning without Forgetting"): on the stage's own batches the loss gains
  ``weight * T^2 * KL(p_start || p_model)`` over every position, both distributions softened by the
  temperature ``T`` (Hinton et al.'s scaling keeps the gradient's size independent of ``T``).

Compute is counted: ``setup_flops`` and ``step_flops`` say what a baseline spends beyond the stage's own
training (the Fisher's forward and backward passes; the teacher's forward pass on every training token, a
third of a training token's FLOPs under the 6N convention); the trainer adds them to the run's count.
"""

from __future__ import annotations

import contextlib
import copy
import threading

import torch
import torch.nn.functional as F
from torch import nn

from cptlab import data
from cptlab.config import RegularizerConfig
from cptlab.training import runtime
from cptlab.training.model import GPT


class Regularizer:
    """The no-op base: no penalty, the trainer's own loss (``loss_fn`` None); subclasses override what
    they change."""

    loss_fn: runtime.LossFn | None = None  # (the loss to differentiate, the data loss) of a micro-batch

    def __init__(self, flops_per_token: int):
        self.flops_per_token = flops_per_token
        self.setup_flops = 0  # FLOPs spent before the stage's first step (EWC's Fisher)
        self.penalty_sum = 0.0  # the penalty summed since the last ``take_penalty``
        self.penalty_count = 0
        self._lock = threading.Lock()  # the training step may call ``loss_fn`` from several threads

    def add_penalty_grad(self, model: nn.Module) -> None:
        """Add the penalty's gradient to ``model``'s ``.grad`` (after the backward pass)."""

    def step_flops(self, tokens: int) -> int:
        """The extra FLOPs of a training step over ``tokens`` tokens."""
        return 0

    def take_penalty(self) -> float:
        """The mean penalty since the last call (the trainer takes it every step), and reset it."""
        mean = self.penalty_sum / max(1, self.penalty_count)
        self.penalty_sum, self.penalty_count = 0.0, 0
        return mean

    def _record(self, value: float) -> None:
        with self._lock:
            self.penalty_sum += value
            self.penalty_count += 1


class EWC(Regularizer):
    """Elastic weight consolidation toward ``start`` with the diagonal Fisher ``fisher`` (by parameter)."""

    def __init__(self, start: nn.Module, fisher: dict[str, torch.Tensor], weight: float, flops_per_token: int,
                 fisher_tokens: int):
        super().__init__(flops_per_token)
        self.anchor = {name: p.detach().clone() for name, p in start.named_parameters()}
        self.fisher = fisher
        self.weight = weight
        self.setup_flops = fisher_tokens * flops_per_token  # a forward and backward pass per token

    def add_penalty_grad(self, model: nn.Module) -> None:
        self._record(float(self.penalty_grad(model)))

    @torch.no_grad()
    def penalty_grad(self, model: nn.Module) -> torch.Tensor:
        """Add the penalty's gradient to ``.grad``; return the penalty, a scalar on the parameters' device
        (summed there: no host round trip per parameter; float64 where the device has it)."""
        params = [(name, p) for name, p in model.named_parameters() if name in self.fisher]
        device = params[0][1].device if params else torch.device("cpu")
        dtype = torch.float32 if device.type == "mps" else torch.float64
        penalty = torch.zeros((), dtype=dtype, device=device)
        for name, p in params:
            delta = p.detach() - self.anchor[name]
            weighted = self.fisher[name] * delta
            grad = weighted.mul(self.weight)
            p.grad = grad if p.grad is None else p.grad.add_(grad)
            penalty += (weighted * delta).sum(dtype=dtype)
        return penalty.mul_(0.5 * self.weight)


class LwF(Regularizer):
    """Learning without forgetting: distillation toward the frozen ``start`` model on the stage's batches."""

    def __init__(self, start: nn.Module, weight: float, temperature: float, flops_per_token: int,
                 autocast: contextlib.AbstractContextManager):
        super().__init__(flops_per_token)
        self.teacher = start.eval().requires_grad_(False)
        self.weight, self.temperature, self.autocast = weight, temperature, autocast

    def loss_fn(self, model: nn.Module, x: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The data loss plus the weighted distillation term, and the data loss."""
        logits, _ = model(x)
        with torch.no_grad(), copy.copy(self.autocast):
            teacher_logits, _ = self.teacher(x)
        t = self.temperature
        logits = logits.float().flatten(0, 1)
        logp = F.log_softmax(logits, dim=-1)
        data_loss = F.nll_loss(logp, y.flatten())
        soft = logp if t == 1 else F.log_softmax(logits / t, dim=-1)
        teacher = F.log_softmax(teacher_logits.float().flatten(0, 1) / t, dim=-1)
        kd = (teacher.exp() * (teacher - soft)).sum(-1).mean() * (t * t)
        self._record(float(kd.detach()))
        return data_loss + self.weight * kd, data_loss

    def step_flops(self, tokens: int) -> int:
        return tokens * self.flops_per_token // 3  # the teacher's forward pass


def estimate_fisher(model: nn.Module, sampler: data.BatchSampler, device: torch.device,
                    autocast: contextlib.AbstractContextManager) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of ``model`` (in eval mode): the mean over the sampler's sequences of
    each parameter's squared gradient of that sequence's mean next-token loss. Draws no global random
    numbers, so a resumed run estimates the same Fisher."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()
    n = 0
    for x, y in sampler:
        for row in range(x.size(0)):
            with copy.copy(autocast):
                _, loss = model(x[row:row + 1].to(device), y[row:row + 1].to(device), return_logits=False)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[name] += g.float().square()
            n += 1
    model.train(was_training)
    return {name: f / max(1, n) for name, f in fisher.items()}


def build(cfg: RegularizerConfig, start: GPT, fisher_sampler: data.BatchSampler | None, device: torch.device,
          autocast: contextlib.AbstractContextManager, flops_per_token: int) -> Regularizer:
    """The stage's regularizer against ``start`` (a copy of the stage's starting model, which it keeps)."""
    if cfg.kind == "ewc":
        assert fisher_sampler is not None
        fisher = estimate_fisher(start, fisher_sampler, device, autocast)
        tokens = fisher_sampler.num_steps * fisher_sampler.batch_size * fisher_sampler.seq_len
        return EWC(start, fisher, cfg.weight, flops_per_token, tokens)
    return LwF(start, cfg.weight, cfg.temperature, flops_per_token, autocast)
