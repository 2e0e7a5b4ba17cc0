"""Built-in stx plugins: readers."""
