"""Data: readers, formats, governance, the synthetic world, and `data prepare`."""
