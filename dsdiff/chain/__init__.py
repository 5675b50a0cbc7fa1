"""The run: the chain of stages (stages.py), the run record (runs.py), loggers and callbacks (runtime.py), self-training
(selftrain.py) and the Hydra config plumbing the entry points share (config.py)."""
