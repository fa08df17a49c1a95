"""The distillation losses on logits already gathered at the positions that count.

All take float logits [N, V] (N selected positions) and return a scalar; an empty selection gives 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of KL(p_teacher || p_student); the teacher is detached. With ``weights`` [N],
    the weighted mean (0 when every weight is 0).

    Same gradient as the soft cross-entropy of the papers, but 0 at the optimum, so logs read well.
    """
    if teacher_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = F.log_softmax(teacher_logits.detach().float(), -1)
    s = F.log_softmax(student_logits.float(), -1)
    kl = (t.exp() * (t - s)).sum(-1)
    if weights is None:
        return kl.mean()
    weights = weights.to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp_min(1e-12)


def ar_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy on the fixed-point tokens (EOS included: pad == EOS must not be ignored)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets.long(), label_smoothing=label_smoothing)


def first_wrong(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index of the first position where pred != target along the last dim (its size if none). [.., n] -> [..]."""
    n = pred.shape[-1]
    wrong = pred != target
    idx = torch.arange(n, device=pred.device).expand_as(wrong)
    return torch.where(wrong, idx, n).min(-1).values


def jacobi_gain(student_argmax: torch.Tensor, state: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Tokens one Jacobi pass would fix, per block: (first wrong of the output) - (first wrong of the state).

    student_argmax, state, fixed: [K, n] (blocks whose state is not yet the fixed point). A training-time
    proxy of the tokens accepted per forward at decode time (which is this gain, at least 1).
    Caveat: ``fixed`` is the collecting model's fixed point. Once training moves the model's own greedy
    answer away from it, the proxy falls (even below 0) while real Jacobi gains can still grow (seen on
    the H100: -0.16 at the end of the run that reached 2.6 tokens per forward). Judge with training.evaluate.
    """
    return (first_wrong(student_argmax, fixed) - first_wrong(state, fixed)).float()


def seen_tokens(context: torch.Tensor, context_real: torch.Tensor, answer: torch.Tensor, answer_real: torch.Tensor,
                vocab: int) -> torch.Tensor:
    """[B, L, V] bool: token v occurs in row b's real context tokens or in answer[b, :t], i.e. in the text that the
    prediction of answer token t sees. context, context_real: [B, P]; answer, answer_real: [B, L] (False = padding,
    never counted)."""
    B, L = answer.shape
    spare = vocab  # padding is scattered into an extra column that is dropped
    ctx = torch.zeros(B, vocab + 1, dtype=torch.bool, device=answer.device)
    ctx.scatter_(1, torch.where(context_real, context, spare), True)
    first = torch.full((B, vocab + 1), L, dtype=torch.long, device=answer.device)
    at = torch.arange(L, device=answer.device)
    first.scatter_reduce_(1, torch.where(answer_real, answer, spare), at.expand(B, L), "amin")
    return ctx[:, None, :vocab] | (first[:, None, :vocab] < at[None, :, None])


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The repetition penalty of CTRL (Keskar et al. 2019; transformers' ``repetition_penalty``) on the logits of
    tokens already seen: positive logits divided by ``penalty``, negative ones multiplied. 1.0 changes nothing."""
    if penalty == 1.0:
        return logits
    logits = logits.float()
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
