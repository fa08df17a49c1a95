"""A benchmark's totals: per lane tokens, forwards, tokens per second with their spread over repeats, and the speedup
over the AR lane it is measured against (``reference``), with the share of prompts whose text equals that lane's."""
from __future__ import annotations

import statistics

AR_LANES = ("base_ar", "cllm_ar")


def model_of(lane: str) -> str:
    """Which model a lane decodes with: "cllm" for the cllm_* lanes, "base" for the others (transformers' too)."""
    return "cllm" if lane.startswith("cllm_") else "base"


def reference(lane: str, lanes) -> str:
    """The AR lane a lane is measured against: its own model's AR (base_ar for transformers' lanes and for cllm_ar,
    whose text is another model's), else base_ar when the CLLM's AR did not run."""
    own = "cllm_ar" if model_of(lane) == "cllm" and lane != "cllm_ar" else "base_ar"
    return own if own in lanes else "base_ar"


def walls(row: dict) -> list[float]:
    """A lane's wall seconds on one prompt, one per timed run."""
    return row.get("walls") or [row["wall_s"]]


def lane_totals(rows: list[dict]) -> dict:
    """Totals of one lane over its prompts (``rows``: the lane's entry of each prompt it ran)."""
    tokens = sum(r["tokens"] for r in rows)
    forwards = sum(r["forwards"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)  # each prompt's median run
    after = [(r["tokens"] - 1, r["forwards"] - 1) for r in rows if r["forwards"] > 1]  # the prefill gives one token
    runs = min(len(walls(r)) for r in rows)
    per_run = [tokens / sum(walls(r)[k] for r in rows) for k in range(runs)]
    return {
        "prompts": len(rows), "tokens": tokens, "forwards": forwards, "wall_s": wall,
        "tok_s": tokens / wall if wall else 0.0,
        "mean_accepted": sum(a for a, _ in after) / max(1, sum(f for _, f in after)),
        "median_tok_s": statistics.median(r["tokens"] / r["wall_s"] for r in rows if r["wall_s"] > 0),
        "runs": runs, "tok_s_runs": per_run,
    }


def speed_ratio(per_prompt: list[dict], lane: str, ref: str) -> dict:
    """Tokens per second of ``lane`` over those of ``ref`` on the prompts both ran: from each prompt's median run
    (``speedup``), and for each timed run both made (their median, min and max: the spread)."""
    both = [p["lanes"] for p in per_prompt if lane in p["lanes"] and ref in p["lanes"]]
    if not both:
        return {}

    def ratio(wall_of) -> float:
        mine = sum(r[lane]["tokens"] for r in both) / sum(wall_of(r[lane]) for r in both)
        theirs = sum(r[ref]["tokens"] for r in both) / sum(wall_of(r[ref]) for r in both)
        return mine / theirs

    runs = min(min(len(walls(r[lane])), len(walls(r[ref]))) for r in both)
    per_run = [ratio(lambda row, k=k: walls(row)[k]) for k in range(runs)]
    return {"speedup": ratio(lambda row: row["wall_s"]), "speedup_runs": per_run,
            "speedup_median": statistics.median(per_run), "speedup_min": min(per_run), "speedup_max": max(per_run)}


def summarise(per_prompt: list[dict], lanes: list[str]) -> dict:
    """Totals per lane, each lane's speedup over its ``reference`` (and over base_ar), and the share of prompts whose
    text equals the reference's where both lanes decode with the same model."""
    summary, exact = {}, {}
    for lane in lanes:
        rows = [p["lanes"][lane] for p in per_prompt if lane in p["lanes"]]
        summary[lane] = lane_totals(rows)
        ref = reference(lane, lanes)
        summary[lane]["reference"] = ref
        summary[lane].update(speed_ratio(per_prompt, lane, ref) if ref in lanes else {"speedup": 0.0})
        if "base_ar" in lanes:
            summary[lane]["speedup_vs_base_ar"] = speed_ratio(per_prompt, lane, "base_ar").get("speedup", 0.0)
        if lane != ref and ref in lanes and model_of(lane) == model_of(ref):
            pairs = [(p["lanes"][lane].get("ids"), p["lanes"][ref].get("ids")) for p in per_prompt
                     if lane in p["lanes"] and ref in p["lanes"]]
            if pairs and all(a is not None and b is not None for a, b in pairs):
                exact[f"{lane}_vs_{ref}"] = sum(a == b for a, b in pairs) / len(pairs)
    return {"lanes": summary, "exact_match": exact}
