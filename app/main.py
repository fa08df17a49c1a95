"""Command line: parse flags, load the models once, build the page, launch."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from decoding import DEFAULT_SPEC, default_adapter
from decoding.cli import parse
from decoding.decoders import ENGINES
from decoding.models import DTYPES

from .callbacks import MAX_PROMPT_TOKENS, RACE_BUDGET_S
from .host import ModelHost
from .race import MAX_NEW_TOKENS


@dataclass
class AppConfig:
    """Jacobi Lens: AR vs Jacobi decoding, live, in the browser. Every flag parses into one field."""

    model: str = DEFAULT_SPEC  # base model: smollm2-135m, a preset, a local folder or .gguf, or a hub id
    adapter: str | None = None  # CLLM LoRA adapter folder; default: the shipped one when present; "none": no CLLM lanes
    cllm_model: str | None = None  # a full CLLM checkpoint to race instead of base + adapter (e.g. a published preset)
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu
    dtype: str = field(default="auto", metadata={"choices": tuple(DTYPES)})  # auto: float32 on CPU, bfloat16 on GPU
    engine: str = field(default="auto", metadata={"choices": ENGINES})  # auto: the fast engine on CUDA and CPU for Llama models, else eager
    cache_dir: str | None = None  # where the embedded model is prepared (default $CLLM_CACHE_DIR or ~/.cache/jacobi-lens)
    host: str | None = None  # address to listen on (default 127.0.0.1, or $GRADIO_SERVER_NAME)
    port: int | None = None  # port (default 7860, or $GRADIO_SERVER_PORT)
    share: bool = False  # create a public gradio.live link
    allow_custom_models: bool = False  # let visitors load other models from the page (presets and hub ids)
    model_root: str | None = None  # with --allow-custom-models: visitors may also load folders under this one
    max_queue: int = 20  # requests that may wait at once; more are refused with a message
    max_new_tokens_limit: int = MAX_NEW_TOKENS  # the largest "max new tokens" a request may ask for
    max_prompt_tokens: int = MAX_PROMPT_TOKENS  # the longest prompt a request may send, in tokens with the chat template
    race_budget_s: float = RACE_BUDGET_S  # wall-clock seconds one race (all its lanes) may run; 0: no limit

    def __post_init__(self):
        if self.max_queue < 1 or self.max_new_tokens_limit < 1 or self.max_prompt_tokens < 1:
            raise ValueError("--max-queue, --max-new-tokens-limit and --max-prompt-tokens must be at least 1")
        if not self.race_budget_s >= 0:
            raise ValueError("--race-budget-s must be 0 (no limit) or more")


def parse_args(argv: list[str] | None = None) -> AppConfig:
    return parse(AppConfig, argv, prog="python app.py")


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

    demo = build_demo(host, cfg.allow_custom_models, cfg.max_new_tokens_limit, max_prompt_tokens=cfg.max_prompt_tokens,
                      race_budget_s=cfg.race_budget_s, model_root=cfg.model_root)
    demo.queue(max_size=cfg.max_queue, default_concurrency_limit=1)
    demo.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share or None, css=CSS, theme=theme())
