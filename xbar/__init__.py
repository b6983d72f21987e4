"""xbar: continual learning on ReRAM crossbar accelerators with 2-tier masks (XMA2)."""

__version__ = "0.1.0"
