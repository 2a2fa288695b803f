"""Stage: training a slimmable supernet (sandwich rule, in-place distillation, DDP)."""
