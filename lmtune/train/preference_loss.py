"""Preference losses: summed answer log-probabilities, and DPO (sigmoid, IPO, hinge) and ORPO on them.

Log-probabilities are computed from the final hidden states on answer positions only, in row
chunks whose float32 logits are recomputed in backward instead of kept (activation
checkpointing of the head): a DPO batch holds both answers of every pair, so keeping the full
``(2 x batch) x seq x vocab`` logits, as the stock forward does, would be the largest tensor of
the step. TRL's fused head does the same on GPUs but scores every position, prompts and
padding included, where Triton is absent (on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmtune.train.loss import CHUNK_ROWS, compute_dtype, shifted_targets
from lmtune.data.render import IGNORE_INDEX


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def sequence_logps_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its labelled tokens, and their number.

    Args:
        hidden: Final hidden states ``(n, seq, hidden)``.
        weight: The bias-free output head's weight ``(vocab, hidden)``.
        labels: ``(n, seq)`` token ids, IGNORE_INDEX where not scored (not yet shifted).
        rows: Rows per chunk; by default ``CHUNK_ROWS``.

    Returns:
        ``(logps, counts)``, both of shape ``(n,)``; ``logps`` is float32 and differentiable.
    """
    targets = shifted_targets(labels)
    keep = targets != IGNORE_INDEX
    owner = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[keep]
    dtype = compute_dtype(hidden, weight)
    selected, weight, wanted = hidden[keep].to(dtype), weight.to(dtype), targets[keep]
    rows = rows or CHUNK_ROWS
    pieces = []
    for start in range(0, selected.shape[0], rows):
        args = (selected[start: start + rows], weight, wanted[start: start + rows])
        grad = torch.is_grad_enabled() and (selected.requires_grad or weight.requires_grad)
        pieces.append(checkpoint(_token_logps, *args, use_reentrant=False) if grad else _token_logps(*args))
    token_logps = torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)
    logps = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, owner, token_logps)
    return logps, keep.sum(dim=1)


def sequence_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps_from_hidden`` for models whose logits come only from their own forward."""
    targets = shifted_targets(labels)
    keep = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits.float(), dim=-1).gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    return (logps * keep).sum(dim=1), keep.sum(dim=1)


@dataclass(frozen=True)
class Objective:
    """What a preference run optimizes: DPO with ``loss_type``, or ORPO; ``beta`` for either."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    orpo: bool = False

    @property
    def name(self) -> str:
        return "ORPO" if self.orpo else f"DPO ({self.loss_type})"


def dpo_loss(
    objective: Objective, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair DPO loss and the logged per-pair metrics.

    ``sigmoid``: -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))), the DPO paper's.
    ``hinge``: relu(1 - beta * that margin) (SLiC). ``ipo``: (length-averaged margin - 1 / (2 beta))^2,
    averaged per answer token as TRL does, so that beta means the same for short and long answers.
    """
    beta = objective.beta
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if objective.loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
    elif objective.loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif objective.loss_type == "ipo":
        averaged = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (averaged - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {objective.loss_type!r}")
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return losses, _reward_metrics(chosen_rewards, rejected_rewards, chosen.detach(), rejected.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's two branches)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    objective: Objective, chosen: torch.Tensor, rejected: torch.Tensor,
    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair ORPO loss: NLL of the chosen answer - beta * log sigmoid(log odds(chosen) - log odds(rejected)).

    Odds are those of the per-token average probability (the ORPO paper's, as TRL computes them).
    The NLL is averaged per answer token within each pair, then over pairs, so that every pair
    weighs the same, like the DPO term (TRL averages it over the batch's tokens).
    """
    avg_chosen = chosen / chosen_tokens.clamp(min=1)
    avg_rejected = rejected / rejected_tokens.clamp(min=1)
    log_odds = (avg_chosen - avg_rejected) - (_log1mexp(avg_chosen) - _log1mexp(avg_rejected))
    losses = -avg_chosen - objective.beta * F.logsigmoid(log_odds)
    metrics = _reward_metrics(objective.beta * avg_chosen.detach(), objective.beta * avg_rejected.detach(),
                              chosen.detach(), rejected.detach())
    metrics["nll_loss"] = -avg_chosen.detach()
    metrics["log_odds_ratio"] = log_odds.detach()
    return losses, metrics


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen: torch.Tensor,
                    rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen,
        "logps/rejected": rejected,
    }
