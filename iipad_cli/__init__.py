"""iipad: one-for-all few-shot anomaly detection (IIPAD, ICLR 2025) as a command-line toolkit."""

__version__ = "0.1.0"
