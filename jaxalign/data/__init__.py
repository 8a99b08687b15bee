"""SFT and preference data: read datasets, normalise formats, tokenize with loss masks, pack,
mix, load.

The path from a config to batches: `build_sft_data(DataConfig, tokenizer, batch_size=...)`
-> `SFTData(train=TrainLoader, eval=EvalLoader | None, stats, ...)`. Batches are dicts of
numpy arrays; the contract is in `jaxalign.data.packing`. Preference pairs (reward models,
DPO): `build_preference_data(...)` -> `PreferenceData(train=PrefLoader, eval=PrefEvalLoader |
None, ...)`, batches with a pair axis (`jaxalign.data.preference`); `load_prompts` for generation.
"""

from jaxalign.data.config import DataConfig, DatasetSpec
from jaxalign.data.formats import Example, detect_format, normalise
from jaxalign.data.loader import EvalLoader, MixtureStream, TrainLoader
from jaxalign.data.packing import BATCH_KEYS, empty_batch, greedy_rows, write_row
from jaxalign.data.pipeline import SFTData, build_sft_data, load_tokenized
from jaxalign.data.preference import (PREF_BATCH_KEYS, PairSet, PairStats, PrefEvalLoader, PrefLoader,
                                      PreferenceData, PrefStats, build_preference_data,
                                      load_prompts, normalise_pairs)
from jaxalign.data.sources import DataError, Source, load_rows
from jaxalign.data.tokenize import DataStats, Encoder, SourceStats, TokenizedSet, tokenize_examples

__all__ = [
    "BATCH_KEYS", "DataConfig", "DataError", "DataStats", "DatasetSpec", "Encoder", "EvalLoader",
    "Example", "MixtureStream", "SFTData", "Source", "SourceStats", "TokenizedSet", "TrainLoader",
    "build_sft_data", "detect_format", "empty_batch", "greedy_rows", "load_rows", "load_tokenized",
    "normalise", "tokenize_examples", "write_row",
    "PREF_BATCH_KEYS", "PairSet", "PairStats", "PrefEvalLoader", "PrefLoader", "PrefStats",
    "PreferenceData", "build_preference_data", "load_prompts", "normalise_pairs",
]
