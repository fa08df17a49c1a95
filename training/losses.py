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
    return weighted_mean((t.exp() * (t - s)).sum(-1), weights)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean of per-position losses, or their ``weights``-weighted mean (0 when every weight is 0)."""
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


def hard_ce(teacher_logits: torch.Tensor, student_logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of the student's cross-entropy on the teacher's argmax token (weighted as ``soft_kl``).

    Jacobi decoding accepts a guess when the argmaxes agree; this spends nothing on the rest of the teacher's
    distribution, which ``soft_kl`` matches too."""
    if teacher_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    return weighted_mean(F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(-1), reduction="none"),
                         weights)


def ar_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy on the fixed-point tokens (EOS included: pad == EOS must not be ignored)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets.long(), label_smoothing=label_smoothing)


def unlikelihood(logits: torch.Tensor, loops: torch.Tensor) -> torch.Tensor:
    """Mean over positions of -log(1 - p(loop tokens)), p the model's probability of all the tokens ``loops`` marks
    (those that would repeat a 4-gram: ``repeat_completions``). Token-level unlikelihood with the loop completions as
    the candidates: it lowers the student's own chance of looping however sure the teacher is of the loop, where
    ``penalize_loops`` only shifts the teacher's logits. logits [N, V], loops [N, V] bool."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    p_loop = (F.softmax(logits.float(), -1) * loops).sum(-1)
    return -torch.log1p(-p_loop.clamp(max=1 - 1e-6)).mean()


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
    answer away from it, the proxy falls (even below 0) while real Jacobi gains can still grow. Judge with
    training.evaluate.
    """
    return (first_wrong(student_argmax, fixed) - first_wrong(state, fixed)).float()


def repeat_completions(ids: torch.Tensor, real: torch.Tensor, at: torch.Tensor, vocab: int, k: int = 4) -> torch.Tensor:
    """[B, K, V] bool: the tokens that, placed after position at[j] of row b, would end a k-gram that already occurs in
    the row's real tokens up to at[j] (what seq-rep-k counts as repeated text). ids, real: [B, S]; at: [K]."""
    B, S = ids.shape
    at = at.to(ids.device)
    if S < k:
        return torch.zeros(B, at.numel(), vocab, dtype=torch.bool, device=ids.device)
    grams = ids.unfold(1, k - 1, 1)  # [B, S-k+2, k-1]: the (k-1)-gram starting at e, ending at e + k - 2
    whole = real.unfold(1, k - 1, 1).all(-1)
    ends = torch.arange(k - 2, S, device=ids.device)  # end position of each gram
    here = (at - (k - 2)).clamp_min(0)  # index of the gram ending at at[j]
    same = (grams[:, here, None, :] == grams[:, None, :, :]).all(-1)  # [B, K, G]
    # an earlier occurrence whose next token exists (and is real): that token would repeat the k-gram
    nxt_pos = (ends + 1).clamp_max(S - 1)
    earlier = ends[None, :] < at[:, None]  # [K, G]; then ends + 1 <= at[j] <= S - 1
    ok = same & earlier[None] & whole[:, None, :] & whole[:, here, None] & (at >= k - 2)[None, :, None]
    ok &= real[:, nxt_pos][:, None, :]
    nxt = ids[:, nxt_pos]  # [B, G]
    out = torch.zeros(B, at.numel(), vocab + 1, dtype=torch.bool, device=ids.device)
    out.scatter_(2, torch.where(ok, nxt[:, None, :], vocab), True)
    return out[..., :vocab]


def penalize_loops(logits: torch.Tensor, loops: torch.Tensor, penalty: float) -> torch.Tensor:
    """``penalty`` subtracted from the logits of the tokens ``loops`` marks (``repeat_completions``): each way of
    repeating a k-gram loses that much log-odds against the rest. 0 changes nothing."""
    if penalty == 0.0:
        return logits
    return logits.float() - penalty * loops.float()


def penalized(logits: torch.Tensor, ids: torch.Tensor, real: torch.Tensor, at: torch.Tensor, penalty: float) -> torch.Tensor:
    """Logits [B, K, V] taken after positions ``at`` of rows ``ids`` (real tokens: ``real``), less ``penalty`` on
    every token that would repeat a 4-gram of the row so far; unchanged at penalty 0."""
    if penalty == 0.0:
        return logits
    return penalize_loops(logits, repeat_completions(ids, real, at, logits.shape[-1]), penalty)
