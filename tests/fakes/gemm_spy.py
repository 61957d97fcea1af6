"""A provider spy for the method's tests: records the keyword options of every group_gemm_masked call."""
from backend import ops


def gemm_options_spy(monkeypatch) -> list:
    """ops.get_provider() wrapped for the test's duration: each group_gemm_masked call appends its keyword options
    (dict) to the returned list, then runs on the real provider; every other op goes straight through."""
    real = ops.get_provider()
    seen = []

    class Spy:
        name = real.name

        def __getattr__(self, op):
            fn = getattr(real, op)
            if op != "group_gemm_masked":
                return fn
            return lambda *args, **options: seen.append(options) or fn(*args, **options)
    monkeypatch.setattr(ops, "get_provider", lambda name=None: Spy())
    return seen
