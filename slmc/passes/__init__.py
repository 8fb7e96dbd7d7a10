"""IR -> IR passes, one class per file (see compiler/pass_manager.py).

Importing this package registers every pass into the compiler's registry
(`compiler.pass_manager.PASSES`): whoever parses pass specs or replays a pipeline
imports `slmc.passes` first. Modules starting with `_` are helpers shared by passes;
no pass imports another pass.
"""

from . import (  # noqa: F401  (each module registers its pass)
    arch_gqa,
    arch_share_layers,
    canon_fuse_projections,
    canon_split_projections,
    canon_tie_embeddings,
    canon_untie_embeddings,
    kv_cache,
    moe_offload,
    quant_autoround,
    quant_awq,
    quant_gptq,
    quant_mixed,
    quant_requant,
    quant_rotate,
    quant_rtn,
)
