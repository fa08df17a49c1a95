"""Prompt files and chat templating."""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "assets" / "prompts.jsonl"
MAX_PROMPT_CHARS = 8000  # longer prompts are refused before tokenising


def read_jsonl(path: str | Path) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSON-lines file.

    Split on "\\n" only: str.splitlines() also breaks on U+2028 and friends, which JSON strings may hold.
    """
    rows = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    return rows


def read_prompts(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """Read a JSON-lines prompt file; each line has "prompt", or "turns" whose first item is used."""
    path = Path(path) if path else DEFAULT_PROMPTS
    rows = []
    for lineno, row in read_jsonl(path):
        text = row.get("prompt") if isinstance(row, dict) else None
        if text is None and isinstance(row, dict) and row.get("turns"):
            text = row["turns"][0]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{lineno}: needs a non-empty \"prompt\" or \"turns\"")
        rows.append({"id": row.get("id", f"p{lineno}"), "category": row.get("category", ""), "prompt": text})
    return rows[:limit] if limit else rows


def encode(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a prompt: through the model's chat template when it has one, else raw."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is too long ({len(prompt)} characters; at most {MAX_PROMPT_CHARS})")
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt, add_special_tokens=True)["input_ids"]]
