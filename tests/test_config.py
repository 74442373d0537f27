"""Config loading, overrides and validation."""

from __future__ import annotations

import re

import pytest

from jax_ensemble.config import PACKAGED_CONFIGS, config_hash, load_config, packaged_config_names
from jax_ensemble.errors import ConfigError


def test_default_yaml_and_overrides():
    cfg = load_config("default", ["lora.rank=8", "lora.alpha=16", "model.base_dtype=float32"])
    assert (cfg.name, cfg.lora.rank, cfg.lora.alpha, cfg.model.base_dtype) == ("default", 8, 16.0, "float32")
    assert cfg.model.source == "smollm2-135m"
    assert config_hash(cfg) == config_hash(load_config("default", ["lora.rank=8", "lora.alpha=16.0", "model.base_dtype=float32"]))
    assert config_hash(cfg) != config_hash(load_config("default"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rank=0", "lora.rank must be >= 1"),
        ("lora.rank=two", "must be int"),
        ("lora.dropout=1.5", "lora.dropout must be in"),
        ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
        ("model.compute_dtype=float16", "model.compute_dtype must be one of"),
        ("lora", "must look like key=value"),
        ("lora=3", "must be a mapping"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", [override])


def test_bad_yaml(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    path.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("affinity.solver=cg", "affinity.solver must be one of"),
        ("affinity.l2=0", "affinity.l2 must be > 0"),
        ("affinity.subset_fraction=1.5", "affinity.subset_fraction must be in"),
        ("affinity.num_subsets=0", "affinity.num_subsets must be >= 1"),
        ("clustering.method=kmeans", "clustering.method must be one of"),
        ("clustering.num_groups=-1", "clustering.num_groups must be >= 0"),
    ],
)
def test_bad_affinity_and_clustering_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", [override])
    cfg = load_config("default", ["affinity.l2=1e-2", "clustering.num_groups=3"])
    assert (cfg.affinity.l2, cfg.affinity.num_subsets, cfg.clustering.num_groups) == (1e-2, 50, 3)


def test_shipped_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    assert {"default", "tiny", "paper_llama31_8b_gpu"} <= set(packaged_config_names())
    monkeypatch.chdir(tmp_path)  # outside the checkout: names resolve inside the installed package
    by_name = load_config("tiny")
    assert config_hash(by_name) == config_hash(load_config("tiny.yaml"))
    assert config_hash(by_name) == config_hash(load_config(PACKAGED_CONFIGS / "tiny.yaml"))
    assert by_name.name == "tiny" and by_name != load_config("default")
    (tmp_path / "tiny.yaml").write_text("name: mine\nseed: 7\n")  # an existing path wins over a shipped name
    assert load_config("tiny.yaml").seed == 7
    with pytest.raises(ConfigError, match=re.escape("shipped configs, by name: " + ", ".join(packaged_config_names()))):
        load_config("tiyn")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/tiny.yaml")  # a path is never looked up by name


@pytest.mark.parametrize("name", packaged_config_names())
def test_every_shipped_config_is_valid(name):
    config = load_config(name)
    assert config.name == name
