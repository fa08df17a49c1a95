"""The adapter tools (experiments.extract, merge), the step probe and the GPU wrapper script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decoding import DecodeConfig, ar_decode, encode, jacobi_decode, run
from training import collect, train
from training.tiny import save_tiny

from training_fixtures import PROMPTS, random_lora, tiny_inputs

def test_step_probe_reports_time_and_memory_of_each_variant(tmp_path):
    from experiments import stepprobe

    out = tmp_path / "probe.json"
    got = stepprobe.main(["--shape", "tiny", "--samples", "16", "--steps", "3", "--timed", "1", "--device", "cpu",
                          "--work", str(tmp_path), "--out", str(out), "--common", "--loop-penalty 2 --use-extra false",
                          "--variants", "plain:--batch 4;lean:--batch 4 --loss-rows 1 --recompute true;bad:--loss-rows -1"])
    assert json.loads(out.read_text()) == got
    for name in ("plain", "lean"):
        row = got["variants"][name]
        assert row["returncode"] == 0 and row["s_per_step"] > 0 and row["peak_gib"] > 0 and row["batch"] == 4
    assert "--loss-rows must be" in got["variants"]["bad"]["error"]
    with pytest.raises(SystemExit, match="--variants must be"):
        stepprobe.main(["--variants", "no flags here"])


def test_full_fine_tuning_of_the_targets_extracts_into_an_adapter(tmp_path, capsys):
    """--full-scope targets trains only the LoRA target matrices; experiments.extract turns the change into a LoRA:
    at full rank base + adapter is the tuned model, under a size budget it keeps the largest singular values."""
    from experiments import extract

    folder, prompts, _ = tiny_inputs(tmp_path)
    collect.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "traj"), "--n", "4",
                  "--max-new-tokens", "16", "--batch", "4", "--device", "cpu"])
    train.main(["--model", str(folder), "--data", str(tmp_path / "traj"), "--out", str(tmp_path / "full"),
                "--lora-rank", "0", "--full-scope", "targets", "--lr", "1e-2", "--batch", "4", "--max-steps", "2",
                "--device", "cpu"])
    from decoding import load_model

    saved = tmp_path / "full" / "model"
    base, tuned = load_model(str(folder), device="cpu", dtype="float32"), load_model(str(saved), device="cpu", dtype="float32")
    before = dict(base.model.named_parameters())
    moved = {n for n, w in tuned.model.named_parameters() if not torch.equal(w, before[n])}
    assert moved == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}

    ids = torch.tensor([encode(tuned.tokenizer, PROMPTS[3])])
    with torch.no_grad():
        want = tuned.model(ids).logits
    # Full rank (32 >= every matrix's smaller side), float32 factors: the same model up to rounding.
    report = extract.main(["--model", str(saved), "--base", str(folder), "--out", str(tmp_path / "exact"), "--rank", "32",
                           "--save-dtype", "float32", "--device", "cpu"])
    assert report["kept_energy"] == pytest.approx(1.0) and report["other_changes_norm"] == {}
    merged = load_model(str(folder), adapter=str(tmp_path / "exact"), device="cpu", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids).logits, want, atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "exact" / "training_settings.json").read_text())["settings"]["full_scope"] == "targets"

    # A budget of a quarter of the full-rank parameters: uneven ranks, most of the energy, a smaller file.
    full_params = sum(r * (p.shape[0] + p.shape[1]) for r, p in
                      ((min(p.shape), p) for n, p in tuned.model.named_parameters() if n in moved))
    budget_mib = full_params * 4 / 4 / (1 << 20)
    small = extract.main(["--model", str(saved), "--base", str(folder), "--out", str(tmp_path / "small"), "--rank", "0",
                          "--max-mib", str(budget_mib), "--save-dtype", "float32", "--device", "cpu"])
    assert 0.4 < small["kept_energy"] < 1.0 and small["rank_min"] < small["rank_max"]
    assert small["file_mib"] < report["file_mib"] / 2
    lean = load_model(str(folder), adapter=str(tmp_path / "small"), device="cpu", dtype="float32")
    gen = encode(lean.tokenizer, PROMPTS[1])
    cfg = DecodeConfig(max_new_tokens=16, n=4, eos_token_ids=lean.eos_token_ids)
    assert run(jacobi_decode, lean.model, gen, cfg).tokens == run(ar_decode, lean.model, gen, cfg).tokens
    # Rank 1 keeps little of the change: the report says so and extract warns that the adapter needs an evaluation.
    capsys.readouterr()
    thin = extract.main(["--model", str(saved), "--base", str(folder), "--out", str(tmp_path / "thin"), "--rank", "1",
                         "--device", "cpu"])
    warned = "warning: the adapter keeps only" in capsys.readouterr().out
    assert thin["kept_energy"] < min(extract.LOW_ENERGY, small["kept_energy"]) and warned


def test_extract_allocates_ranks_by_singular_value_per_parameter():
    from experiments.extract import Delta, allocate

    def delta(name, out, inp, values):
        k = len(values)
        return Delta(name, torch.zeros(out, k), torch.tensor(values), torch.zeros(k, inp))

    # costs 10 and 20 a rank; value^2 per parameter: a: 10, 2.5, 0.1; b: 20, 0.05
    a, b = delta("a", 5, 5, [10.0, 5.0, 1.0]), delta("b", 10, 10, [20.0, 1.0])
    assert allocate([a, b], 30) == [1, 1]
    assert allocate([a, b], 40) == [2, 1]
    assert allocate([a, b], 25) == [0, 1]  # b's first rank pays most; a's no longer fits after it
    assert allocate([a, b], 1000) == [3, 2]


def test_merge_mixes_two_adapters_tensor_by_tensor(tmp_path):
    from safetensors.torch import load_file

    from experiments import merge

    def adapter(seed, rank=4):
        random_lora(["q_proj", "v_proj"], seed, rank).save_pretrained(tmp_path / f"a{seed}_{rank}")
        return tmp_path / f"a{seed}_{rank}"

    a, b = adapter(1), adapter(2)
    wa, wb = (load_file(x / "adapter_model.safetensors") for x in (a, b))
    for alpha in (0.0, 0.25, 1.0):
        out = merge.main(["--a", str(a), "--b", str(b), "--alpha", str(alpha), "--out", str(tmp_path / f"m{alpha}")])
        got = load_file(out / "adapter_model.safetensors")
        assert got.keys() == wa.keys()
        for k in wa:
            torch.testing.assert_close(got[k], (1 - alpha) * wa[k] + alpha * wb[k])
        assert (out / "adapter_config.json").read_text() == (a / "adapter_config.json").read_text()
        assert json.loads((out / "merge_settings.json").read_text())["settings"]["alpha"] == alpha
    from decoding import load_model

    save_tiny(tmp_path / "tiny")
    merged = load_model(str(tmp_path / "tiny"), adapter=str(tmp_path / "m0.25"), device="cpu", dtype="float32")
    assert merged.model is not None  # the merged folder loads as an adapter
    # --scale alone: A's tensors, its lora_alpha times the scale, so every weight's change is scaled
    scaled = merge.main(["--a", str(a), "--scale", "1.25", "--out", str(tmp_path / "s125")])
    assert json.loads((scaled / "adapter_config.json").read_text())["lora_alpha"] == 1.25 * json.loads(
        (a / "adapter_config.json").read_text())["lora_alpha"]
    base = load_model(str(tmp_path / "tiny"), device="cpu", dtype="float32").model.state_dict()
    once, more = (load_model(str(tmp_path / "tiny"), adapter=str(x), device="cpu", dtype="float32").model.state_dict()
                  for x in (a, scaled))
    key = next(k for k in base if "q_proj" in k)
    assert not torch.equal(once[key], base[key])
    torch.testing.assert_close(more[key] - base[key], 1.25 * (once[key] - base[key]), atol=1e-5, rtol=1e-4)
    for bad, match in ((["--b", str(adapter(3, rank=2))], "same tensors"), (["--alpha", "1.5"], "between 0 and 1"),
                       (["--scale", "0"], "positive"),
                       (["--b", str(tmp_path)], "not a LoRA adapter folder")):
        args = dict(zip(["--a", "--b", "--alpha", "--out"], [str(a), str(b), "0.5", str(tmp_path / "bad")]))
        args.update(dict(zip(bad[::2], bad[1::2])))
        with pytest.raises(SystemExit, match=match):
            merge.main([x for kv in args.items() for x in kv])


def test_gpu_script_parses_and_refuses_an_unknown_stage(tmp_path):
    """The device wrappers are only run on a GPU machine: here, that bash reads them and that a wrong stage is refused
    before any work (exit 2, with the stages it knows)."""
    path = Path(__file__).resolve().parents[2] / "experiments" / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    r = subprocess.run(["bash", str(path), "nope"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "WORK": str(tmp_path), "PY": sys.executable})
    assert r.returncode == 2 and "unknown stage" in r.stderr


def test_gpu_pack_brings_a_sharded_adapter_back_in_files_under_16_mib(tmp_path):
    """gpu_run.sh pack: the config, settings and first weight file in adapter_NAME.tar, every further shard in a tar of
    its own (a file brought back from a GPU machine holds at most 16 MiB); unpacked together they load as the folder."""
    import tarfile

    from decoding import adapters

    folder = tmp_path / "run_x" / "adapter"
    random_lora(["q_proj", "v_proj"], 1, 64).save_pretrained(folder)
    (folder / "training_settings.json").write_text("{}")
    size = (folder / adapters.WEIGHTS).stat().st_size
    shards = adapters.split_weights(folder, max_bytes=size // 2 + 8192)
    assert len(shards) >= 2
    path = Path(__file__).resolve().parents[2] / "experiments" / "gpu_run.sh"
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(path), "pack", str(folder), "run_x"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "WORK": str(tmp_path / "w"), "OUT": str(out), "PY": sys.executable})
    assert r.returncode == 0, r.stderr
    tars = sorted(out.glob("adapter_run_x*.tar"))
    assert len(tars) == len(shards) and out / "adapter_run_x.tar" in tars
    back = tmp_path / "back"
    for t in tars:
        with tarfile.open(t) as f:
            f.extractall(back, filter="data")
    assert sorted(p.name for p in back.iterdir()) == sorted([s.name for s in shards] + ["adapter_config.json",
                                                                                          "training_settings.json"])
    assert adapters.weights_sha256(back) == adapters.weights_sha256(folder)
