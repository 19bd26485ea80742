"""Checkpoint sources named by Hugging Face hub repository (optional: needs `huggingface_hub`).

Everything in bltkit reads local folders. Where a source given to a conversion or a load is not a
local path, whose first folder does not exist here either, and reads as a repository id, `org/name`
or `org/name/folder` (Meta's facebook/blt holds
blt_1b/, blt_7b/ and entropy_model/ side by side), it is fetched into huggingface_hub's cache, which
honours HF_HUB_OFFLINE and HF_HUB_CACHE, and the cached folder is read like any other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*")


def resolve(src: str | os.PathLike) -> Path:
    """`src` as a local folder: itself where it exists (or cannot be a repository id: the caller
    then says it is missing), else the hub repository's snapshot, fetched or from the cache. A
    missing path whose first folder exists here is not fetched: a ValueError says so."""
    path = Path(src)
    text = os.fspath(src)
    if path.exists() or not _REPO.fullmatch(text):
        return path
    first = text.split("/")[0]
    if Path(first).exists():  # a local folder's path with a typo (runs/exp1/fnal, where runs/ exists)
        # is a missing local path, not a hub repository to fetch: say why it was not fetched
        raise ValueError(f"{text} does not exist here. It was read as a local path, not a Hugging Face hub "
                         f"repository id, because {first}/ exists in the working directory: correct the path, "
                         "or to fetch the repository run from a directory without that folder (or pass the "
                         "folder you downloaded)")
    org, name, *sub = text.split("/")
    repo = f"{org}/{name}"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{text} is not a local path; to fetch it from the Hugging Face hub install huggingface_hub "
                         "(pip install 'bltkit[hf]'), or pass a folder you downloaded") from None
    # a folder of a repository: that folder and the entropy model Meta keeps beside it
    patterns = [f"{'/'.join(sub)}/*", "entropy_model/*"] if sub else None
    try:
        root = Path(snapshot_download(repo_id=repo, allow_patterns=patterns))
    except Exception as e:  # (offline, gated, missing: huggingface_hub's own errors say which)
        raise ValueError(f"{text} is neither a local path nor a hub repository that could be fetched "
                         f"({type(e).__name__}: {e}); without a network, download it where there is one "
                         f"(huggingface-cli download {repo}) and pass the folder") from None
    out = root.joinpath(*sub)
    if not out.is_dir():
        raise ValueError(f"the hub repository {repo} has no folder {'/'.join(sub)}")
    return out
