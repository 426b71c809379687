"""Fault injection: kill -9 mid-write, full disk, corrupt input, concurrent metrics writers."""
