"""Infrastructure every stage uses: atomic file io, progress bars, memory checks, tables."""
