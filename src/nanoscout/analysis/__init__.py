"""One frame's analysis, without sockets or threads: preprocessing, detection (engine +
instances + tiling), measurement, shape classes, rolling statistics, morphology clusters, alert
rules, field-of-view classification, model cards and the :class:`~nanoscout.analysis.pipeline.Pipeline`
that the daemon and the offline commands share."""
