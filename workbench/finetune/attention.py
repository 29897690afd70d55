"""Which fused attention kernel the GPU training step uses: timed once per process and shape, or chosen."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_SDPA_PICKS: dict = {}


def _fastest_attention(device, heads: int, tokens: int, head_dim: int, batch: int = 32) -> str:
    """Time forward+backward of bf16 attention at the vision tower's shape with flash and cuDNN
    kernels; return the fastest whose output agrees with flash (once per process and shape)."""
    key = (str(device), heads, tokens, head_dim, batch)
    if key in _SDPA_PICKS:
        return _SDPA_PICKS[key]
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    times, ref = {}, None
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:  # events record on the current device's stream: make it `device`'s
            with torch.cuda.device(device), sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v)
                if ref is None:
                    ref = out.detach()
                elif not torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2):
                    continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                for i in range(8):
                    if i == 3:
                        start.record()
                    F.scaled_dot_product_attention(q, k, v).sum().backward()
                end.record()
                end.synchronize()
                times[name] = start.elapsed_time(end)
        except RuntimeError:  # kernel not available for this shape / build
            continue
    _SDPA_PICKS[key] = min(times, key=times.get) if times else "default"
    return _SDPA_PICKS[key]


def attention_context(clip, cfg, device: torch.device):
    """Context manager that puts the chosen SDPA kernel first (others stay as fallbacks, e.g. for
    the text tower's masked attention); a no-op on CPU or with ``attention="default"``."""
    if device.type != "cuda" or cfg.attention == "default":
        return nullcontext, "default"
    name = cfg.attention
    if name == "auto":
        v = clip.visual
        try:
            blk = v.transformer.resblocks[0]
            heads, width = blk.attn.num_heads, blk.attn.embed_dim
            tokens = v.grid_size[0] * v.grid_size[1] + 1
            name = _fastest_attention(device, heads, tokens, width // heads)
        except AttributeError:  # not an open_clip ViT: leave the choice to PyTorch
            return nullcontext, "default"
    if name == "default":
        return nullcontext, name
    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}
    order = [kinds[name]] + [b for b in (*kinds.values(), SDPBackend.MATH) if b != kinds[name]]
    try:
        sdpa_kernel(order, set_priority=True)
    except TypeError:  # older PyTorch: no priorities; flash/cuDNN are its defaults anyway
        return nullcontext, "default"
    return (lambda: sdpa_kernel(order, set_priority=True)), name
