"""A Paddle GPU of a chosen compute capability, seen by the providers' availability checks (no GPU needed)."""
import paddle


def fake_paddle_gpu(monkeypatch, capability):
    """Make Paddle report one CUDA GPU of `capability` (e.g. (10, 0) for SM100), or none when it is None."""
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: capability is not None)
    monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 0 if capability is None else 1)
    monkeypatch.setattr(paddle.device.cuda, "get_device_capability", lambda *a: capability)
