"""Built-in stx plugins: heads."""
