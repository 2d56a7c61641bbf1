"""ptqconv's benchmark: one entry point, `python -m bench`, for every figure of speed, memory
and accuracy the README quotes (see bench/__main__.py for the options)."""
