"""Which trajectories a training run uses and how they make its batches: the repetition filters, a caught loop's
marks (--loop-samples), the seeded batch order (optionally grouped by length) and the packed batch of one step."""
from __future__ import annotations

import random

from decoding.trace import LOOP_PERIOD, loop_onset

from .collect import repeats, seq_rep
from .packing import PackedBatch, pack, pick_states
from .settings import TrainSettings


def batch_indices(step: int, batch: int, count: int, seed: int) -> list[int]:
    """Sample indices of a global step: consecutive slices of per-epoch seeded permutations."""
    out = []
    start = step * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), count)
        order = list(range(count))
        random.Random(seed * 1000 + epoch).shuffle(order)
        out.extend(order[offset: offset + batch - len(out)])
    return out


def grouped_indices(step: int, batch: int, lengths: list[int], seed: int, group: int = 16) -> list[int]:
    """Sample indices of a global step, batches of similar length: each epoch's seeded permutation is cut into
    chunks of ``group`` batches, each chunk sorted by length and cut into batches, and the batches shuffled. Every
    batch holds ``batch`` distinct samples of one epoch (an epoch's remainder, under one batch, is left out)."""
    count = len(lengths)
    if count < batch:
        return batch_indices(step, batch, count, seed)
    per_epoch = count // batch
    epoch, k = divmod(step, per_epoch)
    order = list(range(count))
    rng = random.Random(seed * 1000 + epoch)
    rng.shuffle(order)
    order = order[: per_epoch * batch]
    batches = []
    for start in range(0, len(order), group * batch):
        chunk = sorted(order[start:start + group * batch], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch] for j in range(0, len(chunk), batch)]
    rng.shuffle(batches)
    return batches[k]


def sample_length(sample: dict) -> int:
    """The tokens a sample takes in a packed row before padding: its prompt, its clean answer and one noisy stream."""
    n = int(sample["states"][0].shape[1])  # block size
    return len(sample["prompt"]) + 2 * n * len(sample["states"])


LOOP_ENDS = {  # --loop-samples: the terms that stop at a caught loop's first token (pack's cons_end, ar_end, ul_end)
    "anchor": (("cons_end",), "the answer terms only"),
    "tail": (("cons_end", "ar_end"), "unlikelihood only"),
    "cut": (("cons_end", "ar_end", "ul_end"), "no term"),
}


def mark_loop(sample: dict, limit: int, mode: str = "anchor") -> dict:
    """The sample, marked where the terms of ``mode`` (LOOP_ENDS) stop, if its answer holds a loop that
    ``--repeat-limit`` catches; otherwise the sample itself."""
    onset = loop_onset(sample["answer"][: sample["valid"]].tolist(), limit, LOOP_PERIOD)
    return sample if onset is None else {**sample, **dict.fromkeys(LOOP_ENDS[mode][0], onset)}


def select_samples(samples: list[dict], s: TrainSettings, log=print) -> tuple[list[dict], int]:
    """The samples --repeat-limit, --loop-samples and --max-rep keep (marked by mark_loop where their terms stop), and
    how many of them loop. A caught answer that is kept is judged by --max-rep on its part before the loop."""
    collected = len(samples)
    if s.loop_samples != "drop":
        samples = [mark_loop(x, s.repeat_limit, s.loop_samples) for x in samples]
        log(f"--loop-samples {s.loop_samples}: {sum('cons_end' in x for x in samples)} of {len(samples)} samples loop; "
            f"from the loop on, {LOOP_ENDS[s.loop_samples][1]}")
    filters = []  # (flag, keep(answer tokens)), applied in this order
    if s.repeat_limit and s.loop_samples == "drop":
        filters.append((f"--repeat-limit {s.repeat_limit}", lambda a: not repeats(a, s.repeat_limit, LOOP_PERIOD)))
    if s.max_rep < 1.0:  # looping answers may teach the CLLM to fast-forward loops (most of its gain is repeated text)
        filters.append((f"--max-rep {s.max_rep}", lambda a: seq_rep(a) <= s.max_rep))
    for name, keep in filters:
        samples = [x for x in samples if keep(x["answer"][: x.get("cons_end", x["valid"])].tolist())]
        log(f"{name}: kept {len(samples)} of {collected} samples")
        if not samples:
            raise SystemExit(f"{name} drops all {collected} samples: raise it")
    return samples, sum("cons_end" in x for x in samples)


def make_batch(samples: list[dict], idx: list[int], s: TrainSettings, step: int, pad_id: int) -> PackedBatch:
    rng = random.Random(hash((s.seed, step, tuple(idx))))
    picks = [pick_states(samples[i], s.noise_window, rng, s.use_extra) for i in idx]
    streams = [[c for c, _ in picks]] + ([[f for _, f in picks]] if s.local_weight > 0 else [])
    n = samples[idx[0]]["states"][0].shape[1]
    return pack([samples[i] for i in idx], streams, n, pad_id, s.pad_to)
