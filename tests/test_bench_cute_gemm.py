"""benchmarks/bench_cute_gemm.py's --configs names (CPU: no kernel runs)."""
from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_cute_gemm", reason="benchmark helpers need torch")


def test_config_names_map_to_launcher_configs():
    got = bench.parse_configs("bn192_cl2_s3,bn128_cl1_v1,bn192_cl2_pr")
    assert got == {"cute_bn192_cl2_s3": dict(bn=192, cluster_m=2, sa_tma=True, tma_store=True, stages=3),
                   "cute_bn128_cl1_v1": dict(bn=128, cluster_m=1, sa_tma=False, tma_store=False),
                   "cute_bn192_cl2_pr": dict(bn=192, cluster_m=2, sa_tma=True, tma_store=True, partial_smem=False)}


@pytest.mark.parametrize("bad", ["bn256_cl2", "bn128_cl4", "bn128_cl2_v2", "128_cl2"])
def test_bad_config_name_is_named(bad):
    with pytest.raises(ValueError, match=bad):
        bench.parse_configs(bad)
