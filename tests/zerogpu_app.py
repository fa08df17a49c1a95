"""`python tests/zerogpu_app.py ARGS`: the app as a ZeroGPU Space runs it, for tests/test_zerogpu.py.

The test sets SPACES_ZERO_GPU and points SPACES_ZERO_DEVICE_API_URL at its stand-in for the Space's GPU scheduler.
Everything else is the real ``spaces`` package: torch patched in the main process (its CUDA emulation), GPU tasks in
a forked worker process, arguments and results pickled across. On a machine without a GPU (CI) two things differ:
a CPU build of torch names no CUDA version and has no CUDA initialiser, so ``spaces`` is given a version to pick its
constants by and a stand-in initialiser to keep (the emulation replaces it in the main process); and the two
worker steps that attach a GPU (``spaces.zero.torch.init`` and ``move``) are skipped, so the task runs on the CPU
in that worker.
"""
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

HAS_GPU = Path("/proc/driver/nvidia/gpus").is_dir()


def never_in_bad_fork() -> bool:
    """A CPU build has no CUDA to have initialised before a fork (its own answer is a lambda spaces cannot pickle)."""
    return False


if not HAS_GPU:
    import torch  # importing touches no CUDA; spaces only needs the CUDA version a CUDA build would report

    torch.version.cuda = torch.version.cuda or "13.0"
    if not hasattr(torch._C, "_cuda_init"):  # spaces keeps the original to restore it in the worker
        torch._C._cuda_init = lambda: None
    torch.cuda._is_in_bad_fork = never_in_bad_fork

import spaces  # noqa: E402,F401  (as app.py does, before anything initialises CUDA)

if not HAS_GPU:
    from spaces.zero import torch as zero_torch

    zero_torch.init = lambda nvidia_uuid: None
    zero_torch.move = lambda callback=None: None

sys.argv = ["app.py", *sys.argv[1:]]
runpy.run_path(str(ROOT / "app.py"), run_name="__main__")
