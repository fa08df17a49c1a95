"""Time and memory of training steps, with no model to download: a random model of SmolLM2-135M's shape on
synthetic trajectories (prompts of the held-out set's lengths, 16-token blocks), through ``training.train``.

    python -m experiments.stepprobe --variants "b32:--batch 32;b64_rows4:--batch 64 --loss-rows 4 --recompute true" \\
        --out step_probe.json

Each variant is a training run of ``--steps`` steps in its own process (so peak memory is its own). It prints one
table: seconds a step (the mean of the last ``--timed`` steps) and peak memory (GPU: torch's allocator; CPU: the
process's peak RSS). Speed and memory only: the losses of a random model mean nothing.
"""
from __future__ import annotations

import json
import random
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from decoding.latency import SMOLLM2_135M

from decoding.cli import parse, print_table
from training.evaluate import ROOT, heldout_rows

SHAPES = {  # model shapes, as changes to the tests' tiny Llama (training.tiny.tiny_config): the embedded model's, and the tiny one
    "smollm2-135m": SMOLLM2_135M,
    "tiny": {},
}


@dataclass
class ProbeSettings:
    """Settings of one probe; saved under "settings" in the JSON result."""

    variants: str = "b32:--batch 32"  # "name:train flags;name:train flags;...": one run each
    common: str = "--ref-weight 3 --loop-penalty 2 --use-extra false"  # flags of every run (the recipe's terms)
    steps: int = 12  # optimiser steps a run
    timed: int = 4  # the last K steps are timed (the first are slow: allocator, first launches)
    samples: int = 512  # synthetic trajectories
    shape: str = "smollm2-135m"  # model shape: smollm2-135m or tiny
    work: str = "/tmp/stepprobe"  # model, data and run folders
    device: str = "auto"  # auto / cuda / cpu
    out: str = ""  # JSON result path (default: print only)


def make_inputs(work: Path, samples: int, shape: str, seed: int = 0) -> None:
    """The random model (with the tiny test tokenizer), trajectories and reference rows, once."""
    from transformers import LlamaForCausalLM

    from training.tiny import tiny_config, tiny_tokenizer

    if (work / "traj" / "shard-00000.pt").exists():
        return
    rng = random.Random(seed)
    torch.manual_seed(seed)
    config = tiny_config(**SHAPES[shape], max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(work / "model")
    tiny_tokenizer().save_pretrained(work / "model")
    rows = heldout_rows(str(ROOT / "assets" / "heldout.jsonl"), 0)
    lengths = [max(8, min(len(r["prompt"]) // 4, 400)) for r in rows]  # about 4 characters a token
    vocab, n = config.vocab_size, 16
    out = []
    for _ in range(samples):
        blocks = n if rng.random() < 0.8 else rng.randint(1, n - 1)  # most answers use the whole 256-token budget
        answer = torch.randint(3, vocab, (blocks * n,), dtype=torch.int32)
        states = []
        for j in range(blocks):
            st = torch.randint(3, vocab, (rng.randint(2, 30), n), dtype=torch.int32)
            st[-1] = answer[j * n:(j + 1) * n]  # a trajectory ends at its fixed point
            states.append(st)
        out.append({"prompt": [rng.randrange(3, vocab) for _ in range(rng.choice(lengths))], "answer": answer,
                    "valid": blocks * n, "states": states, "extra": []})
    (work / "traj").mkdir(parents=True, exist_ok=True)
    torch.save({"samples": out, "counts": {}}, work / "traj" / "shard-00000.pt")
    letters = "abcdefgh "
    with open(work / "refs.jsonl", "w") as f:
        for length in lengths[:256]:
            f.write(json.dumps({"prompt": "".join(rng.choice(letters) for _ in range(length)),
                                "reference": "".join(rng.choice(letters) for _ in range(192))}) + "\n")


def run_variant(argv: list[str]) -> None:
    """In a child process: one training run, then its peak memory on stdout."""
    from training import train

    train.main(argv)
    cuda = torch.cuda.is_available() and "cpu" not in argv
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("PEAK_GIB", peak / 2**30, "cuda" if cuda else "cpu_rss")


def parse_variants(text: str) -> list[tuple[str, str]]:
    pairs = [v.split(":", 1) for v in text.split(";") if v.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise SystemExit(f'--variants must be "name:flags;name:flags", got {text!r}')
    return [(name.strip(), flags) for name, flags in pairs]


def main(argv=None) -> dict:
    s = parse(ProbeSettings, argv)
    variants = parse_variants(s.variants)
    if s.steps < 2 or not 1 <= s.timed < s.steps:
        raise SystemExit(f"need --steps of 2 or more and --timed between 1 and steps - 1, got {s.steps} and {s.timed}")
    if s.shape not in SHAPES:
        raise SystemExit(f"--shape must be one of {sorted(SHAPES)}, got {s.shape!r}")
    work = Path(s.work).resolve() / s.shape  # absolute: the runs start in the project root
    make_inputs(work, s.samples, s.shape)
    result = {"settings": vars(s), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and s.device != "cpu" else None,
              "variants": {}}
    for name, flags in variants:
        run = work / f"run_{name}"
        args = ["--model", str(work / "model"), "--data", str(work / "traj"), "--ref-data", str(work / "refs.jsonl"),
                "--out", str(run), "--max-steps", str(s.steps), "--log-every", "1", "--save-every", str(10 * s.steps),
                "--device", s.device, *shlex.split(s.common), *shlex.split(flags)]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "experiments.stepprobe", "--child", json.dumps(args)],
                              capture_output=True, text=True, cwd=ROOT)
        peak = [line.split() for line in proc.stdout.splitlines() if line.startswith("PEAK_GIB")]
        row = {"flags": flags, "returncode": proc.returncode, "seconds": time.perf_counter() - t0}
        if proc.returncode or not peak:
            row["error"] = "out of memory" if "OutOfMemoryError" in proc.stderr else proc.stderr[-800:]
        else:
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            timed = log[-s.timed:]
            row |= {"s_per_step": sum(r["s_per_step_recent"] for r in timed) / len(timed),
                    "peak_gib": float(peak[-1][1]), "memory": peak[-1][2], "batch": json.loads(
                        (run / "train_settings.json").read_text())["settings"]["batch"]}
        result["variants"][name] = row
        print(name, json.dumps(row)[:300], flush=True)
    if s.out:
        Path(s.out).parent.mkdir(parents=True, exist_ok=True)
        Path(s.out).write_text(json.dumps(result, indent=1) + "\n")
    print_table("step probe (s a step / peak GiB / samples a second)", [
        (name, "failed: " + r["error"][:60] if "error" in r else
         f"{r['s_per_step']:.3f} / {r['peak_gib']:.1f} / {r['batch'] / r['s_per_step']:.1f}")
        for name, r in result["variants"].items()])
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_variant(json.loads(sys.argv[2]))
    else:
        main()
