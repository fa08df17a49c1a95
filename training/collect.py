"""Jacobi trajectories of the target model, block by block, batched, in resumable shards.

    python -m training.collect --prompts data/prompts-train.jsonl --out data/traj

For each prompt the answer is built block by block (``n`` tokens a block). Within a block every
Jacobi state is kept, from the random initial guess to the fixed point; the fixed point appended
to the prefix starts the next block. A batch of prompts runs together over one KV cache: the
prefix is computed once, each Jacobi pass feeds only the ``n``-token windows, and the cache is
cropped back after every pass that did not converge. After the last block one teacher-forced
forward checks that the fixed points are the model's greedy continuation (a sequence is greedy
iff every token is the argmax given its prefix).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from decoding import DEFAULT_SPEC, encode, load_model
from decoding.prompts import read_jsonl
from decoding.trace import LOOP_LIMIT, LOOP_PERIOD, loop_onset, repeat_flags

from decoding.cli import parse, print_table, save_settings

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class CollectSettings:
    """Settings of trajectory collection; saved as settings.json in the output folder."""

    model: str = DEFAULT_SPEC  # target model spec (see decoding.models)
    adapter: str = ""  # optional LoRA adapter of the target (progressive training: regenerate with the CLLM)
    prompts: str = str(ROOT / "data" / "prompts-train.jsonl")  # JSON lines with "prompt"
    out: str = str(ROOT / "data" / "traj")  # output folder of shards
    limit: int = 0  # use only the first K prompts (0: all)
    n: int = 16  # block size (Jacobi window)
    max_new_tokens: int = 256  # answer tokens per prompt at most (rounded down to whole blocks)
    max_prompt_tokens: int = 512  # longer prompts are skipped
    batch: int = 512  # prompts per shard, decoded together
    verify_batch: int = 64  # sequences per teacher-forced greedy check forward (bounds logits memory)
    repeat_limit: int = LOOP_LIMIT  # drop a sample whose answer repeats one token (or a short pattern) this many times in a row
    repeat_period: int = LOOP_PERIOD  # longest pattern (in tokens) the repetition filter looks for
    augment: int = 0  # extra states per block: intermediate states with some wrong tokens set to the fixed point
    device: str = "auto"  # auto / cuda / cpu
    dtype: str = "float32"  # float32 (fixed points pass the greedy check) / bfloat16 (faster; near-ties cut answers) / auto
    seed: int = 0  # seed of initial guesses and augmentation
    max_minutes: float = 0.0  # stop cleanly between shards after this many minutes (0: no limit)
    part: int = 0  # this process does the shards k with k % parts == part (one process per GPU)
    parts: int = 1  # number of processes sharing the output folder


def repeats(tokens: list[int], limit: int, max_period: int = 1) -> bool:
    """True if some pattern of 1..max_period tokens occurs ``limit`` times in a row."""
    return loop_onset(tokens, limit, max_period) is not None


def seq_rep(tokens: list[int], k: int = 4) -> float:
    """Share of the k-grams of a sequence that already occurred earlier in it (seq-rep-k; 0 if it has none): the
    share of its tokens from the k-th on that ``repeat_flags`` marks, so the metric and the analysis agree."""
    grams = len(tokens) - k + 1
    return sum(repeat_flags([], tokens, k)) / grams if grams > 0 else 0.0


def augment_states(states: torch.Tensor, fixed: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` noisier-than-trajectory variants per intermediate state: each wrong token after the
    first wrong one is set to its fixed-point token with probability 1/2 (the CLLM paper's augmentation).
    states: [M, n] (the last one is the fixed point), fixed: [n]; returns [<= count*(M-1), n]."""
    out = []
    for state in states[:-1]:
        wrong = state != fixed
        if wrong.sum() < 2:
            continue
        first = int(wrong.nonzero()[0])
        for _ in range(count):
            flip = (torch.rand(state.shape, generator=gen) < 0.5) & wrong
            flip[: first + 1] = False  # the first wrong token stays wrong: the state keeps its noise level
            out.append(torch.where(flip, fixed, state))
    return torch.stack(out) if out else states.new_zeros((0, states.shape[1]))


def left_pad(prompts: list[list[int]], device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, width] of token lists right-aligned behind ``pad_id``, on ``device``."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _forward(model, ids, mask, pos, cache, keep=0):
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                 logits_to_keep=keep).logits


@torch.inference_mode()
def jacobi_block(model, cache, mask, last, pos, init, max_iters):
    """Jacobi-iterate one block for the whole batch until every row reaches its fixed point.

    last: [B] token before the block, pos: [B] its position, init: [B, n] initial guesses.
    Returns (fixed points [B, n], per-row state lists, converged [B]); the cache ends holding the
    KV of ``[last] + fixed[:, :-1]`` for every row.
    """
    B, n = init.shape
    state = init.clone()
    done = torch.zeros(B, dtype=torch.bool, device=init.device)
    history = [[row] for row in state.cpu()]
    window_mask = torch.cat([mask, mask.new_ones(B, n)], 1)
    positions = pos[:, None] + torch.arange(n, device=init.device)
    for _ in range(max_iters):
        window = torch.cat([last[:, None], state[:, :-1]], 1)
        out = _forward(model, window, window_mask, positions, cache).argmax(-1)
        out = torch.where(done[:, None], state, out)  # rows at their fixed point stay frozen
        newly = ~done & (out == state).all(-1)
        done |= newly
        if bool(done.all()):  # note: CPU-GPU sync point
            return state, history, done
        cache.crop(-n)  # drop the window: keep only the prefix
        changed = (~done).nonzero().flatten().tolist()
        out_cpu = out.cpu()
        for b in changed:
            history[b].append(out_cpu[b])
        state = out
    # Not converged within max_iters (never happens in exact arithmetic): run the window once more.
    _forward(model, torch.cat([last[:, None], state[:, :-1]], 1), window_mask, positions, cache)
    return state, history, done


@torch.inference_mode()
def greedy_agreement(model, prompts, answers, valid, batch: int) -> list[int]:
    """For each sample, how many leading answer tokens equal the teacher-forced argmax (the greedy check)."""
    device = next(model.parameters()).device
    agree = []
    for start in range(0, len(prompts), batch):
        chunk = range(start, min(start + batch, len(prompts)))
        ids, mask = left_pad([prompts[i] + answers[i] for i in chunk], device)
        L = max(len(answers[i]) for i in chunk)
        right = max(len(prompts[i]) + len(answers[i]) for i in chunk)
        ids, mask = ids[:, -right:], mask[:, -right:]
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        # Right-aligned rows of unequal answer length: compare each row's own tail.
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=L + 1).logits
        pred = logits[:, :-1].argmax(-1).cpu()
        for r, i in enumerate(chunk):
            a = answers[i][: valid[i]]
            p = pred[r, L - len(answers[i]): L - len(answers[i]) + len(a)].tolist()
            k = next((t for t, (x, y) in enumerate(zip(a, p)) if x != y), len(a))
            agree.append(k)
    return agree


@torch.inference_mode()
def collect_batch(model, prompts: list[list[int]], s: CollectSettings, eos_ids, seed: int) -> tuple[list[dict], dict]:
    """Trajectories for one batch of tokenised prompts; returns (kept samples, counters).

    A sample: prompt ids, ``answer`` (the fixed points of its blocks, [T*n]), ``valid`` (answer
    tokens up to and including EOS), ``states`` (per block a [m, n] tensor: the trajectory, the
    fixed point last) and ``extra`` (per block the augmented states, maybe empty).
    """
    device = next(model.parameters()).device
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n, blocks = s.n, s.max_new_tokens // s.n
    ids, mask = left_pad(prompts, device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    _forward(model, ids[:, :-1], mask[:, :-1], pos[:, :-1], cache, keep=1)
    last, cur, mask = ids[:, -1], pos[:, -1], mask[:, :-1]
    B = len(prompts)
    answers, states = [[] for _ in range(B)], [[] for _ in range(B)]
    finished, valid = [False] * B, [0] * B
    eos = set(eos_ids)
    stalled = 0
    for _ in range(blocks):
        init = torch.tensor([[rng.choice(p) for _ in range(n)] for p in prompts], device=device)
        fixed, history, done = jacobi_block(model, cache, mask, last, cur, init, max_iters=2 * n + 2)
        fixed_cpu = fixed.cpu()
        for b in range(B):
            if finished[b]:
                continue
            if not bool(done[b]):
                finished[b], stalled = True, stalled + 1
                continue
            states[b].append(torch.stack(history[b]))
            row = fixed_cpu[b].tolist()
            answers[b].extend(row)
            hit = next((t for t, tok in enumerate(row) if tok in eos), None)
            valid[b] += n if hit is None else hit + 1
            finished[b] = hit is not None
        if all(finished):
            break
        mask = torch.cat([mask, mask.new_ones(B, n)], 1)
        last, cur = fixed[:, -1], cur + n
    agree = greedy_agreement(model, prompts, answers, valid, s.verify_batch) if any(answers) else [0] * B
    samples, counts = [], {"prompts": B, "stalled": stalled, "greedy_mismatch": 0, "repetitive": 0, "empty": 0}
    for b in range(B):
        keep_blocks = min(len(states[b]), agree[b] // n) if agree[b] < valid[b] else len(states[b])
        counts["greedy_mismatch"] += int(agree[b] < valid[b])
        if keep_blocks == 0:
            counts["empty"] += 1
            continue
        answer = answers[b][: keep_blocks * n]
        v = min(valid[b], keep_blocks * n)
        if repeats(answer[:v], s.repeat_limit, s.repeat_period):
            counts["repetitive"] += 1
            continue
        traj = states[b][:keep_blocks]
        extra = [augment_states(t, t[-1], s.augment, gen) for t in traj] if s.augment else []
        samples.append({"prompt": prompts[b], "answer": torch.tensor(answer, dtype=torch.int32), "valid": v,
                        "states": [t.to(torch.int32) for t in traj], "extra": [e.to(torch.int32) for e in extra]})
    return samples, counts


def load_prompt_ids(tokenizer, path: str, limit: int, max_tokens: int) -> list[list[int]]:
    """Tokenised prompts (chat template), in file order, skipping over-long ones."""
    rows = [row for _, row in read_jsonl(path)]
    rows = rows[:limit] if limit else rows
    ids = [encode(tokenizer, r["prompt"]) for r in rows]
    return [x for x in ids if 2 <= len(x) <= max_tokens]


def load_shards(folder: str | Path) -> list[dict]:
    """Every shard of a trajectory folder ({"samples", "counts"}), in shard order."""
    return [torch.load(path, weights_only=True) for path in sorted(Path(folder).glob("shard-*.pt"))]


def read_shards(folder: str | Path) -> list[dict]:
    """Every sample of every shard in a trajectory folder, in shard order."""
    return [x for shard in load_shards(folder) for x in shard["samples"]]


def main(argv=None) -> None:
    s = parse(CollectSettings, argv)
    if not 0 <= s.part < s.parts:
        raise SystemExit(f"--part must be in 0..{s.parts - 1}")
    t_start = time.perf_counter()
    if s.dtype == "float32":  # the greedy check compares exact argmaxes: no TF32 shortcuts
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    lm = load_model(s.model, adapter=s.adapter or None, device=s.device, dtype=s.dtype)
    prompts = load_prompt_ids(lm.tokenizer, s.prompts, s.limit, s.max_prompt_tokens)
    prompts.sort(key=len)  # similar lengths share a batch: little padding
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    if s.part == 0:
        save_settings(s, out / "settings.json", prompts=len(prompts), eos_token_ids=list(lm.eos_token_ids),
                      device=str(lm.device), dtype=str(lm.dtype))
    shards = range(s.part, (len(prompts) + s.batch - 1) // s.batch, s.parts)
    slowest = 0.0
    for k in tqdm(shards, desc=f"collect {s.part + 1}/{s.parts}" if s.parts > 1 else "collect", unit="shard"):
        path = out / f"shard-{k:05d}.pt"
        if path.exists():
            continue  # resumed: this shard is already on disk
        elapsed = (time.perf_counter() - t_start) / 60
        if s.max_minutes and elapsed + slowest > s.max_minutes:
            print(f"stopping after {elapsed:.1f} min (limit {s.max_minutes}); rerun to continue")
            break
        t0 = time.perf_counter()
        samples, counts = collect_batch(lm.model, prompts[k * s.batch:(k + 1) * s.batch], s, lm.eos_token_ids, s.seed + k)
        counts["seconds"] = round(time.perf_counter() - t0, 2)  # summed over shards: collection time of all processes
        tmp = path.with_suffix(".tmp")
        torch.save({"samples": samples, "counts": counts}, tmp)
        tmp.rename(path)  # atomic: a killed run never leaves half a shard
        slowest = max(slowest, (time.perf_counter() - t0) / 60)
    if s.parts == 1:  # with several parts, a last run with --parts 1 (nothing left to do) writes the summary
        summarise(out, time.perf_counter() - t_start, expected=len(shards))


def summarise(out: Path, seconds: float, expected: int | None = None) -> None:
    """summary.json: totals over every shard in the folder (kept samples and the drop counters); with ``expected``
    (the shard count of the whole prompt file), whether the collection is complete."""
    shards, counts = load_shards(out), {}
    samples = [x for shard in shards for x in shard["samples"]]
    for shard in shards:
        for key, v in shard.get("counts", {}).items():
            counts[key] = counts.get(key, 0) + v
    blocks = sum(len(x["states"]) for x in samples)
    states = sum(int(t.shape[0]) for x in samples for t in x["states"])
    rows = [("shards", len(shards)), ("samples kept", len(samples)), ("blocks", blocks),
            ("states", states), ("states per block", states / max(blocks, 1)),
            ("answer tokens", sum(x["valid"] for x in samples)), ("seconds (this run)", seconds)]
    if expected is not None:
        rows.append(("complete", len(shards) >= expected))
    rows += list(counts.items())
    (out / "summary.json").write_text(json.dumps(dict(rows), indent=2) + "\n")
    print_table("collect", rows)


if __name__ == "__main__":
    main()
