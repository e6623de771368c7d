"""Strategy-agnostic training: optimizer and schedule, EMA, train step, loop, checkpoints."""
