"""The embedded models by name: their sizes follow from the spec alone, and `model.embedded` picks one."""

from __future__ import annotations

import typing

import pytest

from cluster.config import ConfigError, ModelConfig, advisories, from_dict
from flywheel.tiny_model import EMBEDDED_MODELS, TinyModelSpec, embedded_spec

VOCAB = 1008  # what the BPE trainer reaches on the synthetic corpus (target 1024)


def test_small_model_is_about_80m_parameters():
    # Per layer: q, o 768*768 = 589,824 each; k, v 768*256 = 196,608 each; gate, up, down
    # 768*2048 = 1,572,864 each; two norms 768 each: 6,292,992. Twelve layers 75,515,904,
    # plus embedding and lm_head 2 * 1008*768 = 1,548,288, plus the final norm 768.
    small = embedded_spec("small")
    assert small.num_parameters(VOCAB) == 77_064_960
    assert abs(small.num_parameters(VOCAB) - 80e6) <= 0.1 * 80e6
    assert small.head_dim == 64  # a head size vLLM's CPU attention supports


def test_tiny_spec_count_matches_the_built_model():
    from flywheel.tiny_model import count_parameters, ensure_embedded_model

    path = ensure_embedded_model("policy", embedded_spec("tiny"))  # cached; built once per machine
    assert embedded_spec("tiny") == TinyModelSpec()
    assert count_parameters(path) == TinyModelSpec().num_parameters(VOCAB) == 2_090_240


def test_config_names_match_the_registry_and_validate():
    assert set(typing.get_args(typing.get_type_hints(ModelConfig)["embedded"])) == set(EMBEDDED_MODELS)
    assert from_dict({}).model.embedded == "tiny"
    assert from_dict({}, ["model.embedded=small"]).model.embedded == "small"
    with pytest.raises(ConfigError, match="model.embedded: must be one of 'tiny', 'small', got 'huge'"):
        from_dict({}, ["model.embedded=huge"])
    with pytest.raises(ValueError, match="model.embedded must be one of tiny, small"):
        embedded_spec("huge")
    [note] = advisories(from_dict({}, ["model.embedded=small", "model.path=/tmp/m"]))
    assert "model.embedded=small is ignored" in note
