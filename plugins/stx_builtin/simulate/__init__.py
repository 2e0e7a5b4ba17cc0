"""Built-in stx plugins: simulate."""
