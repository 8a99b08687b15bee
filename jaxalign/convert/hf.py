"""Hugging Face checkpoints <-> jaxalign params, through each family's declarative table.

Each row (`jaxalign.families.base.Row`) names an HF key (with `{i}` for the layer index), our
param path, and a transform that is applied forwards on import and backwards on export; a
fused row (Phi-3's qkv_proj) splits one HF tensor into several of ours and joins them back.
Per-layer HF tensors are stacked on a leading 'layers' axis on import and unstacked on export.

Every family's <Family>ForCausalLM and <Family>ForSequenceClassification (reward models:
`score.weight` instead of `lm_head.weight`, `cfg.num_labels > 0`) are read and written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxalign import families, rundir
from jaxalign.config import JaxalignError, ModelConfig, num_labels_from_hf
from jaxalign.families.base import (  # noqa: F401 (the row vocabulary, re-exported)
    IDENTITY, KV_BIAS, KV_PROJ, O_PROJ, Q_BIAS, Q_PROJ, TRANSPOSE, FusedRow, Row, Transform)
from jaxalign.models import functional

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
# Tensors some HF checkpoints carry that hold no weights of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(JaxalignError):
    """An HF checkpoint directory cannot be read exactly."""


# The Llama rows; each family's are `families.get(name).rows`.
TABLE = families.FAMILIES["llama"].rows


def active_rows(cfg: ModelConfig) -> list[Row | FusedRow]:
    return families.get(cfg.family).active_rows(cfg)


def hf_keys(row: Row, cfg: ModelConfig) -> list[str]:
    return [row.hf_key.format(i=i) for i in range(cfg.num_layers)] if row.per_layer else [row.hf_key]


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- reading

class TensorFile:
    """One safetensors file opened by the `safetensors` package (numpy framework: bf16 comes
    back as ml_dtypes.bfloat16). Only the header is read on opening; `get` reads one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        try:
            return self._file.get_tensor(key)
        except (SafetensorError, TypeError, ValueError) as e:  # e.g. a dtype numpy cannot hold
            raise CheckpointError(f"{self.path}: tensor {key!r} cannot be read ({e})") from None

    def close(self) -> None:
        self._file.__exit__(None, None, None)


def write_tensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """One safetensors file, written beside and renamed, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})   # transformers reads "pt" files
    # safetensors creates its file owner-only (0600); an export is for sharing, so it gets
    # the mode any other file the user writes gets (0666 less the umask).
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0o022)   # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


@dataclasses.dataclass
class HFCheckpoint:
    """An HF Llama directory, opened: its config and where each tensor lives."""
    path: Path
    hf_config: dict[str, Any]
    cfg: ModelConfig
    files: dict[str, TensorFile]   # tensor key -> file holding it

    def close(self) -> None:
        for f in set(self.files.values()):
            f.close()


def read_hf_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file}: missing (not a Hugging Face model directory?)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None


def open_hf(path: str | Path, **runtime) -> HFCheckpoint:
    """Opens and validates an HF directory; reads only headers. `runtime` sets dtype etc."""
    path = Path(path)
    hf_config = read_hf_config(path)
    try:
        cfg = ModelConfig.from_hf(hf_config, **runtime)
    except JaxalignError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None

    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        opened = {}
        for name in sorted(set(weight_map.values())):
            if not (path / name).exists():
                raise CheckpointError(f"{path / name}: shard listed in {index.name} does not exist")
            opened[name] = TensorFile(path / name)
        held = {name: set(f.keys()) for name, f in opened.items()}
        for key, name in weight_map.items():
            if key not in held[name]:
                raise CheckpointError(f"{index}: tensor {key!r} is listed in {name}, "
                                      "which does not hold it")
        files = {k: opened[v] for k, v in weight_map.items()}
    elif (path / "model.safetensors").exists():
        f = TensorFile(path / "model.safetensors")
        files = {k: f for k in f.keys()}
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are read)")
    ckpt = HFCheckpoint(path, hf_config, cfg, files)
    _validate(ckpt)
    return ckpt


def expected_hf_shape(row: Row | FusedRow, cfg: ModelConfig) -> tuple[int, ...]:
    dummies = []
    for path in row.paths:
        ours = _get(functional.abstract_params(cfg), path).shape
        dummies.append(np.zeros(ours[1:] if row.per_layer else ours, np.int8))
    return row.to_hf(tuple(dummies), cfg).shape


def _validate(ckpt: HFCheckpoint) -> None:
    cfg, expected = ckpt.cfg, set()
    for row in active_rows(cfg):
        shape = expected_hf_shape(row, cfg)
        for key in hf_keys(row, cfg):
            expected.add(key)
            if key not in ckpt.files:
                raise CheckpointError(f"{ckpt.path}: tensor {key!r} is missing "
                                      f"(expected shape {shape} for this config.json)")
            got = ckpt.files[key].shape(key)
            if got != shape:
                raise CheckpointError(f"{ckpt.files[key].path}: tensor {key!r} has shape {got}, "
                                      f"expected {shape} from config.json")
    extra = sorted(k for k in ckpt.files if k not in expected and not k.endswith(_IGNORED_SUFFIXES))
    if cfg.num_labels == 0 and cfg.tie_word_embeddings and "lm_head.weight" in extra:
        # Some writers store the tied head anyway. transformers then uses the stored head
        # (it unties), so we may only drop it when it equals the embedding.
        head = ckpt.files["lm_head.weight"].get("lm_head.weight")
        embed = ckpt.files["model.embed_tokens.weight"].get("model.embed_tokens.weight")
        if head.shape != embed.shape or not np.array_equal(head, embed):
            raise CheckpointError(f"{ckpt.path}: config.json ties the embeddings, but tensor "
                                  "'lm_head.weight' differs from 'model.embed_tokens.weight'")
        extra.remove("lm_head.weight")
    if extra:
        raise CheckpointError(f"{ckpt.path}: unexpected tensor(s) {extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''} not used by a {cfg.family} "
                              "model with this config.json (wrong architecture or config?)")


def load_params(ckpt: HFCheckpoint, mesh: Mesh | None = None) -> functional.Params:
    """Reads every tensor once and places it straight onto its target sharding.

    Only one of our params is ever held on the host at a time; each device then receives
    just its own slice of it (`make_array_from_callback`), also across processes.
    """
    cfg = ckpt.cfg
    pdtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    shardings = functional.param_shardings(cfg, mesh) if mesh is not None else None
    params: dict = {}
    for row in active_rows(cfg):
        arrays = [row.to_ours(ckpt.files[k].get(k), cfg) for k in hf_keys(row, cfg)]
        for n, path in enumerate(row.paths):
            part = [a[n] for a in arrays]
            host = (np.stack(part) if row.per_layer else part[0]).astype(pdtype)
            if shardings is None:
                value = jax.device_put(host)
            else:
                value = jax.make_array_from_callback(host.shape, _get(shardings, path),
                                                     lambda idx, h=host: h[idx])
            _set(params, path, value)
            del part, host
        del arrays
    return params


def load(path: str | Path, mesh: Mesh | None = None, **runtime):
    """HF directory -> (ModelConfig, params, hf_config dict)."""
    ckpt = open_hf(path, **runtime)
    try:
        return ckpt.cfg, load_params(ckpt, mesh), ckpt.hf_config
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- writing

def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def hf_tensors(cfg: ModelConfig, params: functional.Params, dtype: np.dtype | None = None):
    """Yields (hf_key, numpy array) for every tensor of the HF layout."""
    for row in active_rows(cfg):
        hosts = [_to_host(_get(params, path)) for path in row.paths]
        if dtype is not None:
            hosts = [h.astype(dtype) for h in hosts]
        if row.per_layer:
            for i, key in enumerate(hf_keys(row, cfg)):
                yield key, np.ascontiguousarray(row.to_hf(tuple(h[i] for h in hosts), cfg))
        else:
            yield row.hf_key, np.ascontiguousarray(row.to_hf(tuple(hosts), cfg))


def hf_config_for(cfg: ModelConfig, base: dict[str, Any] | None = None, *,
                  pad_token_id: int | None = None) -> dict[str, Any]:
    """config.json content: the source checkpoint's (kept verbatim) or one built from cfg.

    A classifier (num_labels > 0) made from a causal LM gets the classifier's fields on top
    of its base config: architectures, num_labels, id2label, label2id, and the pad_token_id
    it scores by (`cfg.pad_token_id`: transformers finds each row's scored token by it, so
    it must be the one jaxalign used). `pad_token_id`, when given, is written where cfg
    names none (`save` insists that a classifier has one).
    """
    if base is not None:
        config = dict(base)
        base_labels = num_labels_from_hf(config)
        if cfg.num_labels == 0 and base_labels > 0:
            raise CheckpointError(f"the model is a causal LM but its source config.json is a "
                                  f"{families.get(cfg.family).classifier}; export it without hf_config")
        if cfg.num_labels > 0 and base_labels != cfg.num_labels:
            config.update(_classifier_fields(cfg))
    else:
        config = _config_from_cfg(cfg)
        if cfg.num_labels > 0:
            config.update(_classifier_fields(cfg))
    if cfg.num_labels > 0 and cfg.pad_token_id is not None:
        config["pad_token_id"] = int(cfg.pad_token_id)
    elif pad_token_id is not None:
        config["pad_token_id"] = int(pad_token_id)
    return config


def _classifier_fields(cfg: ModelConfig) -> dict[str, Any]:
    # What transformers writes (id2label / label2id), plus num_labels for other readers.
    num_labels = cfg.num_labels
    labels = [f"LABEL_{i}" for i in range(num_labels)]
    return {"architectures": [families.get(cfg.family).classifier], "num_labels": num_labels,
            "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)}}


def _config_from_cfg(cfg: ModelConfig) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    family = families.get(cfg.family)
    return {
        "architectures": [family.causal_lm[0]], "model_type": family.model_types[0],
        "hidden_act": cfg.hidden_act,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias, "dtype": cfg.param_dtype,
        **({"pad_token_id": cfg.pad_token_id} if cfg.pad_token_id is not None else {}),
        **family.config_keys(cfg),
    }


def save(out_dir: str | Path, cfg: ModelConfig, params: functional.Params, *,
         hf_config: dict[str, Any] | None = None, source_dir: str | Path | None = None,
         max_shard_bytes: int = 5 * 2**30, pad_token_id: int | None = None,
         dtype: str | None = None) -> Path:
    """Writes an HF directory that `AutoModelForCausalLM.from_pretrained` loads
    (`AutoModelForSequenceClassification` for a classifier / reward model, num_labels > 0).

    Tensors are written in `dtype` ("float32" / "bfloat16") when given, which config.json then
    names; else in the dtype named by the config (`dtype` / `torch_dtype`), so an fp32 or
    bf16 checkpoint comes back in its own precision. Tokenizer files, chat
    template and generation_config.json are copied from `source_dir` when given.
    A classifier needs `pad_token_id` in its config: the argument, else the config's, else
    the pad token of the tokenizer in `source_dir`; with none of them, nothing is written.
    Only process 0 writes; all processes must call this (the gather is collective).
    `out_dir` is replaced whole (`rundir.replacing`): refused when it holds files jaxalign
    did not write or overlaps `source_dir`.
    """
    out = Path(out_dir)
    config = hf_config_for(cfg, hf_config, pad_token_id=pad_token_id)
    if cfg.num_labels > 0:
        _require_pad_token(config, source_dir)
    if dtype is not None:
        # transformers 5 reads `dtype`, 4.x `torch_dtype`: a source's stale one must not stay.
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    dtype_str = config.get("dtype") or config.get("torch_dtype") or cfg.param_dtype
    dtype = np.dtype(jax.numpy.dtype(dtype_str))
    with rundir.replacing(out, "model export", sources=[source_dir]) as tmp:
        if _write_hf(tmp, cfg, params, config, dtype, max_shard_bytes, source_dir):
            log.info("wrote %s (%s)", out, dtype)
    return out


def _write_hf(out: Path, cfg: ModelConfig, params, config: dict, dtype, max_shard_bytes: int,
              source_dir) -> bool:
    """The tensors (gathered on every process), config.json and side files into `out`
    (process 0 only: True when it wrote)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, arr in hf_tensors(cfg, params, dtype):
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    if jax.process_index() != 0:
        return False
    if len(shards) == 1:
        write_tensors(shards[0], out / "model.safetensors")
    else:
        weight_map, total = {}, 0
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            write_tensors(shard, out / name)
            weight_map.update({k: name for k in shard})
            total += sum(a.nbytes for a in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    # transformers' own layout: indent 2, sorted keys.
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_side_files(source_dir, out, config)
    return True


def _require_pad_token(config: dict[str, Any], source_dir: str | Path | None) -> None:
    """transformers' LlamaForSequenceClassification scores the rightmost token != pad_token_id
    and refuses batches > 1 without one, so an exported classifier must name it. A model
    loaded by `checkpoint.load_model` has one already (the config's, else its tokenizer's),
    the same jaxalign scores by; the fallbacks here serve hand-built params."""
    if config.get("pad_token_id") is None:
        config["pad_token_id"] = _tokenizer_pad_id(source_dir)
    if config["pad_token_id"] is None:
        raise CheckpointError(
            "exporting a sequence classifier / reward model needs a pad_token_id (transformers "
            "finds each row's last token by it), but neither the config nor the tokenizer "
            f"{'in ' + str(source_dir) + ' ' if source_dir else ''}defines one: pass "
            "pad_token_id=... to convert.hf.save (e.g. the tokenizer's eos id), or set "
            "pad_token_id in the source config.json")


def _tokenizer_pad_id(source_dir: str | Path | None) -> int | None:
    # The tokenizer's own pad token: not jaxalign.tokenizer's pad = eos fallback, which
    # transformers' users would not get from these files.
    if source_dir is None or not (Path(source_dir) / "tokenizer.json").exists():
        return None
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(source_dir)).pad_token_id


def copy_side_files(source_dir: str | Path | None, out: Path, config: dict[str, Any]) -> None:
    src = Path(source_dir) if source_dir is not None else None
    if src is not None and src.resolve() != out.resolve():
        for name in TOKENIZER_FILES + ("generation_config.json",):
            if (src / name).exists():
                shutil.copyfile(src / name, out / name)
    if not (out / "generation_config.json").exists():
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if config.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


def num_params(params: functional.Params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
