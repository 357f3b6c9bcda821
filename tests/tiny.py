"""The one tiny model of the tests, in every architecture."""

import dataclasses

from models import PRESETS, ModelConfig

# Chunks of 8 tokens, so that test lengths cross SSM and attention chunk edges; a hybrid of 2 layers
# is one GSS and one local-attention block.
TINY = dict(vocab_size=97, d_model=32, n_layers=2, d_gate=64, d_ssm=16, state_size=8, n_heads=4,
            ssm_chunk=8, attn_chunk=8, attn_every=2)  # fmt: skip


def tiny_config(arch: str, **overrides) -> ModelConfig:
    return dataclasses.replace(PRESETS["small-gss"], arch=arch, **{**TINY, **overrides})
