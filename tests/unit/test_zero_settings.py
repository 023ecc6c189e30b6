"""DeepSpeed's ZeRO section: buffers sized by the model's hidden width at stage 3, defaults otherwise."""

from types import SimpleNamespace

from torch import nn

from learner.engine import zero_settings


class _Model(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden)
        self.proj = nn.Linear(hidden, hidden)


def test_stage_three_buffers_follow_the_hidden_width():
    settings = zero_settings(_Model(64), 3)
    # h = 64: h*h = 4096 elements per gradient bucket, weights under 10*h = 640 elements kept whole.
    assert settings == {"stage": 3, "reduce_bucket_size": 4096, "stage3_param_persistence_threshold": 640}


def test_a_wrapped_model_is_read_through_its_first_configured_module():
    wrapper = nn.Sequential(_Model(32), nn.Linear(32, 1))
    assert zero_settings(wrapper, 3)["reduce_bucket_size"] == 32 * 32


def test_other_stages_and_unconfigured_models_keep_deepspeed_defaults():
    assert zero_settings(_Model(64), 2) == {"stage": 2}
    assert zero_settings(nn.Linear(4, 4), 3) == {"stage": 3}
