"""The built-in stx plugins. Each module registers through the `stx` entry-point group."""
