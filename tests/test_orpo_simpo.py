"""ORPO and SimPO through `jaxalign dpo` (dpo.loss_type: orpo | simpo) on the tiny model and the
synthetic preference set: no reference model is loaded, and training moves the held-out
length-normalised reward margin up."""

import jax
import pytest

from jaxalign.config import ConfigError
from jaxalign.train.dpo import DPOConfig, DPOOptions, load_dpo_models, run_dpo
from conftest import pref_config, read_metrics


@pytest.mark.slow  # trains and resumes whole runs
@pytest.mark.parametrize("loss_type, section", [
    ("orpo", {"beta": 0.5}),
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}),
])
def test_policy_only_objective_trains(prefs, tmp_path, loss_type, section):  # noqa: F811
    cfg = pref_config(DPOConfig, prefs, tmp_path / loss_type,
                  {"dpo": dict(section, loss_type=loss_type)}, steps=8, eval_every=2,
                  eval_batches=2)
    import jaxalign.sharding as sharding
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    models = load_dpo_models(cfg, mesh)
    # A full fine-tune, yet no frozen copy of the policy as reference.
    assert models.extra["ref_cfg"] is None and models.frozen["ref"] == {}
    run_dpo(cfg, devices=jax.devices()[:1])
    rows = [r for r in read_metrics(tmp_path / loss_type) if "eval/loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    first, last = rows[0], rows[-1]
    assert last["eval/loss"] < first["eval/loss"], (first, last)
    assert last["eval/rewards/margins"] > first["eval/rewards/margins"], (first, last)
    assert last["eval/rewards/accuracies"] >= first["eval/rewards/accuracies"]
    if loss_type == "orpo":
        assert last["eval/nll_loss"] < first["eval/nll_loss"]


@pytest.mark.parametrize("key, value", [("reference", "some/model"), ("average_logps", True),
                                        ("label_smoothing", 0.1)])
@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_policy_only_refuses_reference_options(loss_type, key, value):
    with pytest.raises(ConfigError, match=f"^dpo.{key}: loss_type '{loss_type}'"):
        DPOOptions(loss_type=loss_type, **{key: value})


@pytest.mark.parametrize("name", ["tiny_orpo", "tiny_simpo"])
def test_configs_parse(name):
    from pathlib import Path
    from jaxalign.config import from_dict, load_yaml
    cfg = from_dict(DPOConfig, load_yaml(str(Path(__file__).parents[1] / "configs" / f"{name}.yaml")))
    assert cfg.dpo.loss_type == name[5:] and not cfg.dpo.uses_reference
