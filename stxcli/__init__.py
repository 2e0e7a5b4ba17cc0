"""stx: carry a stellar-parameter model from one spectroscopic survey to another."""

__version__ = "0.1.0"
