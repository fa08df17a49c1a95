"""Held-out evaluation of a CLLM against its base model, with our own decoders.

    python -m training.evaluate --adapter runs/cllm/adapter --out runs/cllm/eval.json

Metrics (held-out ShareGPT prompts):
- tokens per forward of ``jacobi_decode`` (CLLM and base; mean over prompts of trace.mean_accepted);
- exactness: each CLLM Jacobi answer checked against the CLLM's greedy by one teacher-forced
  forward (every token must be the argmax given its prefix), and against ``ar_decode`` on a few prompts;
- per-token perplexity of the held-out reference answers under the CLLM and the base;
- repetition of greedy answers (batched generate, all prompts): seq-rep-4 (share of repeated
  4-grams) and the share of answers the collection filter would drop;
- agreement of the CLLM's greedy answers with the base model's (all prompts): how many leading tokens they share.
  Training targets are the base model's fixed points, so the text after the first difference is text the
  CLLM was never trained to fast-forward.
Tokens and forwards of every speed prompt are kept (``per_prompt``), for paired comparisons of two evaluations.
The per-prompt Jacobi loop costs one eager forward per pass, so its prompt counts are limited.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from decoding import DEFAULT_SPEC, DecodeConfig, ar_decode, encode, jacobi_decode, load_model, run
from decoding.prompts import read_jsonl
from decoding.trace import LOOP_LIMIT, LOOP_PERIOD, FastForwardSplit, loop_onset

from decoding.cli import parse, print_table
from .collect import greedy_agreement, left_pad, seq_rep
from .losses import penalized
from .packing import align_answers, reference_pairs

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class EvalSettings:
    """Settings of one evaluation; saved under "settings" in the JSON result."""

    model: str = DEFAULT_SPEC  # base model spec
    adapter: str = ""  # CLLM: a LoRA adapter folder, or a full model folder (has config.json)
    heldout: str = str(ROOT / "assets" / "heldout.jsonl")  # prompts with "reference" answers
    limit: int = 0  # use only the first K held-out prompts for perplexity and repetition (0: all)
    n: int = 16  # Jacobi window
    max_new_tokens: int = 256  # answer tokens
    speed_prompts: int = 40  # prompts for the CLLM's Jacobi tokens per forward (one eager forward per pass)
    base_speed_prompts: int = 8  # prompts for the base model's Jacobi tokens per forward (~1.1, slow to measure)
    ar_check_prompts: int = 3  # prompts whose CLLM Jacobi answer is compared with ar_decode token for token
    batch: int = 50  # sequences per batched forward / generate (perplexity, repetition)
    device: str = "auto"  # auto / cuda / cpu
    dtype: str = "float32"  # float32 makes Jacobi == AR exact; bfloat16 is faster
    engine: str = "eager"  # decoding session for jacobi/ar: eager, or fast (CUDA graphs, if decoding/fast.py exists)
    out: str = ""  # JSON result path (default: print only)


def load_pair(s: EvalSettings):
    """(base, cllm) LoadedModels; the CLLM merges the adapter, or is a full model folder."""
    base = load_model(s.model, device=s.device, dtype=s.dtype)
    if not s.adapter:
        return base, None
    if (Path(s.adapter) / "config.json").exists():
        return base, load_model(s.adapter, device=s.device, dtype=s.dtype)
    return base, load_model(s.model, adapter=s.adapter, device=s.device, dtype=s.dtype)


def jacobi_speed(lm, prompts: list[list[int]], s: EvalSettings, label: str) -> tuple[dict, list[list[int]]]:
    """Mean tokens per forward of jacobi_decode over prompts; also returns the answers."""
    cfg = DecodeConfig(max_new_tokens=s.max_new_tokens, n=s.n, eos_token_ids=lm.eos_token_ids)
    rates, answers, per_prompt, passes, gained, t0 = [], [], [], 0, 0, time.perf_counter()
    split = FastForwardSplit(0, 0, 0, 0)  # pooled over the prompts
    for ids in tqdm(prompts, desc=f"{label} jacobi", unit="prompt"):
        trace = run(jacobi_decode, lm.model, ids, cfg, engine=s.engine)
        rates.append(trace.mean_accepted)
        answers.append(trace.tokens)
        passes += len(trace.iterations)
        gained += sum(it.accepted for it in trace.iterations)
        per_prompt.append([sum(it.accepted for it in trace.iterations), len(trace.iterations)])
        split = split + trace.fast_forward_split()
    return {"prompts": len(prompts), "tokens_per_forward": sum(rates) / max(len(rates), 1),
            "tokens_per_forward_pooled": gained / max(passes, 1), "min": min(rates, default=0.0),
            "max": max(rates, default=0.0), "answer_tokens": sum(map(len, answers)),
            # Is the speed-up made of copies? Share of repeating tokens among the fast-forwarded ones and among all.
            "fast_forwarded_tokens": split.fast_forwarded,
            "fast_forwarded_repeating": split.fast_forwarded_repeating / max(split.fast_forwarded, 1),
            "answer_tokens_repeating": split.repeating / max(split.tokens, 1),
            "fast_forward_counts": asdict(split),  # the counts behind the three numbers above (training.compare)
            "per_prompt": per_prompt,  # [tokens, forwards] of each prompt, in prompt order
            "seconds": time.perf_counter() - t0}, answers


def exactness(lm, prompts, answers, s: EvalSettings) -> dict:
    """Jacobi answers vs greedy: teacher-forced check on all, ar_decode on the first few."""
    eos = set(lm.eos_token_ids)
    valid = [next((i + 1 for i, t in enumerate(a) if t in eos), len(a)) for a in answers]
    agree = greedy_agreement(lm.model, prompts, answers, valid, s.batch)
    cfg = DecodeConfig(max_new_tokens=s.max_new_tokens, n=1, eos_token_ids=lm.eos_token_ids)
    ar_same = [run(ar_decode, lm.model, p, cfg, engine=s.engine).tokens == a
               for p, a in list(zip(prompts, answers))[: s.ar_check_prompts]]
    return {"teacher_forced_greedy": sum(a >= v for a, v in zip(agree, valid)) / max(len(valid), 1),
            "ar_decode_equal": f"{sum(ar_same)}/{len(ar_same)}"}


@torch.inference_mode()
def reference_nll(lm, rows: list[dict], batch: int, loop_penalty: float = 0.0) -> tuple[float, int]:
    """Total negative log-likelihood of the reference answers (after the chat-templated prompt), and their token count;
    with ``loop_penalty``, under the logits a loop-penalised teacher would give (``train --loop-penalty``)."""
    tok, device = lm.tokenizer, lm.device
    total, count = 0.0, 0
    pairs = reference_pairs(tok, rows)
    for start in tqdm(range(0, len(pairs), batch), desc="reference perplexity", unit="batch"):
        b = align_answers(pairs[start:start + batch]).to(device)
        logits = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                          logits_to_keep=b.keep, use_cache=False).logits.float()
        logits = penalized(logits, b.input_ids, b.real(), b.keep, loop_penalty)
        answers = b.input_ids[:, -logits.shape[1]:]  # the tokens those logits predict
        logp = torch.log_softmax(logits, -1).gather(-1, answers[..., None])[..., 0]
        total += float(-logp[b.valid].sum())
        count += int(b.valid.sum())
    return total, count


class LoopPenalty(LogitsProcessor):
    """generate's logits less ``penalty`` on every token that would repeat a 4-gram of the row's text so far (the
    teacher of ``train --loop-penalty``); ``starts[b]`` is where row b's prompt begins after its left padding, kept on
    ``device`` (generate's) so that no step copies it there."""

    def __init__(self, penalty: float, starts: list[int], device=None):
        self.penalty, self.starts = penalty, torch.tensor(starts, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        S = input_ids.shape[1]
        real = torch.arange(S, device=input_ids.device)[None, :] >= self.starts.to(input_ids.device)[:, None]
        at = torch.tensor([S - 1], device=input_ids.device)
        return penalized(scores[:, None], input_ids, real, at, self.penalty)[:, 0].to(scores.dtype)


@torch.inference_mode()
def generate_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos: set[int], pad: int, batch: int,
                    device, progress: bool = True, loop_penalty: float = 0.0) -> list[list[int]]:
    """Batched greedy answers of ``model`` (left-padded generate), each cut after its first EOS; with
    ``loop_penalty``, those of the loop-penalised teacher (``LoopPenalty``)."""
    out = []
    for start in tqdm(range(0, len(prompts), batch), desc="generate", unit="batch", disable=not progress):
        chunk = prompts[start:start + batch]
        ids, mask = left_pad(chunk, device, pad)
        extra = {}
        if loop_penalty:
            extra["logits_processor"] = LogitsProcessorList([LoopPenalty(loop_penalty, [ids.shape[1] - len(p) for p in chunk], ids.device)])
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(eos), **extra)
        for row in gen[:, ids.shape[1]:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def greedy_answers(lm, prompts: list[list[int]], s, loop_penalty: float = 0.0) -> list[list[int]]:
    """Batched greedy answers of a loaded model to the evaluation prompts (``s``: settings with max_new_tokens and
    batch); with ``loop_penalty``, those of the loop-penalised model (``LoopPenalty``)."""
    return generate_greedy(lm.model, prompts, s.max_new_tokens, set(lm.eos_token_ids), lm.tokenizer.pad_token_id or 0,
                           s.batch, lm.device, loop_penalty=loop_penalty)


def repetition(answers: list[list[int]]) -> dict:
    """seq-rep-4: share of 4-grams that already occurred in the same answer (mean over answers); the share the
    collection's 10x filter would drop; and, answer by answer, seq-rep-4 and where a loop the filter catches
    begins (None: none), for ``training.compare --loops``."""
    per = [seq_rep(a) for a in answers]
    reps = [r for r, a in zip(per, answers) if len(a) >= 4]
    onsets = [loop_onset(a, LOOP_LIMIT, LOOP_PERIOD) for a in answers]
    return {"seq_rep_4": sum(reps) / max(len(reps), 1),
            "filter_rate": sum(o is not None for o in onsets) / max(len(answers), 1),
            "mean_tokens": sum(map(len, answers)) / max(len(answers), 1),
            "per_answer": {"seq_rep_4": [round(r, 4) for r in per], "loop_onset": onsets,
                           "tokens": [len(a) for a in answers]}}


def agreement(answers: list[list[int]], reference: list[list[int]]) -> dict:
    """How far each answer follows the reference answer to the same prompt (here: the CLLM's greedy answers against
    the base model's): the share that are identical, and the leading tokens they share (mean, median)."""
    shared = [next((k for k, (x, y) in enumerate(zip(a, r)) if x != y), min(len(a), len(r)))
              for a, r in zip(answers, reference)]
    same = [a == r for a, r in zip(answers, reference)]
    return {"identical": sum(same) / max(len(same), 1), "shared_prefix_mean": sum(shared) / max(len(shared), 1),
            "shared_prefix_median": statistics.median(shared) if shared else 0.0, "answers": len(shared),
            "shared_prefix": shared}


def heldout_rows(path: str, limit: int) -> list[dict]:
    """The held-out rows {prompt, reference, ...} of a JSON-lines file, the first ``limit`` of them (0: all)."""
    rows = [row for _, row in read_jsonl(path)]
    return rows[:limit] if limit else rows


def result_header(s, lm, rows: list[dict]) -> dict:
    """The start of a result JSON: settings ``s``, where it ran (the GPU's name on CUDA) and how many rows."""
    head = {"settings": s.__dict__, "device": str(lm.device), "dtype": str(lm.dtype), "torch": torch.__version__,
            "python": platform.python_version(), "heldout_prompts": len(rows)}
    if torch.cuda.is_available() and lm.device.type == "cuda":
        head["gpu"] = torch.cuda.get_device_name(lm.device)
    return head


def write_result(result: dict, out: str) -> None:
    """Write a result JSON to ``out`` (its folder made as needed); nothing if ``out`` is empty."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


def main(argv=None) -> dict:
    s = parse(EvalSettings, argv)
    t0 = time.perf_counter()
    rows = heldout_rows(s.heldout, s.limit)
    base, cllm = load_pair(s)
    prompts = [encode(base.tokenizer, r["prompt"]) for r in rows]
    result = result_header(s, base, rows)
    nll_base, count = reference_nll(base, rows, s.batch)
    result["base"] = {"ppl": math.exp(nll_base / max(count, 1)), "reference_tokens": count}
    result["base"]["jacobi"], _ = jacobi_speed(base, prompts[: s.base_speed_prompts], s, "base")
    base_answers = greedy_answers(base, prompts, s)
    result["base"]["repetition"] = repetition(base_answers)
    if cllm is not None:
        nll, _ = reference_nll(cllm, rows, s.batch)
        speed, answers = jacobi_speed(cllm, prompts[: s.speed_prompts], s, "cllm")
        cllm_answers = greedy_answers(cllm, prompts, s)
        result["cllm"] = {"ppl": math.exp(nll / max(count, 1)), "jacobi": speed,
                          "exactness": exactness(cllm, prompts[: s.speed_prompts], answers, s),
                          "repetition": repetition(cllm_answers),
                          "agreement_with_base": agreement(cllm_answers, base_answers)}
        result["ppl_ratio"] = result["cllm"]["ppl"] / result["base"]["ppl"]
    result["seconds"] = time.perf_counter() - t0
    write_result(result, s.out)
    print_table("evaluate", summary_rows(result))
    return result


def summary_rows(r: dict) -> list[tuple[str, object]]:
    rows = [("base tokens/forward", r["base"]["jacobi"]["tokens_per_forward"]), ("base ppl", r["base"]["ppl"]),
            ("base seq-rep-4", r["base"]["repetition"]["seq_rep_4"])]
    if "cllm" in r:
        c = r["cllm"]
        rows += [("CLLM tokens/forward", c["jacobi"]["tokens_per_forward"]),
                 ("CLLM tokens/forward (pooled)", c["jacobi"]["tokens_per_forward_pooled"]),
                 ("fast-forwarded tokens that repeat a 4-gram", c["jacobi"]["fast_forwarded_repeating"]),
                 ("answer tokens that repeat a 4-gram", c["jacobi"]["answer_tokens_repeating"]),
                 ("CLLM ppl", c["ppl"]), ("ppl ratio (target <= 1.10)", r["ppl_ratio"]),
                 ("CLLM seq-rep-4", c["repetition"]["seq_rep_4"]),
                 ("CLLM filter rate / base", f"{c['repetition']['filter_rate']:.3f} / {r['base']['repetition']['filter_rate']:.3f}"),
                 ("greedy answers identical to the base's", c["agreement_with_base"]["identical"]),
                 ("leading tokens shared with the base's (mean)", c["agreement_with_base"]["shared_prefix_mean"]),
                 ("Jacobi == greedy (teacher-forced)", c["exactness"]["teacher_forced_greedy"]),
                 ("Jacobi == ar_decode", c["exactness"]["ar_decode_equal"])]
    return rows + [("seconds", r["seconds"])]


if __name__ == "__main__":
    main()
