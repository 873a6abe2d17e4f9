"""Mesh, logical-axis rules, multi-host runtime and global batches."""
