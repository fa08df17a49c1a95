"""A race as a file: what the Download button gives (every lane's numbers, trace and token texts, as JSON), and the
recorded example race the page shows when it opens, before any model has run.

    python -m app.record                # records the example race again (embedded model + shipped CLLM, CPU)
    python -m app.record --help
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from decoding import DecodeConfig, DecodeTrace, Iteration

from .race import LANES, MAX_ROUNDS, ROUNDS, LaneRun, Race, race_json

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "assets" / "example_race_cpu_fp32_n4_t128.json"  # the page's recorded race (see RecordSettings)
EXAMPLE_PROMPT = "Explain the difference between weather and climate to a ten-year-old."


def race_record(race: Race) -> dict:
    """The race as JSON: the ``/race`` numbers of every lane, plus what the page draws them from (the trace of each
    pass, the text of each token, the seconds of each timed run); ``read_race`` reads it back."""
    out = race_json(race)
    out["prompt_ids"] = list(race.prompt_ids)
    out["stopped"] = race.stopped  # Stop or the server's time budget ended it early
    for run in race.runs:
        out["lanes"][run.lane.key] |= {
            "pieces": run.pieces, "special": run.special, "vocab": {str(k): v for k, v in run.vocab.items()},
            "trace": run.trace.to_dict() if run.trace else None,
        }
    if race.recorded:
        out["meta"] = race.recorded
    return out


def read_trace(data: dict | None) -> DecodeTrace | None:
    if data is None:
        return None
    fields = {k: v for k, v in data.items() if k not in ("summary", "iterations")}
    return DecodeTrace(**fields, iterations=[Iteration(**it) for it in data["iterations"]])


def read_race(data: dict) -> Race:
    """A race from ``race_record``'s JSON (KeyError or TypeError when it is not one)."""
    runs = []
    for key, lane in data["lanes"].items():
        runs.append(LaneRun(LANES[key], lane["status"], read_trace(lane["trace"]), list(lane["pieces"]),
                            list(lane["special"]), lane["text"], list(lane["walls"]),
                            {int(k): v for k, v in lane["vocab"].items()}))
    return Race(data["prompt"], DecodeConfig(**data["settings"]), data["model"], data["device"], runs,
                list(data["prompt_ids"]), data["rounds"], data["stopped"], recorded=data.get("meta") or {})


def read_example(path: str | Path = EXAMPLE) -> Race | None:
    """The recorded example race, or None when its file is missing or unreadable (the page then opens empty)."""
    try:
        return read_race(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"[jacobi-lens] no recorded example race ({path}: {type(exc).__name__}: {exc})", flush=True)
        return None


@dataclass
class RecordSettings:
    """Record the page's example race: one real race with the page's default settings, written as JSON."""

    out: str = str(EXAMPLE.relative_to(ROOT))  # where to write it
    prompt: str = EXAMPLE_PROMPT  # the prompt to race
    max_new_tokens: int = 128  # tokens per lane at most (the page's default)
    rounds: int = field(default=ROUNDS, metadata={"choices": tuple(range(1, MAX_ROUNDS + 1))})  # timed runs of every lane
    device: str = "cpu"  # where the models run (the example shows a CPU race: what a free Space has)
    max_spread: float = 0.25  # a race with a lane whose timed runs stray further than this share from their median is raced again (another process had the CPU)
    attempts: int = 5  # races at most, to get one within max_spread (the last is kept either way)


def git_commit() -> str | None:
    """The commit the code ran at (with "+changes" when the tree had uncommitted edits), None outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+changes" if dirty else "")


def repo_path(path: str | None) -> str | None:
    """A path inside the repository as the repository names it (machine-independent); others as given."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def recording_meta(host, settings: RecordSettings) -> dict:
    """What the page says about a recorded race: where and how it ran, and the command that records it again."""
    import torch
    import transformers

    from decoding import adapter_sha256
    from decoding.fast import cpu_name

    device = host.base.device
    return {
        "command": " ".join(["python -m app.record", *sys.argv[1:]]), "commit": git_commit(),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "dtype": str(host.base.dtype).removeprefix("torch."), "engine": host.engine,
        "model": host.base.name, "adapter": repo_path(host.adapter), "adapter_sha256": adapter_sha256(host.adapter),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


def spread(race: Race) -> float:
    """How far the timed runs of the race's lanes stray from their lane's median, at most (a share of it)."""
    import statistics

    return max((abs(w - statistics.median(r.walls)) / statistics.median(r.walls) for r in race.runs for w in r.walls),
               default=0.0)


def record(settings: RecordSettings) -> dict:
    """Load the embedded model and the shipped CLLM, race ``settings.prompt`` with the page's defaults (again, up to
    ``settings.attempts`` times, while another process disturbed its clock beyond ``settings.max_spread``), and
    return the race as ``race_record`` JSON with its meta."""
    from decoding import DEFAULT_SPEC, default_adapter

    from .host import ModelHost
    from .race import new_race, run_race

    host = ModelHost(DEFAULT_SPEC, default_adapter(DEFAULT_SPEC), device=settings.device)
    if not host.load(DEFAULT_SPEC, default_adapter(DEFAULT_SPEC)):
        raise SystemExit(f"could not load the models: {host.error}")
    meta = recording_meta(host, settings)  # before the race: the commit the code was at when it started
    for attempt in range(1, settings.attempts + 1):
        race = new_race(host, settings.prompt, host.default_window(), settings.max_new_tokens, rounds=settings.rounds)
        for race in host.stream(run_race(host, race, engine=host.engine)):
            pass
        print(f"race {attempt}: the timed runs stray up to {spread(race):.0%} from their lane's median", flush=True)
        if spread(race) <= settings.max_spread:
            break
    race.recorded = meta | {"attempts": attempt, "max_spread": settings.max_spread, "spread": spread(race)}
    return race_record(race)


def main(argv: list[str] | None = None) -> None:
    from decoding.cli import parse

    settings = parse(RecordSettings, argv, prog="python -m app.record")
    data = record(settings)
    Path(settings.out).write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    for key, lane in data["lanes"].items():
        print(f"{key:12s} {lane['tokens']:4d} tokens  {lane['forwards']:4d} forwards  {lane['mean_accepted']:.3f} per pass"
              f"  {lane['wall_s']:.2f} s  speedup {lane['speedup'] or 0:.2f} ({lane['speedup_min'] or 0:.2f}-"
              f"{lane['speedup_max'] or 0:.2f})  same text: {lane['same_text']}")
    print(f"wrote {settings.out}")


if __name__ == "__main__":
    main()
