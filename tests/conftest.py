"""Shared pytest setup.

Triton picks interpreter or compiler when a function is decorated, and its own standard library
is decorated when `triton` is first imported. So the Triton kernels (tests/test_triton_provider.py,
CPU-only CI) need TRITON_INTERPRET=1 before anything imports triton. It is set here just long
enough to import triton and our kernels, then removed again, so that provider selection in every
other test (`FD_MOE_OPS_PROVIDER=auto` skips triton without a GPU) is unchanged. Set
TRITON_INTERPRET yourself (0 on a GPU machine) to keep this hook out.
"""
import os


def _decorate_triton_kernels_for_the_interpreter() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import triton.experimental.gluon  # noqa: F401  (the interpreter imports it lazily; it checks the flag)
        import backend.ops.triton.kernels  # noqa: F401
    except ImportError:
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


_decorate_triton_kernels_for_the_interpreter()
