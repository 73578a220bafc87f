"""The inference daemon: typed configuration, composition from it (``app``), the receive /
work / publish threads, the lens query socket and the Prometheus metrics."""
