"""Upstream FastDeploy's (PR #7053) names of the method's three paths, for readers coming from there.

`BlackwellGemmFusedMoeMethod` has one entry, `apply`, which picks the path from the layer and the
runner; this mixin adds upstream's three names, each checking that the layer is on that path.
"""
from __future__ import annotations


class UpstreamPathNames:
    """apply_ep_prefill (ht), apply_ep_decode (ll), apply_tp: `self.apply` under upstream's names."""

    def apply_ep_prefill(self, layer, x, routing, runner):
        """Upstream name of the ht path: `apply` with a runner and moe_phase "prefill"."""
        if layer.ep_mode != "ht":
            raise ValueError(f"layer: moe_phase is {layer.moe_phase!r}, apply_ep_prefill needs 'prefill'")
        return self.apply(layer, x, routing, runner)

    def apply_ep_decode(self, layer, x, routing, runner):
        """Upstream name of the ll path: `apply` with a runner and moe_phase "decode"."""
        if layer.ep_mode != "ll":
            raise ValueError(f"layer: moe_phase is {layer.moe_phase!r}, apply_ep_decode needs 'decode'")
        return self.apply(layer, x, routing, runner)

    def apply_tp(self, layer, x, routing):
        """Upstream name of the TP path: `apply` without a runner (ep_size 1)."""
        return self.apply(layer, x, routing, None)
