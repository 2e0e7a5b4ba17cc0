"""Built-in stx plugins: featurizers."""
