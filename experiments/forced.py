"""How well a model's Jacobi decoding fast-forwards a given text: Jacobi toward a fixed point that is given.

    python -m experiments.forced --bench RESULT.json --lane base_ar --heldout assets/heldout.jsonl --out forced.json

Real Jacobi decoding runs toward the model's own greedy answer. Here the answer is given: the texts of one lane of
a ``decoding.bench`` result (``base_ar``: the base model's greedy answers, the fixed points that training distils
from). Each pass accepts the given token after the last accepted one, and with it every further given token that the
window had guessed and the model also predicted there; the other outputs become the next guesses, and fresh slots
get random prompt tokens, as in ``jacobi_decode``. On the model's own greedy answer this is exactly its Jacobi run
(tested). On another text it measures the skill consistency training optimises on that text: tokens per pass the
model would gain if that text were its fixed point. For a CLLM trained on the base model's trajectories, a rate
on the base model's answers far above its rate on its own answers says training learned its task, and that the
task is not the one decoding needs.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from decoding import DEFAULT_ADAPTER, DEFAULT_SPEC, DecodeConfig, encode, load_model
from decoding.decoders import fresh_guesses, make_session
from decoding.bench import read_bench
from decoding.prompts import read_prompts

from decoding.cli import parse, print_table
from training.evaluate import write_result


@dataclass
class ForcedSettings:
    """Settings of one measurement; saved under "settings" in the JSON result."""

    model: str = DEFAULT_SPEC  # base model spec
    adapter: str = str(DEFAULT_ADAPTER)  # LoRA adapter of the model whose Jacobi is measured ("" or none: the base)
    bench: str = ""  # a decoding.bench result (.json or .json.gz) whose lane texts are the targets
    lane: str = "base_ar"  # the lane whose token ids are the given answers
    heldout: str = ""  # the prompts file the bench ran on (rows with "id" and "prompt"): prompts are found by id
    n: int = 16  # Jacobi window
    limit: int = 0  # the first K prompts of the bench only (0: all)
    seed: int = 0  # seed of the random guesses for fresh slots (each prompt starts from it, as in jacobi_decode)
    device: str = "auto"
    dtype: str = "float32"
    engine: str = "eager"  # eager, or fast (CUDA graphs)
    out: str = ""  # JSON result path (default: print only)


@torch.inference_mode()
def forced_jacobi(session, prompt_ids: list[int], target: list[int], n: int, rng: random.Random) -> list[int]:
    """Tokens accepted per pass of Jacobi decoding toward the given answer ``target`` (its first token comes with
    the prefill, as in ``jacobi_decode``, and is not counted)."""
    if not target:
        return []
    cfg = DecodeConfig(max_new_tokens=len(target), n=n)
    session.prefill(prompt_ids)
    tokens = target[:1]
    guesses = fresh_guesses(cfg, prompt_ids, tokens, [], n - 1, rng)
    accepted = []
    while len(tokens) < len(target):
        p = len(tokens)
        width = min(n, len(target) - p + 1)
        window = [tokens[-1]] + guesses[: width - 1]
        outputs = session.forward(window)
        # window[k] is the guess for answer position p + k - 1, outputs[k] the prediction for p + k
        k = 1
        while k < width and window[k] == target[p + k - 1] and outputs[k - 1] == target[p + k - 1]:
            k += 1
        session.keep(k, width)
        tokens = tokens + target[p:p + k]
        accepted.append(k)
        guesses = outputs[k:]
        guesses += fresh_guesses(cfg, prompt_ids, tokens, guesses, n - 1 - len(guesses), rng)
    return accepted


def main(argv=None) -> dict:
    s = parse(ForcedSettings, argv)
    if not s.bench or not s.heldout:
        raise SystemExit("--bench (a decoding.bench result) and --heldout (the prompts file it ran on) are needed")
    bench = read_bench(s.bench)
    rows = bench["prompts"][: s.limit or None]
    prompts = {row["id"]: row["prompt"] for row in read_prompts(s.heldout)}  # ids as the bench gave them
    missing = [r["id"] for r in rows if r["id"] not in prompts or s.lane not in r["lanes"]]
    if missing:
        raise SystemExit(f"{len(missing)} bench prompts have no row in {s.heldout} or no {s.lane} lane, e.g. {missing[0]}")
    adapter = "" if s.adapter in ("", "none") else s.adapter
    lm = load_model(s.model, adapter=adapter or None, device=s.device, dtype=s.dtype)
    per_prompt, t0 = [], time.perf_counter()
    for r in tqdm(rows, desc=f"forced jacobi on {s.lane}", unit="prompt"):
        ids = encode(lm.tokenizer, prompts[r["id"]])
        if len(ids) != r["prompt_tokens"]:
            raise SystemExit(f"prompt {r['id']}: {len(ids)} tokens here, {r['prompt_tokens']} in the bench")
        # a fresh generator per prompt, seeded as jacobi_decode seeds its own: the same guesses as the bench's decode
        accepted = forced_jacobi(make_session(lm.model, s.engine), ids, r["lanes"][s.lane]["ids"], s.n,
                                 random.Random(s.seed))
        per_prompt.append([sum(accepted), len(accepted)])
    rates = [t / f for t, f in per_prompt if f]
    result = {"settings": s.__dict__, "device": str(lm.device), "dtype": str(lm.dtype), "prompts": len(per_prompt),
              "tokens_per_forward": sum(rates) / max(len(rates), 1),
              "tokens_per_forward_pooled": sum(t for t, _ in per_prompt) / max(sum(f for _, f in per_prompt), 1),
              "per_prompt": per_prompt, "seconds": time.perf_counter() - t0}
    write_result(result, s.out)
    print_table("forced jacobi", [("target lane", s.lane), ("prompts", result["prompts"]),
                                  ("tokens per forward (mean over prompts)", result["tokens_per_forward"]),
                                  ("tokens per forward (pooled)", result["tokens_per_forward_pooled"])])
    return result


if __name__ == "__main__":
    main()
