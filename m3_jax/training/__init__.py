"""Training: optimizer (optim.py), train state (state.py), pure steps (step.py), loop (loop.py)."""
