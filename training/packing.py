"""Jacobi Forcing packing: one training row holds a prompt, its clean answer and a noisy copy of
every block, so one forward gives teacher logits (clean) and student logits (noisy) for all blocks.

Row layout (left-padded so that every row of a batch has the same segment boundaries):

    [pad | prompt (p) | clean answer (L) | noisy stream 1 (L) | noisy stream 2 (L, optional)]

Positions: prompt 0..p-1, clean answer token t at p+t. Noisy block j is the decoding window
``[token before the block] + state[:n-1]`` at positions p-1+jn .. p-1+jn+n-1, so its outputs predict
answer tokens jn .. jn+n-1, exactly like ``jacobi_decode``'s window. Attention: the prompt and clean
answer are causal; noisy block j sees the clean tokens before its window (prompt + answer[:jn-1])
and itself causally, never other noisy blocks (at decode time the prefix is always accepted, clean
text). Pads see only themselves.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from decoding import encode
from decoding.trace import repeat_flags

from .losses import first_wrong


def noise_level(states: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """(n - first wrong position) / n for each state [M, n]: 0 at the fixed point, 1 if the first token is wrong."""
    n = fixed.shape[-1]
    return (n - first_wrong(states, fixed.expand_as(states))).float() / n


def pick_states(sample: dict, window: int, rng: random.Random, use_extra: bool = True) -> tuple[list, list]:
    """The noise curriculum: block j takes the state whose noise is nearest ``((j + shift) mod W) / (W - 1)``.

    Returns (chosen state per block, the trajectory's next state per block, for local consistency).
    """
    shift = rng.randrange(window) if window > 1 else 0
    chosen, following = [], []
    for j, traj in enumerate(sample["states"]):
        fixed = traj[-1]
        pool = torch.cat([traj, sample["extra"][j]]) if use_extra and sample.get("extra") else traj
        target = ((j + shift) % window) / (window - 1) if window > 1 else 1.0
        dist = (noise_level(pool, fixed) - target).abs()
        best = (dist == dist.min()).nonzero().flatten().tolist()
        k = rng.choice(best)
        chosen.append(pool[k])
        # The next trajectory state of an augmented state is unknown: use the fixed point.
        following.append(traj[k + 1] if k + 1 < len(traj) else fixed)
    return chosen, following


def real_tokens(attention_mask: torch.Tensor, P: int, answer_real: torch.Tensor) -> torch.Tensor:
    """[B, P + A] bool: a left-padded row's real prompt tokens (those its last prompt token, at P - 1, may attend
    to) followed by ``answer_real`` [B, A]."""
    return torch.cat([attention_mask[:, 0, P - 1, :P], answer_real], 1)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, 1, S, S] bool, True = may attend
    keep: torch.Tensor  # [K] indices of the positions whose logits are needed (same for every row)
    answer: torch.Tensor  # [B, L] fixed-point tokens (targets)
    ar_mask: torch.Tensor  # [B, L] answer tokens the AR term counts (up to and including EOS; see ``ar_end`` in pack)
    states: torch.Tensor  # [streams, B, L] the noisy states fed (as answer-aligned guesses)
    cons_mask: torch.Tensor  # [streams, B, L] noisy outputs that count: after the state's first wrong token
    repeats: torch.Tensor  # [B, L] answer tokens that end a 4-gram already seen in the prompt or earlier in the answer
    n: int  # block size
    prompt_end: int  # P: index where the clean answer starts
    valid: torch.Tensor  # [B, L] answer tokens that exist (up to and including EOS)
    ul_mask: torch.Tensor  # [B, L] answer tokens the unlikelihood term counts (see ``ul_end`` in pack)

    def to(self, device) -> "PackedBatch":
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PackedBatch(**fields)

    def real(self) -> torch.Tensor:
        """[B, P + L] bool: the row's own tokens in its prompt and clean answer (up to EOS), not padding."""
        return real_tokens(self.attention_mask, self.prompt_end, self.valid)

    def rows(self, sl: slice) -> "PackedBatch":
        """The rows ``sl`` of this batch, with the same layout (segment boundaries, ``keep``, ``n``)."""
        return PackedBatch(self.input_ids[sl], self.position_ids[sl], self.attention_mask[sl], self.keep,
                           self.answer[sl], self.ar_mask[sl], self.states[:, sl], self.cons_mask[:, sl],
                           self.repeats[sl], self.n, self.prompt_end, self.valid[sl], self.ul_mask[sl])


def round_up(width: int, multiple: int) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (1 or less: unchanged)."""
    return width if multiple <= 1 else -(-width // multiple) * multiple


def pack(samples: list[dict], streams: list[list[list[torch.Tensor]]], n: int, pad_id: int = 0,
         pad_to: int = 1) -> PackedBatch:
    """Build a batch. streams[s][b][j] is the [n] state of block j of sample b in noisy stream s.

    ``pad_to``: the prompt segment is left-padded to a multiple of this width, so batches come in few shapes (kernels
    that are planned per shape, such as cuDNN attention's, are then planned once for many steps); the extra pads
    change no loss.

    A sample may end its terms early (``batches.mark_loop`` sets these at the onset of a loop): ``cons_end``, the first
    answer position with no consistency output; ``ar_end``, the first the AR term skips; ``ul_end``, the first the
    unlikelihood term skips."""
    B, S_n = len(samples), len(streams)
    P = round_up(max(len(x["prompt"]) for x in samples), pad_to)
    L = max(len(x["states"]) for x in samples) * n
    S = P + L * (1 + S_n)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    pos = torch.zeros((B, S), dtype=torch.long)
    mask = torch.zeros((B, S, S), dtype=torch.bool)
    answer = torch.full((B, L), pad_id, dtype=torch.long)
    valid = torch.zeros((B, L), dtype=torch.bool)
    states = torch.full((S_n, B, L), pad_id, dtype=torch.long)
    cons = torch.zeros((S_n, B, L), dtype=torch.bool)
    repeat = torch.zeros((B, L), dtype=torch.bool)
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    for b, x in enumerate(samples):
        p, T = len(x["prompt"]), len(x["states"])
        a = P - p
        ans = x["answer"][: T * n].long()
        ids[b, a:P] = torch.tensor(x["prompt"])
        ids[b, P:P + T * n] = ans
        pos[b, a:P + L] = torch.arange(P + L - a)
        answer[b, :T * n] = ans
        valid[b, : x["valid"]] = True
        repeat[b, : x["valid"]] = torch.tensor(repeat_flags(list(x["prompt"]), ans[: x["valid"]].tolist()), dtype=torch.bool)
        mask[b, a:P + L, a:P + L] = torch.ones(P + L - a, P + L - a, dtype=torch.bool).tril()
        bridge = torch.cat([ids[b, P - 1:P], ans])  # bridge[jn] is the token before block j
        for s in range(S_n):
            base = P + L * (s + 1)
            for j in range(T):
                state = streams[s][b][j].long()
                r = base + j * n
                ids[b, r] = bridge[j * n]
                ids[b, r + 1:r + n] = state[: n - 1]
                pos[b, r:r + n] = torch.arange(p - 1 + j * n, p - 1 + j * n + n)
                mask[b, r:r + n, a:P + j * n - 1] = True
                mask[b, r:r + n, r:r + n] = tril
                states[s, b, j * n:(j + 1) * n] = state
                f = int(first_wrong(state, ans[j * n:(j + 1) * n]))
                # Outputs up to the first wrong guess see only right tokens: equal to the teacher's, no signal.
                cons[s, b, j * n + f + 1:(j + 1) * n] = True
        cons[:, b, min(x["valid"], x.get("cons_end", L)):] = False  # nothing past EOS, nor past cons_end
    mask |= torch.eye(S, dtype=torch.bool)  # pads (and every token) see themselves: no empty softmax row
    keep = torch.cat([torch.arange(P - 1, P - 1 + L)] + [torch.arange(P + L * (s + 1), P + L * (s + 2)) for s in range(S_n)])
    ends = torch.arange(L)[None]
    ar_mask = valid & (ends < torch.tensor([x.get("ar_end", L) for x in samples])[:, None])
    ul_mask = valid & (ends < torch.tensor([x.get("ul_end", L) for x in samples])[:, None])
    return PackedBatch(ids, pos, mask[:, None], keep, answer, ar_mask, states, cons, repeat, n, P, valid, ul_mask)


@dataclass
class AlignedBatch:
    """(prompt, answer) rows with every answer starting at column P: ``[pad | prompt | answer | pad]``."""

    input_ids: torch.Tensor  # [B, P + A]
    position_ids: torch.Tensor  # [B, P + A]
    attention_mask: torch.Tensor  # [B, 1, S, S] bool: causal over the row's tokens; pads see only themselves
    keep: torch.Tensor  # [A] positions P-1 .. P+A-2, whose logits predict the answer tokens
    valid: torch.Tensor  # [B, A] answer tokens that exist (the rest is padding)

    def to(self, device) -> "AlignedBatch":
        return AlignedBatch(*(v.to(device) for v in self.__dict__.values()))

    def real(self) -> torch.Tensor:
        """[B, P + A] bool: the row's own tokens (prompt and answer), not padding."""
        return real_tokens(self.attention_mask, self.input_ids.shape[1] - self.valid.shape[1], self.valid)


def align_answers(pairs: list[tuple[list[int], list[int]]], pad_id: int = 0, pad_to: int = 1) -> AlignedBatch:
    """Left-pad the prompts and right-pad the answers so one ``logits_to_keep`` range holds every answer:
    the LM head then runs on answer positions only (reference perplexity, the anchor terms of training).
    ``pad_to``: both widths rounded up to a multiple of it (few shapes; see ``pack``)."""
    B = len(pairs)
    P = round_up(max(len(p) for p, _ in pairs), pad_to)
    A = round_up(max(len(a) for _, a in pairs), pad_to)
    ids = torch.full((B, P + A), pad_id, dtype=torch.long)
    pos = torch.zeros((B, P + A), dtype=torch.long)
    real = torch.zeros((B, P + A), dtype=torch.bool)
    valid = torch.zeros((B, A), dtype=torch.bool)
    for b, (p, a) in enumerate(pairs):
        start = P - len(p)
        ids[b, start:P + len(a)] = torch.tensor(p + a)
        pos[b, start:] = torch.arange(P + A - start)
        real[b, start:P + len(a)] = True
        valid[b, : len(a)] = True
    causal = torch.ones(P + A, P + A, dtype=torch.bool).tril()
    mask = (causal & real[:, None, :] & real[:, :, None]) | torch.eye(P + A, dtype=torch.bool)
    return AlignedBatch(ids, pos, mask[:, None], torch.arange(P - 1, P + A - 1), valid)


def reference_pairs(tokenizer, rows: list[dict], max_answer: int = 0, max_prompt: int = 0) -> list[tuple[list[int], list[int]]]:
    """(chat-templated prompt ids, reference answer ids) of rows {prompt, reference}; answers cut to
    max_answer tokens and rows with a prompt over max_prompt tokens skipped (0: no limit)."""
    pairs = []
    for r in rows:
        prompt = encode(tokenizer, r["prompt"])
        answer = tokenizer(r["reference"], add_special_tokens=False)["input_ids"]
        if max_prompt and len(prompt) > max_prompt:
            continue
        pairs.append((prompt, answer[:max_answer] if max_answer else answer))
    return pairs
