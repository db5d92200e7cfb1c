"""`result_cache`: keys that see every byte and parameter, and entries that never read as
valid when they are not (the stage's reuse is tested in pipelines/synthetic_generation)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml

from fedmic_pipeline.result_cache import ResultCache, content_key

from fixtures_pipelines import PROJECT_ROOT as ROOT


def test_keys_see_bytes_dtype_shape_and_parameters_but_not_mapping_order():
    images = np.arange(12, dtype=np.uint8).reshape(3, 4)
    base = content_key("generator", {"a": images, "b": 1}, {"lr": 0.002})
    assert base == content_key("generator", {"b": 1, "a": images.copy()}, {"lr": 0.002})
    changed_pixel = images.copy()
    changed_pixel[0, 0] += 1
    variants = [
        content_key("generator", {"a": changed_pixel, "b": 1}, {"lr": 0.002}),
        content_key("generator", {"a": images.astype(np.int64), "b": 1}, {"lr": 0.002}),
        content_key("generator", {"a": images.reshape(4, 3), "b": 1}, {"lr": 0.002}),
        content_key("generator", {"a": images, "b": 1}, {"lr": 0.001}),
        content_key("quality", {"a": images, "b": 1}, {"lr": 0.002}),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_put_then_get_round_trips_and_bad_entries_are_misses(tmp_path, caplog):
    cache = ResultCache(tmp_path / "cache")
    key = content_key("thing", 1)
    assert cache.get("thing", key) is None
    value = {"weights": torch.arange(4.0), "summary": {"loss": 0.5, "devices": [0, 2], "note": None}}
    cache.put("thing", key, value)
    again = cache.get("thing", key)
    assert torch.equal(again["weights"], value["weights"]) and again["summary"] == value["summary"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"thing-{key[:40]}.pt"]  # no temporary file left

    entry = tmp_path / "cache" / f"thing-{key[:40]}.pt"
    entry.write_bytes(entry.read_bytes()[:50])  # an interrupted copy, say
    with caplog.at_level(logging.WARNING, logger="fedmic_pipeline.result_cache"):
        assert cache.get("thing", key) is None
    assert "unreadable" in caplog.text
    cache.put("thing", key, value)  # recomputed and overwritten
    assert cache.get("thing", key) is not None
    assert ResultCache(None).get("thing", key) is None  # no directory: never hits, never writes


def test_a_cache_dir_that_is_not_a_path_is_refused_naming_the_key():
    from fedmic_pipeline.configuration import validate_parameters

    synthetic = yaml.safe_load((ROOT / "conf/base/parameters_synthetic_generation.yml").read_text())["synthetic"]
    with pytest.raises(Exception, match="cache_dir"):
        validate_parameters({"synthetic": {**synthetic, "cache_dir": 3}}, ["synthetic"])
