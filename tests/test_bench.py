"""The benchmark CLI end to end on a tiny local model: lanes, JSON layout, exact match."""
from __future__ import annotations

import json

from decoding import bench


def test_bench_writes_lanes_and_summary(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi there"}\n{"turns": ["Count to five.", "ignored"]}\n')
    out = tmp_path / "r.json"
    code = bench.main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "8",
                       "--max-new-tokens", "24", "--device", "cpu", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["meta"]) >= {"config", "decode", "env", "command"}
    assert result["meta"]["env"]["dtype"] == "float32" and result["meta"]["config"]["n"] == 8
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
