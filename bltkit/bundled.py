"""Where the model that ships with bltkit lives (`bltkit/models/default`)."""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).parent / "models" / "default"


def bundled_model_dir() -> Path:
    if not (BUNDLED / "config.json").is_file():
        raise FileNotFoundError(
            f"no bundled model at {BUNDLED}; pass --model DIR (create one with `blt init tiny DIR` or "
            "`blt train ...`)")
    return BUNDLED
