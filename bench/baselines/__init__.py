"""Baselines: the same relay chain served by something konbini did not write (HAProxy), on the same addresses."""
