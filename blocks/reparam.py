"""Structural re-parameterisation for inference.

Blocks that train with parallel linear branches (Slide attention's fixed shift kernels plus a
learnable depthwise conv, Pan et al., CVPR 2023, https://arxiv.org/abs/2304.04237) expose a
``reparameterize()`` method that folds them into one equivalent layer; outputs are unchanged. This
walks a model and calls every such method, the RepVGG-style "convert after training" step.
"""

from __future__ import annotations

from torch import nn


def reparameterize(module: nn.Module) -> nn.Module:
    """Call ``.reparameterize()`` on ``module`` and every submodule that has one, in place; return ``module``.

    Children are merged before their parents (post-order), so a parent that folds its children's
    weights sees them already merged. The list of modules is taken before any call, so a method
    that replaces its own submodules does not disturb the walk.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    todo: list[nn.Module] = []
    seen: set[int] = set()  # a module shared by two parents is merged once

    def visit(m: nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        for child in m.children():
            visit(child)
        if callable(getattr(m, "reparameterize", None)):
            todo.append(m)

    visit(module)
    for m in todo:
        m.reparameterize()
    return module
