"""Train state, jitted steps and the one training loop."""
