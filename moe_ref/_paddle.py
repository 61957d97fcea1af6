"""`paddle`, imported without its import-time "No ccache found" warning.

Paddle warns that ccache is missing; that only matters for C++ extensions, which this project
does not build. Every module of `moe_ref` that needs Paddle imports it from here, so the warning
stays out of notebooks whichever module comes first; `moe_ref` itself and `moe_ref.constants`
never import Paddle.
"""
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="No ccache found")
    import paddle  # noqa: F401 - re-exported

__all__ = ["paddle"]
