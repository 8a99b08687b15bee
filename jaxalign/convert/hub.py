"""Models by Hugging Face hub id: `org/name` (at a `revision`) -> a local snapshot directory.

Every place that takes a model path (convert, export, generate, model.path, reward.model,
eval) goes through `resolve`, so an id works wherever a directory does. A local path that
exists always wins over an id of the same spelling (`runs/smol` is a valid id too).

Only what a model needs is fetched (config, tokenizer and safetensors files: no pytorch
.bin, no GGUF, no README images). The hub cache is huggingface_hub's own
(`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub), shared with
transformers; with `HF_HUB_OFFLINE=1` the snapshot must already be in it. The environment
is read at each call, not when huggingface_hub was imported, so a caller (a test, a script)
may set it late.

A snapshot directory is named by its commit hash: `commit_of` reads it back, and a run
started from a hub model pins that hash in its description (checkpoint.describe_run).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

from jaxalign.config import JaxalignError, ModelConfig

log = logging.getLogger(__name__)

# What a Llama checkpoint directory needs (convert.hf reads safetensors only).
ALLOW_PATTERNS = ("config.json", "generation_config.json", "*.safetensors",
                  "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
                  "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")
# huggingface_hub's own rules (validate_repo_id): [org/]name of these characters, no '--',
# no '..', not starting or ending with '-' or '.'.
_ID = re.compile(r"^(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}


class HubError(JaxalignError):
    """A hub model cannot be found or fetched."""


def looks_like_id(name: str) -> bool:
    return (bool(_ID.match(name)) and "--" not in name and ".." not in name
            and not name.startswith((".", "-")) and not name.endswith((".", "-")))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def is_hub_id(name: str | Path) -> bool:
    """True when `name` names no existing local path and is spelled as a hub id."""
    text = str(name)
    return not Path(text).expanduser().exists() and looks_like_id(text)


def resolve(name: str | Path, revision: str | None = None, *, config_only: bool = False) -> Path:
    """A model path or hub id -> the local directory to read.

    An existing local path comes back as is (giving it a `revision` is an error: there is
    nothing to pin it to). A hub id is looked up in / fetched into the hub cache; anything
    else comes back as a path, for the reader to report as missing. `config_only`: fetch
    config.json alone (for what needs only the model's shape, e.g. `jaxalign plan`)."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise HubError(f"{text}: revision {revision!r} was given, but this is a local "
                           "path (a revision applies to hub model ids only)")
        return path
    if not looks_like_id(text):
        return path
    return _fetch_model(text, revision, config_only)


def _fetch_model(repo_id: str, revision: str | None, config_only: bool) -> Path:
    """config.json first, checked (an architecture or field we do not implement is refused
    before any weights download); then the tokenizer and side files, the index, and only the
    safetensors files the index names (a repo may also hold consolidated or other-format
    copies), or model.safetensors when there is no index."""
    cache, local_only = str(cache_dir()), offline()
    snap = _snapshot(repo_id, revision, cache, local_only, ("config.json",))
    where = f"hub model {repo_id} (revision {revision or 'main'})"
    try:
        ModelConfig.from_hf(json.loads((snap / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, JaxalignError) as e:
        raise HubError(f"{where}: {e}; no weights were downloaded") from None
    if config_only:
        return snap
    side = tuple(p for p in ALLOW_PATTERNS if "safetensors" not in p)
    # The later fetches ask for the commit the config came from: a branch moving meanwhile
    # cannot mix two checkpoints.
    revision = snap.name if _COMMIT.match(snap.name) else revision
    snap = _snapshot(repo_id, revision, cache, local_only, side + ("model.safetensors.index.json",))
    index = snap / "model.safetensors.index.json"
    if index.exists():
        shards = tuple(sorted(set(json.loads(index.read_text())["weight_map"].values())))
    else:
        shards = ("model.safetensors",)
    return _snapshot(repo_id, revision, cache, local_only, shards)


@functools.lru_cache(maxsize=None)
def _snapshot(repo_id: str, revision: str | None, cache: str, local_only: bool,
              patterns: tuple[str, ...]) -> Path:
    # Cached per process: a run resolves its base several times (load, describe, reference)
    # and each online call would ask the hub again.
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors

    rev = revision or "main"
    where = f"hub model {repo_id} (revision {rev})"
    try:
        out = snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                local_files_only=local_only, allow_patterns=list(patterns))
    except errors.LocalEntryNotFoundError:
        if local_only:
            raise HubError(f"{where}: not in the hub cache {cache}, and HF_HUB_OFFLINE=1 "
                           "forbids downloading it (no local directory of that name either); "
                           "fetch it once online, or point HF_HUB_CACHE at a cache that "
                           "holds it") from None
        raise HubError(f"{where}: cannot reach the hub and not in the hub cache {cache} "
                       "(no local directory of that name either)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: the hub has no such revision") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise HubError(f"{where}: no such model on the hub, or it needs a login "
                       f"({type(e).__name__}); no local directory of that name either") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{where}: download failed ({e})") from None
    out = Path(out)
    log.info("%s: %s", where, out)
    return out


def commit_of(name: str | Path, revision: str | None = None) -> str | None:
    """The commit hash a hub id resolves to (its snapshot folder's name); None for a local
    path. A run records it so that a later load reads the same weights."""
    if not is_hub_id(name):
        return None
    snapshot = resolve(name, revision).name
    return snapshot if _COMMIT.match(snapshot) else None


def clear_cache() -> None:
    """Forgets this process's resolutions: the next `resolve` of a branch reads it anew."""
    _snapshot.cache_clear()
