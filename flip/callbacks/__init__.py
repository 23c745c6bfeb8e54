"""Lightning callbacks of training runs: ``preemption`` (save and stop on SIGTERM/SIGUSR1),
``training_time`` (time spent in training steps), ``progress`` (the step-counted progress
bar) and ``data_quality`` (skip counts, ``data.max_skip_rate``); chosen in
``conf/callbacks/``."""
