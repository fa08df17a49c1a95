"""Consistency distillation (Jacobi Forcing packing) with LoRA or full fine-tuning, through accelerate.

    python -m training.train --data data/traj --out runs/cllm                 # CPU or one GPU
    accelerate launch -m training.train --data data/traj --out runs/cllm      # several GPUs
    python -m training.train ... --resume true                                # continue from runs/cllm/checkpoint

Loss = ar_weight * AR + consistency_weight * global consistency (+ local_weight * local consistency)
(+ ref_weight * reference KL + self_weight * own-answer KL + unlikelihood * loop unlikelihood). With
--loop-penalty, the frozen base's target logits lose that much on every token that would repeat a 4-gram (a
teacher that loops less); --unlikelihood pushes down the model's own probability of those tokens. Within the
consistency terms, outputs whose target repeats a 4-gram seen before count repeat_weight times as much as the
others (1 by default).
Global consistency: KL(teacher on the clean block || student on its noisy state), only at outputs
after the state's first wrong guess. AR: cross-entropy on the fixed-point tokens (``ce``, the
papers) or KL to the frozen base model on the clean answer (``kl``: keeps the answer distribution,
hence perplexity). Reference KL (optional): KL to the frozen base on human answers of the
training prompts (ShareGPT), a second forward and backward each step. Own-answer KL (optional): the same
KL on the model's own greedy answers to training prompts, regenerated every few steps (on-policy: where the
adapted model drifts into loops the base model would not enter). Logs go to out/log.jsonl; the adapter (or full model) to out/adapter.
The terms are computed in training/objective.py, the samples and batches chosen in training/batches.py; this file holds
the settings, the model, the loop, checkpoints and saving.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from decoding import adapters, load_model
from decoding.prompts import read_jsonl

from .batches import LOOP_ENDS, batch_indices, grouped_indices, make_batch, sample_length, select_samples
from decoding.cli import parse, print_table, save_settings
from .collect import read_shards
from .evaluate import generate_greedy
from .objective import anchor_step, step_losses, uses_base
from .packing import reference_pairs
from .settings import TrainSettings

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
BUDGET_WARMUP, BUDGET_TIMED = 3, 30  # --budget-minutes times steps 4..33 of an invocation: the first ones are slow, and
# too few timed steps (runs sharing one host start at once) under-use the budget


def build_model(s: TrainSettings):
    """(trainable model, frozen base or None, pad id, tokenizer, EOS ids). LoRA via peft unless lora_rank == 0."""
    lm = load_model(s.model, device="cpu", dtype="float32")
    model = lm.model
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    needs_base = uses_base(s)
    if s.init_adapter:
        model = adapters.attach(model, s.init_adapter, trainable=True)
    elif s.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                         target_modules=sorted(target_names(s.lora_targets)))
        model = get_peft_model(model, cfg)
    elif s.full_scope == "targets":
        model.requires_grad_(False)
        for _, module in target_modules(model, s.lora_targets):
            module.weight.requires_grad_(True)
    else:
        model.requires_grad_(True)
    if s.recompute:  # non-reentrant: gradients reach the LoRA matrices without inputs that require them
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # With LoRA the base is the same model with its adapter disabled; full fine-tuning needs a frozen copy.
    base = load_model(s.model, device="cpu", dtype="float32").model if needs_base and not is_lora(s) else None
    model.train()
    return model, base, pad_id, lm.tokenizer, set(lm.eos_token_ids)


def target_names(targets: str) -> set[str]:
    """The module names of a comma-separated --lora-targets."""
    return {t.strip() for t in targets.split(",") if t.strip()}


def target_modules(model, targets: str) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module of the model named in --lora-targets (full fine-tuning's "targets" scope)."""
    names = target_names(targets)
    return [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in names]


def make_schedule(s: TrainSettings, total: dict):
    """Linear warm-up then cosine to min_lr_ratio; reads total["steps"], which may be set after a few steps."""
    def factor(step: int) -> float:
        steps = max(total["steps"], 1)
        warm = max(1, int(s.warmup * steps))
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, steps - warm))
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def own_answers(accelerator, model, samples, s: TrainSettings, step: int, pad_id: int, eos: set[int]) -> list:
    """The model's greedy answers now, to this process's share of a few training prompts: (prompt, answer) pairs."""
    rank, world = accelerator.process_index, accelerator.num_processes
    idx = batch_indices(step // max(s.self_every, 1), max(s.self_prompts, world), len(samples), s.seed + 2)[rank::world]
    prompts = [[int(t) for t in samples[i]["prompt"]] for i in idx]
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    with accelerator.autocast():
        answers = generate_greedy(unwrapped, prompts, s.self_tokens, eos, pad_id, len(prompts), accelerator.device,
                                  progress=False)
    unwrapped.train()
    return [(p, a) for p, a in zip(prompts, answers) if a]


def load_references(s: TrainSettings, tokenizer) -> list:
    if s.ref_weight <= 0:
        return []
    if not s.ref_data or not Path(s.ref_data).exists():
        raise SystemExit(f"--ref-weight {s.ref_weight} needs --ref-data, a JSON-lines file of prompt + reference "
                         "(python -m training.dataset writes data/references-train.jsonl)")
    rows = [row for _, row in read_jsonl(s.ref_data) if row.get("reference")]
    pairs = reference_pairs(tokenizer, rows, max_answer=s.ref_tokens, max_prompt=512)
    if not pairs:
        raise SystemExit(f"no usable prompt + reference rows in {s.ref_data}")
    return pairs


def save_checkpoint(accelerator, out: Path, step: int, total: dict, s: TrainSettings) -> None:
    accelerator.wait_for_everyone()
    accelerator.save_state(str(out / "checkpoint"))
    if accelerator.is_main_process:
        state = {"step": step, "max_steps": total["steps"], "lora_rank": s.lora_rank}
        (out / "checkpoint" / "trainer_state.json").write_text(json.dumps(state))


def resume_state(out: Path, s: TrainSettings, say) -> dict | None:
    """The checkpoint's trainer state for --resume, or None (said) when there is none to resume from. Stops with a
    message when the checkpoint is unreadable or was trained with another adapter shape than this run's."""
    folder = out / "checkpoint"
    if not folder.exists():
        say(f"--resume: no checkpoint in {folder}: starting from step 0")
        return None
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        step, max_steps = int(state["step"]), int(state["max_steps"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"the checkpoint in {folder} is incomplete or corrupt ({type(exc).__name__}: {exc}): "
                         "delete it to start again, or give another --out") from None
    if state.get("lora_rank", s.lora_rank) != s.lora_rank:
        raise SystemExit(f"the checkpoint in {folder} was trained with --lora-rank {state['lora_rank']}, this run asks "
                         f"for {s.lora_rank}: resume with the same rank, or give another --out")
    return {"step": step, "max_steps": max_steps}


def load_checkpoint(accelerator, out: Path) -> None:
    """accelerator.load_state, with a message instead of a traceback when the files do not fit the model."""
    try:
        accelerator.load_state(str(out / "checkpoint"))
    except Exception as exc:  # torch, safetensors and accelerate each raise their own error types
        raise SystemExit(f"could not resume from {out / 'checkpoint'} ({type(exc).__name__}: {str(exc)[:300]}): "
                         "it is corrupt or from another model or --lora-rank; delete it or give another --out") from None


def drop_log_rows_after(path: Path, step: int) -> None:
    """Keep the log rows up to the checkpoint's step: a resumed run writes the later steps again."""
    if path.exists():
        rows = path.read_text().splitlines()
        kept = [r for r in rows if r.strip() and json.loads(r).get("step", 0) <= step]
        if len(kept) != len(rows):
            path.write_text("".join(r + "\n" for r in kept))


def is_lora(s: TrainSettings) -> bool:
    return bool(s.init_adapter) or s.lora_rank > 0


def save_final(accelerator, model, tokenizer, s: TrainSettings, out: Path, summary: dict, suffix: str = "") -> Path:
    """The adapter folder (LoRA, in save_dtype) or the full model folder, with the training settings."""
    unwrapped = accelerator.unwrap_model(model)
    target = out / (("adapter" if is_lora(s) else "model") + suffix)
    if accelerator.is_main_process:
        if is_lora(s):
            dtype = getattr(torch, s.save_dtype)
            state = {k: v.detach().to("cpu", dtype) for k, v in unwrapped.state_dict().items() if "lora_" in k}
            unwrapped.save_pretrained(str(target), state_dict=state)
            adapters.split_weights(target)  # shards of at most 15 MiB, under a committed file's 16 (high ranks)
        else:
            unwrapped.save_pretrained(str(target))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(target))
        save_settings(s, target / "training_settings.json", **summary)
        for f in target.iterdir():
            if f.stat().st_size > 16 * MIB:
                print(f"warning: {f} is {f.stat().st_size / MIB:.1f} MiB, over the 16 MiB limit of a committed file")
    return target


class StepProfiler:
    """``--profile-steps K``: torch.profiler over K steps after the first ``BUDGET_WARMUP`` (allocator and first
    launches), each phase of a step labelled ``phase:<name>``. At the end it writes out/profile.txt: the operators by
    their own time on the device (the GPU's hot spots) and by total CPU time (the phases, and what waits on the host)."""

    def __init__(self, steps: int, first_step: int, out: Path, enabled: bool):
        self.start, self.stop = first_step + BUDGET_WARMUP, first_step + BUDGET_WARMUP + steps
        self.out, self.enabled, self.prof, self.t0 = out, enabled and steps > 0, None, 0.0

    def phase(self, name: str):
        return torch.profiler.record_function(f"phase:{name}") if self.prof is not None else nullcontext()

    def after_step(self, step: int) -> None:
        """Call with the number of optimiser steps done so far."""
        if not self.enabled:
            return
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof, self.t0 = profile(activities=activities), time.perf_counter()
            self.prof.__enter__()
        elif step == self.stop:
            self.finish(step)

    def finish(self, step: int) -> None:
        """Stop profiling at ``step`` steps done (the run may end before the K steps) and write profile.txt."""
        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        steps = step - self.start
        seconds = (time.perf_counter() - self.t0) / max(steps, 1)
        self.prof.__exit__(None, None, None)
        averages = self.prof.key_averages()
        text = (f"{steps} profiled steps, {seconds:.3f} s a step (with the profiler's overhead)\n\n"
                + averages.table(sort_by="self_device_time_total", row_limit=40) + "\n"
                + averages.table(sort_by="cpu_time_total", row_limit=40) + "\n")
        (self.out / "profile.txt").write_text(text)
        self.prof, self.enabled = None, False


def log_line(path: Path, row: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def check_settings(s: TrainSettings) -> None:
    """Stop with the flag's name and its range when a setting is out of range, before anything is loaded."""
    for name in ("ar_weight", "consistency_weight", "local_weight", "ref_weight", "self_weight", "repeat_weight",
                 "unlikelihood"):
        if getattr(s, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(s, name)}")
    if s.loop_penalty < 0:
        raise SystemExit(f"--loop-penalty must be 0 (off) or more, got {s.loop_penalty}")
    if s.pad_to < 1:
        raise SystemExit(f"--pad-to must be 1 (off) or more, got {s.pad_to}")
    if s.max_samples < 0:
        raise SystemExit(f"--max-samples must be 0 (all) or more, got {s.max_samples}")
    if s.repeat_limit < 0:
        raise SystemExit(f"--repeat-limit must be 0 (keep all) or more, got {s.repeat_limit}")
    if s.loop_samples not in ("drop", *LOOP_ENDS):
        raise SystemExit(f"--loop-samples must be drop, {', '.join(LOOP_ENDS)}, got {s.loop_samples!r}")
    if s.loop_samples != "drop" and not s.repeat_limit:
        raise SystemExit(f"--loop-samples {s.loop_samples} needs --repeat-limit K (the loops it keeps are those the filter catches)")
    if s.consistency_loss not in ("kl", "ce"):
        raise SystemExit(f"--consistency-loss must be kl or ce, got {s.consistency_loss!r}")
    if s.full_scope not in ("all", "targets"):
        raise SystemExit(f"--full-scope must be all or targets, got {s.full_scope!r}")
    if s.loss_rows < 0:
        raise SystemExit(f"--loss-rows must be 0 (the whole batch at once) or more, got {s.loss_rows}")


def read_samples(s: TrainSettings, log=print) -> tuple[list[dict], int]:
    """The trajectories of --data (its folders one after another), cut to --max-samples, and how many were read."""
    folders = [f.strip() for f in s.data.split(",") if f.strip()]
    missing = [f for f in folders if not Path(f).is_dir()]
    if missing or not folders:
        raise SystemExit(f"--data: no trajectory folder at {', '.join(missing) or repr(s.data)}: "
                         "run python -m training.collect first")
    samples = [x for folder in folders for x in read_shards(folder)]
    collected = len(samples)
    if not samples:
        raise SystemExit(f"no trajectories in {s.data}: run python -m training.collect first")
    if s.max_samples:
        samples = samples[: s.max_samples]
        log(f"--max-samples {s.max_samples}: training on {len(samples)} of {collected} samples")
    return samples, collected


def main(argv=None) -> None:
    s = parse(TrainSettings, argv)
    check_settings(s)
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and s.device != "cpu"
    if cuda and not s.cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    torch.manual_seed(s.seed)
    out = Path(s.out)
    t_start = time.perf_counter()
    samples, collected = read_samples(s, accelerator.print)
    samples, anchored = select_samples(samples, s, accelerator.print)
    if s.batch < accelerator.num_processes:
        raise SystemExit(f"--batch {s.batch} is smaller than the {accelerator.num_processes} processes: each needs a row")
    model, base, pad_id, tokenizer, eos = build_model(s)
    references = load_references(s, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr,
                                  betas=(0.9, 0.95), weight_decay=s.weight_decay)
    by_epochs = math.ceil(s.epochs * len(samples) / s.batch)
    total = {"steps": s.max_steps or by_epochs}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(s, total))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if base is not None:
        base.to(accelerator.device).eval().requires_grad_(False)
    step, auto_steps = 0, bool(s.budget_minutes and not s.max_steps)
    if auto_steps:  # at least the timed steps (the schedule runs on this provisional total until they are timed)
        total["steps"] = max(by_epochs, BUDGET_WARMUP + BUDGET_TIMED + 1)
    state = resume_state(out, s, accelerator.print) if s.resume else None
    if state:
        step, total["steps"], auto_steps = state["step"], state["max_steps"], False
        load_checkpoint(accelerator, out)
        if accelerator.is_main_process:
            drop_log_rows_after(out / "log.jsonl", step)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_settings(s, out / "train_settings.json", samples=len(samples), collected=collected, loop_anchored=anchored,
                      references=len(references), processes=accelerator.num_processes)
    summary = train_loop(accelerator, (model, base, optimizer, scheduler), (samples, references), s, out, step, total,
                         auto_steps, (pad_id, eos), t_start)
    # Saved at a time-limit stop too (marked by step < max_steps), so an interrupted run still yields an adapter.
    summary["saved"] = str(save_final(accelerator, model, tokenizer, s, out, summary))
    if accelerator.is_main_process:
        print_table("train", list(summary.items()))
    # All processes leave together, through the process group's own teardown: a process that exits while another
    # still writes can abort in gloo's threads ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()


def agree(accelerator, value: float) -> float:
    """The largest of the processes' values, on every process: decisions that must not differ between processes
    (stop now, how many steps) are taken on it, or one process would wait forever for the others."""
    if accelerator.num_processes == 1:
        return float(value)
    return float(accelerator.gather(torch.tensor([float(value)], device=accelerator.device)).max())


def log_row(accelerator, losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's loss terms as means over the processes (each saw its share of the batch), and on a GPU its peak
    memory (how many runs, or how large a batch, one GPU could take)."""
    # note: CPU-GPU sync point
    row = {k: float(accelerator.reduce(v.detach().float(), "mean")) for k, v in losses.items()}
    if accelerator.device.type == "cuda":
        row["gpu_peak_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    return row


def train_loop(accelerator, parts, data, s, out, step, total, auto_steps, tokens, t_start) -> dict:
    """Optimiser steps until max_steps or the time limit; checkpoints on the way; returns the last log row."""
    from tqdm.auto import tqdm

    model, base, optimizer, scheduler = parts
    samples, references = data
    pad_id, eos = tokens
    own, own_step, own_ok = [], -s.self_every, False  # the model's own answers (this process's share), the step they were made at, whether every process has some

    rank, world = accelerator.process_index, accelerator.num_processes
    log_path, last, t_steps = out / "log.jsonl", {}, time.perf_counter()
    lengths = [sample_length(x) for x in samples] if s.group_by_length else []
    bar = tqdm(total=total["steps"], initial=step, desc="train", disable=not accelerator.is_main_process)
    first_step = log_step = step
    t_log = t_warm = t_steps
    profiler = StepProfiler(s.profile_steps, first_step, out, accelerator.is_main_process)
    while step < total["steps"]:
        with profiler.phase("batch"):
            idx = grouped_indices(step, s.batch, lengths, s.seed) if lengths else batch_indices(step, s.batch, len(samples), s.seed)
            b = make_batch(samples, idx[rank::world], s, step, pad_id).to(accelerator.device)
        with profiler.phase("main"):
            with accelerator.autocast():
                losses = step_losses(accelerator, model, base, b, s)
            accelerator.backward(losses["loss"])
        if references:
            with profiler.phase("ref"):
                ridx = batch_indices(step, max(s.ref_batch, world), len(references), s.seed + 1)[rank::world]
                anchor_step(accelerator, (model, base), references, ridx, pad_id, s.ref_weight, losses, "ref",
                            pad_to=s.pad_to)
        if s.self_weight > 0:
            with profiler.phase("self"):
                if step - own_step >= s.self_every:
                    own, own_step = own_answers(accelerator, model, samples, s, step, pad_id, eos), step
                    # Every process runs the term's backward or none does (a lone backward would wait forever for the others).
                    own_ok = agree(accelerator, float(not own)) == 0
                if own_ok:
                    oidx = batch_indices(step, s.self_batch, len(own), s.seed + 2)
                    anchor_step(accelerator, (model, base), own, oidx, pad_id, s.self_weight, losses, "self",
                                s.loop_penalty, s.pad_to)
        with profiler.phase("optimizer"):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        profiler.after_step(step)
        if auto_steps and step == first_step + BUDGET_WARMUP:
            t_warm = time.perf_counter()  # the first steps are slow (allocator, kernels' first launches): not timed
        if auto_steps and step == first_step + BUDGET_WARMUP + BUDGET_TIMED:
            per_step = agree(accelerator, (time.perf_counter() - t_warm) / BUDGET_TIMED)
            left = s.budget_minutes * 60 - (time.perf_counter() - t_steps)
            total["steps"] = max(step + 1, step + int(left / per_step))
            bar.total = total["steps"]
            accelerator.print(f"{per_step:.3f} s/step -> max_steps = {total['steps']} for {s.budget_minutes} min")
        if step % s.log_every == 0 or step == total["steps"]:
            now = time.perf_counter()
            last = {**log_row(accelerator, losses), "step": step, "lr": scheduler.get_last_lr()[0],
                    "s_per_step": (now - t_steps) / max(step - first_step, 1),
                    "s_per_step_recent": (now - t_log) / max(step - log_step, 1), "elapsed_min": (now - t_start) / 60}
            t_log, log_step = now, step
            if accelerator.is_main_process:
                log_line(log_path, last)
                bar.set_postfix(loss=f"{last['loss']:.3f}", gain=f"{last['gain']:.2f}")
        # Each process has its own clock: all stop when the first one runs out of time.
        out_of_time = agree(accelerator, bool(s.max_minutes) and (time.perf_counter() - t_start) / 60 > s.max_minutes) > 0
        if step % s.save_every == 0 or out_of_time or step == total["steps"]:
            save_checkpoint(accelerator, out, step, total, s)
            if s.keep_adapters and step < total["steps"]:
                save_final(accelerator, model, None, s, out, {"step": step, **last}, suffix=f"-step{step}")
        if out_of_time:
            accelerator.print(f"time limit of {s.max_minutes} min reached at step {step}: resume with --resume true")
            break
    profiler.finish(step)
    bar.close()
    return {"step": step, "max_steps": total["steps"], **{k: v for k, v in last.items() if k != "step"}}


if __name__ == "__main__":
    main()
