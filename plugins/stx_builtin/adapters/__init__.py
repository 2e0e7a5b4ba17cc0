"""Built-in stx plugins: adapters."""
