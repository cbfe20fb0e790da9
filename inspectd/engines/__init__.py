"""Model side of inspectd: shared preprocessing, the bundle format, training, runtime backends.

Modules here that the daemon uses (preprocess, bundle, runtime) never import torch;
training modules (backbone, flow, model, train, export) do.
"""
