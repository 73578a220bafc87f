"""nanoscout inference daemon: wire protocol, transport, engines, pipeline, measurement,
statistics, alerts, metrics and configuration.

Layers (checked by import-linter, see pyproject.toml): ``service`` never imports ``clients``
or torch; it reaches models only through files on disk (ONNX + model card JSON).
"""
