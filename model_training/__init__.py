"""Training and research, off the serving path: feature extraction and its cache, fitting the box
head, measuring, the model card, data sources (phantoms, manifests, Open-i), evaluation, plots,
augmentation and the default bundle. It writes the bundles models/ loads; models/ never imports it.

Named model_training, not training: sam2's sdist installs a top-level package called `training`
(tests/unit/test_import_graph.py checks that no first-party name is shadowed)."""
