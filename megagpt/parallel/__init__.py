"""Process groups, parallel layers, collectives, pipeline schedules and data parallelism."""
