"""Strict fakes of upstream's op packages (`blackwell_ops`, `fastdeploy.model_executor.ops.gpu`), by generation.

Made from FastDeploy's op definitions (PD_BUILD_STATIC_OP, pybind11 m.def) and, for the unpublished
`blackwell_ops`, from its call sites at #7053, develop and #7666: docs/upstream.md. Use `install_fakes`.
"""
from ._base import CALL_LOG, Call, CallLog
from ._modules import FD_OPS, install_fakes

__all__ = ["install_fakes", "CALL_LOG", "Call", "CallLog", "FD_OPS"]
