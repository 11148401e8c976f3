"""VAR's `models.helpers` names, for code written against the official package (docs/VAR_COMPAT.md): the seeded
samplers of `models/var_compat.py` and the blocks' drop path."""
from models.blocks import DropPath  # noqa: F401
from models.var_compat import gumbel_softmax_with_rng, sample_with_top_k_top_p_  # noqa: F401
