"""Tiny offline models and a running app, for the app's tests.

The tiny model is a random Llama with a byte-level BPE tokenizer trained here on a few sentences:
no download, real decoders, real traces, in well under a second.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from app.host import ModelHost
from decoding import LoadedModel

ROOT = Path(__file__).resolve().parent.parent
XSS = "<img src=x onerror=alert(1)>"  # a prompt that would run script if any view rendered it as HTML
CORPUS = [
    "The cat sat on the mat and purred.", "def reverse(s): return s[::-1]", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "Write a haiku about the sea.", "héllo wörld, ça va? 中文 🌊 <b>&amp;</b>", "A train travels 120 km in 1.5 hours.",
]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_model(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0, bos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    model.generation_config.eos_token_id = 0
    return model


class TinyHost:
    """Stands in for app.host.ModelHost: a base model and, optionally, a different 'CLLM'."""

    def __init__(self, with_cllm: bool = True):
        tok = tiny_tokenizer()
        self.base = LoadedModel(tiny_model(len(tok), 0), tok, "tiny", "tiny", None, torch.device("cpu"), torch.float32)
        cllm = LoadedModel(tiny_model(len(tok), 1), tok, "tiny", "tiny", "tiny-lora", torch.device("cpu"), torch.float32)
        self.cllm = cllm if with_cllm else None
        self.error = None
        self.spec, self.adapter = "tiny", None
        self.engine = "eager"  # what ModelHost resolved at load time
        self.zero_gpu = False

    def describe(self) -> str:
        return "tiny"

    default_window = ModelHost.default_window  # the page's starting n, as the real host picks it

    def stream(self, steps):  # decodes on the caller's thread
        return steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(folder: Path) -> Path:
    """A LoRA adapter for the embedded model whose update is zero (peft's default init): the 'CLLM' equals the base."""
    from peft import LoraConfig, get_peft_model

    from decoding import load_model

    base = load_model("smollm2-135m", device="cpu", dtype="float32").model
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    return folder


class AppProcess:
    """`python app.py` in a subprocess, on a free port; ``url`` once it serves."""

    def __init__(self, *args: str, timeout: float = 300, script: str = "app.py", env: dict | None = None):
        self.port = free_port()
        self.log = []
        env = os.environ | {"PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"} | (env or {})
        self.proc = subprocess.Popen([sys.executable, script, "--port", str(self.port), *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would block the app
        deadline = time.time() + timeout
        while not self.ready and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        if not self.ready:
            self.stop()
            raise RuntimeError("the app did not start:\n" + "".join(self.log[-40:]))
        self.url = f"http://127.0.0.1:{self.port}/"

    @property
    def ready(self) -> bool:
        return any("Running on local URL" in line for line in self.log)

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_SHARED: AppProcess | None = None


def shared_app() -> AppProcess:
    """One app for all end-to-end and browser tests of a run: the embedded model, and a zero LoRA as its 'CLLM'
    so all three lanes run; a queue of 3. Stopped when the test run ends."""
    global _SHARED
    if _SHARED is None:
        folder = Path(tempfile.mkdtemp(prefix="jl-adapter-"))
        # No time budget: on a loaded test machine a race may be slow (the budget is tested in test_app_bounds.py).
        _SHARED = AppProcess("--adapter", str(make_adapter(folder / "zero-lora")), "--max-queue", "3", "--race-budget-s", "0")
        atexit.register(shutil.rmtree, folder, True)
        atexit.register(_SHARED.stop)
    return _SHARED
