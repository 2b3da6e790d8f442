"""DICE: self-alignment with DPO implicit rewards. The algorithm and its engines, no Prefect."""

__version__ = "0.1.0"
