"""The benchmark CLI end to end on a tiny local model: lanes, JSON layout, exact match."""
from __future__ import annotations

import json

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
    assert result["summary"]["exact_match"]["base_ar_vs_hf_generate"] == 1.0
    assert "base_jacobi" in capsys.readouterr().out


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
    assert list(lanes) == ["base_ar", "base_jacobi"]  # base_ar always runs: it is the speed reference


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
        return real(lambda: (seen.append(threading.current_thread().name), fn()), in_thread)

    monkeypatch.setattr(bench, "run_timed", spy)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n')
    out = tmp_path / "r.json"
    assert bench.main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "4", "--max-new-tokens", "8",
                       "--device", "cpu", "--lanes", "base_jacobi", "--in-thread", "--out", str(out)]) == 0
    assert seen == [True, "bench-lanes"]
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
