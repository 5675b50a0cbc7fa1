"""The ground floor, with no dsdiff imports: atomic files, progress lines, config helpers, the user-facing error type."""
