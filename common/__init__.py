"""What `integration`, `hub_tools` and the CLI share: errors, safe file writing, hashing, the package-free check.

Nothing here imports `linearpatch.integration` or `linearpatch.hub_tools`, so either side can import it.
"""
