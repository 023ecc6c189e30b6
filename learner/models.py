"""The learner's models: loading a causal LM policy / reference, and the critic
(the policy's transformer trunk with a scalar value head).

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
