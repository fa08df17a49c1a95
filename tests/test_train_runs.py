"""Whole runs of the pipeline on a tiny model on the CPU: end to end, full fine-tuning and extraction, time budgets,
two processes, merging adapters, the step probe and the loop teacher."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decoding import DecodeConfig, ar_decode, encode, jacobi_decode, run
from training import collect, evaluate, train

from training_fixtures import PROMPTS, tiny_inputs


def test_loop_penalty_processor_penalises_the_token_that_would_repeat_a_4_gram():
    # generate's view: row 0 is "pad | 5 6 7 8 5 6 7": token 8 would repeat "5 6 7 8"; row 1 has no loop yet
    ids = torch.tensor([[0, 5, 6, 7, 8, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]])
    scores = torch.zeros(2, 10)
    got = evaluate.LoopPenalty(2.0, [1, 0])(ids, scores.clone())
    assert got[0].tolist() == [0.0] * 8 + [-2.0, 0.0] and got[1].tolist() == [0.0] * 10


def test_pipeline_end_to_end(tmp_path):
    folder, prompts, held = tiny_inputs(tmp_path)
    traj = tmp_path / "traj"
    collecting = ["--model", str(folder), "--prompts", str(prompts), "--out", str(traj), "--n", "4",
                  "--max-new-tokens", "16", "--batch", "5", "--augment", "1", "--device", "cpu"]
    for part in ("0", "1"):  # two processes (one per GPU on a real run), one shard each
        collect.main(collecting + ["--parts", "2", "--part", part])
    assert len(list(traj.glob("shard-*.pt"))) == 2 and (traj / "settings.json").exists()
    assert not (traj / "summary.json").exists()
    (traj / "shard-00001.pt").rename(tmp_path / "shard-00001.pt")
    collect.main(collecting + ["--max-minutes", "1e-6"])  # out of time before the missing shard: says so
    assert json.loads((traj / "summary.json").read_text())["complete"] is False
    (tmp_path / "shard-00001.pt").rename(traj / "shard-00001.pt")
    collect.main(collecting)  # nothing left to collect: writes the summary over both shards
    summary = json.loads((traj / "summary.json").read_text())
    tokenised = json.loads((traj / "settings.json").read_text())["prompts"]
    assert summary["shards"] == 2 and summary["prompts"] == tokenised and summary["samples kept"] >= 1
    assert summary["complete"] is True
    run_dir = tmp_path / "run"
    common = ["--model", str(folder), "--data", str(traj), "--out", str(run_dir), "--lora-rank", "4",
              "--lora-alpha", "8", "--batch", "4", "--max-steps", "4", "--log-every", "1", "--device", "cpu",
              "--save-every", "2", "--keep-adapters", "true"]
    train.main(common + ["--max-minutes", "0.00001"])  # stops after one step, checkpointed
    assert (run_dir / "checkpoint" / "trainer_state.json").exists()
    train.main(common + ["--resume", "true"])
    steps = [json.loads(x)["step"] for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "training_settings.json").exists()
    assert (run_dir / "adapter-step1" / "adapter_model.safetensors").exists()  # the time-limit stop
    assert (run_dir / "adapter-step2" / "adapter_model.safetensors").exists()  # save_every
    # Progressive distillation: trajectories of the CLLM itself, whose fixed points are its own greedy answers.
    traj2 = tmp_path / "traj2"
    collect.main(["--model", str(folder), "--adapter", str(adapter), "--prompts", str(prompts), "--out", str(traj2),
                  "--n", "4", "--max-new-tokens", "16", "--batch", "5", "--device", "cpu"])
    assert json.loads((traj2 / "summary.json").read_text())["greedy_mismatch"] == 0
    from decoding import load_model

    cllm = load_model(str(folder), adapter=str(adapter), device="cpu", dtype="float32")
    own = collect.read_shards(traj2)
    assert own
    for x in own[:3]:
        cfg = DecodeConfig(max_new_tokens=len(x["answer"]), n=1, eos_token_ids=[])
        assert run(ar_decode, cllm.model, list(x["prompt"]), cfg).tokens[: x["valid"]] == x["answer"][: x["valid"]].tolist()
    train.main(["--model", str(folder), "--data", str(traj2), "--out", str(tmp_path / "round2"), "--init-adapter",
                str(adapter), "--batch", "4", "--max-steps", "6", "--device", "cpu", "--group-by-length", "true",
                "--profile-steps", "2", "--ref-weight", "1", "--ref-data", str(held), "--ref-batch", "2", "--loss-rows", "3",
                "--recompute", "true", "--pad-to", "32", "--cudnn-attention", "false"])
    profile = (tmp_path / "round2" / "profile.txt").read_text()  # steps 4 and 5, each phase labelled
    assert profile.startswith("2 profiled steps") and all(f"phase:{p}" in profile for p in ("batch", "main", "ref", "optimizer"))
    train.main(["--model", str(folder), "--data", str(traj2), "--out", str(tmp_path / "short"), "--init-adapter",
                str(adapter), "--batch", "4", "--max-steps", "4", "--device", "cpu", "--profile-steps", "5"])
    assert (tmp_path / "short" / "profile.txt").read_text().startswith("1 profiled steps")  # the run ended first
    assert (tmp_path / "round2" / "adapter" / "adapter_model.safetensors").exists()
    # both rounds' trajectories at once (comma-separated folders, read one after the other)
    train.main(["--model", str(folder), "--data", f"{traj},{traj2}", "--out", str(tmp_path / "mixed"), "--init-adapter",
                str(adapter), "--batch", "4", "--max-steps", "1", "--device", "cpu", "--unlikelihood", "0.2",
                "--loop-penalty", "1", "--log-every", "1", "--repeat-limit", "1000"])
    assert "unlikelihood" in json.loads((tmp_path / "mixed" / "log.jsonl").read_text().splitlines()[-1])
    mixed = json.loads((tmp_path / "mixed" / "train_settings.json").read_text())
    assert mixed["collected"] == len(collect.read_shards(traj)) + len(own) == mixed["samples"]  # no 1000-fold loop
    with pytest.raises(SystemExit, match="no trajectory folder at .*nowhere"):
        train.main(common + ["--out", str(tmp_path / "none"), "--data", f"{traj},{tmp_path / 'nowhere'}"])
    with pytest.raises(SystemExit, match="--loss-rows must be"):
        train.main(common + ["--out", str(tmp_path / "none"), "--loss-rows", "-2"])
    with pytest.raises(SystemExit, match="--pad-to must be 1"):
        train.main(common + ["--out", str(tmp_path / "none"), "--pad-to", "0"])
    with pytest.raises(SystemExit, match="drops all"):
        train.main(common + ["--out", str(tmp_path / "none"), "--max-rep", "-1"])
    with pytest.raises(SystemExit, match="--repeat-limit 1 drops all"):  # every answer holds one token once
        train.main(common + ["--out", str(tmp_path / "none"), "--repeat-limit", "1"])
    with pytest.raises(SystemExit, match="--loop-samples must be drop, anchor, tail, cut"):
        train.main(common + ["--out", str(tmp_path / "none"), "--loop-samples", "keep"])
    with pytest.raises(SystemExit, match="--loop-samples tail needs --repeat-limit"):
        train.main(common + ["--out", str(tmp_path / "none"), "--loop-samples", "tail"])
    for mode in ("anchor", "tail"):  # limit 2: most answers of a tiny random model hold some pattern twice in a row
        train.main(common + ["--out", str(tmp_path / mode), "--repeat-limit", "2", "--loop-samples", mode,
                             "--unlikelihood", "0.5", "--max-steps", "1"])
        kept = json.loads((tmp_path / mode / "train_settings.json").read_text())
        assert kept["samples"] == kept["collected"] and 0 < kept["loop_anchored"] <= kept["samples"]
    with pytest.raises(SystemExit, match="--repeat-limit must be 0"):
        train.main(common + ["--out", str(tmp_path / "none"), "--repeat-limit", "-1"])
    with pytest.raises(SystemExit, match="--unlikelihood must be 0 or more"):
        train.main(common + ["--out", str(tmp_path / "none"), "--unlikelihood", "-1"])
    with pytest.raises(SystemExit, match="--repeat-weight must be 0 or more"):
        train.main(common + ["--out", str(tmp_path / "none"), "--repeat-weight", "-0.5"])
    with pytest.raises(SystemExit, match="--loop-penalty must be 0"):
        train.main(common + ["--out", str(tmp_path / "none"), "--loop-penalty", "-1"])
    with pytest.raises(SystemExit, match="--consistency-loss must be kl or ce"):
        train.main(common + ["--out", str(tmp_path / "none"), "--consistency-loss", "mse"])
    # A second phase starts from the first one's adapter (its rank wins over --lora-rank), here with the reference term.
    phase2 = ["--model", str(folder), "--data", str(traj), "--out", str(tmp_path / "phase2"), "--init-adapter",
              str(adapter), "--lora-rank", "16", "--batch", "4", "--max-steps", "2", "--log-every", "1", "--device", "cpu",
              "--ref-weight", "1"]
    with pytest.raises(SystemExit, match="needs --ref-data"):
        train.main(phase2)
    train.main(phase2 + ["--ref-data", str(held), "--ref-batch", "2"])
    assert json.loads((tmp_path / "phase2" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    rows = [json.loads(x) for x in (tmp_path / "phase2" / "log.jsonl").read_text().splitlines()]
    assert all(r["ref"] > 0 and r["loss"] > r["ref"] for r in rows)  # the trained adapter already differs from the base
    # The on-policy anchor: the adapted model's own greedy answers, regenerated every step here.
    own = ["--model", str(folder), "--data", str(traj), "--out", str(tmp_path / "own"), "--init-adapter", str(adapter),
           "--batch", "4", "--max-steps", "2", "--log-every", "1", "--device", "cpu", "--self-weight", "1",
           "--self-every", "1", "--self-prompts", "3", "--self-batch", "2", "--self-tokens", "6", "--repeat-weight", "0.25",
           "--loop-penalty", "2"]
    train.main(own)
    rows = [json.loads(x) for x in (tmp_path / "own" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["self"] > 0 for r in rows)
    result = evaluate.main(["--model", str(folder), "--adapter", str(adapter), "--heldout", str(held),
                            "--n", "4", "--max-new-tokens", "12", "--speed-prompts", "2", "--base-speed-prompts", "1",
                            "--ar-check-prompts", "1", "--device", "cpu", "--out", str(tmp_path / "eval.json")])
    assert result["cllm"]["exactness"]["teacher_forced_greedy"] == 1.0
    assert result["cllm"]["exactness"]["ar_decode_equal"] == "1/1"
    assert result["cllm"]["jacobi"]["tokens_per_forward"] >= 1.0 and result["ppl_ratio"] > 0
    jac = result["cllm"]["jacobi"]
    assert jac["fast_forward_counts"]["fast_forwarded"] == jac["fast_forwarded_tokens"]
    assert jac["fast_forward_counts"]["tokens"] == jac["answer_tokens"]
    # per-prompt [tokens, forwards] add up to the pooled rate, and average (as rates) to the mean one
    assert len(jac["per_prompt"]) == 2
    assert sum(t for t, _ in jac["per_prompt"]) / sum(f for _, f in jac["per_prompt"]) == pytest.approx(jac["tokens_per_forward_pooled"])
    assert sum(t / f for t, f in jac["per_prompt"]) / 2 == pytest.approx(jac["tokens_per_forward"])
    agree = result["cllm"]["agreement_with_base"]
    assert agree["answers"] == result["heldout_prompts"] and 0 <= agree["identical"] <= 1


def test_full_fine_tuning_saves_a_model_that_decodes_losslessly(tmp_path):
    """--lora-rank 0: every weight trains (against a frozen copy of the base for the KL terms), through a
    time-limit stop and a resume; the saved folder is a whole model with its tokenizer."""
    folder, prompts, _ = tiny_inputs(tmp_path)
    collect.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "traj"), "--n", "4",
                  "--max-new-tokens", "16", "--batch", "4", "--device", "cpu"])
    args = ["--model", str(folder), "--data", str(tmp_path / "traj"), "--out", str(tmp_path / "full"), "--lora-rank", "0",
            "--lr", "1e-3", "--batch", "4", "--max-steps", "3", "--device", "cpu"]
    train.main(args + ["--max-minutes", "0.00001"])
    train.main(args + ["--resume", "true"])
    saved = tmp_path / "full" / "model"
    assert (saved / "model.safetensors").exists() and (saved / "tokenizer.json").exists()
    from decoding import load_model

    before, after = load_model(str(folder), device="cpu", dtype="float32"), load_model(str(saved), device="cpu", dtype="float32")
    moved = [n for n, w in after.model.named_parameters() if not torch.equal(w, dict(before.model.named_parameters())[n])]
    assert "model.layers.0.mlp.down_proj.weight" in moved and "model.embed_tokens.weight" in moved
    ids = encode(after.tokenizer, PROMPTS[1])
    cfg = DecodeConfig(max_new_tokens=16, n=4, eos_token_ids=after.eos_token_ids)
    assert run(jacobi_decode, after.model, ids, cfg).tokens == run(ar_decode, after.model, ids, cfg).tokens


def test_budget_minutes_sets_the_step_count_from_timed_steps(tmp_path, capsys):
    """--budget-minutes: steps 4..33 are timed, max_steps comes from their speed, and the run ends at it
    (a tiny dataset of 2 batches an epoch does not cut it short)."""
    folder, prompts, _ = tiny_inputs(tmp_path)
    collect.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "traj"), "--n", "4",
                  "--max-new-tokens", "16", "--batch", "4", "--device", "cpu"])
    train.main(["--model", str(folder), "--data", str(tmp_path / "traj"), "--out", str(tmp_path / "run"), "--lora-rank", "2",
                "--batch", "4", "--budget-minutes", "0.01", "--log-every", "1", "--device", "cpu"])
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["max_steps"] >= 34 and state["step"] == state["max_steps"]
    assert f"max_steps = {state['max_steps']} for 0.01 min" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, state["max_steps"] + 1))
    assert all(r["s_per_step_recent"] > 0 for r in rows)
    # --max-samples: the first N collected samples only (a data-size run from one collection)
    few = ["--model", str(folder), "--data", str(tmp_path / "traj"), "--out", str(tmp_path / "few"), "--lora-rank", "2",
           "--batch", "2", "--max-steps", "1", "--device", "cpu"]
    train.main(few + ["--max-samples", "3"])
    saved = json.loads((tmp_path / "few" / "train_settings.json").read_text())
    assert saved["samples"] == 3 and saved["collected"] > 3
    with pytest.raises(SystemExit, match="--max-samples must be 0"):
        train.main(few + ["--max-samples", "-1"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full", "lean"])
def test_training_on_two_processes(tmp_path, mode):
    """Two processes (gloo on CPU; one per GPU through accelerate launch on a GPU machine): each takes its share
    of the batch, the time limit stops both at a checkpoint, and both resume from it to the end; with a LoRA, with
    full fine-tuning of the target matrices, and with a LoRA under --loss-rows and --recompute (the LM head skipped
    inside the DDP wrapper's forward, checkpointed terms: the gradients must still be synchronised)."""
    folder, prompts, refs = tiny_inputs(tmp_path)
    traj, out = tmp_path / "traj", tmp_path / "run"
    collect.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(traj), "--n", "4",
                  "--max-new-tokens", "16", "--batch", "8", "--device", "cpu"])
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    # training.train, and at its end each process's sum of its trained weights, gathered: DDP keeps them equal
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, sys, torch\nfrom training import train\nsave = train.save_final\n"
        "def check(acc, model, *args, **kw):\n"
        "    w = sum(p.detach().double().sum() for p in acc.unwrap_model(model).parameters() if p.requires_grad)\n"
        "    sums = acc.gather(w.reshape(1)).tolist()\n"
        "    if acc.is_main_process:\n        print('TRAINED_SUMS', sums, flush=True)\n"
        "    return save(acc, model, *args, **kw)\n"
        "train.save_final = check\n"
        # with PROBE_LONE_LIMIT, only the second process gets a time limit: all must still stop together
        "lone = ['--max-minutes', '0.00001'] if os.environ.get('PROBE_LONE_LIMIT') and os.environ['RANK'] == '1' else []\n"
        "train.main(sys.argv[1:] + lone)\n")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe),
            "--model", str(folder), "--data", str(traj), "--out", str(out),
            *(["--lora-rank", "0", "--full-scope", "targets"] if mode == "full" else ["--lora-rank", "4", "--lora-alpha", "8"]),
            *(["--loss-rows", "1", "--recompute", "true"] if mode == "lean" else []),
            "--batch", "4", "--max-steps", "3", "--log-every", "1", "--device", "cpu", "--ref-weight", "1",
            "--ref-data", str(refs), "--ref-batch", "2", "--self-weight", "1", "--self-every", "2", "--self-prompts", "4",
            "--self-batch", "2", "--self-tokens", "6"]
    for extra in (["--max-minutes", "0.00001"], ["--resume", "true"]):
        done = subprocess.run(args + extra, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        sums = [json.loads(line.split("TRAINED_SUMS", 1)[1]) for line in done.stdout.splitlines() if "TRAINED_SUMS" in line]
        assert len(sums) == 1 and sums[0][0] == sums[0][1] != 0.0  # each process trained on other rows, same weights
    assert json.loads((out / "train_settings.json").read_text())["processes"] == 2
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one log line a step: only the main process writes
    assert all(math.isfinite(r["loss"]) and r["ref"] >= 0 and r["self"] >= 0 for r in rows)
    assert (out / ("model/model.safetensors" if mode == "full" else "adapter/adapter_model.safetensors")).exists()
    if mode != "lora":
        return
    # One process out of time, the other not: both stop at the same step (else one waits for the other forever).
    lone = tmp_path / "lone"
    done = subprocess.run([a if a != str(out) else str(lone) for a in args], cwd=root, capture_output=True, text=True,
                          timeout=120, env=env | {"PROBE_LONE_LIMIT": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((lone / "checkpoint" / "trainer_state.json").read_text())["step"] == 1


def test_resume_says_when_there_is_nothing_to_resume_and_refuses_a_corrupt_or_other_checkpoint(tmp_path, capsys):
    folder, prompts, _ = tiny_inputs(tmp_path)
    traj, run_dir = tmp_path / "traj", tmp_path / "run"
    collect.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(traj), "--n", "4",
                  "--max-new-tokens", "12", "--batch", "5", "--device", "cpu"])
    common = ["--model", str(folder), "--data", str(traj), "--out", str(run_dir), "--lora-rank", "4", "--lora-alpha", "8",
              "--batch", "4", "--max-steps", "3", "--log-every", "1", "--device", "cpu", "--save-every", "1"]
    train.main(common + ["--max-minutes", "0.00001", "--resume", "true"])  # nothing to resume yet: says so, stops at 1
    assert "no checkpoint" in capsys.readouterr().out
    log = run_dir / "log.jsonl"
    with log.open("a") as fh:  # a row the stopped run wrote after its checkpoint (as a run killed mid-way leaves)
        fh.write(json.dumps({"step": 2, "loss": 9.9}) + "\n")
    with pytest.raises(SystemExit, match="--lora-rank 4, this run asks for 8"):
        train.main([*common[:7], "8", *common[8:], "--resume", "true"])
    train.main(common + ["--resume", "true"])
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] != 9.9 for r in rows)
    (run_dir / "checkpoint" / "trainer_state.json").write_text("{not json")
    with pytest.raises(SystemExit, match="incomplete or corrupt"):
        train.main(common + ["--resume", "true"])
    (run_dir / "checkpoint" / "trainer_state.json").write_text(json.dumps({"step": 1, "max_steps": 3}))
    for weights in (run_dir / "checkpoint").glob("*.safetensors"):
        weights.write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="could not resume"):
        train.main(common + ["--resume", "true"])
