"""The pipeline engine: schedules, stages, communication and the executor. It never imports Lightning."""
