"""What a forward pass of the fast engine costs on the CPU by window width and projection form, and what each decode
loop adds to its passes.

    python -m experiments.cpu_pass_cost --out assets/results/FILE.json
    python -m experiments.cpu_pass_cost --threads main,worker --out FILE.json   # also on a second thread

Passes: the engine's whole step (``FastEngine.step``: the host tables, the forward with its argmax, the tokens back)
at each width, in each CPU projection form (``llama_static.project``) and in the form the engine's tuning chose
("tuned"), at cache position ``--pos``. Each round times every (width, form) pair ``--reps`` times, the pairs in an
order rotated from round to round; a pair's cost is the median of its rounds' medians, with the range of those.

Loops: ``ar_decode`` and ``jacobi_decode`` (window ``--n``) on the first ``--limit`` prompts, alternated, every engine
step timed: per pass the step, the forward inside it, and what the decoder's own loop adds
((wall - prefill - steps) / passes).

Tunings: the engine's own timing of the forms (``FastEngine.time_forms``), ``--tunings`` times: what it would
choose, and whether its timings were steady enough to be kept in the tune file.

``--threads``: where it all runs: ``main`` (the thread that loaded the model) and/or ``worker`` (a thread started
afterwards, as a web server's handler would be; the app itself decodes on the thread that loaded its models).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from decoding import fast
from decoding.bench import command_line, environment, run_timed, source_commit
from decoding.cli import parse
from decoding.decoders import DecodeConfig, ar_decode, jacobi_decode, run
from decoding.models import DEFAULT_SPEC, load_model
from decoding.prompts import encode, read_prompts


@dataclass
class PassCostConfig:
    """Forward cost by width and form on the CPU, and each decoder loop's overhead beyond its forwards."""

    model: str = DEFAULT_SPEC  # model spec (load_model)
    dtype: str = "float32"  # weights' dtype
    widths: tuple[int, ...] = (1, 2, 4, 8, 16)  # window widths to time
    forms: tuple[str, ...] = ("linear", "wx", "tuned")  # projection forms: linear (F.linear), wx (w @ x.T), tuned (the engine's choice per width)
    pos: int = 192  # cache position of the timed steps (a prompt and part of an answer before them)
    reps: int = 10  # steps timed per (width, form) and round
    rounds: int = 5  # rounds over all (width, form) pairs, the order rotated each round
    prompts: str | None = "assets/prompts_unseen80.jsonl"  # prompts of the decode loops
    limit: int = 3  # decode loops on this many prompts (0: none)
    n: int = 4  # Jacobi window of the decode loops
    max_new_tokens: int = 128  # tokens a decode loop generates at most
    loop_repeats: int = 2  # runs of each decoder on each prompt (AR and Jacobi alternated)
    threads: tuple[str, ...] = ("main",)  # where to measure: main (the loading thread), worker (a thread started later)
    tunings: int = 2  # times to repeat the engine's own timing of the forms (FastEngine.time_forms), for its choices and steadiness
    out: str | None = None  # write the JSON result here

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)  # a command line gives strings
        unknown = set(self.forms) - set(FORMS) - {"tuned"} | set(self.threads) - {"main", "worker"}
        if unknown:
            raise ValueError(f"unknown form or thread: {', '.join(sorted(unknown))}")


FORMS = {"linear": False, "wx": True}  # form name -> StaticLlama.cpu_wx value


def set_form(engine: fast.FastEngine, form: str, tuned: dict[int, bool]) -> None:
    engine.model.cpu_wx = dict(tuned) if form == "tuned" else dict.fromkeys(engine.widths, FORMS[form])


def time_steps(engine: fast.FastEngine, width: int, pos: int, reps: int) -> float:
    """Median seconds of ``reps`` engine steps of ``width`` tokens at ``pos`` (after one untimed step)."""
    window = [1] * width
    engine.step(window, pos)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        engine.step(window, pos)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pass_costs(engine: fast.FastEngine, pc: PassCostConfig, tuned: dict[int, bool]) -> list[dict]:
    """A row per (width, form): median ms over rounds, its range, and the round medians."""
    pairs = [(w, f) for w in pc.widths for f in pc.forms]
    per_pair: dict[tuple, list[float]] = {p: [] for p in pairs}
    for r in range(pc.rounds):
        k = r * len(pc.forms) + r  # rotate by a width and a form each round
        for width, form in pairs[k % len(pairs):] + pairs[:k % len(pairs)]:
            set_form(engine, form, tuned)
            per_pair[(width, form)].append(time_steps(engine, width, pc.pos, pc.reps) * 1000)
    set_form(engine, "tuned", tuned)
    rows = []
    for (width, form), ms in per_pair.items():
        rows.append({"width": width, "form": form, "wx": engine.model.uses_wx(width) if form == "tuned" else FORMS[form],
                     "ms": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms), "rounds_ms": ms})
    return rows


class StepTimer:
    """Wraps an engine's ``step`` and ``_forward`` to add up their seconds (and count the steps)."""

    def __init__(self, engine: fast.FastEngine):
        self.engine, self.step_s, self.forward_s, self.steps = engine, 0.0, 0.0, 0
        self._step, self._forward = engine.step, engine._forward

        def step(*args, **kwargs):
            t0 = time.perf_counter()
            out = self._step(*args, **kwargs)
            self.step_s += time.perf_counter() - t0
            self.steps += 1
            return out

        def forward(*args, **kwargs):
            t0 = time.perf_counter()
            out = self._forward(*args, **kwargs)
            self.forward_s += time.perf_counter() - t0
            return out

        engine.step, engine._forward = step, forward

    def reset(self) -> None:
        self.step_s, self.forward_s, self.steps = 0.0, 0.0, 0

    def remove(self) -> None:
        del self.engine.step, self.engine._forward  # the instance attributes: the class's methods again


def loop_costs(model, engine: fast.FastEngine, prompts: list[list[int]], pc: PassCostConfig, eos) -> dict:
    """Per decoder: passes, tokens, and per pass the wall time, the engine step, the forward in it and the loop's own
    time, pooled over prompts and repeats (each run's per-pass numbers kept too)."""
    cfg = DecodeConfig(max_new_tokens=pc.max_new_tokens, n=pc.n, eos_token_ids=eos)
    timer = StepTimer(engine)
    decoders = {"ar": ar_decode, "jacobi": jacobi_decode}
    runs: dict[str, list[dict]] = {name: [] for name in decoders}
    try:
        run(ar_decode, model, prompts[0], DecodeConfig(max_new_tokens=8, eos_token_ids=eos), engine="fast")  # warm
        for k in range(pc.loop_repeats):
            for ids in prompts:
                for name in (("ar", "jacobi") if k % 2 == 0 else ("jacobi", "ar")):
                    timer.reset()
                    trace = run(decoders[name], model, ids, cfg, engine="fast")
                    passes = len(trace.iterations)
                    decode_s = trace.wall_s - trace.prefill_s
                    step_s = timer.step_s  # the prefill runs outside step()
                    runs[name].append({
                        "tokens": len(trace.tokens), "passes": passes, "decode_s": decode_s, "step_s": step_s,
                        "forward_s": timer.forward_s, "loop_s": decode_s - step_s})
    finally:
        timer.remove()
    out = {}
    for name, rs in runs.items():
        passes = sum(r["passes"] for r in rs)
        out[name] = {
            "runs": len(rs), "passes": passes, "tokens": sum(r["tokens"] for r in rs),
            "tokens_per_pass": sum(r["tokens"] - 1 for r in rs) / passes,  # the prefill's token is no pass's
            **{f"{key}_ms_per_pass": 1000 * sum(r[f"{key}_s"] for r in rs) / passes
               for key in ("decode", "step", "forward", "loop")},
            "step_extra_ms_per_pass": 1000 * sum(r["step_s"] - r["forward_s"] for r in rs) / passes,
            "per_run_ms_per_pass": [1000 * r["decode_s"] / r["passes"] for r in rs],
        }
    return out


def tunings(engine: fast.FastEngine, count: int) -> list[dict]:
    """The engine's own timing of the forms, ``count`` times: each time its choices, whether it was steady (would be
    kept) and the best and median ms of each width and form."""
    rows = []
    for _ in range(count):
        times = engine.time_forms()
        forms, steady = fast.choose_forms(times)
        rows.append({"wx": {str(W): v for W, v in forms.items()}, "steady": steady, "loadavg": os.getloadavg(),
                     "ms": {str(W): {form: [1000 * min(t), 1000 * statistics.median(t)] for form, t in zip(FORMS, pair)}
                            for W, pair in times.items()}})
    return rows


def measure(model, engine, prompts, pc: PassCostConfig, eos, tuned) -> dict:
    result = {"passes": pass_costs(engine, pc, tuned), "tunings": tunings(engine, pc.tunings)}
    if prompts:
        set_form(engine, "tuned", tuned)
        result["loops"] = loop_costs(model, engine, prompts, pc, eos)
    return result


def format_table(result: dict) -> str:
    lines = []
    for thread, part in result["threads"].items():
        lines.append(f"[{thread} thread] one engine step, ms (median over rounds [min-max]) at position {result['meta']['config']['pos']}")
        forms = list(dict.fromkeys(r["form"] for r in part["passes"]))
        lines.append("width " + "".join(f"{f:>22}" for f in forms) + "   tuned/AR(tuned)")
        by = {(r["width"], r["form"]): r for r in part["passes"]}
        one = by.get((1, "tuned"))
        for w in dict.fromkeys(r["width"] for r in part["passes"]):
            cells = "".join(f"{by[(w, f)]['ms']:>8.2f} [{by[(w, f)]['ms_min']:5.1f}-{by[(w, f)]['ms_max']:5.1f}]"
                            for f in forms)
            ratio = f"{by[(w, 'tuned')]['ms'] / one['ms']:.2f}" if one and (w, "tuned") in by else ""
            lines.append(f"{w:>5} {cells}   {ratio}")
        for t in part["tunings"]:
            lines.append(f"engine's timing of the forms: {'steady' if t['steady'] else 'unsteady'}, w @ x.T at widths "
                         f"{', '.join(W for W, v in t['wx'].items() if v) or 'none'}")
        for name, r in part.get("loops", {}).items():
            lines.append(f"{name:>6}: {r['passes']} passes, {r['tokens_per_pass']:.3f} tok/pass; ms a pass: decode "
                         f"{r['decode_ms_per_pass']:.2f} = step {r['step_ms_per_pass']:.2f} (forward "
                         f"{r['forward_ms_per_pass']:.2f} + host {r['step_extra_ms_per_pass']:.2f}) + loop "
                         f"{r['loop_ms_per_pass']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    pc = parse(PassCostConfig, argv, description=__doc__.split("\n\n")[0], prog="python -m experiments.cpu_pass_cost")
    load_before = os.getloadavg()
    lm = load_model(pc.model, device="cpu", dtype=pc.dtype)
    engine = fast.prepare(lm.model, progress=None)
    tuned = dict(engine.model.cpu_wx)
    prompts = [encode(lm.tokenizer, p["prompt"]) for p in read_prompts(pc.prompts, pc.limit)] if pc.limit else []
    threads = {}
    for thread in pc.threads:
        work = lambda: measure(lm.model, engine, prompts, pc, lm.eos_token_ids, tuned)  # noqa: E731
        threads[thread] = run_timed(work, in_thread=thread == "worker")
    result = {
        "meta": {"config": asdict(pc), "command": command_line(),
                 "commit": source_commit(), "env": environment(engine.device, lm.dtype),
                 "tuned_wx": {str(w): v for w, v in tuned.items()}, "tune_file": str(fast.tune_file()),
                 "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "threads": threads,
    }
    print(format_table(result))
    if pc.out:
        Path(pc.out).parent.mkdir(parents=True, exist_ok=True)
        Path(pc.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
