"""The fused-MoE layer and its Blackwell method, in data-flow order:

    layer.py             FusedMoE: sizes, ranks, routing options, weights; forward -> quant method
    blackwell_method.py  BlackwellGemmFusedMoeMethod: create / process weights / apply (ht, ll, tp)
    quantize.py          its quantization outside the fused ops: weights at load, tokens before dispatch
    memory.py            forward_buffer_bytes: the buffers of one forward, ours next to upstream's
    upstream.py          upstream's names of the three paths (a mixin of the method)
    ep_runner.py         EPRunner interface, SingleRankEPRunner, InProcessEPGroup + run_ranks
    ep_distributed.py    the same interface over paddle.distributed (separate module)

Nothing is imported here eagerly: `import backend.moe.layer` etc. (no import-time work).
"""
