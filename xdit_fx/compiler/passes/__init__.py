"""Graph passes and the one function that assembles them from a plan."""

from __future__ import annotations

from xdit_fx.compiler.passes.analysis import find_attention, find_transformer_blocks
from xdit_fx.compiler.passes.cache_regions import insert_cache
from xdit_fx.compiler.passes.normalize_attention import normalize_attention
from xdit_fx.compiler.passes.base import (GraphHistory, GraphPass, Mesh, PassContext, PassInfo, PassResult, check_pipeline,
                   graph_pass, run_pipeline)
from xdit_fx.compiler.passes.sequence_parallel import infer_token_dims, parallelize_attention, shard_sequence
from xdit_fx.compiler.passes.pipefusion import patch_sequence, pipefusion

def build_pipeline(plan) -> list[GraphPass]:
    """The passes a plan needs, in order."""
    # attention written by hand or as nn.MultiheadAttention becomes SDPA first, so analysis sees one form
    passes: list[GraphPass] = [normalize_attention, find_attention, find_transformer_blocks]
    if plan.sequence_parallel_degree > 1 and plan.pipefusion_degree == 1:
        # token dims need the attention sites (a space is sharded if it is a query and key sequence);
        # sharding must run before attention is rewritten (it marks which sites run on local shards)
        passes += [infer_token_dims, shard_sequence, parallelize_attention]
    if plan.pipefusion_degree > 1:
        # the graph of one patch (shard_sequence over patches), then the stage cut and the region; with
        # ulysses, one of M x ulysses chunks (pf_attention does the all-to-alls)
        passes += [infer_token_dims, patch_sequence, pipefusion]
    if plan.cache is not None:
        # last: the region it cuts out holds the blocks as the other passes left them (collectives included)
        passes.append(insert_cache)
    check_pipeline(passes)
    return passes


__all__ = [
    "GraphHistory", "GraphPass", "Mesh", "PassContext", "PassInfo", "PassResult",
    "build_pipeline", "check_pipeline", "graph_pass", "run_pipeline",
    "normalize_attention", "find_attention", "find_transformer_blocks", "infer_token_dims", "parallelize_attention", "shard_sequence",
    "insert_cache", "patch_sequence", "pipefusion",
]
