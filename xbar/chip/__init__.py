"""The chip: its deployment state (what every cell holds), the chip forward, device models."""
