"""The stx command line: one module per command, one error boundary in :func:`main.main`."""
