"""DyRate's learned rate predictor, its teacher-forced training pass and its training
(``dyrate-eval train-predictor``); the policy itself is ``methods/dyrate.py``."""
