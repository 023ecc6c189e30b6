"""The learner's models: loading a causal LM policy / reference, and the critic:
a copy of the policy's transformer trunk with a scalar value head (`Critic`), or
a value head on the policy's own trunk (`add_value_head`).

transformers is imported inside the functions so that importing this module
stays cheap.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def load_causal_lm(path: str, dtype: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    # Training reads every position's logits; a cache would only cost memory.
    model.config.use_cache = False
    return model


class Critic(nn.Module):
    """V(s_t) for every position: the LM's trunk plus a linear head to one scalar.

    Initialised from the policy's weights (the usual choice when no reward
    model trunk is given), with a zero head so the first values are 0 and the
    first advantages are the plain returns.
    """

    def __init__(self, path: str, dtype: str):
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        # The checkpoint's lm_head is not part of the trunk; its "unexpected key" report is noise here.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.trunk = AutoModel.from_pretrained(path, dtype=DTYPES[dtype])
        finally:
            hf_logging.set_verbosity(verbosity)
        self.trunk.config.use_cache = False
        self.value_head = nn.Linear(self.trunk.config.hidden_size, 1, dtype=DTYPES[dtype])
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids=None):
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, L, H)
        return self.value_head(hidden).squeeze(-1)  # (B, L)


# The attribute (and parameter-name prefix) of a value head carried by the policy itself.
VALUE_HEAD = "value_head"


def is_value_head(name: str) -> bool:
    """Whether a parameter name of the policy belongs to its own value head (not a Hugging Face weight)."""
    return name.startswith(VALUE_HEAD + ".")


def add_value_head(model: nn.Module) -> nn.Module:
    """The critic on the policy's own trunk (learner.critic_trunk=shared): a zero-initialised linear
    head to one scalar, `model.value_head`, applied to the trunk's last hidden state.

    A forward hook on the trunk (`model.base_model`) applies it during every forward of the
    model and leaves the values (B, L) in `model.last_values`; the logits come out as usual.
    The head is thus called inside the model's own forward, where DeepSpeed's ZeRO-3 hooks
    gather its weights in the same order at every pass. Its parameters are named `value_head.*`
    (`is_value_head`), which the weight sync and Hugging Face export leave out.
    """
    hidden = model.config.hidden_size
    dtype = next(model.parameters()).dtype
    head = nn.Linear(hidden, 1, dtype=dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    setattr(model, VALUE_HEAD, head)
    model.last_values = None

    def record_values(_trunk, _inputs, output) -> None:
        model.last_values = head(output.last_hidden_state).squeeze(-1)

    model.base_model.register_forward_hook(record_values)
    return model
