"""PyTorch torchvision ResNet50 train step, timed the same way as the JAX step.

The point of comparison users ask for: "is the JAX port as fast as what I'd get in
PyTorch on the same device?" torch is an optional dependency (test extra); without it
the comparison is skipped with a message.
"""
from __future__ import annotations

from typing import Dict, Optional

from medtransfer_jax.bench import common


def available() -> bool:
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
        return True
    except Exception:
        return False


def time_train_step(*, batch_size: int, image_size: int, dtype: str = "float32",
                    num_classes: int = 2, iters: int = 3, repeats: int = 2,
                    device: Optional[str] = None, depth: int = 50,
                    compile: bool = False) -> Dict[str, float]:
    """Times one Adam train step of torchvision ResNet (v1.5) in channels-last.

    ``dtype='bfloat16'`` uses torch.autocast (bf16 compute, fp32 master weights), the
    counterpart of the JAX mixed-precision step. ``compile=True`` wraps the model in
    ``torch.compile`` (its compilation lands in ``first_s``).
    """
    import torch
    import torchvision

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes)
    model = model.to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if compile:
        model = torch.compile(model)
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev).to(
        memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    def sync(loss):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    model.train()
    return common.time_fn(step, iters=iters, repeats=repeats, sync=sync)
