"""The paper's study: its constants (paper), the scales of the lab (scales), its experiments as run builders
(experiments), its real-scale recipes (recipes) and the runner that trains a set of runs (runner)."""
