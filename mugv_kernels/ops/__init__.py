"""Fused Triton ops, one family per module; each registers ``torch.ops.mugv.*``."""
