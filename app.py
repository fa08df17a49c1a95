"""Jacobi Lens: `python app.py` serves the app on http://127.0.0.1:7860 (`--help` for the flags).

Also the entry point of the Hugging Face Space (README front matter: app_file: app.py).
"""
from app.main import main

if __name__ == "__main__":
    main()
