"""The benchmark CLI end to end on a tiny local model: lanes, JSON layout, exact match."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from decoding import bench, fast


def test_bench_writes_lanes_and_summary(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n{"turns": ["Count to five.", "ignored"]}\n')
    out = tmp_path / "r.json"
    code = bench.main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "8",
                       "--max-new-tokens", "24", "--device", "cpu", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["meta"]) >= {"config", "decode", "env", "command", "adapter_sha256"}
    assert result["meta"]["adapter_sha256"] is None  # no adapter on this model
    assert result["meta"]["env"]["dtype"] == "float32" and result["meta"]["config"]["n"] == 8
    assert result["meta"]["env"]["device_name"] == fast.cpu_name()  # the CPU's model name, so results tell CPUs apart
    assert len(result["prompts"]) == 2
    lanes = result["summary"]["lanes"]
    assert set(lanes) == {"hf_generate", "base_ar", "base_jacobi"}
    for lane in lanes.values():
        assert {"tokens", "forwards", "wall_s", "tok_s", "mean_accepted", "speedup"} <= set(lane)
    assert lanes["base_ar"]["speedup"] == 1.0 and lanes["base_ar"]["mean_accepted"] == 1.0
    assert result["summary"]["exact_match"]["base_jacobi_vs_base_ar"] == 1.0
    assert result["summary"]["exact_match"]["hf_generate_vs_base_ar"] == 1.0
    assert {lanes[k]["reference"] for k in lanes} == {"base_ar"} and result["meta"]["commit"]
    assert "base_jacobi" in capsys.readouterr().out


def test_bench_runs_every_lane_repeated_with_peers_on_the_first_prompts(tiny_model_dir, tmp_path):
    """--lanes all: transformers' three lanes (on the --hf-limit first prompts, once) and our AR, Jacobi and lookup
    lanes (every prompt, --repeats times, the order rotated): each the AR text in float32, each with the wall seconds
    of every run, its reference, and the spread of its speedup over the runs."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n{"prompt": "Count to five. Count to five."}\n')
    out = tmp_path / "r.json"
    assert bench.main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "12",
                       "--device", "cpu", "--lanes", "all", "--repeats", "2", "--hf-limit", "1", "--lookup-tokens", "5",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    lanes = result["summary"]["lanes"]
    assert list(lanes) == ["hf_generate", "hf_static", "hf_lookup", "base_ar", "base_jacobi", "base_lookup"]
    assert result["summary"]["exact_match"] == {f"{k}_vs_base_ar": 1.0 for k in lanes if k != "base_ar"}
    first, second = (p["lanes"] for p in result["prompts"])
    assert set(second) == {"base_ar", "base_jacobi", "base_lookup"}  # transformers' lanes on the first prompt only
    assert [len(first[k]["walls"]) for k in lanes] == [1, 1, 1, 2, 2, 2]
    assert all(row["same_text_every_run"] for p in result["prompts"] for row in p["lanes"].values())
    assert lanes["hf_static"]["prompts"] == 1 and lanes["base_lookup"]["prompts"] == 2
    assert len(lanes["base_jacobi"]["speedup_runs"]) == 2 and len(lanes["hf_lookup"]["speedup_runs"]) == 1
    assert lanes["base_jacobi"]["speedup_min"] <= lanes["base_jacobi"]["speedup_median"] <= lanes["base_jacobi"]["speedup_max"]
    assert lanes["hf_lookup"]["mean_accepted"] >= 1.0 and lanes["base_lookup"]["mean_accepted"] >= 1.0
    assert set(result["meta"]["warmup_s"]) == set(lanes) and result["meta"]["references"]["hf_static"] == "base_ar"
    assert result["meta"]["config"]["repeats"] == 2 and result["meta"]["config"]["hf_limit"] == 1


def test_bench_refuses_an_empty_prompt_file(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert bench.main(["--model", str(tiny_model_dir), "--prompts", str(empty), "--device", "cpu"]) == 2
    assert "holds no prompts" in capsys.readouterr().err


def test_summary_measures_each_lane_against_its_own_model_s_ar():
    """cllm_jacobi against cllm_ar (same model, same text), cllm_ar against base_ar (another model: no text check);
    the speedup from each prompt's median run, its spread from the runs paired by index."""
    from decoding.bench_summary import summarise

    def row(tokens, walls, ids):
        return {"tokens": tokens, "forwards": tokens, "wall_s": sorted(walls)[len(walls) // 2], "walls": walls,
                "mean_accepted": 1.0, "ids": ids}

    prompts = [{"id": "a", "lanes": {"base_ar": row(10, [1.0, 1.0, 1.0], [1] * 10),
                                     "cllm_ar": row(8, [0.8, 0.8, 0.8], [2] * 8),
                                     "cllm_jacobi": row(8, [0.4, 0.2, 0.8], [2] * 8)}}]
    s = summarise(prompts, ["base_ar", "cllm_ar", "cllm_jacobi"])
    cj, ca = s["lanes"]["cllm_jacobi"], s["lanes"]["cllm_ar"]
    assert (cj["reference"], ca["reference"]) == ("cllm_ar", "base_ar")
    assert cj["speedup"] == pytest.approx(2.0) and cj["speedup_runs"] == pytest.approx([2.0, 4.0, 1.0])
    assert (cj["speedup_min"], cj["speedup_median"], cj["speedup_max"]) == pytest.approx((1.0, 2.0, 4.0))
    assert cj["speedup_vs_base_ar"] == pytest.approx(2.0) and ca["speedup"] == pytest.approx(1.0)
    assert s["exact_match"] == {"cllm_jacobi_vs_cllm_ar": 1.0}


def test_bench_rejects_bad_settings(tiny_model_dir, capsys):
    assert bench.main(["--model", str(tiny_model_dir), "--n", "500", "--limit", "1", "--device", "cpu"]) == 2
    assert "n must be between" in capsys.readouterr().err


def test_bench_lanes_flag_runs_only_the_lanes_asked_for(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n')
    out = tmp_path / "r.json"
    code = bench.main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "8",
                       "--device", "cpu", "--lanes", "base_jacobi", "--out", str(out)])
    assert code == 0
    lanes = json.loads(out.read_text())["summary"]["lanes"]
    assert list(lanes) == ["base_ar", "base_jacobi"]  # base_ar always runs: it is the reference


def test_bench_lanes_flag_rejects_unknown_lanes(tiny_model_dir):

    with pytest.raises(SystemExit):
        bench.main(["--model", str(tiny_model_dir), "--lanes", "base_ar,warp_drive", "--device", "cpu"])


def test_bench_on_the_cpu_fast_engine_reports_forward_time_by_width(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n')
    out = tmp_path / "r.json"
    code = bench.main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "8",
                       "--device", "cpu", "--engine", "fast", "--lanes", "base_jacobi", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["meta"]["config"]["engine"] == "fast"
    assert result["summary"]["exact_match"]["base_jacobi_vs_base_ar"] == 1.0
    rows = result["latency"]["widths"]  # no graphs on the CPU: the whole step is the forward
    assert [r["width"] for r in rows] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert all(r["graph_ms"] is None and r["step_ms"] > 0 and r["bandwidth_frac"] is None for r in rows)
    assert set(result["latency"]["cpu_wx"]) == {"1", "2", "4", "8", "16", "32", "64", "128"}  # the tuned form of each
    assert "one forward by window width" in capsys.readouterr().out


@pytest.mark.parametrize("form", ["wx", "linear"])
def test_bench_cpu_projection_sets_one_form_at_every_width(tiny_model_dir, tmp_path, form):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n')
    out = tmp_path / "r.json"
    assert bench.main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "8",
                       "--device", "cpu", "--engine", "fast", "--lanes", "base_jacobi", "--cpu-projection", form,
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["config"]["cpu_projection"] == form
    assert set(result["latency"]["cpu_wx"].values()) == {form == "wx"}
    assert result["summary"]["exact_match"]["base_jacobi_vs_base_ar"] == 1.0


def test_bench_in_thread_times_the_lanes_in_a_second_thread(tiny_model_dir, tmp_path, monkeypatch):
    import threading

    seen = []
    real = bench.run_timed

    def spy(fn, in_thread):
        seen.append(in_thread)
        return real(lambda: (seen.append(threading.current_thread().name), fn())[1], in_thread)

    monkeypatch.setattr(bench, "run_timed", spy)
    tuned_on = []  # the engine's CPU tuning runs on the thread that times the lanes: its best forms can differ
    real_tune = bench.fast.FastEngine.tune
    monkeypatch.setattr(bench.fast.FastEngine, "tune",
                        lambda self, *a, **k: (tuned_on.append(threading.current_thread().name), real_tune(self, *a, **k))[1])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n')
    out = tmp_path / "r.json"
    assert bench.main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "8",
                       "--device", "cpu", "--lanes", "base_jacobi", "--engine", "fast", "--in-thread", "--out",
                       str(out)]) == 0
    assert seen == [True, "bench-lanes"] and tuned_on and set(tuned_on) == {"bench-lanes"}
    result = json.loads(out.read_text())
    assert result["meta"]["config"]["in_thread"] is True and len(result["prompts"]) == 1
    assert result["summary"]["exact_match"]["base_jacobi_vs_base_ar"] == 1.0


def test_bench_checks_candidate_ngrams_beside_the_window(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n')
    out = tmp_path / "r.json"
    code = bench.main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "24",
                       "--device", "cpu", "--engine", "fast", "--lanes", "base_jacobi", "--candidates", "2",
                       "--candidate-len", "5", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["meta"]["decode"]["candidates"] == 2 and result["meta"]["decode"]["candidate_len"] == 5
    assert result["summary"]["exact_match"]["base_jacobi_vs_base_ar"] == 1.0


def test_bench_checks_branches_for_the_first_guess_and_writes_gzip(tiny_model_dir, tmp_path):
    """--branches reaches the decodes (same text as AR), is saved with the result, and --out .gz writes gzipped JSON
    that read_bench and the About tab's setting words read back."""
    from app import about

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n')
    out = tmp_path / "r.json.gz"
    code = bench.main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "24",
                       "--device", "cpu", "--engine", "fast", "--lanes", "base_jacobi", "--branches", "3",
                       "--out", str(out)])
    assert code == 0 and out.read_bytes()[:2] == b"\x1f\x8b"  # gzip's magic number
    result = bench.read_bench(out)
    assert result["meta"]["decode"]["branches"] == 3 and result["meta"]["config"]["branches"] == 3
    assert result["summary"]["exact_match"]["base_jacobi_vs_base_ar"] == 1.0
    assert about.bench_setting(result["meta"]) == "n = 4, 3 branches for the first guess, 24 new tokens"
    assert bench.main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--device", "cpu",
                       "--engine", "eager", "--lanes", "base_jacobi", "--branches", "2"]) == 2  # fast engine only


def test_adapter_sha256_names_the_weights_a_result_measured(tmp_path):
    import hashlib

    from decoding import adapter_sha256

    assert adapter_sha256(None) is None and adapter_sha256(tmp_path) is None  # no folder, no weights file
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights" * 1000)
    assert adapter_sha256(tmp_path) == hashlib.sha256(b"weights" * 1000).hexdigest()


def test_cpu_name_reads_the_model_name_and_falls_back(monkeypatch, tmp_path):
    """cpu_name gives the cpuinfo file's model name where it has one, and platform's answer where it cannot be read."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU 9000 16-Core Processor\nflags\t\t: avx512f\n")
    assert fast.cpu_name(info) == "Example CPU 9000 16-Core Processor"
    monkeypatch.setattr(fast.platform, "processor", lambda: "")
    monkeypatch.setattr(fast.platform, "machine", lambda: "arm64")
    assert fast.cpu_name(tmp_path / "missing") == "arm64"


def test_the_recorded_command_is_the_one_a_user_types(monkeypatch):
    """A module run with -m has its file as sys.argv[0]; the result's meta records it as ``python -m package.module``
    (the bench's, fastcheck's and the experiments' results alike), anything else as given."""
    root = Path(bench.__file__).resolve().parent.parent
    monkeypatch.setattr(sys, "argv", [str(root / "decoding" / "bench.py"), "--n", "4"])
    assert bench.command_line() == "python -m decoding.bench --n 4"
    monkeypatch.setattr(sys, "argv", [str(root / "experiments" / "cancel_to_free.py"), "--out", "x.json"])
    assert bench.command_line() == "python -m experiments.cancel_to_free --out x.json"
    monkeypatch.setattr(sys, "argv", ["tool.py", "-k"])
    assert bench.command_line() == "tool.py -k"
