"""Front ends that run several stages: the demo and held-out evaluation of searched configs
and exported models."""
