"""Parity and throughput of engines against eager PyTorch references."""
