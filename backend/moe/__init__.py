"""The fused-MoE layer and its Blackwell method, in data-flow order:

    layer.py             FusedMoE: sizes, ranks, routing options, weights; forward -> quant method
    blackwell_method.py  BlackwellGemmFusedMoeMethod: FastDeploy develop's hooks; apply (ht, ll, tp) by generation
    quantize.py          its quantization outside the fused ops: weights at load, tokens before dispatch
    memory.py            forward_buffer_bytes: the buffers of one forward, ours next to upstream's
    upstream.py          what the method reads of upstream's FusedMoE (load tracker, routing attributes, sizes)
    ep_runner.py         EPRunner interface, SingleRankEPRunner, InProcessEPGroup + run_ranks
    ep_distributed.py    the same interface over paddle.distributed (separate module)
    ep_index.py          the ht exchange's index formulas (numpy), shared by both runners

Nothing is imported here eagerly: `import backend.moe.layer` etc. (no import-time work).
"""
