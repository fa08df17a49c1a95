"""Command line: parse flags, load the models once, build the page, launch."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from decoding import DEFAULT_SPEC, default_adapter
from decoding.models import DEVICES, DTYPES

from .engine import ENGINES, NO_ADAPTER, ModelHost
from .race import MAX_NEW_TOKENS


@dataclass
class AppConfig:
    """Settings of one app process; every flag parses into one field."""

    model: str = DEFAULT_SPEC  # base model: smollm2-135m, a preset, a local folder or .gguf, or a hub id
    adapter: str | None = None  # CLLM LoRA folder; None: the shipped one when present; "none": no CLLM lanes
    cllm_model: str | None = None  # a full CLLM checkpoint instead of an adapter (e.g. a published preset)
    device: str = "auto"  # auto picks CUDA, then MPS, then CPU
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    engine: str = "auto"  # auto: the fast engine on CUDA and CPU for Llama models, else eager
    cache_dir: str | None = None  # where the embedded model is prepared (default $CLLM_CACHE_DIR or ~/.cache/jacobi-lens)
    host: str | None = None  # None: Gradio's default (127.0.0.1, or $GRADIO_SERVER_NAME)
    port: int | None = None  # None: Gradio's default (7860, or $GRADIO_SERVER_PORT)
    share: bool = False  # a public gradio.live link
    allow_custom_models: bool = False  # let visitors load other models from the page
    max_queue: int = 20  # requests waiting at most; more are refused with a message
    max_new_tokens_limit: int = MAX_NEW_TOKENS  # the largest "max new tokens" a request may ask for


def parse_args(argv: list[str] | None = None) -> AppConfig:
    p = argparse.ArgumentParser(prog="python app.py", description="Jacobi Lens: AR vs Jacobi decoding, live, in the browser.")
    p.add_argument("--model", default=DEFAULT_SPEC, help=f"base model spec (default {DEFAULT_SPEC})")
    p.add_argument("--adapter", default=None, help=f"CLLM LoRA adapter folder (default: the shipped one if present; '{NO_ADAPTER}' for none)")
    p.add_argument("--cllm-model", default=None, help="a full CLLM checkpoint to race instead of base + adapter")
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} or cuda:N")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES))
    p.add_argument("--engine", default="auto", choices=ENGINES, help="decoding engine (auto: fast on CUDA and CPU for Llama models)")
    p.add_argument("--cache-dir", default=None, help="folder for the prepared embedded model")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; $GRADIO_SERVER_NAME works too)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860; $GRADIO_SERVER_PORT works too)")
    p.add_argument("--share", action="store_true", help="create a public share link")
    p.add_argument("--allow-custom-models", action="store_true", help="let the page load other models (off by default)")
    p.add_argument("--max-queue", type=int, default=20, help="requests that may wait at once")
    p.add_argument("--max-new-tokens-limit", type=int, default=MAX_NEW_TOKENS, help="cap on max new tokens per request")
    args = p.parse_args(argv)
    if args.max_queue < 1 or args.max_new_tokens_limit < 1:
        p.error("--max-queue and --max-new-tokens-limit must be at least 1")
    return AppConfig(**vars(args))


def theme():
    """Gradio's Soft theme on system fonts: nothing fetched from a font host, so the page works offline."""
    import gradio as gr

    return gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    adapter = cfg.adapter if cfg.adapter is not None else default_adapter(cfg.model)
    host = ModelHost(cfg.model, adapter, cfg.device, cfg.dtype, cfg.cache_dir, cfg.cllm_model, cfg.engine)
    print(f"[jacobi-lens] settings: {asdict(cfg)}", flush=True)
    host.load(cfg.model, adapter, cfg.cllm_model)  # once, before serving; a failure is shown in the page

    from .ui import CSS, build_demo  # gradio is imported only when serving

    demo = build_demo(host, cfg.allow_custom_models, cfg.max_new_tokens_limit)
    demo.queue(max_size=cfg.max_queue, default_concurrency_limit=1)
    demo.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share or None, css=CSS, theme=theme())
