"""Training: the model (owns its parameter count and FLOPs), the device and the step (runtime), the trainer
(train), several processes (distributed) and the run store (store). ``cptlab.training.train.train`` is what
``cptlab train`` calls."""
