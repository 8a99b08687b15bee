"""Models by Hugging Face hub id: `org/name` (at a `revision`) -> a local snapshot directory.

Every place that takes a model path (convert, export, generate, model.path, reward.model,
eval) goes through `resolve`, so an id works wherever a directory does. A hub model is
named explicitly, `hf://org/name`: a bare `org/name` is a local path, and one that does not
exist is refused naming it (a typo or the wrong working directory must not load someone
else's weights and chat template from the hub).

Only what a model needs is fetched, and only from the repository's top level: first its
config.json, which must describe a model we implement (else nothing more is fetched), then its
tokenizer files and safetensors index, then exactly the safetensors files that index names (or `model.safetensors` without one); no pytorch .bin, no GGUF, no README
images, no other `*.safetensors` (an `original/` or `onnx/` folder). The hub cache is huggingface_hub's own
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

HUB_PREFIX = "hf://"
# What a Llama checkpoint directory needs besides its weights (top-level names only: no
# wildcard, so nothing in a subfolder matches); the weights come second, by name, from the
# index (`_weight_files`).
ALLOW_PATTERNS = ("config.json", "generation_config.json", "model.safetensors.index.json",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "tokenizer.model", "chat_template.jinja", "chat_template.json",
                  "added_tokens.json", "vocab.json", "merges.txt")
INDEX = "model.safetensors.index.json"
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


def repo_id(name: str | Path) -> str | None:
    """`org/name` of an `hf://org/name`; None for a local path. A malformed id after the
    prefix is an error naming it."""
    text = str(name)
    if not text.startswith(HUB_PREFIX):
        return None
    rid = text[len(HUB_PREFIX):]
    if not looks_like_id(rid):
        raise HubError(f"{text}: not a hub model id (expected {HUB_PREFIX}org/name)")
    return rid


def is_hub_id(name: str | Path) -> bool:
    """True when `name` is written as a hub model, `hf://org/name`."""
    return repo_id(name) is not None


def resolve(name: str | Path, revision: str | None = None, *, config_only: bool = False) -> Path:
    """A model path or `hf://` hub id -> the local directory to read.

    A local path comes back as is (giving it a `revision` is an error: there is nothing to
    pin it to); one that does not exist but is spelled like a hub id is refused, naming it
    and the explicit form. A hub id is looked up in / fetched into the hub cache.
    `config_only`: fetch config.json alone (for what needs only the model's shape, e.g.
    `jaxalign plan`)."""
    text = str(name)
    rid = repo_id(text)
    if rid is not None:
        return _snapshot(rid, revision, str(cache_dir()), offline(), config_only)
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise HubError(f"{text}: revision {revision!r} was given, but this is a local "
                           f"path (a revision applies to {HUB_PREFIX} hub models only)")
        return path
    if looks_like_id(text) and "/" in text:
        raise HubError(f"{text}: no such local directory (from {Path.cwd()}); a model on the "
                       f"hub is named {HUB_PREFIX}{text}")
    return path


def _weight_files(snapshot: Path, where: str) -> list[str]:
    """The safetensors files the index names (top level only), or model.safetensors."""
    if not (snapshot / "config.json").is_file():
        raise HubError(f"{where}: the repository has no config.json at its top level")
    index = snapshot / INDEX
    if not index.is_file():
        return ["model.safetensors"]
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as e:
        raise HubError(f"{where}: {INDEX} is not a safetensors index ({e})") from None
    bad = [n for n in names if "/" in n or "\\" in n or not n.endswith(".safetensors")]
    if bad:
        raise HubError(f"{where}: {INDEX} names {bad[0]!r}; only top-level .safetensors "
                       "files are read")
    return names


def _check_config(snapshot: Path, where: str) -> None:
    try:
        ModelConfig.from_hf(json.loads((snapshot / "config.json").read_text()))
    except (OSError, ValueError, JaxalignError) as e:
        raise HubError(f"{where}: {e}; no weights were downloaded") from None


@functools.lru_cache(maxsize=None)
def _snapshot(repo_id: str, revision: str | None, cache: str, local_only: bool,
              config_only: bool) -> Path:
    # Cached per process: a run resolves its base several times (load, describe, reference)
    # and each online call would ask the hub again.
    rev = revision or "main"
    where = f"hub model {HUB_PREFIX}{repo_id} (revision {rev})"
    first = _download(repo_id, revision, cache, local_only, ["config.json"], where)
    if config_only:
        return first
    # An architecture or config field we do not implement is refused before anything else
    # is fetched.
    _check_config(first, where)
    # The rest pinned to the commit the first call resolved (a branch may move): the side
    # files and the index, then the weights the index names.
    commit = first.name if _COMMIT.match(first.name) else revision
    out = _download(repo_id, commit, cache, local_only, list(ALLOW_PATTERNS), where)
    out = _download(repo_id, commit, cache, local_only, _weight_files(out, where), where)
    log.info("%s: %s", where, out)
    return out


def _download(repo_id: str, revision: str | None, cache: str, local_only: bool,
              patterns: list[str], where: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors
    try:
        out = snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                local_files_only=local_only, allow_patterns=patterns)
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
    log.debug("%s: %s", where, out)
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
