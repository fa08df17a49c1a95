"""Jacobi Lens: `python app.py` serves the app on http://127.0.0.1:7860 (`--help` for the flags).

Also the entry point of the Hugging Face Space (README front matter: app_file: app.py).
"""
try:  # first: on ZeroGPU Spaces (SPACES_ZERO_GPU set) it patches torch, which must happen before torch is imported
    import spaces  # noqa: F401
except ImportError:  # not installed: no ZeroGPU here
    pass

from app.main import main

if __name__ == "__main__":
    main()
