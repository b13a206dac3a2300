"""Training: the model (owns its parameter count and FLOPs), the device and the step (runtime), the trainer
(train), several processes (distributed), a run's directory (rundir), the run store (store) and the optional
mirrors of metrics.jsonl in experiment trackers (loggers). ``cptlab.training.train.train`` is what ``cptlab
train`` calls."""
