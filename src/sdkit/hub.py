"""Resolve a local folder or a Hugging Face Hub repo id to a folder on disk.

A path that exists is used as it is. Anything else is treated as a repo id and looked up in the
huggingface_hub cache (downloading only when online and allowed). Offline, a missing repo is a
plain error that says what to download.
"""

import os
from pathlib import Path


def is_offline(local_files_only=None):
    """True when the caller or the environment forbids network access."""
    if local_files_only:
        return True
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_folder(name_or_path, subfolder=None, *, allow_patterns=None, local_files_only=None,
                   revision=None, cache_dir=None, token=None):
    """Return the local folder for `name_or_path` (a folder or a repo id), plus `subfolder`."""
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder: expected a model folder in the "
                                    f"diffusers layout{f' with a {subfolder!r} subfolder' if subfolder else ''}.")
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"{name!r} is neither an existing folder nor a valid Hugging Face "
                                f"repo id: check the path.") from None
    offline = is_offline(local_files_only)
    try:
        root = snapshot_download(name, allow_patterns=allow_patterns, local_files_only=offline,
                                 revision=revision, cache_dir=cache_dir, token=token)
    except Exception as e:  # huggingface_hub raises several types for "not there"
        how = "offline (HF_HUB_OFFLINE or local_files_only)" if offline else f"download failed: {e}"
        raise FileNotFoundError(
            f"Model {name!r} is not a local folder and is not in the Hugging Face cache; {how}. "
            f"Download it first where the Hub is reachable (`hf download {name}`), or pass the "
            f"path of a local folder in the diffusers layout.") from None
    folder = Path(root) / subfolder if subfolder else Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"Repo {name!r} (cached at {root}) has no {subfolder!r} folder.")
    return folder


def weights_choice(owner, use_safetensors, low_cpu_mem_usage, allow_pickle=False):
    """``allow_pickle`` after the reference's ``use_safetensors`` / ``low_cpu_mem_usage`` keywords.

    ``use_safetensors=True`` (or None) is what sdkit does anyway; False asks for pickle weights,
    which sdkit reads only with ``allow_pickle=True``. ``low_cpu_mem_usage`` changes nothing: sdkit
    always builds models empty and fills them from the file.
    """
    for name, value in (("use_safetensors", use_safetensors), ("low_cpu_mem_usage", low_cpu_mem_usage)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{owner}: {name} must be True, False or None, got {value!r}.")
    if use_safetensors is False and not allow_pickle:
        raise ValueError(f"{owner}: use_safetensors=False asks for pickle weights, which can run code when "
                         f"loaded; sdkit reads .safetensors (leave use_safetensors out), or pickles only with "
                         f"allow_pickle=True.")
    return allow_pickle and use_safetensors is not True
