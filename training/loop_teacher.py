"""What a loop-penalised teacher would teach (``train --loop-penalty``), measured on the base model itself.

    python -m training.loop_teacher --penalties 0,1,2,4 --limit 60 --out assets/results/training/loop_teacher.json

For each penalty: the repetition of the teacher's greedy answers to held-out prompts (generate with the penalty as
a logits processor) and the perplexity of the held-out human reference answers under the penalised logits. A CLLM
trained toward such a teacher moves toward these numbers; the training itself adds repetition of its own.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from decoding import DEFAULT_SPEC, encode, load_model

from .cli import parse, print_table
from .evaluate import ROOT, greedy_answers, heldout_rows, reference_nll, repetition, result_header, write_result


@dataclass
class TeacherSettings:
    """Settings of one measurement; saved under "settings" in the JSON result."""

    model: str = DEFAULT_SPEC  # base model spec
    heldout: str = str(ROOT / "assets" / "heldout.jsonl")  # prompts with "reference" answers
    limit: int = 60  # the first K held-out prompts (0: all)
    penalties: str = "0,1,2,4"  # comma-separated --loop-penalty values (0 = the plain base model)
    max_new_tokens: int = 256  # answer tokens
    batch: int = 20  # sequences per batched forward / generate
    device: str = "auto"  # auto / cuda / cpu
    dtype: str = "float32"  # model dtype
    out: str = ""  # JSON result path (default: print only)


def penalty_values(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--penalties must be comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise SystemExit(f"--penalties must be one or more numbers of 0 or more, got {text!r}")
    return values


def main(argv=None) -> dict:
    s = parse(TeacherSettings, argv)
    penalties = penalty_values(s.penalties)
    t0 = time.perf_counter()
    rows = heldout_rows(s.heldout, s.limit)
    lm = load_model(s.model, device=s.device, dtype=s.dtype)
    prompts = [encode(lm.tokenizer, r["prompt"]) for r in rows]
    result = result_header(s, lm, rows) | {"teachers": []}
    for penalty in tqdm(penalties, desc="penalties", unit="teacher"):
        nll, count = reference_nll(lm, rows, s.batch, penalty)
        answers = greedy_answers(lm, prompts, s, penalty)
        mean = nll / max(count, 1)  # a huge penalty on references that repeat themselves: no finite perplexity
        result["teachers"].append({"loop_penalty": penalty, "ppl": math.exp(mean) if mean < 700 else None,
                                   "reference_tokens": count, "repetition": repetition(answers)})
    plain = next((t["ppl"] for t in result["teachers"] if t["loop_penalty"] == 0), None)
    for t in result["teachers"]:
        t["ppl_ratio"] = t["ppl"] / plain if plain and t["ppl"] is not None else None
    result["seconds"] = time.perf_counter() - t0
    write_result(result, s.out)
    print_table("loop-penalised teachers", [(f"penalty {t['loop_penalty']:g}: seq-rep-4 / ppl ratio",
                                             f"{t['repetition']['seq_rep_4']:.3f} / "
                                             + (f"{t['ppl_ratio']:.3f}" if t["ppl_ratio"] else "-"))
                                            for t in result["teachers"]])
    return result


if __name__ == "__main__":
    main()
