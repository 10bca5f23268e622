"""ibkr-statements: fetch, decrypt and archive IBKR statements delivered over sFTP."""

__version__ = "0.1.0"
