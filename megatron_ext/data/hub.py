"""A Hugging Face hub name or a local path -> a local path, through the local cache only.

Nothing here downloads: training ranks on compute nodes must not all fetch from the hub (most
have no internet at all), so a hub name resolves only through the local cache (``HF_HOME`` /
``HF_HUB_CACHE``, the layout ``hf download`` writes), as with ``HF_HUB_OFFLINE=1``. A name that
is not cached is one error line saying how to fetch it.
"""
from __future__ import annotations

import os
import re



class HubError(ValueError):
    """A hub name that is not in the local cache; the message is one line saying how to fetch it."""

# "org/name" or "name", optionally "@revision" (a branch, tag or commit of the cached snapshot)
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*(?:@[\w.\-/]+)?$")


def looks_like_hub_name(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and not text.startswith((".", "~")) and ".." not in text


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def resolve(name_or_path: str, what: str) -> str:
    """An existing file or folder as given; otherwise the cached snapshot folder of a hub name.
    ``what`` names the input in errors (a flag, or the command's argument): FileNotFoundError for a
    missing path that cannot be a hub name, HubError for a hub name that is not cached."""
    path = os.path.expanduser(str(name_or_path))
    if os.path.exists(path):
        return path
    if not looks_like_hub_name(str(name_or_path)):
        raise FileNotFoundError(f"{what}: no such file or directory: {path}")
    from huggingface_hub import snapshot_download

    repo_id, _, revision = str(name_or_path).partition("@")
    try:
        return snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and its relatives all mean "not cached"
        raise HubError(f"{what} {name_or_path}: no such local path, and not in the local Hugging Face cache "
                      f"({cache_dir()}); this never downloads: fetch it where there is internet access with "
                      f"'hf download {repo_id}' (same HF_HOME), or give a local folder") from None
