"""Metrics as pure functions of scores and labels (numpy)."""
